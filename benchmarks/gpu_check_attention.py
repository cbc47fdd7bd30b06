"""One GPU run for the attention kernels: correctness against SDPA, then the two speed bars.

    python benchmarks/gpu_check_attention.py --out results_dir           # on a CUDA machine, < 2 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_check_attention.py --smoke  # tiny shapes on the CPU: the script's own test

1. ``labkit.kernels.flash_attention`` against ``F.scaled_dot_product_attention`` (with the same
   mask) in fp16, bf16 and fp32: causal, sliding window, non-causal, decode-shaped (T < S),
   ragged lengths and a head dim that needs padding.
2. Bar 1: batch 4, 16 heads, head dim 128, sequence 4096, causal, bf16: the kernel's TFLOP/s
   must reach at least 75% of SDPA's.
3. Bar 2: the same at sequence 16384 with window 1024: the sliding-window kernel must be at
   least 4.5x faster than dense causal SDPA (which computes the whole causal triangle).

Each ratio is measured side by side: three interleaved rounds of 20 timed calls each, the
median round kept. Writes gpu_results_attention.json (every figure with its baseline, the
autotuner's timings of every config, the card, versions, the date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.bench import measure
from labkit.kernels import flash_attention
from labkit.kernels.flash_attention import (
    AttentionConfig,
    attention_mask,
    attention_tflops,
    autotune_log,
    flash_attention_triton,
    tuning_key,
)

# fp32: exact dot products ("ieee"); 16-bit: the softmax weights are rounded to 16 bits before p @ v
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def sdpa(q, k, v, causal=True, window=None):
    """The oracle: PyTorch's attention, with an explicit mask unless it is plain causal self-attention."""
    T, S = q.size(2), k.size(2)
    if causal and window is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(T, S, causal, window, q.device))


def random_qkv(B, H, T, S, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g)
    return q, k, v


def check(device, smoke: bool, quick: bool = False) -> list[dict]:
    """Fixed launch configs (autotuning every check shape would compile dozens of variants)."""
    cases = [  # B, H, T, S, D, causal, window
        (2, 4, 1000, 1000, 128, True, None),  # ragged last block
        (1, 4, 2048, 2048, 128, True, 256),
        (1, 2, 777, 777, 64, True, 100),
        (1, 2, 300, 700, 64, False, None),
        (2, 4, 1, 2000, 128, True, 512),  # one decode step after a long cache
        (1, 2, 513, 513, 80, True, 64),  # head dim 80, padded to 128
    ]
    configs = {  # a small safe tile for every dtype (fp32 tiles take twice the shared memory); the fast one for 16-bit
        torch.float32: [AttentionConfig(64, 64, 2, 4)],
        torch.float16: [AttentionConfig(64, 64, 2, 4)],
        torch.bfloat16: [AttentionConfig(64, 64, 2, 4), AttentionConfig(128, 64, 3, 8)],
    }
    if quick:  # 16-bit only: the fp32 checks spend a minute compiling and running "ieee" dots
        configs = {torch.bfloat16: [AttentionConfig(128, 64, 3, 8)]}
    if smoke or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9):
        configs[torch.bfloat16].append(AttentionConfig(128, 64, 3, 8, tma=True))  # K and V through TMA
    if smoke:
        cases = [(1, 2, 40, 40, 16, True, None), (1, 2, 37, 37, 16, True, 9), (1, 1, 5, 30, 8, True, 4),
                 (1, 1, 20, 33, 16, False, None)]  # fmt: skip
        configs = {dtype: [AttentionConfig(16, 16, 1, 1)] for dtype in configs}
        configs[torch.bfloat16].append(AttentionConfig(16, 16, 1, 1, tma=True))
    rows = []
    for dtype, dtype_configs in configs.items():
        for cfg in dtype_configs:
            for B, H, T, S, D, causal, window in cases:
                q, k, v = random_qkv(B, H, T, S, D, dtype, device, seed=T + S + D)
                got = flash_attention_triton(q, k, v, causal, window, cfg)
                ref = sdpa(q.float(), k.float(), v.float(), causal, window)
                err = (got.float() - ref).abs().max().item()
                ok = bool(err <= TOLERANCE[dtype] * (1 + ref.abs().max().item()))
                rows.append({"dtype": str(dtype), "shape": [B, H, T, S, D], "causal": causal, "window": window,
                             "config": [cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps, cfg.tma],
                             "max_abs_err": err, "ok": ok})  # fmt: skip
                log(f"check {str(dtype):<14} {cfg.block_m}x{cfg.block_n}{' tma' if cfg.tma else ''} B={B} H={H} T={T} S={S} D={D} "
                    f"causal={causal} window={window}: {'ok' if ok else 'FAIL'} (max abs err {err:.2e})")  # fmt: skip
    return rows


def side_by_side(baseline, ours, rounds=3, repeat=20, device="cuda") -> tuple[float, float]:
    """Median-of-rounds seconds for both, interleaved so clock and thermal drift hit both alike."""
    base_times, our_times = [], []
    for _ in range(rounds):
        base_times.append(measure(baseline, warmup=3, repeat=repeat, device=device).median_s)
        our_times.append(measure(ours, warmup=3, repeat=repeat, device=device).median_s)
    return sorted(base_times)[rounds // 2], sorted(our_times)[rounds // 2]


def autotune_report(q, k, causal, window) -> list[dict]:
    key = tuning_key(q, k, causal, window)
    if key not in autotune_log:  # the interpreter runs one fixed config: nothing was tuned
        return []
    report = []
    for cfg, seconds in autotune_log[key]:
        report.append({"block_m": cfg.block_m, "block_n": cfg.block_n, "num_stages": cfg.num_stages,
                       "num_warps": cfg.num_warps, "tma": cfg.tma, "seconds": seconds})  # fmt: skip
        log(f"  autotune {cfg.block_m}x{cfg.block_n} s{cfg.num_stages} w{cfg.num_warps}{' tma' if cfg.tma else ''}: "
            + (f"{seconds * 1e3:.3f} ms" if seconds is not None else "failed"))  # fmt: skip
    return report


def bar_causal(device, smoke: bool) -> dict:
    B, H, T, D = (1, 2, 64, 16) if smoke else (4, 16, 4096, 128)
    q, k, v = random_qkv(B, H, T, T, D, torch.bfloat16, device)
    got = flash_attention(q, k, v, causal=True)  # autotunes (outside the timing)
    tuning = autotune_report(q, k, True, None)
    err = (got.float() - sdpa(q, k, v).float()).abs().max().item()
    base, ours = side_by_side(lambda: sdpa(q, k, v), lambda: flash_attention(q, k, v, causal=True), device=device)
    row = {
        "name": f"causal attention B={B} H={H} T={T} D={D} bf16",
        "baseline": "F.scaled_dot_product_attention(is_causal=True)",
        "variant": "labkit.kernels.flash_attention (Triton)",
        "baseline_s": base,
        "variant_s": ours,
        "baseline_tflops": attention_tflops(B, H, T, D, base),
        "variant_tflops": attention_tflops(B, H, T, D, ours),
        "fraction_of_sdpa": base / ours,
        "bar": 0.75,
        "max_abs_err_vs_sdpa": err,
        "autotune": tuning,
    }
    row["passed"] = row["fraction_of_sdpa"] >= row["bar"]
    log(f"BAR 1 {row['name']}: SDPA {row['baseline_tflops']:.0f} TFLOP/s, Triton {row['variant_tflops']:.0f} "
        f"TFLOP/s = {100 * row['fraction_of_sdpa']:.1f}% of SDPA (bar 75%): {'PASS' if row['passed'] else 'FAIL'}")  # fmt: skip
    return row


def bar_window(device, smoke: bool) -> dict:
    B, H, T, D, W = (1, 2, 96, 16, 24) if smoke else (4, 16, 16384, 128, 1024)
    q, k, v = random_qkv(B, H, T, T, D, torch.bfloat16, device)
    got = flash_attention(q, k, v, causal=True, window=W)
    tuning = autotune_report(q, k, True, W)
    # the masked oracle on one batch element and two heads (a full T x T mask could fall back to materialised scores)
    part = [t[:1, :2].float() for t in (q, k, v)]
    err = (got[:1, :2].float() - sdpa(*part, causal=True, window=W)).abs().max().item()
    del part
    base, ours = side_by_side(lambda: sdpa(q, k, v), lambda: flash_attention(q, k, v, causal=True, window=W),
                              device=device)  # fmt: skip
    row = {
        "name": f"sliding window {W} B={B} H={H} T={T} D={D} bf16",
        "baseline": "F.scaled_dot_product_attention(is_causal=True) (dense causal)",
        "variant": f"labkit.kernels.flash_attention(window={W}) (Triton)",
        "baseline_s": base,
        "variant_s": ours,
        "speedup": base / ours,
        "bar": 4.5,
        "dense_causal_tflops": attention_tflops(B, H, T, D, base),
        "max_abs_err_vs_masked_sdpa": err,
        "autotune": tuning,
    }
    row["passed"] = row["speedup"] >= row["bar"]
    log(f"BAR 2 {row['name']}: dense causal SDPA {base * 1e3:.2f} ms, sliding kernel {ours * 1e3:.2f} ms = "
        f"{row['speedup']:.2f}x (bar 4.5x): {'PASS' if row['passed'] else 'FAIL'}")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_results_attention.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CPU: TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help="check bf16 only (skip the slow fp32 and fp16 checks)")
    args = parser.parse_args()
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 to test the script on a CPU)")
    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke test)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    log(json.dumps(info))
    out = Path(args.out, "gpu_results_attention.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "checks": check(device, args.smoke, args.quick)}
    result["all_checks_ok"] = all(r["ok"] for r in result["checks"])
    for name, bar in (("bar_causal_4096", bar_causal), ("bar_window_1024_at_16384", bar_window)):
        out.write_text(json.dumps(result, indent=1))  # after every section: a run cut short keeps its figures
        result[name] = bar(device, args.smoke)
    result["seconds"] = time.perf_counter() - START
    out.write_text(json.dumps(result, indent=1))
    log(f"checks {'all ok' if result['all_checks_ok'] else 'FAILED'}; wrote {out}")


if __name__ == "__main__":
    main()
