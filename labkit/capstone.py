"""The capstone: stack the kit's techniques on LabGPT and measure what each step buys.

The stack, in the order its steps can be applied::

    tiny (teacher) → distill → prune → quantize → early exit → speculate

* **distill**: serve the distilled student (``student-distilled``, notebook 10) instead of
  the teacher: half the layers.
* **prune**: remove MLP neurons, attention heads or single weights (notebook 07), then
  optionally fine-tune a few steps to recover.
* **quantize**: int8 or int4 weights, or W8A8 (notebook 08).
* **early exit**: a token leaves the stack at the first layer whose exit head is confident,
  ``max(p_k) ≥ τ`` (notebook 11).
* **speculate**: the last step turns the stack around. The *teacher* serves every token, and
  the compressed model built so far (with its exits) becomes the *draft* that guesses ``k``
  tokens for the teacher to verify in one pass (notebook 16). The output is the teacher's own
  greedy output, token for token: quality comes back to the teacher's, and the question is
  only whether the compressed draft makes the teacher faster.

Each step is applied to the result of the one before; the order is fixed because each step
needs what the previous one leaves (pruning ranks float weights, so it comes before
quantization; a draft must exist before speculation). Speedups multiply only when the steps
remove *different* costs: if pruning halves the matmuls but matmuls are a fraction ``f`` of
the time, latency falls to ``(1 − f) + f/2`` of what it was (Amdahl), and ``profile`` shows
what ``f`` is on this machine.

Also here: the Pareto front of the stacks (``pareto_front``), a small neural-architecture
search over LabGPT shapes under a latency budget measured on this machine (``search``), and
an export of the compressed model with ``torch.export`` for deployment (``export_decoder``).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import DATA_DIR, data, early_exit, evaluation, prune, quant, serving, train
from ._args import check_int
from .bench import measure, native_stderr_silenced
from .model import GPTConfig, KVCache, LabGPT
from .tokenizer import CharTokenizer

STEPS = ("distill", "prune", "quantize", "early_exit", "speculate")


# ---------------------------------------------------------------------------------------
# Early exit as a model: every position decoded with exits, usable wherever a LabGPT is
# ---------------------------------------------------------------------------------------
class EarlyExitLM(nn.Module):
    """A LabGPT that runs each position alone through its blocks and leaves at the first confident exit.

    It has the calls speculative decoding and ``evaluation.perplexity`` use (``config``,
    ``new_cache``, ``forward(idx, cache=...)``, ``loss``), so an early-exit model can be a
    draft, and its perplexity is that of the exit policy itself: position t's logits come
    from the layer it exited at, with the skipped layers' keys and values copied forward
    from the exit state (``early_exit._fill_skipped``), exactly as when it generates.
    ``threshold=1`` never exits: the logits are then the model's own.
    """

    def __init__(self, model: LabGPT, heads: early_exit.ExitHeads, threshold: float) -> None:
        super().__init__()
        _check_threshold(threshold)
        self.model, self.heads, self.threshold = model, heads, float(threshold)
        self.config = model.config
        self.layers_used: list[int] = []  # layers each position used, appended as it runs

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return self.model.new_cache(batch_size)

    def _position(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (1, vocab) for one token (1, 1) at position cache.pos; the cache grows by one."""
        model, start, last = self.model, cache.pos, self.config.n_layer - 1
        x = model.transformer.wte(token) + model.transformer.wpe(torch.tensor([start], device=token.device))
        for layer, block in enumerate(model.transformer.h):
            x = block(x, cache, layer, start)  # (1, 1, C)
            logits = self.heads.logits(model, x[:, -1], layer) if layer == last or self.threshold < 1 else None
            if layer < last and logits is not None and F.softmax(logits.float(), dim=-1).max() >= self.threshold:
                early_exit._fill_skipped(model, cache, x, layer + 1, start)
                break
        self.layers_used.append(layer + 1)
        cache.pos = start + 1
        return logits

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) to logits (B, T, vocab), one position at a time (B = 1 with a cache)."""
        if cache is None:  # each row is its own sequence with its own cache
            return torch.cat([self(row[None], cache=self.new_cache(1)) for row in idx])
        if idx.size(0) != 1:
            raise ValueError(f"with a cache, idx must be one sequence (1, T); got {tuple(idx.shape)}")
        if cache.pos + idx.size(1) > self.config.block_size:
            raise ValueError(
                f"sequence of {cache.pos + idx.size(1)} tokens exceeds block_size {self.config.block_size}"
            )
        return torch.stack([self._position(idx[:, t : t + 1], cache) for t in range(idx.size(1))], dim=1)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def _check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold τ must be a number in (0, 1] (1 never exits), got {threshold!r}")


_check_int = check_int


def _check_steps(steps: Sequence[str]) -> tuple[str, ...]:
    steps = tuple(steps)
    for s in steps:
        if s not in STEPS:
            raise ValueError(f"steps must be drawn from {list(STEPS)}, got {s!r}")
    if list(steps) != sorted(set(steps), key=STEPS.index):
        raise ValueError(f"steps must be distinct and in the order {' → '.join(STEPS)}, got {list(steps)}")
    return steps


# ---------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------
@dataclass
class Stack:
    """What serves tokens after some steps: a model, maybe exit heads, maybe a teacher it drafts for.

    ``model`` decodes alone, or (when ``target`` is set) drafts ``k`` tokens per round for the
    target to verify. ``record`` says how each step was applied.
    """

    name: str
    steps: tuple[str, ...]
    model: LabGPT
    heads: early_exit.ExitHeads | None = None
    threshold: float = 1.0
    target: LabGPT | None = None
    k: int = 4
    record: dict = field(default_factory=dict)

    @property
    def decoder(self) -> nn.Module:
        """The model that writes (or drafts) tokens: with exit heads, an ``EarlyExitLM``."""
        return EarlyExitLM(self.model, self.heads, self.threshold) if self.heads is not None else self.model

    @property
    def batched(self) -> bool:
        """Early exit and speculation decide per sequence: they decode one sequence at a time."""
        return self.heads is None and self.target is None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, stop_token: int | None = None) -> torch.Tensor:
        """Greedy decoding (B, T) → (B, T + new), with the KV cache, by whatever this stack serves with; with
        ``stop_token``, the output ends at the first one it writes (as ``LabGPT.generate``'s)."""
        if self.target is not None:  # the teacher's tokens, drafted by the compressed model
            out = serving.speculative_generate(self.target, self.decoder, idx, max_new_tokens, self.k)
            stops = (out[0, idx.size(1):] == stop_token).nonzero() if stop_token is not None else []
            return out[:, : idx.size(1) + int(stops[0, 0]) + 1] if len(stops) else out
        if self.heads is not None:
            return early_exit.generate(self.model, self.heads, idx, max_new_tokens, self.threshold, stop_token)[0]
        return self.model.generate(idx, max_new_tokens, temperature=0, stop_token=stop_token)

    def weight_bytes(self) -> int:
        """Bytes of every weight this stack must hold: the model, its exit heads, and the teacher if speculating."""
        parts = [self.model] + [m for m in (self.heads, self.target) if m is not None]
        return sum(quant.weight_bytes(m) for m in parts)

    def perplexity(self, tokenizer: CharTokenizer, text: str) -> float:
        """Per-character perplexity of what this stack serves on ``text`` (speculation serves the teacher's)."""
        return evaluation.perplexity(self.target if self.target is not None else self.decoder, tokenizer, text)

    def accuracy(self, tokenizer: CharTokenizer, n: int = 20, fmt: str = "specific", shots: int = 0) -> float:
        """Mean exact-match accuracy over the five tasks, greedy answers written the way this stack writes them."""
        if self.batched:  # one teacher-forced pass, exactly equivalent for greedy decoding (evaluation.py)
            scores = [evaluation.evaluate(self.model, tokenizer, t, fmt, shots, n=n) for t in data.tasks()]
            return sum(scores) / len(scores)
        correct = total = 0
        for task in data.tasks():
            for ex in data.examples(task, fmt, shots, n=n):
                idx = tokenizer.tensor(ex.prompt, device=self.model.transformer.wte.weight.device)
                out = self.generate(idx, len(ex.answer) + 2, stop_token=tokenizer.newline_id)
                correct += tokenizer.decode(out[0, idx.size(1) :].tolist()) == f" {ex.answer}\n"
                total += 1
        return correct / total


def _load(model: LabGPT | str) -> tuple[LabGPT, str | None]:
    if isinstance(model, str):
        from . import load_model

        return load_model(model)[0], model
    if not isinstance(model, LabGPT):
        raise ValueError(f"a model must be a LabGPT or the name of a shipped checkpoint, got {type(model).__name__}")
    return model, None


def shipped_exit_heads(model: LabGPT, name: str) -> early_exit.ExitHeads:
    """The exit heads trained for the shipped checkpoint ``name`` (data/exit_heads/<name>.safetensors)."""
    path = DATA_DIR / "exit_heads" / f"{name}.safetensors"
    if not path.is_file():
        shipped = sorted(p.stem for p in (DATA_DIR / "exit_heads").glob("*.safetensors"))
        raise ValueError(f"no exit heads ship for {name!r} (shipped: {shipped}); train them with "
                         f"tools/train_exit_heads.py --model {name}, or pass exit_heads=")  # fmt: skip
    return early_exit.load_exit_heads(model, path)


def plain_linears(model: nn.Module) -> nn.Module:
    """Turn every pruning ``MaskedLinear`` into an ``nn.Linear`` holding the same zeros, in place.

    For inference the mask is redundant (the weight already holds its zeros), and the
    quantizers swap ``nn.Linear`` modules only.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, prune.MaskedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear = linear.to(module.weight.device, module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight * module.mask)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def build_stack(
    steps: Sequence[str] = STEPS,
    *,
    teacher: LabGPT | str = "tiny",
    student: LabGPT | str = "student-distilled",
    sparsity: float = 0.25,
    structure: str = "neurons",
    recover_steps: int = 30,
    scheme: str = "int8_weight_only",
    threshold: float = 0.95,
    exit_heads: early_exit.ExitHeads | None = None,
    k: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> list[Stack]:
    """The teacher, then one ``Stack`` after each step of ``steps`` (a sub-sequence of ``STEPS``, in order).

    ``sparsity`` and ``structure`` go to ``prune.prune_model`` (then ``recover_steps`` of
    ``train.finetune``, 0 for none); ``scheme`` to ``quant.quantize_model``; ``threshold`` τ
    is the early-exit confidence, with the exit heads shipped for the student (or
    ``exit_heads``); ``k`` is the draft length when speculating. ``teacher`` and ``student``
    are shipped names or LabGPT models. The models passed in are never modified.
    """
    steps = _check_steps(steps)
    prune._check_sparsity(sparsity)
    prune._check_choice("structure", structure, prune.STRUCTURES)
    if structure == "2:4" and sparsity != 0.5:
        raise ValueError(f"sparsity must be 0.5 for structure '2:4' (2 of every 4 weights are zero), got {sparsity!r}")
    _check_int("recover_steps", recover_steps, 0)
    prune._check_choice("scheme", scheme, quant.SCHEMES)
    _check_threshold(threshold)
    _check_int("k", k, 1)
    teacher_model, teacher_name = _load(teacher)
    stacks = [Stack(f"{teacher_name or 'teacher'} (teacher)", (), teacher_model, record={"base": teacher_name})]
    model, name = teacher_model, teacher_name
    heads = None
    for step in steps:
        record = dict(stacks[-1].record)
        if step == "distill":
            model, name = _load(student)
            record["base"] = name
        elif step == "prune":
            torch.manual_seed(seed)
            model = prune.prune_model(model, sparsity, structure)
            if recover_steps:
                train.finetune(model, steps=recover_steps, seed=seed + 1, progress=progress)
            model = plain_linears(model).eval()
            record.update(sparsity=sparsity, structure=structure, recover_steps=recover_steps)
        elif step == "quantize":
            model = quant.quantize_model(copy.deepcopy(model), scheme).eval()
            record["scheme"] = scheme
        elif step == "early_exit":
            heads = exit_heads if exit_heads is not None else shipped_exit_heads(model, name or "")
            record["threshold"] = threshold
        else:
            record["k"] = k
        target = teacher_model if step == "speculate" else None
        stacks.append(Stack(f"+ {step.replace('_', ' ')}", steps[: steps.index(step) + 1], model, heads,
                            threshold if heads is not None else 1.0, target, k, record))  # fmt: skip
    return stacks


# ---------------------------------------------------------------------------------------
# Measuring a stack: speed, memory, quality
# ---------------------------------------------------------------------------------------
def measure_stack(
    stacks: Sequence[Stack],
    tokenizer: CharTokenizer,
    *,
    text: str | None = None,
    n_per_task: int = 20,
    prompt: str = "Once upon a time",
    new_tokens: int = 64,
    batch_size: int = 8,
    repeat: int = 3,
    timing: bool = True,
    quality: bool = True,
    progress: bool = True,
) -> list[dict]:
    """One row per stack: latency, throughput, weight memory and quality, measured in this run.

    * ``latency_ms``: milliseconds per generated token, greedy with the KV cache, batch 1
      (median of ``repeat`` runs of ``new_tokens`` tokens after ``prompt``, via ``bench.measure``).
    * ``tokens_per_s``: generated tokens per second at ``batch_size`` sequences at once; a
      stack that decodes one sequence at a time (early exit, speculation) serves them in turn,
      so its throughput is its batch-1 rate (``batch`` says which).
    * ``weight_mb``: megabytes of weights held (``Stack.weight_bytes``).
    * ``perplexity`` on ``text`` (default: 2,048 characters of held-out text) and
      ``accuracy``: mean exact match over the five tasks, ``n_per_task`` specific prompts each.
    * ``speedup``: latency of the first stack / this one; ``step_speedup``: of the previous one / this one.
    """
    if not stacks:
        raise ValueError("stacks must hold at least one Stack")
    _check_int("n_per_task", n_per_task, 1)
    _check_int("new_tokens", new_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("repeat", repeat, 1)
    text = text if text is not None else train.validation_text(4 * 512 + 1)
    rows = []
    for stack in tqdm(stacks, desc="measuring", disable=not progress, mininterval=1.0):
        row = {"name": stack.name, "steps": stack.steps, "weight_mb": stack.weight_bytes() / 1e6}
        if timing:
            device = stack.model.transformer.wte.weight.device
            idx = tokenizer.tensor(prompt, device=device)
            with torch.no_grad():
                one = measure(lambda: stack.generate(idx, new_tokens), warmup=1, repeat=repeat, device=device)
                row["latency_ms"] = 1e3 * one.median_s / new_tokens
                if stack.batched:
                    many = idx.repeat(batch_size, 1)
                    m = measure(lambda: stack.generate(many, new_tokens), warmup=1, repeat=repeat, device=device)
                    row.update(tokens_per_s=batch_size * new_tokens / m.median_s, batch=batch_size)
                else:
                    row.update(tokens_per_s=1e3 / row["latency_ms"], batch=1)
        if quality:
            row["perplexity"] = stack.perplexity(tokenizer, text)
            row["accuracy"] = stack.accuracy(tokenizer, n=n_per_task)
        rows.append(row)
    if timing:
        for i, row in enumerate(rows):
            row["speedup"] = rows[0]["latency_ms"] / row["latency_ms"]
            row["step_speedup"] = rows[max(0, i - 1)]["latency_ms"] / row["latency_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows of ``measure_stack`` as an aligned table (columns it lacks are left out)."""
    columns = [
        ("latency_ms", "ms/token", "{:.2f}"),
        ("step_speedup", "vs prev", "{:.2f}x"),
        ("speedup", "vs teacher", "{:.2f}x"),
        ("tokens_per_s", "tokens/s", "{:.0f}"),
        ("batch", "batch", "{}"),
        ("weight_mb", "weights MB", "{:.2f}"),
        ("perplexity", "perplexity", "{:.3f}"),
        ("accuracy", "accuracy", "{:.0%}"),
    ]
    columns = [c for c in columns if all(c[0] in r for r in rows)]
    width = max(len(r["name"]) for r in rows)
    print(f"{'step':<{width}}" + "".join(f"  {title:>10}" for _, title, _ in columns))
    for r in rows:
        print(f"{r['name']:<{width}}" + "".join(f"  {fmt.format(r[key]):>10}" for key, _, fmt in columns))


# ---------------------------------------------------------------------------------------
# The Pareto front
# ---------------------------------------------------------------------------------------
def _check_objectives(objectives: dict[str, str]) -> None:
    if not objectives:
        raise ValueError("objectives must name at least one key, e.g. {'latency_ms': 'min'}")
    for key, sense in objectives.items():
        if sense not in ("min", "max"):
            raise ValueError(f"objectives[{key!r}] must be 'min' or 'max', got {sense!r}")


def dominates(a: dict, b: dict, objectives: dict[str, str]) -> bool:
    """a dominates b: at least as good on every objective, and strictly better on one."""
    _check_objectives(objectives)
    sign = {"min": 1, "max": -1}
    at_least = all(sign[s] * a[key] <= sign[s] * b[key] for key, s in objectives.items())
    better = any(sign[s] * a[key] < sign[s] * b[key] for key, s in objectives.items())
    return at_least and better


def pareto_front(rows: Sequence[dict], objectives: dict[str, str]) -> list[dict]:
    """The rows no other row dominates, in their order (``objectives``: key → 'min' or 'max').

    Equal rows do not dominate each other: both stay. O(n²) comparisons, fine for tens of rows.
    """
    _check_objectives(objectives)
    for r in rows:
        missing = [key for key in objectives if key not in r]
        if missing:
            raise ValueError(f"row {r.get('name', r)} lacks the objective(s) {missing}")
    return [r for r in rows if not any(dominates(other, r, objectives) for other in rows if other is not r)]


# ---------------------------------------------------------------------------------------
# Where the time goes: torch.profiler, grouped
# ---------------------------------------------------------------------------------------
OP_GROUPS = {
    "matmul": ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_int_mm", "addmv", "mv", "dot"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "softmax",
                  "_softmax", "_safe_softmax"),
    "layer norm": ("layer_norm", "native_layer_norm"),
    "elementwise": ("add", "add_", "mul", "mul_", "div", "sub", "gelu", "tanh", "round", "round_", "clamp",
                    "reciprocal", "maximum", "amax", "amin", "max", "argmax", "exp", "pow", "where", "rsub", "ge",
                    "eq", "sum", "mean", "masked_fill"),
}  # fmt: skip
OUTSIDE = "outside torch ops (Python, modules, dispatch)"


def op_group(op: str) -> str:
    """The group of an aten op name ('aten::addmm' → 'matmul'); copies, views and allocations are 'memory'."""
    name = op.removeprefix("aten::")
    for group, names in OP_GROUPS.items():
        if name in names:
            return group
    return "memory & other"


def profile(fn: Callable[[], object], top: int = 10, warmup: int = 1) -> dict:
    """Run ``fn()`` once under ``torch.profiler`` (CPU) and say where the wall time went.

    Returns ``{"wall_ms", "op_ms", "ops", "groups"}``: ``ops`` are the ``top`` aten ops by self
    time (``op``, ``group``, ``calls``, ``self_ms``, ``share`` of the wall time); ``groups`` sum
    the self time of *every* op by group, plus a row for the time spent outside any op (the
    Python interpreter running modules, argument checks, dispatch), so group shares sum to 1.
    Self time counts an op's own time without its children's, so nothing is counted twice.
    """
    if not callable(fn):
        raise ValueError("fn must be a callable taking no arguments (wrap it in a lambda)")
    _check_int("top", top, 1)
    _check_int("warmup", warmup, 0)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(warmup):
        fn()
    with native_stderr_silenced(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall_ms = 1e3 * (time.perf_counter() - t0)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    op_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    wall_ms = max(wall_ms, op_ms)  # the profiler's clock and ours can differ by a few microseconds
    ops = sorted(
        ({"op": e.key, "group": op_group(e.key), "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events),
        key=lambda r: -r["self_ms"],
    )  # fmt: skip
    totals: dict[str, float] = {}
    for r in ops:
        r["share"] = r["self_ms"] / wall_ms
        totals[r["group"]] = totals.get(r["group"], 0.0) + r["self_ms"]
    totals[OUTSIDE] = wall_ms - op_ms
    groups = sorted(({"group": g, "self_ms": ms, "share": ms / wall_ms} for g, ms in totals.items()),
                    key=lambda r: -r["self_ms"])  # fmt: skip
    return {"wall_ms": wall_ms, "op_ms": op_ms, "ops": ops[:top], "groups": groups}


# ---------------------------------------------------------------------------------------
# A small neural-architecture search under a latency budget
# ---------------------------------------------------------------------------------------
SEARCH_SPACE = {"n_layer": (1, 2, 3, 4), "n_head": (2, 4, 6), "n_embd": (48, 96, 144, 192)}


def _check_space(space: dict) -> None:
    allowed = ("n_layer", "n_head", "n_embd")
    if not space:
        raise ValueError(f"space must map some of {allowed} to tuples of values")
    for key, values in space.items():
        if key not in allowed:
            raise ValueError(f"space keys must be among {allowed}, got {key!r}")
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"space[{key!r}] must be a non-empty tuple of ints >= 1, got {values!r}")
    if not any(_valid(dict(zip(space, combo))) for combo in _combos(space)):
        raise ValueError("space has no valid configuration (n_embd must be divisible by n_head)")


def _combos(space: dict) -> list[tuple]:
    combos = [()]
    for values in space.values():
        combos = [c + (v,) for c in combos for v in values]
    return combos


def _valid(choice: dict) -> bool:
    n_head = choice.get("n_head", GPTConfig.n_head)
    return choice.get("n_embd", GPTConfig.n_embd) % n_head == 0


def candidate_config(choice: dict, block_size: int = 128) -> GPTConfig:
    """The LabGPT shape of a search candidate: the ``tiny`` config with the chosen fields, and a
    ``block_size`` context (short, so that a few training steps reach every position)."""
    return GPTConfig(**{**choice, "block_size": block_size})


def decode_latency(config: GPTConfig, new_tokens: int = 32, repeat: int = 3) -> float:
    """Seconds per token of greedy decoding (batch 1, KV cache) for a model of this shape, on this machine.

    The weights are random: the cost of a forward pass does not depend on their values.
    """
    _check_int("new_tokens", new_tokens)
    if 16 + new_tokens > config.block_size:
        raise ValueError(f"a 16-token prompt + new_tokens ({new_tokens}) must fit the context (block_size "
                         f"{config.block_size}): new_tokens <= {config.block_size - 16}")
    torch.manual_seed(0)
    return serving.generation_time(LabGPT(config).eval(), 16, new_tokens, True, repeat) / new_tokens


def train_and_score(config: GPTConfig, steps: int = 40, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                    text: str | None = None) -> float:  # fmt: skip
    """Train a fresh model of this shape for ``steps`` on windows of its context (``train.finetune``
    at a from-scratch learning rate); return its perplexity on held-out ``text`` (default: 4,096
    characters), scored in windows of the same context."""
    torch.manual_seed(seed)
    model = LabGPT(config)
    train.finetune(model, steps, batch_size, config.block_size, lr, seed, corpus_chars=400_000, progress=False)
    return evaluation.perplexity(model, CharTokenizer(), text or train.validation_text(8 * 512 + 1))


def _mutate(choice: dict, space: dict, rng: random.Random) -> dict:
    """Move one field to another of its allowed values (a field with one value stays)."""
    options = [key for key in space if len(space[key]) > 1]
    if not options:
        return dict(choice)
    key = rng.choice(options)
    return {**choice, key: rng.choice([v for v in space[key] if v != choice[key]])}


def search(
    budget_s: float,
    *,
    space: dict | None = None,
    method: str = "evolution",
    population: int = 4,
    generations: int = 2,
    latency_fn: Callable[[GPTConfig], float] | None = None,
    score_fn: Callable[[GPTConfig], float] | None = None,
    block_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Search LabGPT shapes for the lowest perplexity whose decode latency fits ``budget_s`` s/token.

    Each candidate's latency is measured first (``latency_fn``, default ``decode_latency``); a
    candidate over the budget is rejected *without training*. The others are trained briefly
    and scored (``score_fn``, default ``train_and_score``: perplexity, lower is better).
    ``method="random"`` draws ``population × generations`` distinct shapes; ``"evolution"``
    draws ``population``, then each generation mutates the better half of the accepted
    candidates (one field moved to another value). Returns ``{"best": row or None, "history":
    rows}``, each row the choice with ``latency_ms``, ``accepted``, ``perplexity`` (None if
    rejected) and ``generation``. Every candidate has a ``block_size`` context.
    """
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"budget_s (seconds per token) must be a number > 0, got {budget_s!r}")
    space = dict(space if space is not None else SEARCH_SPACE)
    _check_space(space)
    if method not in ("random", "evolution"):
        raise ValueError(f"method must be 'random' or 'evolution', got {method!r}")
    _check_int("population", population, 1)
    _check_int("generations", generations, 1)
    _check_int("block_size", block_size, 2)
    latency_fn = latency_fn or decode_latency
    score_fn = score_fn or train_and_score
    rng = random.Random(seed)
    valid = [dict(zip(space, c)) for c in _combos(space) if _valid(dict(zip(space, c)))]
    seen: dict[tuple, dict] = {}
    history: list[dict] = []
    bar = tqdm(total=population * generations, desc=f"{method} search", disable=not progress, mininterval=0.5)

    def evaluate(choice: dict, generation: int) -> None:
        key = tuple(choice.values())
        if key in seen:
            return
        config = candidate_config(choice, block_size)
        latency = latency_fn(config)
        row = {**choice, "latency_ms": 1e3 * latency, "accepted": latency <= budget_s, "perplexity": None,
               "generation": generation}  # fmt: skip
        if row["accepted"]:
            row["perplexity"] = score_fn(config)
        seen[key] = row
        history.append(row)
        bar.update(1)

    def unseen(candidates: list[dict]) -> list[dict]:
        return [c for c in candidates if tuple(c.values()) not in seen]

    for generation in range(generations):
        if generation == 0 or method == "random":
            pool = unseen(valid)
            picks = rng.sample(pool, min(population, len(pool)))
        else:
            accepted = sorted((r for r in history if r["accepted"]), key=lambda r: r["perplexity"])
            parents = [{key: r[key] for key in space} for r in accepted[: max(1, population // 2)]]
            if not parents:  # nothing fits yet: keep exploring at random
                parents = rng.sample(valid, min(population, len(valid)))
            picks = []
            for i in range(population * 10):  # mutate until `population` new valid shapes (or give up)
                child = _mutate(parents[i % len(parents)], space, rng)
                if _valid(child) and child not in picks and tuple(child.values()) not in seen:
                    picks.append(child)
                if len(picks) == population:
                    break
        for choice in picks:
            evaluate(choice, generation)
    bar.close()
    accepted = [r for r in history if r["accepted"]]
    return {"best": min(accepted, key=lambda r: r["perplexity"]) if accepted else None, "history": history}


# ---------------------------------------------------------------------------------------
# Deployment: torch.export
# ---------------------------------------------------------------------------------------
def export_decoder(model: LabGPT, example_len: int = 16) -> torch.export.ExportedProgram:
    """Export ``model``'s forward (token ids (1, T) → logits (1, T, vocab)) with ``torch.export``.

    The sequence length is dynamic (1 … block_size), so one exported program serves every
    prompt. The program is a graph of aten ops with the weights attached: no Python model
    code is needed to run it (``program.module()(idx)``), and ``torch.export.save`` writes it
    to one file.
    """
    if not isinstance(model, LabGPT):
        raise ValueError(f"model must be a LabGPT, got {type(model).__name__}")
    if not 2 <= example_len <= model.config.block_size:
        raise ValueError(f"example_len must be in 2..{model.config.block_size}, got {example_len!r}")
    idx = torch.zeros(1, example_len, dtype=torch.long, device=model.transformer.wte.weight.device)
    length = torch.export.Dim("T", min=1, max=model.config.block_size)
    with torch.no_grad():
        return torch.export.export(model.eval(), (idx,), dynamic_shapes={"idx": {1: length}})


@torch.no_grad()
def _exported_context(program: torch.export.ExportedProgram) -> int | None:
    """The longest sequence the exported forward accepts (its dynamic dimension's upper bound), if it says."""
    for info in program.range_constraints.values():
        upper = getattr(info, "upper", None)
        if upper is not None and int(upper) < 2**62:  # "no bound" reads as a huge int
            return int(upper)
    return None


def generate_exported(program: torch.export.ExportedProgram, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with an exported program: the whole sequence runs again for each token.

    The program is a pure function of the tokens (no KV cache: a cache is state, which an
    exported forward would have to take and return as tensors), so this is the O(n²) loop.
    """
    _check_int("max_new_tokens", max_new_tokens, 0)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(f"idx must be a (batch, time) tensor of token ids, got {getattr(idx, 'shape', type(idx))}")
    limit = _exported_context(program)
    if limit is not None and idx.size(1) + max_new_tokens - 1 > limit:  # the last token is never fed back
        raise ValueError(f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) - 1 must be at most the "
                         f"program's context ({limit} tokens): the exported forward takes 1..{limit}")
    run = program.module()
    for _ in range(max_new_tokens):
        idx = torch.cat([idx, run(idx)[:, -1:].argmax(-1)], dim=1)
    return idx


__all__ = [
    "STEPS",
    "EarlyExitLM",
    "Stack",
    "build_stack",
    "measure_stack",
    "pareto_front",
    "dominates",
    "profile",
    "search",
    "export_decoder",
    "generate_exported",
]
