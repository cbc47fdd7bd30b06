"""GPU check for the pruning lab: 2:4 semi-structured sparsity and removed MLP neurons, as they are.

    PYTHONPATH=. python3 benchmarks/gpu_check_prune.py --out OUT_DIR

1. Correctness: ``prune_model(model, 0.5, "2:4")`` on a GPU swaps the block linears for
   ``torch.sparse`` semi-structured ones (``SemiStructuredLinear``); their logits against the
   masked dense model's.
2. Speed, side by side (CUDA events, queued, median; three interleaved rounds, middle kept):
   a 2:4 linear vs the dense one at fp16 8192³ (the issue quotes 0.79× on an H200), at
   batch 1-128 rows (decode-like), and the LabGPT GPT-2-small-shaped forward dense vs 2:4 vs
   50% of MLP neurons removed. Writes gpu_results_prune.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit import prune
from labkit.bench import measure
from labkit.model import LabGPT, get_config

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def side_by_side(variants: dict, rounds: int = 3, repeat: int = 20) -> dict:
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(measure(fn, warmup=3, repeat=repeat, device="cuda").median_s)
    return {name: sorted(t)[rounds // 2] for name, t in times.items()}


def linear_rows(dtype=torch.float16) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, n, device="cuda", dtype=dtype, generator=g)
    w = w * prune.semi_structured_mask(w)
    w_sparse = to_sparse_semi_structured(w)
    for m in (8192, 1024, 128, 16):
        x = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
        err = (F.linear(x, w_sparse).float() - F.linear(x, w).float()).abs().max().item()
        t = side_by_side({"dense": lambda: F.linear(x, w), "2:4": lambda: F.linear(x, w_sparse)})
        row = {"shape": [m, n, n], "dtype": str(dtype), "dense_s": t["dense"], "sparse_s": t["2:4"],
               "speedup": t["dense"] / t["2:4"], "max_abs_err": err}  # fmt: skip
        rows.append(row)
        log(f"linear {m}x{n}x{n} {dtype}: dense {t['dense'] * 1e3:.3f} ms, 2:4 {t['2:4'] * 1e3:.3f} ms = "
            f"{row['speedup']:.2f}x (max abs err {err:.1e})")  # fmt: skip
    return rows


def model_rows() -> dict:
    torch.manual_seed(0)
    dense = LabGPT(get_config("gpt2")).to("cuda", torch.float16).eval()
    masked = prune.prune_model(dense, 0.5, "2:4", semi_structured=False)
    sparse = prune.prune_model(dense, 0.5, "2:4")
    swapped = sum(isinstance(m, prune.SemiStructuredLinear) for m in sparse.modules())
    neurons = prune.prune_model(dense, 0.5, "neurons")
    idx = torch.randint(0, dense.config.vocab_size, (8, 512), device="cuda")
    with torch.no_grad():
        err = (sparse(idx)[0].float() - masked(idx)[0].float()).abs().max().item() if swapped else None
        t = side_by_side({"dense": lambda: dense(idx), "2:4 semi-structured": lambda: sparse(idx),
                          "50% MLP neurons removed": lambda: neurons(idx)})  # fmt: skip
    out = {"batch": [8, 512], "swapped_linears": swapped, "max_abs_logit_err_vs_masked": err, "seconds": t,
           "speedup": {name: t["dense"] / s for name, s in t.items()}}  # fmt: skip
    log(f"LabGPT gpt2 shape fp16, 8x512 tokens: {swapped} linears swapped to 2:4, max |logit diff| vs masked "
        f"dense {err}")  # fmt: skip
    for name, s in t.items():
        log(f"  {name:<26} {s * 1e3:7.2f} ms  {t['dense'] / s:5.2f}x dense")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out = Path(args.out, "gpu_results_prune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, section in (("linear_2_4", linear_rows), ("labgpt", model_rows)):
        try:
            result[name] = section()
        except Exception as err:  # noqa: BLE001 - a section that cannot run is reported, the next one still runs
            result[name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{name}: {type(err).__name__}: {err}")
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
