"""Prompt engineering, measured: formats, demonstrations, their accuracy and their cost.

The survey's claims (clear and specific prompts are better; context helps; a few
demonstrations let a model generalise) are tested on LabGPT's task suite
(``labkit.data``), with the price of each prompt counted in tokens and measured as time to
the first answer token (the prompt's prefill: every prompt token costs compute before the
model can say anything).
"""

from __future__ import annotations

import dataclasses
import random
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
    """Median over ``prompts`` of the prefill's median time (batch 1): the latency a user waits."""
    from .bench import measure

    device = next(model.parameters()).device
    times = []
    for prompt in prompts:
        idx = tokenizer.tensor(prompt, device=device)
        times.append(measure(lambda: model(idx)[:, -1].argmax(-1), warmup=1, repeat=repeat, device=device).median_s)
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


# ---------------------------------------------------------------------------------------
# Prompt tuning: a learned soft prompt, Prompt(x) = [P; x], on a frozen model.
# ---------------------------------------------------------------------------------------
class SoftPrompt(torch.nn.Module):
    """A frozen LabGPT with ``n_tokens`` learned embedding vectors P prepended to every input.

    Prompt tuning (Lester et al., 2021): the survey's ``Prompt(x) = x + P``, where "+" joins
    the learned prompt embeddings to the input's token embeddings (``inputs_embeds``). Only P
    trains: n_tokens x n_embd numbers. P starts as the embeddings of random vocabulary
    characters (better than noise) or, with ``init_text``, of a real prompt's characters.
    The model is frozen in place (``model.requires_grad_(False)``), not copied: to train it
    afterwards, ``model.requires_grad_(True)``.
    """

    def __init__(self, model, n_tokens: int | None = None, seed: int = 0, init_text: str | None = None) -> None:
        super().__init__()
        if init_text is not None:  # start from the embeddings of a real prompt (one vector per character)
            n_tokens = len(init_text) if n_tokens is None else n_tokens
        if not isinstance(n_tokens, int) or not 0 <= n_tokens < model.config.block_size:
            raise ValueError(f"n_tokens must be an int in 0..{model.config.block_size - 1}, got {n_tokens!r}")
        model.requires_grad_(False)  # every model weight frozen
        self.model, self.n_tokens = model, n_tokens
        wte = model.transformer.wte.weight
        ids = torch.randint(32, 127, (n_tokens,), generator=torch.Generator().manual_seed(seed))
        if init_text is not None:
            ids[: min(n_tokens, len(init_text))] = torch.tensor(CharTokenizer().encode(init_text[:n_tokens]))
        self.prompt = torch.nn.Parameter(wte.detach()[ids.to(wte.device)].clone())  # (n_tokens, C)
        # what callers (answer_correct, generate) see: the context left for real tokens
        self.config = dataclasses.replace(model.config, block_size=model.config.block_size - n_tokens)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.model.transformer.wte(idx)  # (B, T, C)
        P = self.prompt.unsqueeze(0).expand(idx.size(0), -1, -1)  # (B, n_tokens, C)
        logits = self.model(inputs_embeds=torch.cat([P, x], dim=1))  # (B, n_tokens + T, vocab)
        return logits[:, self.n_tokens :]  # predictions at the real tokens' positions

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def answer_batch(tokenizer: CharTokenizer, examples: list, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets to train on answers only: prompt positions and padding get target -1."""
    seqs = [(tokenizer.encode(e.prompt), tokenizer.encode(" " + e.answer + "\n")) for e in examples]
    width = max(len(p) + len(a) for p, a in seqs) - 1
    x = torch.full((len(seqs), width), tokenizer.newline_id, dtype=torch.long)
    y = torch.full((len(seqs), width), -1, dtype=torch.long)
    for row, (p, a) in enumerate(seqs):
        full = p + a
        x[row, : len(full) - 1] = torch.tensor(full[:-1])
        y[row, len(p) - 1 : len(full) - 1] = torch.tensor(a)  # predict the answer, nothing else
    return x.to(device), y.to(device)


def train_on_answers(
    module, examples: list, steps: int = 100, lr: float = 1e-2, batch_size: int = 16, seed: int = 0
) -> list[float]:
    """Train ``module``'s trainable parameters (a SoftPrompt, or a whole model) on the examples' answers."""
    if steps < 1 or batch_size < 1 or not examples:
        raise ValueError(f"steps and batch_size must be >= 1 and examples non-empty; got {steps}, {batch_size}")
    tokenizer = CharTokenizer()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("module has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    rng = random.Random(seed)
    losses = []
    module.train()
    for _ in range(steps):
        x, y = answer_batch(tokenizer, rng.sample(examples, min(batch_size, len(examples))), device)
        logits = module(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    return losses


def new_label_sentiment(n: int, seed: int, labels: tuple[str, str] = ("yay", "nay"), shots: int = 0) -> list:
    """A format LabGPT never saw: the specific sentiment prompt, answered with new label words.

    The instruction still says "positive or negative"; the answers are ``labels`` instead (a
    new label vocabulary). ``shots`` demonstrations show the new labels in the prompt.
    """
    if len(labels) != 2 or not all(labels):
        raise ValueError(f"labels must be two non-empty words (positive, negative), got {labels!r}")
    mapping = {"positive": labels[0], "negative": labels[1]}
    out = []
    for e in data.examples("sentiment", "specific", shots, n=n, seed=seed):
        prompt = e.prompt.replace("=> positive", f"=> {labels[0]}").replace("=> negative", f"=> {labels[1]}")
        out.append(data.Example("sentiment-new-labels", "specific", shots, prompt, mapping[e.answer]))
    return out


# ---------------------------------------------------------------------------------------
# Pattern-exploiting training: Verbalizer(Pattern(x)).
# ---------------------------------------------------------------------------------------
def verbalizer_scores(model, tokenizer: CharTokenizer, texts: list[str], pattern, verbalizer: dict) -> torch.Tensor:
    """(N, labels) log-probabilities of each label word after ``pattern(text) + " "`` (summed over its characters)."""
    if not verbalizer or any(not isinstance(w, str) or not w for w in verbalizer.values()):
        raise ValueError(
            "verbalizer must map each label to a non-empty word, e.g. {'pos': 'positive', 'neg': 'negative'}"
        )
    if not texts:
        raise ValueError("texts must not be empty")
    device = next(model.parameters()).device
    columns = []
    for word in verbalizer.values():
        exs = [data.Example("pet", "pattern", 0, pattern(t), word) for t in texts]
        x, y = answer_batch(tokenizer, exs, device)
        for row, e in enumerate(exs):  # score the word itself, not the newline after it
            end = len(tokenizer.encode(e.prompt)) + len(word)
            y[row, end:] = -1
        logp = torch.log_softmax(model(x).float(), dim=-1)  # (N, T, vocab)
        picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (y >= 0)
        columns.append(picked.sum(dim=1))
    return torch.stack(columns, dim=1)  # (N, n_labels)


@torch.no_grad()
def pet_classify(model, tokenizer: CharTokenizer, texts: list[str], pattern, verbalizer: dict) -> list:
    """Classify each text by the label whose verbalizer word the LM finds most likely after the pattern."""
    labels = list(verbalizer)
    best = verbalizer_scores(model, tokenizer, texts, pattern, verbalizer).argmax(dim=1)
    return [labels[i] for i in best.tolist()]


def _label_ids(gold: list, labels: list, name: str) -> list[int]:
    """Each gold label's index in ``labels``; a ValueError naming the labels that are not there."""
    missing = sorted({str(g) for g in gold if g not in labels})
    if missing:
        raise ValueError(f"gold labels {missing} are not among the {name}'s labels {list(labels)}")
    return [labels.index(g) for g in gold]


def pet_finetune(
    model, tokenizer, texts, gold, pattern, verbalizer: dict, steps: int = 30, lr: float = 1e-4
) -> list[float]:
    """PET training: cross-entropy over the verbalizer words' scores, on a few labelled examples (every weight that
    requires grad trains: all of them, unless some were frozen)."""
    labels = list(verbalizer)
    target = torch.tensor(_label_ids(gold, labels, "verbalizer"), device=next(model.parameters()).device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every weight of model is frozen: nothing to train (a SoftPrompt freezes the model it wraps; "
                         "model.requires_grad_(True) undoes it)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(
            verbalizer_scores(model, tokenizer, texts, pattern, verbalizer), target
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def last_token_features(model, tokenizer: CharTokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, C): the final-norm hidden state at each prompt's last token, from the frozen model."""
    device = next(model.parameters()).device
    feats = []
    for p in prompts:
        _, hidden = model(tokenizer.tensor(p, device=device), return_hidden=True)
        feats.append(model.transformer.ln_f(hidden[-1])[0, -1])
    return torch.stack(feats)


def train_classifier_head(features: torch.Tensor, gold: list, labels: list, steps: int = 200, lr: float = 1e-2):
    """A linear classifier (logistic regression) on frozen features: the fine-tuning baseline PET is compared to."""
    target = torch.tensor(_label_ids(gold, labels, "labels"), device=features.device)
    head = torch.nn.Linear(features.size(1), len(labels)).to(features.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head


def _register() -> None:
    from .bench import compare, register_suite

    @register_suite("prompting")
    def prompting_suite(quick: bool = False) -> list[dict]:
        """20 queries sharing an 8-shot prefix: full prompts every time vs a cached prefix (LabGPT tiny)."""
        from . import load_model

        model, tokenizer = load_model("tiny")
        shared = data.examples("capital", "specific", 8, n=1, seed=11)[0].prompt.rsplit("\n", 1)[0] + "\n"
        queries = [f"{country} =>" for country, _ in data.words()["countries"][: 5 if quick else 20]]
        cache = PrefixCache(model, tokenizer, shared)
        with torch.no_grad():
            return compare(
                {
                    "full prompt every time": lambda: [model(tokenizer.tensor(shared + q)) for q in queries],
                    "cached prefix": lambda: [cache.logits(q) for q in queries],
                },
                warmup=1,
                repeat=3,
                suite="prompting",
            )


_register()
