"""Scoring LabGPT on the task suite: exact-match accuracy of greedy answers.

A prompt is answered correctly when greedy decoding writes exactly `` <answer>\\n``.
Greedy decoding is deterministic, so it writes that text if and only if, at every
position of the answer, the argmax of the model's logits is the answer's next character.
That lets one batched forward pass over ``prompt + answer`` score a whole batch of
prompts (right padding is harmless under a causal mask), instead of a generation loop
per prompt. ``method="generate"`` runs the real loop; the tests check both agree.
"""

from __future__ import annotations

import math

import torch

from . import data
from ._args import check_int
from .tokenizer import CharTokenizer


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _check_batch_size(batch_size) -> None:
    check_int("batch_size", batch_size)


@torch.no_grad()
def answer_correct(model, tokenizer: CharTokenizer, examples: list, batch_size: int = 32) -> list[bool]:
    """For each example: would greedy decoding write exactly its answer and a newline?"""
    device = _device_of(model)
    out: list[bool] = []
    _check_batch_size(batch_size)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [tokenizer.encode(e.prompt) for e in chunk]
        answers = [tokenizer.encode(" " + e.answer + "\n") for e in chunk]
        lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
        block = model.config.block_size
        if max(lengths) > block:
            raise ValueError(f"a prompt with its answer is {max(lengths)} tokens; the context (block_size) is {block}")
        width = max(lengths) - 1
        idx = torch.full((len(chunk), width), tokenizer.newline_id, dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            seq = (p + a)[:-1]
            idx[row, : len(seq)] = torch.tensor(seq)
        predicted = model(idx.to(device)).argmax(dim=-1).cpu()  # (B, width)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            start = len(p) - 1  # logits at the last prompt token predict the first answer token
            out.append(predicted[row, start : start + len(a)].tolist() == a)
    return out


@torch.no_grad()
def greedy_completion(model, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The raw text greedy decoding writes after ``prompt`` (stops after a newline)."""
    idx = tokenizer.tensor(prompt, device=_device_of(model))
    room = model.config.block_size - idx.size(1)
    if room < 1:
        raise ValueError(f"prompt is {idx.size(1)} tokens; the context (block_size) is {model.config.block_size}")
    out = model.generate(idx, min(max_new_tokens, room), temperature=0, stop_token=tokenizer.newline_id)
    return tokenizer.decode(out[0, idx.size(1) :])


def generate_answer(model, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy answer to one prompt, up to the newline, stripped (what a user reads)."""
    return greedy_completion(model, tokenizer, prompt, max_new_tokens).split("\n")[0].strip()


def evaluate(
    model,
    tokenizer: CharTokenizer,
    task: str,
    fmt: str = "specific",
    shots: int = 0,
    n: int = 200,
    seed: int = 1234,
    method: str = "forced",
) -> float:
    """Accuracy (0..1) of greedy answers on ``n`` seeded prompts of ``task`` in format ``fmt``.

    ``method="forced"`` scores with one batched forward pass (exactly equivalent, fast);
    ``method="generate"`` decodes each answer token by token (slow, what serving does).
    """
    if method not in ("forced", "generate"):
        raise ValueError(f"method must be 'forced' or 'generate', got {method!r}")
    was_training = model.training
    model.eval()
    try:
        exs = data.examples(task, fmt, shots, n=n, seed=seed)
        if method == "forced":
            correct = answer_correct(model, tokenizer, exs)
        else:
            correct = [
                greedy_completion(model, tokenizer, e.prompt, len(e.answer) + 2) == f" {e.answer}\n" for e in exs
            ]
    finally:
        model.train(was_training)
    return sum(correct) / len(correct)


def confidence_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (better than +-1.96*se near 0 and 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_grid(
    model, tokenizer, tasks=None, formats=None, shots=(0, 1, 4, 8), n: int = 200, seed: int = 1234
) -> dict:
    """{task: {fmt: {shots: accuracy}}} over the task suite (the model card's table)."""
    grid: dict = {}
    for task in tasks or data.tasks():
        grid[task] = {}
        for fmt in formats or data.FORMATS:
            grid[task][fmt] = {k: evaluate(model, tokenizer, task, fmt, k, n=n, seed=seed) for k in shots}
    return grid


@torch.no_grad()
def perplexity(model, tokenizer: CharTokenizer, text: str, batch_size: int = 8) -> float:
    """exp(mean next-character cross-entropy) over ``text`` cut into context-sized windows."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    T = model.config.block_size
    n_windows = (len(ids) - 1) // T
    if n_windows < 1:
        raise ValueError(f"text must be longer than the context ({T + 1} characters at least)")
    x = ids[: n_windows * T].view(n_windows, T)
    y = ids[1 : n_windows * T + 1].view(n_windows, T)
    was_training = model.training
    model.eval()
    total = 0.0
    device = _device_of(model)
    _check_batch_size(batch_size)
    for i in range(0, n_windows, batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        total += model.loss(xb, yb).item() * xb.size(0)
    model.train(was_training)
    return math.exp(total / n_windows)
