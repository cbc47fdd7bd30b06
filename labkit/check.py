"""Exercise checkers: ``labkit.check.<exercise>(your_function)`` prints pass, or feedback to act on.

Each checker runs the learner's function on several cases against an oracle (the kit's own
implementation or PyTorch's), and returns True or False so tests can use it too.
Reference solutions live in ``labkit/solutions/`` -- look after you have tried.
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable

import torch

from .model import GPTConfig, KVCache, LabGPT


def _report(name: str, failures: list[str], cases: int, hint: str) -> bool:
    if not failures:
        print(f"PASS {name}: correct on all {cases} cases.")
        return True
    print(f"NOT YET {name}: {len(failures)} of {cases} cases wrong.")
    for f in failures[:3]:
        print(f"  - {f}")
    print(f"  hint: {hint}")
    print("  (a reference solution: labkit/solutions/, once you have tried)")
    return False


def _call(fn: Callable, *args):
    try:
        return fn(*args), None
    except Exception as err:  # the learner's code may raise anything; show it, do not crash
        return None, f"your function raised {type(err).__name__}: {err}\n{traceback.format_exc(limit=-1)}"


CONFIGS = [
    GPTConfig(vocab_size=128, block_size=64, n_layer=1, n_head=1, n_embd=8),
    GPTConfig(vocab_size=128, block_size=512, n_layer=6, n_head=6, n_embd=192),
    GPTConfig(vocab_size=100, block_size=32, n_layer=3, n_head=4, n_embd=16, bias=False),
    GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
]


def count_parameters(fn: Callable[[GPTConfig], int]) -> bool:
    """Exercise: count LabGPT's parameters from its config alone (tied head counted once)."""
    failures = []
    for cfg in CONFIGS:
        with torch.device("meta"):  # no memory: the meta device only tracks shapes
            expected = sum(p.numel() for p in LabGPT(cfg).parameters())
        got, err = _call(fn, cfg)
        if err:
            failures.append(err)
        elif got != expected:
            failures.append(f"{cfg}: you returned {got}, the model has {expected} (off by {expected - (got or 0)})")
    hint = (
        "embeddings: vocab*C + block*C; per layer: two LayerNorms (2C each with bias), qkv C*3C+3C, "
        "attention proj C*C+C, MLP C*4C+4C and 4C*C+C; final LayerNorm 2C; the head shares wte. "
        "Without bias, drop every bias term (LayerNorms keep their weight C)."
    )
    return _report("count_parameters", failures, len(CONFIGS), hint)


def kv_cache_bytes(fn: Callable[[GPTConfig, int, int, int], int]) -> bool:
    """Exercise: bytes a KV cache needs for batch_size sequences of seq_len tokens."""
    failures, cases = [], 0
    for cfg in CONFIGS[:3]:
        for batch, seq_len, nbytes in ((1, cfg.block_size, 4), (3, cfg.block_size // 2, 2)):
            cases += 1
            small = GPTConfig(**{**cfg.__dict__, "block_size": seq_len})
            expected = KVCache(small, batch, device="meta", dtype=torch.float32).nbytes() * nbytes // 4
            got, err = _call(fn, cfg, batch, seq_len, nbytes)
            if err:
                failures.append(err)
            elif got != expected:
                failures.append(
                    f"n_layer={cfg.n_layer}, C={cfg.n_embd}, batch={batch}, seq_len={seq_len}, "
                    f"{nbytes} bytes/element: you returned {got}, expected {expected}"
                )
    return _report(
        "kv_cache_bytes",
        failures,
        cases,
        "keys AND values, for every layer: 2 * n_layer * batch * seq_len * n_embd * bytes",
    )


def greedy_decode(fn: Callable[[LabGPT, torch.Tensor, int], torch.Tensor]) -> bool:
    """Exercise: greedy decoding written by hand (no cache) must equal model.generate(temperature=0)."""
    torch.manual_seed(0)
    model = LabGPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    failures, cases = [], 0
    for batch, length, n_new in ((1, 5, 8), (2, 3, 12), (1, 1, 20)):
        cases += 1
        idx = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(cases))
        expected = model.generate(idx, n_new, temperature=0)
        with torch.no_grad():
            got, err = _call(fn, model, idx, n_new)
        if err:
            failures.append(err)
        elif not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            failures.append(
                f"expected a tensor of shape {tuple(expected.shape)}, got {getattr(got, 'shape', type(got))}"
            )
        elif not torch.equal(got, expected):
            first = (got != expected).nonzero()[0].tolist()
            failures.append(f"batch={batch}, prompt={length}, new={n_new}: first difference at (row, position) {first}")
    hint = "loop n_new times: logits = model(idx); take logits[:, -1].argmax(-1, keepdim=True); torch.cat it onto idx"
    return _report("greedy_decode", failures, cases, hint)


def attention_flops(fn: Callable[[int, int, int, int], int]) -> bool:
    """Exercise: FLOPs of non-causal attention softmax(Q K^T / sqrt(d)) V, matmuls only.

    The oracle is PyTorch's own FlopCounterMode counting the two matmuls of a real call.
    """
    from torch.utils.flop_counter import FlopCounterMode

    failures, cases = [], 0
    for batch, heads, seq_len, head_dim in ((1, 1, 4, 8), (2, 3, 16, 32), (1, 12, 128, 64)):
        cases += 1
        q, k, v = (torch.randn(batch, heads, seq_len, head_dim) for _ in range(3))
        with FlopCounterMode(display=False) as counter:
            torch.softmax(q @ k.transpose(-2, -1) / head_dim**0.5, dim=-1) @ v
        expected = counter.get_total_flops()
        got, err = _call(fn, batch, heads, seq_len, head_dim)
        if err:
            failures.append(err)
        elif got != expected:
            failures.append(
                f"batch={batch}, heads={heads}, seq_len={seq_len}, head_dim={head_dim}: you returned {got}, PyTorch counts {expected}"
            )
    hint = "two matmuls: Q K^T is (T x d) @ (d x T) per head, then P V is (T x T) @ (T x d); each costs 2*m*n*k"
    return _report("attention_flops", failures, cases, hint)


def memory_bound(fn: Callable[[int, int, int, int, float, float], bool]) -> bool:
    """Exercise: is an (m, k) @ (k, n) matmul memory-bound on a device with this peak and bandwidth?"""
    from .hardware import bound, matmul_bytes, matmul_flops

    shapes = [(1, 4096, 4096, 2), (16, 4096, 4096, 2), (4096, 4096, 4096, 2), (512, 512, 512, 4), (8, 8192, 8192, 1)]
    devices = [(989e12, 4.8e12), (0.845e12, 120e9), (19.5e12, 2.0e12)]
    failures, cases = [], 0
    for m, n, k, nbytes in shapes:
        for peak, bandwidth in devices:
            cases += 1
            expected = bound(matmul_flops(m, n, k), matmul_bytes(m, n, k, nbytes), peak, bandwidth) == "memory"
            got, err = _call(fn, m, n, k, nbytes, peak, bandwidth)
            if err:
                failures.append(err)
            elif bool(got) != expected:
                failures.append(
                    f"m={m}, n={n}, k={k}, {nbytes} bytes/element, peak {peak:.3g} FLOP/s, {bandwidth:.3g} B/s: "
                    f"you said {'memory' if got else 'compute'}-bound, it is {'memory' if expected else 'compute'}-bound"
                )
    hint = (
        "intensity = 2mnk / ((mk + kn + mn) * bytes); memory-bound when intensity < peak / bandwidth (the ridge point)"
    )
    return _report("memory_bound", failures, cases, hint)


def read_safetensors_header(fn: Callable) -> bool:
    """Exercise: parse a safetensors header by hand: ``fn(path) -> (header_dict, data_start)``."""
    import tempfile
    from pathlib import Path

    from .memory import read_safetensors_header as oracle
    from .memory import save_safetensors

    failures, cases = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        examples = {
            "one.safetensors": ({"w": torch.zeros(2, 3)}, None),
            "mixed.safetensors": ({"a": torch.ones(4, dtype=torch.int8), "b": torch.zeros(5).half()}, {"note": "hi"}),
            "empty.safetensors": ({}, {"only": "metadata"}),
        }
        for name, (tensors, meta) in examples.items():
            cases += 1
            path = Path(tmp) / name
            save_safetensors(tensors, path, meta)
            entries, metadata, start = oracle(path)
            expected = dict(entries)
            if metadata:
                expected["__metadata__"] = metadata
            got, err = _call(fn, path)
            if err:
                failures.append(err)
                continue
            if not (isinstance(got, tuple) and len(got) == 2):
                failures.append(f"{name}: return a pair (header_dict, data_start), got {type(got).__name__}")
            elif got[1] != start:
                failures.append(f"{name}: data starts at byte {start} (8 + header length), you said {got[1]}")
            elif got[0] != expected:
                failures.append(f"{name}: header {got[0]} differs from {expected}")
    hint = "read 8 bytes, int.from_bytes(..., 'little') = N; json.loads the next N bytes; data starts at 8 + N"
    return _report("read_safetensors_header", failures, cases, hint)


def accumulate(fn: Callable) -> bool:
    """Exercise: gradient accumulation whose result equals the full batch's gradient (1e-6), run one
    micro-batch at a time (a forward hook records the largest batch the model sees)."""
    failures, cases = [], 0
    for batch, pieces in ((12, 3), (10, 4), (11, 3), (7, 7)):
        cases += 1
        torch.manual_seed(cases)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        x, y = torch.randn(batch, 5), torch.randn(batch, 2)
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        seen = []
        hook = model.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
        try:
            _, err = _call(fn, model, torch.nn.functional.mse_loss, x, y, pieces)
        finally:
            hook.remove()
        if err:
            failures.append(err)
            continue
        grads = [p.grad for p in model.parameters()]
        if any(g is None for g in grads):
            failures.append("some parameters have no .grad: call backward on every micro-batch's loss")
            continue
        largest = -(-batch // pieces)
        if not seen or max(seen) > largest:
            failures.append(f"batch {batch} in {pieces} micro-batches: the model saw a batch of "
                            f"{max(seen, default=0)} rows; no micro-batch should exceed {largest}")
            continue
        worst = max((g - e).abs().max().item() for g, e in zip(grads, expected))
        if worst > 1e-6:
            failures.append(f"batch {batch} in {pieces} micro-batches: gradients differ by up to {worst:.3g}")
    hint = "the loss is a mean: weight micro-batch i's loss by len(x_i) / len(x) before backward (unequal pieces!)"
    return _report("accumulate", failures, cases, hint)


def rank_for_compression(fn: Callable[[int, int, float], int]) -> bool:
    """Exercise: the largest rank k whose two factors hold at most ``keep`` x the dense matrix's parameters."""
    from .lowrank import rank_for_compression as oracle

    cases = [(192, 192, 0.5), (768, 192, 0.3), (3072, 768, 0.25), (100, 50, 0.9), (64, 64, 1.0), (1000, 10, 0.5)]
    failures = []
    for d_out, d_in, keep in cases:
        expected = oracle(d_out, d_in, keep)
        got, err = _call(fn, d_out, d_in, keep)
        if err:
            failures.append(err)
        elif got != expected:
            failures.append(f"d_out={d_out}, d_in={d_in}, keep={keep}: you returned {got}, the answer is {expected}")
    hint = (
        "factors cost k*(d_in + d_out); solve k*(d_in + d_out) <= keep*d_out*d_in, round down, cap at min(d_out, d_in)"
    )
    return _report("rank_for_compression", failures, len(cases), hint)


ARROWS = ("->", "=>")  # how the corpus's demonstrations pair an input with its answer


def reversal_prompt(template: Callable[[str, str], str], target: float = 0.9) -> bool:
    """Exercise: a zero-shot prompt ``template(word, "reverse")`` that makes LabGPT `tiny` reverse words."""
    from . import data, load_model
    from .evaluation import answer_correct
    from .prompting import query_pairs

    model, tokenizer = load_model("tiny")
    pairs = [(x, y) for x, y, op in query_pairs("string", 300, seed=77) if op == "reverse"][:60]
    try:
        exs = [data.Example("string", "custom", 0, template(x, "reverse"), y) for x, y in pairs]
        prompts_ok = all(isinstance(e.prompt, str) and e.prompt for e in exs)
    except Exception as err:  # the learner's template may raise anything
        return _report("reversal_prompt", [f"your template raised {type(err).__name__}: {err}"], 1, "return a string")
    if not prompts_ok:
        return _report("reversal_prompt", ["the template must return a non-empty string"], 1, "return a string")
    shown = [e.prompt for e in exs if any(arrow in line for line in e.prompt.split("\n")[:-1] for arrow in ARROWS)]
    if shown:
        return _report("reversal_prompt", [f"zero-shot means no demonstrations, but this prompt shows one: {shown[0]!r}"],
                       1, "only the last line (the query) may hold an arrow; describe the task in words instead")  # fmt: skip
    accuracy = sum(answer_correct(model, tokenizer, exs)) / len(exs)
    failures = (
        []
        if accuracy >= target
        else [
            f"accuracy {100 * accuracy:.0f}% on {len(exs)} words (target {100 * target:.0f}%); "
            f"for '{pairs[0][0]}' your prompt was {exs[0].prompt!r}"
        ]
    )
    hint = "say what you want, as the training data's specific prompts do: an instruction line, then 'word =>'"
    return _report("reversal_prompt", failures, 1, hint)


def verbalizer(words: dict, target: float = 0.9) -> bool:
    """Exercise: label words ``{"pos": ..., "neg": ...}`` that make zero-shot PET classify reviews (pattern ``x ->``)."""
    from . import data, load_model
    from .prompting import pet_classify

    if not isinstance(words, dict) or set(words) != {"pos", "neg"}:
        return _report(
            "verbalizer", [f"give a dict with keys 'pos' and 'neg', got {words!r}"], 1, "{'pos': ..., 'neg': ...}"
        )
    model, tokenizer = load_model("tiny")
    exs = data.examples("sentiment", "specific", 0, n=100, seed=21)
    texts = [e.prompt.split("\n")[-1].removesuffix(" =>") for e in exs]
    gold = ["pos" if e.answer == "positive" else "neg" for e in exs]
    try:
        pred = pet_classify(model, tokenizer, texts, lambda x: f"{x} ->", words)
    except ValueError as err:
        return _report("verbalizer", [str(err)], 1, "non-empty words made of characters the tokenizer knows")
    accuracy = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    failures = (
        [] if accuracy >= target else [f"zero-shot PET accuracy {100 * accuracy:.0f}% (target {100 * target:.0f}%)"]
    )
    hint = "pick the words the model itself used after reviews in training: which labels did the corpus use?"
    return _report("verbalizer", failures, 1, hint)


def soft_target_loss(fn: Callable) -> bool:
    """Exercise: the soft term T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over positions."""
    from .distill import distillation_loss

    failures, cases = [], 0
    for shape, temperature in (((4, 10), 1.0), ((2, 3, 17), 2.0), ((5, 128), 4.0)):
        cases += 1
        g = torch.Generator().manual_seed(cases)
        s, t = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        targets = torch.zeros(shape[:-1], dtype=torch.long)
        expected = distillation_loss(s, t, targets, alpha=0.0, temperature=temperature)
        got, err = _call(fn, s, t, temperature)
        if err:
            failures.append(err)
        elif not isinstance(got, torch.Tensor) or got.numel() != 1:
            failures.append(f"return a scalar tensor, got {type(got).__name__} {getattr(got, 'shape', '')}")
        elif not torch.allclose(got.float(), expected, atol=1e-6, rtol=1e-5):
            failures.append(
                f"shape {shape}, T={temperature}: you returned {got.item():.6f}, expected {expected.item():.6f}"
            )
    hint = "soften both with /T, KL(teacher || student) summed over the vocabulary, mean over positions, times T**2"
    return _report("soft_target_loss", failures, cases, hint)


def exit_rule(fn: Callable) -> bool:
    """Exercise: exit when the largest probability reaches the threshold; a threshold of 1 never exits."""
    cases = [
        (torch.tensor([0.5, 0.3, 0.2]), 0.5, True),
        (torch.tensor([0.5, 0.3, 0.2]), 0.6, False),
        (torch.tensor([1.0, 0.0, 0.0]), 1.0, False),  # a softmax can round to exactly 1.0: tau=1 must still not exit
        (torch.tensor([1.0, 0.0, 0.0]), 0.9, True),  # ... while any tau < 1 exits on it
        (torch.tensor([0.1, 0.85, 0.05]), 0.8, True),
        (torch.tensor([0.34, 0.33, 0.33]), 0.3, True),
    ]
    failures = []
    for probs, threshold, expected in cases:
        got, err = _call(fn, probs, threshold)
        if err:
            failures.append(err)
        elif bool(got) != expected:
            failures.append(f"probs {probs.tolist()}, threshold {threshold}: you said {bool(got)}, expected {expected}")
    return _report("exit_rule", failures, len(cases), "exit iff threshold < 1 and max(probs) >= threshold")


# -- parallelism (notebooks 02-05) -----------------------------------------------------


def _reference_reduce_scatter_step(buffers: list[list[torch.Tensor]], step: int) -> list[list[torch.Tensor]]:
    n = len(buffers)
    new = [[c.clone() for c in b] for b in buffers]
    for r in range(n):  # every rank sends at once: the values sent are the old ones
        c = (r - step) % n
        new[(r + 1) % n][c] += buffers[r][c]
    return new


def reduce_scatter_step(fn: Callable) -> bool:
    """Exercise: one step of a ring reduce-scatter, simulated on lists (``buffers[rank][chunk]``).
    Each step is checked from the reference's buffers, so one wrong step does not hide the others."""
    failures, cases = [], 0
    for n in (2, 3, 4, 5):
        g = torch.Generator().manual_seed(n)
        buffers = [[torch.randn(3, generator=g) for _ in range(n)] for _ in range(n)]
        total = [sum(buffers[r][c] for r in range(n)) for c in range(n)]
        expected = buffers
        for step in range(n - 1):
            cases += 1
            expected_next = _reference_reduce_scatter_step(expected, step)
            got, err = _call(fn, [[c.clone() for c in b] for b in expected], step)
            if err:
                failures.append(err)
            elif not (isinstance(got, list) and len(got) == n and all(len(b) == n for b in got)):
                failures.append(f"n={n}, step {step}: return the list of {n} ranks' lists of {n} chunks")
            else:
                wrong = [(r, c) for r in range(n) for c in range(n) if not torch.allclose(got[r][c], expected_next[r][c])]
                if wrong:
                    failures.append(f"n={n}, step {step}: (rank, chunk) pairs {wrong[:4]} differ from the ring's result")
            expected = expected_next
        done = all(torch.allclose(expected[r][(r + 1) % n], total[(r + 1) % n]) for r in range(n))
        assert done  # the reference itself: after n-1 steps rank r owns the sum of chunk r+1
    hint = "rank r sends its chunk (r - step) % n to rank (r + 1) % n, which adds it; use the values from before the step"
    return _report("reduce_scatter_step", failures, cases, hint)


def qkv_rows(fn: Callable[[int, int, int, int], torch.Tensor]) -> bool:
    """Exercise: the rows of the fused (3C x C) qkv weight that tensor-parallel rank ``rank`` holds."""
    failures, cases = [], 0
    for C, n_head, tp in ((8, 2, 2), (192, 6, 3), (192, 6, 2), (768, 12, 4), (16, 4, 1)):
        hs = C // n_head
        for rank in range(tp):
            cases += 1
            heads = range(rank * n_head // tp, (rank + 1) * n_head // tp)
            mine = torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in heads])
            expected = torch.cat([mine, C + mine, 2 * C + mine])
            got, err = _call(fn, C, n_head, tp, rank)
            if err:
                failures.append(err)
            elif not (isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got.long(), expected)):
                seen = f"shape {tuple(got.shape)}, starting {got.flatten()[:3].tolist()}" if isinstance(got, torch.Tensor) else repr(got)
                failures.append(f"C={C}, n_head={n_head}, tp={tp}, rank={rank}: expected {len(expected)} rows "
                                f"starting {expected[:3].tolist()}..., got {seen}")
    hint = "rank r owns heads r*n_head/tp ... ; each head is hs=C/n_head rows in q (offset 0), k (offset C), v (offset 2C)"
    return _report("qkv_rows", failures, cases, hint)


def min_micro_batches(fn: Callable[[int, float], int]) -> bool:
    """Exercise: the fewest micro-batches m that keep the bubble (p-1)/(m+p-1) at or below a target."""
    from fractions import Fraction

    failures, cases = [], 0
    for p, target in ((1, 0.1), (2, 0.5), (4, 0.25), (4, 0.1), (8, 0.05), (16, 0.2), (64, 0.11), (3, 1.0)):
        cases += 1
        m = 1
        while Fraction(p - 1) > Fraction(target) * (m + p - 1):
            m += 1
        got, err = _call(fn, p, target)
        if err:
            failures.append(err)
        elif got != m:
            failures.append(f"p={p}, target bubble {target}: you said m={got}, the fewest is {m}")
    return _report("min_micro_batches", failures, cases, "solve (p-1)/(m+p-1) <= b for m, round up, at least 1")


def layout_that_fits(fn: Callable) -> bool:
    """Exercise: choose a dp x tp x pp layout whose memory per GPU fits a limit (the planner judges)."""
    from .parallel import planner

    cases = [
        ("gpt3-175b", "A100-80GB", 1024, 1024, 80e9),
        ("gpt3-175b", "A100-80GB", 512, 512, 60e9),
        ("megatron-1t", "A100-80GB", 3072, 3072, 80e9),
        ("gpt3-1.3b", "A100-40GB", 64, 512, 20e9),
        ("gpt3-175b", "H100-SXM", 256, 512, 70e9),
    ]
    failures = []
    for model, gpu, n, batch, limit in cases:
        got, err = _call(fn, model, gpu, n, batch, limit)
        if err:
            failures.append(err)
            continue
        try:
            dp, tp, pp = (got.dp, got.tp, got.pp) if hasattr(got, "dp") else got
            p = planner.plan(model, gpu, planner.Layout(dp, tp, pp, 1, batch, "full"))
        except (TypeError, ValueError) as e:
            failures.append(f"{model} on {n} GPUs: {got!r} is not a valid layout ({e})")
            continue
        if dp * tp * pp != n:
            failures.append(f"{model}: dp*tp*pp = {dp * tp * pp}, but there are {n} GPUs")
        elif p.total_bytes > limit:
            failures.append(f"{model} on {n} x {gpu}, limit {limit / 1e9:.0f} GB: ({dp}, {tp}, {pp}) needs "
                            f"{p.total_bytes / 1e9:.1f} GB per GPU")
    hint = ("weights+grads+optimizer take 16 bytes per parameter / (tp*pp): raise tp (up to 8, a node) and pp "
            "until they fit; planner.plan(...).total_bytes tells you; micro-batch 1, full recompute")
    return _report("layout_that_fits", failures, len(cases), hint)


# -- pruning (notebook 07) --------------------------------------------------------------


def threshold_for_sparsity(fn: Callable[[torch.Tensor, float], float]) -> bool:
    """Exercise: the magnitude threshold τ at which W · 1(|W| >= τ) zeroes a fraction ``sparsity`` of W."""
    from .prune import count_to_prune

    failures, cases = [], 0
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(1000, generator=g), torch.randn(64, 48, generator=g) * 0.02, torch.rand(3, 5, 8, generator=g)]
    tensors.append(torch.randn(50, 40, generator=g) ** 3)  # heavy tails: most weights tiny, a few large
    for w in tensors:
        for sparsity in (0.0, 0.3, 0.5, 0.9):
            cases += 1
            expected = count_to_prune(w.numel(), sparsity)
            got, err = _call(fn, w.clone(), sparsity)
            if err:
                failures.append(err)
                continue
            try:
                tau = float(got)
            except (TypeError, ValueError, RuntimeError):
                failures.append(f"return a number (or a one-element tensor), got {type(got).__name__}")
                continue
            zeroed = int((w.abs() < tau).sum())
            if zeroed != expected:
                failures.append(
                    f"shape {tuple(w.shape)}, sparsity {sparsity}: your threshold {tau:.4g} zeroes {zeroed} of "
                    f"{w.numel()} weights ({zeroed / w.numel():.1%}); {expected} ({expected / w.numel():.1%}) wanted"
                )
    hint = (
        "sort the magnitudes |w| ascending; with k = round(sparsity * n) weights to zero, tau is the (k+1)-th "
        "smallest magnitude (index k). Weights are not spread evenly between 0 and max|w|."
    )
    return _report("threshold_for_sparsity", failures, cases, hint)


def head_importance(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> bool:
    """Exercise: score attention heads by the norm of their contribution y_h · W_proj[:, h]ᵀ (ranking judged)."""
    from . import load_model
    from .prune import calibration_batch, head_output_norms

    g = torch.Generator().manual_seed(3)
    cases = []  # (label, y, proj_weight, n_head)
    y = torch.randn(2, 16, 4 * 8, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat_interleave(8)
    w = torch.randn(24, 4 * 8, generator=g) * torch.tensor([4.0, 1.5, 0.7, 0.2]).repeat_interleave(8)
    cases.append(("loud heads, quiet projections", y, w, 4))  # the head with the largest output matters least
    cases.append(("random, 6 heads", torch.randn(3, 10, 48, generator=g), torch.randn(20, 48, generator=g), 6))
    model, _ = load_model("tiny")
    captured = {}
    hooks = [
        model.transformer.h[i].attn.c_proj.register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0])
        )
        for i in (0, 4)
    ]
    with torch.no_grad():
        model(calibration_batch(2, 64))
    for hook in hooks:
        hook.remove()
    for i in (0, 4):
        cases.append((f"LabGPT tiny layer {i}", captured[i], model.transformer.h[i].attn.c_proj.weight.detach(), 6))
    failures = []
    for label, y, w, n_head in cases:
        expected = head_output_norms(y, w, n_head)
        got, err = _call(fn, y.clone(), w.clone(), n_head)
        if err:
            failures.append(err)
            continue
        if not isinstance(got, torch.Tensor) or got.shape != (n_head,):
            failures.append(f"{label}: return a tensor of shape ({n_head},), got {getattr(got, 'shape', type(got))}")
            continue
        got = got.detach().double()
        wrong = [  # pairs the reference separates by more than 5% that you order the other way (or tie)
            (a, b) for a in range(n_head) for b in range(n_head) if expected[a] > 1.05 * expected[b] and got[a] <= got[b]
        ]
        if wrong:
            a, b = wrong[0]
            order = expected.argsort(descending=True).tolist()
            failures.append(
                f"{label}: you rank head {b} at least as high as head {a}, but head {a} contributes "
                f"{expected[a] / expected[b]:.2f}x more; most to least important: {order}, "
                f"yours: {got.argsort(descending=True).tolist()}"
            )
    hint = (
        "what c_proj makes of head h is y[..., h*hs:(h+1)*hs] @ W[:, h*hs:(h+1)*hs].T; a head with a big "
        "output whose projection columns are small adds little. Score each head by the norm of that product."
    )
    return _report("head_importance", failures, len(cases), hint)


# -- serving (notebook 16) ---------------------------------------------------------------


def accept_draft(fn: Callable[[list, list], list]) -> bool:
    """Exercise: speculative decoding's greedy rule. Given the draft's k guesses and the target's
    k+1 greedy choices (after each prefix), return the tokens kept this round."""
    cases = [
        ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),  # all accepted, plus the target's bonus token
        ([5, 6, 7], [5, 9, 7, 8], [5, 9]),  # first disagreement at 1: keep 5, then the target's 9
        ([5, 6, 7], [1, 6, 7, 8], [1]),  # nothing accepted: the target's own token
        ([4], [4, 2], [4, 2]),
        ([4], [3, 2], [3]),
        ([1, 1, 1, 1], [1, 1, 1, 2, 0], [1, 1, 1, 2]),  # agreement stops at the first mismatch
    ]
    failures = []
    for guesses, target, expected in cases:
        got, err = _call(fn, list(guesses), list(target))
        if err:
            failures.append(err)
        elif list(got) != expected:
            failures.append(f"guesses {guesses}, target choices {target}: you kept {list(got)}, expected {expected}")
    hint = "keep guesses while they equal the target's choice at the same position; then append the target's choice there"
    return _report("accept_draft", failures, len(cases), hint)


def percentile(fn: Callable[[list, float], float]) -> bool:
    """Exercise: the q-th percentile of latencies, linearly interpolated (numpy's and torch.quantile's rule)."""
    failures, cases = [], 0
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 20, 101):
        values = (torch.rand(n, generator=g) * 10).tolist()
        for q in (50, 95, 99):
            cases += 1
            expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item()
            got, err = _call(fn, list(values), q)
            if err:
                failures.append(err)
            elif got is None or abs(float(got) - expected) > 1e-6 * max(1.0, abs(expected)):
                failures.append(f"{n} values, q={q}: you said {got}, expected {expected:.6f}")
    hint = "sort; position (n-1)*q/100; interpolate between the values at floor and ceil of it"
    return _report("percentile", failures, cases, hint)


# -- quantization and mixed precision (notebooks 08-09) --------------------------------


def _away_from_ties(ratio: torch.Tensor) -> torch.Tensor:
    """Where x / s is not within 1e-3 of a half-integer: there, any correct rounding agrees."""
    return ((ratio - ratio.floor()) - 0.5).abs() > 1e-3


def quantize_dequantize(quantize_fn: Callable, dequantize_fn: Callable) -> bool:
    """Exercise: q = clamp(round(x / s) + z, 0, 2^bits - 1) and x_hat = (q - z) s, against labkit.quant (= PyTorch)."""
    from . import quant

    cases = [(8, 0.05, 128), (8, 0.01, 3), (4, 0.3, 8), (4, 0.2, 0), (2, 0.5, 1), (6, 0.1, 40)]
    failures = []
    for i, (bits, scale, zero_point) in enumerate(cases):
        x = torch.randn(200, generator=torch.Generator().manual_seed(i)) * 4  # some values fall off the grid
        expected_q, _, _ = quant.quantize(x, bits, scale=scale, zero_point=zero_point)
        expected_x = quant.dequantize(expected_q, torch.tensor(scale), zero_point)
        got_q, err = _call(quantize_fn, x.clone(), scale, zero_point, bits)
        if err:
            failures.append(err)
            continue
        if not isinstance(got_q, torch.Tensor) or got_q.shape != x.shape:
            failures.append(f"quantize must return a tensor of shape {tuple(x.shape)}, got {type(got_q).__name__}")
            continue
        got_q = got_q.double()
        keep = _away_from_ties(x.double() / scale)
        if not torch.equal(got_q[keep], expected_q.double()[keep]):
            j = int(((got_q != expected_q.double()) & keep).nonzero()[0])
            failures.append(
                f"bits={bits}, s={scale}, z={zero_point}: x={x[j].item():.4f} gave q={got_q[j].item():g}, expected "
                f"{int(expected_q[j])} (the grid is 0..{2**bits - 1})"
            )
            continue
        got_x, err = _call(dequantize_fn, expected_q.long(), scale, zero_point)
        if err:
            failures.append(err)
        elif not isinstance(got_x, torch.Tensor) or not torch.allclose(got_x.double(), expected_x.double(), atol=1e-6):
            failures.append(f"bits={bits}, s={scale}, z={zero_point}: dequantize(q) is not (q - z) * s")
    hint = "q = round(x / s) + z, then clamp to 0..2**bits - 1 (values beyond the range are clipped); x_hat = (q - z) * s"
    return _report("quantize_dequantize", failures, len(cases), hint)


def pick_scale(fn: Callable) -> bool:
    """Exercise: min-max scale and zero point (asymmetric, per tensor), as PyTorch's MinMaxObserver picks them."""
    from . import quant

    g = torch.Generator().manual_seed(0)
    tensors = [
        ("randn", torch.randn(300, generator=g), 8),
        ("randn, 4 bits", torch.randn(300, generator=g) * 3, 4),
        ("all positive", torch.rand(100, generator=g) + 1.0, 8),
        ("all negative", -torch.rand(100, generator=g) - 0.5, 8),
        ("skewed", torch.randn(100, generator=g).exp() - 0.3, 6),
        ("all zeros", torch.zeros(10), 8),
    ]
    failures = []
    for name, x, bits in tensors:
        scale, zero_point = quant.calibrate(x, bits)
        got, err = _call(fn, x.clone(), bits)
        if err:
            failures.append(err)
            continue
        try:
            got_scale, got_zero = float(got[0]), int(round(float(got[1])))
        except (TypeError, ValueError, IndexError):
            failures.append(f"return (scale, zero_point), got {got!r}")
            continue
        if not abs(got_scale - scale.item()) <= 1e-5 * scale.item() or got_zero != int(zero_point):
            failures.append(
                f"{name} ({bits} bits, min {x.min().item():.3f}, max {x.max().item():.3f}): you returned "
                f"s={got_scale:.6g}, z={got_zero}; expected s={scale.item():.6g}, z={int(zero_point)}"
            )
    hint = (
        "widen the range to include 0 (lo = min(x.min(), 0), hi = max(x.max(), 0)); 2**bits levels make "
        "2**bits - 1 steps: s = (hi - lo) / (2**bits - 1), at least float32 eps; z = -round(lo / s)"
    )
    return _report("pick_scale", failures, len(tensors), hint)


def straight_through(fn: Callable) -> bool:
    """Exercise: fake quantization whose gradient is the straight-through estimator, as torch.fake_quantize_*."""
    cases = [(0.1, 8, 0, 15), (0.05, 0, -7, 7), (0.2, 128, 0, 255), (0.02, 3, 0, 15)]
    failures = []
    for i, (scale, zero_point, qmin, qmax) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        steps = torch.randint(qmin - zero_point - 4, qmax - zero_point + 5, (64,), generator=g)  # some off the grid
        w = ((steps + (torch.rand(64, generator=g) - 0.5) * 0.8) * scale).requires_grad_()  # never on a tie
        w_torch = w.detach().clone().requires_grad_()
        expected = torch.fake_quantize_per_tensor_affine(w_torch, scale, zero_point, qmin, qmax)
        upstream = torch.randn(64, generator=g)
        expected.backward(upstream)
        got, err = _call(fn, w, scale, zero_point, qmin, qmax)
        if err:
            failures.append(err)
            continue
        if not isinstance(got, torch.Tensor) or got.shape != w.shape:
            failures.append(f"return a tensor of shape {tuple(w.shape)}, got {type(got).__name__}")
            continue
        if not torch.allclose(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6):
            failures.append(f"s={scale}, z={zero_point}, grid {qmin}..{qmax}: the forward values are not Q⁻¹(Q(w))")
            continue
        if not got.requires_grad:
            failures.append("the output has no gradient: round() cut the graph (that is what the STE fixes)")
            continue
        got.backward(upstream)
        if w.grad is None or not torch.allclose(w.grad, w_torch.grad):
            clipped = int((w_torch.grad == 0).sum())
            failures.append(
                f"s={scale}, z={zero_point}, grid {qmin}..{qmax}: gradient differs from torch's ({clipped} of 64 "
                f"values were clipped and get gradient 0; the others get the upstream gradient unchanged)"
            )
    hint = (
        "forward w_hat = (clamp(round(w/s)+z, qmin, qmax) - z)*s; backward: pass the gradient straight through "
        "where round(w/s)+z lies inside qmin..qmax, 0 where it was clipped: torch.where(inside, w + (w_hat - w).detach(), "
        "w_hat.detach())"
    )
    return _report("straight_through", failures, len(cases), hint)


def window_mask(fn: Callable[[int, int], torch.Tensor]) -> bool:
    """Exercise: the (T, T) boolean mask of causal sliding-window attention (query i sees keys i-window+1 … i)."""
    from .sparse import sliding_window_mask as oracle

    cases = [(1, 1), (6, 1), (8, 3), (8, 8), (8, 20), (33, 7), (64, 16)]
    failures = []
    for T, window in cases:
        expected = oracle(T, window)
        got, err = _call(fn, T, window)
        if err:
            failures.append(err)
        elif not isinstance(got, torch.Tensor) or got.shape != (T, T) or got.dtype != torch.bool:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            dtype = got.dtype if isinstance(got, torch.Tensor) else ""
            failures.append(f"T={T}, window={window}: return a ({T}, {T}) bool tensor, got {shape} {dtype}")
        elif not torch.equal(got, expected):
            i, j = (got != expected).nonzero()[0].tolist()
            failures.append(
                f"T={T}, window={window}: entry [{i}, {j}] (query {i}, key {j}) is {bool(got[i, j])}, should be "
                f"{bool(expected[i, j])}; row {i} should be True exactly for keys {max(0, i - window + 1)}..{i}"
            )
    hint = "with i = arange(T)[:, None] and j = arange(T)[None, :]: keep j <= i (causal) and j > i - window"
    return _report("window_mask", failures, len(cases), hint)


# -- capstone (notebook 17) ----------------------------------------------------------------


def dominates(fn: Callable[[tuple, tuple], bool]) -> bool:
    """Exercise: Pareto dominance, every objective minimised (say latency, memory, perplexity)."""
    from .capstone import dominates as oracle

    objectives = {"latency": "min", "memory": "min", "perplexity": "min"}
    cases = [
        ((1, 1, 1), (2, 2, 2)),
        ((1, 2, 2), (2, 2, 2)),  # better on one, equal on the others: dominates
        ((2, 2, 2), (2, 2, 2)),  # equal points do not dominate each other
        ((1, 3, 2), (2, 2, 2)),  # a trade-off: neither dominates
        ((2, 2, 2), (1, 1, 1)),
        ((0.5, 9.0, 1.0), (0.5, 9.0, 1.5)),
    ]
    g = torch.Generator().manual_seed(0)
    cases += [tuple(tuple(p) for p in torch.randint(0, 3, (2, 3), generator=g).tolist()) for _ in range(30)]
    failures = []
    for a, b in cases:
        expected = oracle(dict(zip(objectives, a)), dict(zip(objectives, b)), objectives)
        got, err = _call(fn, a, b)
        if err:
            failures.append(err)
        elif bool(got) != expected:
            failures.append(f"a={a}, b={b}: you said {bool(got)}, expected {expected}")
    hint = "a dominates b when a <= b in every coordinate AND a < b in at least one (equal points do not dominate)"
    return _report("dominates", failures, len(cases), hint)


def _guarded(check: Callable) -> Callable:
    """A checker that reports, instead of crashing the notebook, when the learner's result cannot even be compared
    (None from a forgotten ``return``, a string, a tensor where a bool was asked, a wrong shape...)."""

    @functools.wraps(check)
    def run(*args, **kwargs) -> bool:
        try:
            return check(*args, **kwargs)
        except Exception as err:  # raised while comparing what the learner's function returned
            print(f"NOT YET {check.__name__}: your function's result could not be checked "
                  f"({type(err).__name__}: {err}).")  # fmt: skip
            print("  hint: compare what it returns (type, shape, length) with what the exercise asks for; "
                  "did it forget a return?")  # fmt: skip
            print("  (a reference solution: labkit/solutions/, once you have tried)")
            return False

    return run


for _name, _check in list(globals().items()):  # every public checker of this module
    if inspect.isfunction(_check) and not _name.startswith("_") and _check.__module__ == __name__:
        globals()[_name] = _guarded(_check)
