"""Prompt engineering, measured: formats, demonstrations, their accuracy and their cost.

The survey's claims (clear and specific prompts are better; context helps; a few
demonstrations let a model generalise) are tested on LabGPT's task suite
(``labkit.data``), with the price of each prompt counted in tokens and measured as time to
the first answer token (the prompt's prefill: every prompt token costs compute before the
model can say anything).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import data
from .evaluation import answer_correct, confidence_interval
from .tokenizer import CharTokenizer


@dataclass
class PromptScore:
    """Accuracy (with a 95% Wilson interval), prompt length and time to first token of one prompt set."""

    task: str
    fmt: str
    shots: int
    n: int
    accuracy: float
    low: float
    high: float
    tokens: float  # mean prompt length in tokens
    ttft_s: float | None  # median time to the first answer token (prefill), if measured

    def __str__(self) -> str:
        t = f", {1e3 * self.ttft_s:.1f} ms to first token" if self.ttft_s is not None else ""
        return (
            f"{self.task:<10} {self.fmt:<10} {self.shots}-shot: {100 * self.accuracy:5.1f}% "
            f"[{100 * self.low:.0f}-{100 * self.high:.0f}], {self.tokens:.0f} tokens{t}"
        )


def max_shots_that_fit(model, task: str, fmt: str, seed: int = 1234, n: int = 50) -> int:
    """How many demonstrations fit in the model's context for ``task`` in ``fmt`` (checked on n prompts)."""
    tok = CharTokenizer()
    for shots in range(data.MAX_SHOTS, -1, -1):
        exs = data.examples(task, fmt, shots, n=n, seed=seed)
        if max(len(tok.encode(e.text)) for e in exs) <= model.config.block_size:
            return shots
    return -1


def _check_fits(model, task: str, fmt: str, shots: int, exs) -> None:
    tok = CharTokenizer()
    longest = max(len(tok.encode(e.text)) for e in exs)
    if longest > model.config.block_size:
        fit = max_shots_that_fit(model, task, fmt)
        raise ValueError(
            f"{shots} demonstrations do not fit: a {task}/{fmt} prompt with its answer reaches {longest} tokens and "
            f"the context holds {model.config.block_size}; at most {fit} demonstrations fit"
        )


@torch.no_grad()
def time_to_first_token(model, tokenizer: CharTokenizer, prompts: list[str], repeat: int = 3) -> float:
    """Median time of the prefill forward pass (batch 1) over ``prompts``: the latency a user waits."""
    device = next(model.parameters()).device
    times = []
    for prompt in prompts:
        idx = tokenizer.tensor(prompt, device=device)
        model(idx)  # warm-up for this length
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(idx)[:, -1].argmax(-1).item()  # .item() waits for the result
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def score(
    model,
    tokenizer: CharTokenizer,
    task: str,
    fmt: str = "specific",
    shots: int = 0,
    n: int = 100,
    seed: int = 1234,
    latency_prompts: int = 0,
) -> PromptScore:
    """Accuracy, interval, tokens and (if ``latency_prompts`` > 0) time to first token of a prompt format."""
    exs = data.examples(task, fmt, shots, n=n, seed=seed)
    _check_fits(model, task, fmt, shots, exs)
    was_training = model.training
    model.eval()
    correct = answer_correct(model, tokenizer, exs)
    model.train(was_training)
    accuracy = sum(correct) / n
    low, high = confidence_interval(accuracy, n)
    tokens = sum(len(tokenizer.encode(e.prompt)) for e in exs) / n
    ttft = time_to_first_token(model, tokenizer, [e.prompt for e in exs[:latency_prompts]]) if latency_prompts else None
    return PromptScore(task, fmt, shots, n, accuracy, low, high, tokens, ttft)


def query_pairs(task: str, n: int = 100, seed: int = 4321) -> list[tuple[str, str, str | None]]:
    """``n`` (input, answer, operation) triples of ``task``, for prompts you write yourself.

    Inputs are as in the specific format (arithmetic shows its operator); ``operation`` names
    the arithmetic or string operation (None for the other tasks).
    """
    if task not in data.TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(data.TASKS)}")
    rng = random.Random(f"{seed}-{task}-pairs")
    out = []
    for _ in range(n):
        op = {"arithmetic": rng.choice(data.ARITHMETIC_OPS), "string": rng.choice(data.STRING_OPS)}.get(task)
        x, y = data._item(task, op, "specific", rng, "positive")
        out.append((x, y, op))
    return out


def template_accuracy(
    model,
    tokenizer: CharTokenizer,
    task: str,
    template: Callable[[str, str | None], str],
    n: int = 100,
    seed: int = 4321,
) -> float:
    """Accuracy of your own prompt: ``template(input, operation) -> prompt``; the answer follows it after a space."""
    pairs = query_pairs(task, n, seed)
    exs = [data.Example(task, "custom", 0, template(x, op), y) for x, y, op in pairs]
    if any(not isinstance(e.prompt, str) or not e.prompt for e in exs):
        raise ValueError("template must return a non-empty prompt string")
    return sum(answer_correct(model, tokenizer, exs)) / n


class PrefixCache:
    """Run a shared prompt prefix (instructions, demonstrations) once; reuse its KV cache for every query.

    Each query then costs only its own tokens. The cached keys and values are copied per
    query (a query must not overwrite the shared prefix), which costs memory bandwidth but
    no compute.
    """

    def __init__(self, model, tokenizer: CharTokenizer, prefix: str) -> None:
        self.model, self.tokenizer = model, tokenizer
        device = next(model.parameters()).device
        self.prefix_ids = tokenizer.tensor(prefix, device=device)
        self.cache = model.new_cache(1)
        with torch.no_grad():
            self.prefix_logits = model(self.prefix_ids, cache=self.cache)
        self.length = self.cache.pos

    @torch.no_grad()
    def logits(self, suffix: str) -> torch.Tensor:
        """Logits for ``suffix``'s positions, as if ``prefix + suffix`` had been run in one pass."""
        device = self.prefix_ids.device
        ids = self.tokenizer.tensor(suffix, device=device)
        if self.length + ids.size(1) > self.model.config.block_size:
            raise ValueError(
                f"prefix ({self.length}) + suffix ({ids.size(1)}) tokens exceed the context of "
                f"{self.model.config.block_size}"
            )
        cache = self.model.new_cache(1)
        for layer in range(len(cache.k)):  # copy only the filled part of the shared prefix
            cache.k[layer][:, :, : self.length] = self.cache.k[layer][:, :, : self.length]
            cache.v[layer][:, :, : self.length] = self.cache.v[layer][:, :, : self.length]
        cache.pos = self.length
        return self.model(ids, cache=cache)
