"""Exercise checkers: ``labkit.check.<exercise>(your_function)`` prints pass, or feedback to act on.

Each checker runs the learner's function on several cases against an oracle (the kit's own
implementation or PyTorch's), and returns True or False so tests can use it too.
Reference solutions live in ``labkit/solutions/`` -- look after you have tried.
"""

from __future__ import annotations

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
