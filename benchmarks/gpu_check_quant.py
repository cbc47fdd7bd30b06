"""One GPU run for the quantization kernels: correctness against the references, then every speed bar.

    python benchmarks/gpu_check_quant.py --out results_dir           # on a CUDA machine, < 2 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_check_quant.py --smoke  # tiny shapes on the CPU: the script's own test

1. Correctness: ``int8_weight_only_linear``, ``int4_weight_only_linear`` (GEMV and GEMM paths,
   split-K included) and ``int8_linear`` (W8A8) against their PyTorch references, in bf16/fp16;
   ``LossScaler`` against ``torch.amp.GradScaler`` under fp16 autocast (same scales, same skips).
2. Bar 1: batch 1, K=8192, N=28672 (a 70B-class MLP up-projection): the int8 weight-only kernel
   at least 1.8x faster than the bf16 cuBLAS GEMV (``F.linear``), the int4 one (groups of 128)
   at least 2.8x. Also timed: ``torch._weight_int8pack_mm`` and dequantize-then-matmul.
   Reported with the achieved GB/s (bytes of weights, scales, x and y over the time).
3. Bar 2: W8A8 at 8192^3: ``int8_linear`` (with its dequantizing epilogue, bf16 out) at least 90% of
   ``torch._int_mm`` (int32 out, column-major second operand). Reported in TOPS.
4. Mixed precision: a LabGPT training step (GPT-2-small shape) in fp32 vs bf16 autocast: time and
   peak memory.

Timing: kernels this short (tens of microseconds) are timed as 50 calls captured in a CUDA graph
and replayed between two CUDA events (the GPU's own time, as a decode loop under a CUDA graph
sees it; the bars use these), and also as 50 plain back-to-back calls (adding whatever launch
cost the host cannot hide behind the GPU); three interleaved rounds of baseline and kernel, the
median round kept. Writes
gpu_results_quant.json: every figure with its baseline, the autotuner's timings of every config,
the card, versions, the date.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit import quant
from labkit.kernels import quant_kernels as qk

START = time.perf_counter()
INT4_GROUP_MAJOR = "labkit int4_weight_only_linear, scales group-major"
INT4_K_MAJOR = "labkit int4_weight_only_linear, weights K-major, scales group-major"
BARS = {"int8 weight-only vs bf16": 1.8, "int4 weight-only vs bf16": 2.8, "w8a8 vs torch._int_mm": 0.9}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def loop_time(fn, calls: int, device) -> float:
    """Seconds per call of ``calls`` back-to-back calls (CUDA events around the loop; perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def as_graph(fn, calls: int, device):
    """A callable replaying ``calls`` calls of ``fn`` captured in a CUDA graph (no host launch cost), or None."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return graph.replay
    except Exception as err:  # a variant that cannot be captured is timed as a plain loop only
        log(f"  (CUDA graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:100]})")
        return None


def side_by_side(variants: dict, device, calls: int, rounds: int = 3) -> tuple[dict, dict]:
    """Per-call seconds of each variant, as (GPU time from CUDA-graph replays, time of plain back-to-back calls).

    Each is the median over ``rounds`` interleaved rounds. The graph time is the kernel's own
    time (a decode loop runs under a CUDA graph); the loop time adds whatever launch cost the
    host cannot hide. A variant that cannot be captured gets its loop time in both.
    """
    for fn in variants.values():  # warm-up (and autotune) outside the timing
        fn()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    graphs = {name: as_graph(fn, calls, device) for name, fn in variants.items()}
    loop, graph = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            loop[name].append(loop_time(fn, calls, device))
            if graphs[name] is not None:
                graph[name].append(loop_time(graphs[name], 1, device) / calls)
    loop = {name: statistics.median(t) for name, t in loop.items()}
    return {name: statistics.median(graph[name]) if graph[name] else loop[name] for name in variants}, loop


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> tuple[bool, float]:
    """Relative error against the reference's scale: max |got - expected| / max |expected|."""
    err = ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()
    return err <= tolerance, err


def check_kernels(device, smoke: bool) -> list[dict]:
    """Each path with one fixed launch config (the timings below autotune; compiling every config for every
    checked shape would take minutes)."""
    gemv = qk.INTERPRETER_GEMV if smoke else qk.GemvConfig(16, 256, 1, 4, 3)
    gemm = qk.INTERPRETER_GEMM if smoke else qk.TileConfig(64, 128, 64, 3, 4)
    w8a8 = qk.INTERPRETER_GEMM if smoke else qk.TileConfig(128, 128, 128, 3, 8)
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = (
        [(1, 64, 40, torch.float32, 32), (3, 96, 24, torch.float32, 32), (20, 64, 40, torch.float32, 32)]
        if smoke
        else [
            (1, 8192, 28672, bf16, 128),
            (1, 4096, 14336, fp16, 64),
            (4, 4096, 4096, bf16, 128),
            (8, 14336, 4096, bf16, 128),
            (64, 4096, 4096, bf16, 128),
            (333, 4096, 1000, fp16, 64),
        ]
    )  # (M, K, N, dtype of x, int4 group): both paths, both dtypes
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    for m, k, n, dtype, group in cases:
        x = torch.randn(m, k, device=device, generator=g).to(dtype)
        w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=g)
        s = torch.rand(n, device=device, generator=g) / 100
        cfg = gemv if m <= qk.GEMV_MAX_ROWS else gemm
        ok, err = close(qk.int8_weight_only_linear_triton(x, w, s, config=cfg),
                        qk.int8_weight_only_linear_reference(x, w, s), tolerance[dtype])  # fmt: skip
        rows.append({"kernel": "int8_weight_only_linear", "shape": [m, k, n], "dtype": str(dtype), "ok": ok,
                     "max_rel_err": err})  # fmt: skip
        q, scales, zeros, _ = quant.int4_parameters(torch.randn(n, k, device=device, generator=g), group)
        packed = qk.pack_int4(q)
        expected4 = qk.int4_weight_only_linear_reference(x, packed, scales, zeros, group)
        got = qk.int4_weight_only_linear_triton(x, packed, scales, zeros, group, config=cfg)
        ok4, err4 = close(got, expected4, tolerance[dtype])
        rows.append({"kernel": f"int4_weight_only_linear g{group}", "shape": [m, k, n], "dtype": str(dtype),
                     "ok": ok4, "max_rel_err": err4})  # fmt: skip
        s_g, z_g = qk.group_major(scales), qk.group_major(zeros)  # the layout Int4WeightOnlyLinear gives the kernels
        okg, errg = close(qk.int4_weight_only_linear_triton(x, packed, s_g, z_g, group, config=cfg), expected4,
                          tolerance[dtype])  # fmt: skip
        rows.append({"kernel": f"int4_weight_only_linear g{group}, scales group-major", "shape": [m, k, n],
                     "dtype": str(dtype), "ok": okg, "max_rel_err": errg})  # fmt: skip
        log(f"check weight-only {m}x{k}x{n} {dtype}: int8 {'ok' if ok else 'FAIL'} ({err:.1e}), "
            f"int4 g{group} {'ok' if ok4 else 'FAIL'} ({err4:.1e}), group-major {'ok' if okg else 'FAIL'} "
            f"({errg:.1e})")  # fmt: skip
        if m <= qk.GEMV_MAX_ROWS:  # the int4 word kernel, both unpackings (the halves one is inline PTX), both layouts
            for halves, (sw, zw) in itertools.product((False, True), ((scales, zeros), (s_g, z_g))):
                wcfg = qk.GemvConfig(8, 32, 1, 1, 1, True, halves) if smoke else qk.GemvConfig(
                    128, min(128, group), 1, 2, 4, True, halves)  # fmt: skip
                got = qk.int4_weight_only_linear_triton(x, packed, sw, zw, group, config=wcfg)
                # halves keep ~13 bits of each q·x: below bf16's rounding, not fp32's (the autotuner offers them
                # to 16-bit activations only)
                tol = max(tolerance[dtype], 1e-4) if halves else tolerance[dtype]
                okw, errw = close(got, expected4, tol)
                label = ("fp16 halves" if halves else "float words") + (", scales group-major" if sw is s_g else "")
                rows.append({"kernel": f"int4_weight_only_linear g{group} word kernel, {label}", "shape": [m, k, n],
                             "dtype": str(dtype), "ok": okw, "max_rel_err": errw})  # fmt: skip
                log(f"check int4 word kernel ({label}) {m}x{k}x{n} {dtype}: {'ok' if okw else 'FAIL'} ({errw:.1e})")
            # the K-major kernel (weights stored as qk.k_major makes them), K split, as the GPU's tuner may choose it
            for words in (False, True):  # bytes, and rows read as 32-bit words
                kcfg = qk.GemvConfig(8, 32, 2, 1, 1, words) if smoke else qk.GemvConfig(1024, 32, 8, 4, 3, words)
                okk, errk = close(qk.int4_weight_only_linear_triton(x, qk.k_major(packed), s_g, z_g, group,
                                                                    config=kcfg), expected4, tolerance[dtype])  # fmt: skip
                label = "K-major kernel, words" if words else "K-major kernel"
                rows.append({"kernel": f"int4_weight_only_linear g{group} {label}", "shape": [m, k, n],
                             "dtype": str(dtype), "ok": okk, "max_rel_err": errk})  # fmt: skip
                log(f"check int4 {label} {m}x{k}x{n} {dtype}: {'ok' if okk else 'FAIL'} ({errk:.1e})")
    # split-K explicitly (the autotuner may not pick it)
    m, k, n = (2, 256, 24) if smoke else (1, 14336, 4096)
    x = torch.randn(m, k, device=device, generator=g).to(cases[0][3])
    w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=g)
    s = torch.rand(n, device=device, generator=g) / 100
    cfg = qk.GemvConfig(8, 32, 4, 1, 1) if smoke else qk.GemvConfig(16, 512, 4, 4, 3)
    ok, err = close(qk.int8_weight_only_linear_triton(x, w, s, config=cfg),
                    qk.int8_weight_only_linear_reference(x, w, s), tolerance[cases[0][3]])  # fmt: skip
    rows.append({"kernel": "int8_weight_only_linear split-K 4", "shape": [m, k, n], "ok": ok, "max_rel_err": err})
    log(f"check int8 weight-only split-K: {'ok' if ok else 'FAIL'} ({err:.1e})")
    for m, k, n in [(20, 64, 40), (17, 40, 24)] if smoke else [(8192, 8192, 8192), (1000, 1000, 1000), (17, 64, 40)]:
        x_q, x_s = quant.quantize_per_token(torch.randn(m, k, device=device, generator=g))
        w_q, w_s, _ = quant.quantize(torch.randn(n, k, device=device, generator=g), 8, axis=0, symmetric=True)
        bias = torch.randn(n, device=device, generator=g)
        expected = qk.int8_linear_reference(x_q, w_q, x_s, w_s.flatten(), bias)
        got = qk.int8_linear_triton(x_q, w_q, x_s, w_s.flatten(), bias, config=w8a8)
        ok, err = close(got, expected, 1e-5)
        rows.append({"kernel": "int8_linear (W8A8)", "shape": [m, k, n], "ok": ok, "max_rel_err": err})
        log(f"check int8_linear {m}x{k}x{n}: {'ok' if ok else 'FAIL'} ({err:.1e})")
    return rows


def check_loss_scaler(device) -> dict:
    """LossScaler vs GradScaler on the same fp16-autocast model and batches, overflows included."""
    results = []
    for scaler in (quant.LossScaler(init_scale=2.0**24, growth_interval=3),
                   torch.amp.GradScaler(device.type, init_scale=2.0**24, growth_interval=3)):  # fmt: skip
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        scales, skipped = [], []
        for step in range(20):
            x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step)).to(device) * (
                100 if step % 7 == 3 else 1
            )
            with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            optimizer.zero_grad()
            scales.append(float(torch.tensor(scaler.get_scale(), dtype=torch.float32)))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped.append(scaler.get_scale() < scales[-1])
        results.append((scales, skipped, [p.detach().cpu() for p in model.parameters()]))
    ours, theirs = results
    ok = ours[0] == theirs[0] and ours[1] == theirs[1] and all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))
    log(f"check LossScaler vs GradScaler: {'ok' if ok else 'FAIL'}; scales {ours[0][:8]}..., {sum(ours[1])} skipped")
    return {"ok": ok, "scales": ours[0], "skipped": ours[1], "grad_scaler_scales": theirs[0]}


def time_weight_only(device, smoke: bool, calls: int) -> list[dict]:
    m, k, n, group = (1, 64, 32, 32) if smoke else (1, 8192, 28672, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, generator=g, dtype=dtype) / k**0.5
    x = torch.randn(m, k, device=device, generator=g, dtype=dtype)
    w8, s8, _ = quant.quantize(w, 8, axis=0, symmetric=True)
    w8, s8 = w8, s8.flatten()
    q4, s4, z4, _ = quant.int4_parameters(w, group)
    p4 = qk.pack_int4(q4)
    s4g, z4g = qk.group_major(s4), qk.group_major(z4)  # as Int4WeightOnlyLinear hands them to the kernels
    p4k = qk.k_major(p4)  # the same bytes stored K-major: the K-major kernel's layout
    variants = {
        "bf16 F.linear (cuBLAS)": lambda: F.linear(x, w),
        "labkit int8_weight_only_linear": lambda: qk.int8_weight_only_linear(x, w8, s8, backend="triton"),
        "labkit int4_weight_only_linear": lambda: qk.int4_weight_only_linear(x, p4, s4, z4, group, backend="triton"),
        INT4_GROUP_MAJOR: lambda: qk.int4_weight_only_linear(x, p4, s4g, z4g, group, backend="triton"),
        INT4_K_MAJOR: lambda: qk.int4_weight_only_linear(x, p4k, s4g, z4g, group, backend="triton"),
        "dequantize then F.linear (eager)": lambda: F.linear(x, (w8.to(dtype) * s8[:, None].to(dtype))),
    }
    if device.type == "cuda" and hasattr(torch, "_weight_int8pack_mm"):
        variants["torch._weight_int8pack_mm"] = lambda: torch._weight_int8pack_mm(x, w8, s8.to(dtype))
    try:
        for name in list(variants):
            variants[name]()
    except RuntimeError as err:  # e.g. _weight_int8pack_mm without a CUDA kernel for this dtype in this build
        log(f"  {name} unavailable: {str(err).splitlines()[0]}")
        variants.pop(name)
    seconds, loop = side_by_side(variants, device, calls)
    weight_bytes = {"bf16 F.linear (cuBLAS)": n * k * 2, "labkit int8_weight_only_linear": n * k + n * 4,
                    "labkit int4_weight_only_linear": n * k // 2 + 3 * n * (k // group),
                    INT4_GROUP_MAJOR: n * k // 2 + 3 * n * (k // group),
                    INT4_K_MAJOR: n * k // 2 + 3 * n * (k // group)}  # fmt: skip
    io_bytes = (m * k + m * n) * 2
    base = seconds["bf16 F.linear (cuBLAS)"]
    rows = []
    for name, s in seconds.items():
        moved = weight_bytes.get(name, n * k + n * 4) + io_bytes
        rows.append({"suite": "quant", "name": f"weight-only GEMV {m}x{k}x{n}", "baseline": "bf16 F.linear (cuBLAS)",
                     "variant": name, "baseline_s": base, "variant_s": s, "speedup": base / s,
                     "gb_per_s": moved / s / 1e9, "loop_baseline_s": loop["bf16 F.linear (cuBLAS)"],
                     "loop_variant_s": loop[name], "device": _device_name(device)})  # fmt: skip
        log(f"{name:50s} {s * 1e6:9.1f} us  {base / s:5.2f}x bf16  {moved / s / 1e9:7.0f} GB/s   "
            f"(plain loop: {loop[name] * 1e6:.1f} us, {loop['bf16 F.linear (cuBLAS)'] / loop[name]:.2f}x)")  # fmt: skip
    # int4: scales stored group by group, as Int4WeightOnlyLinear stores them (the row-major line above compares);
    # and the same weights stored K-major (the function takes either layout; the layer stores row-major bytes)
    for label, name in (("int8 weight-only vs bf16", "labkit int8_weight_only_linear"),
                        ("int4 weight-only vs bf16", INT4_GROUP_MAJOR), ("int4 weight-only vs bf16", INT4_K_MAJOR)):  # fmt: skip
        speedup = base / seconds[name]
        log(f"BAR {label}: {speedup:.2f}x (bar {BARS[label]}x) -> {'MET' if speedup >= BARS[label] else 'NOT MET'}"
            f" ({name})")  # fmt: skip
    return rows


def log_autotune_winners() -> None:
    """Which kernel won each GEMV shape, the three fastest, and how many configs were left out."""
    for key, timings in qk.autotune_log.items():
        if "gemv" not in key:
            continue
        ranked = sorted((s, str(c)) for c, s in timings if s is not None)
        left_out = len(timings) - len(ranked)
        log(f"autotune {' '.join(map(str, key[:-1]))}: " + "; ".join(f"{c} {s * 1e6:.1f} us" for s, c in ranked[:3])
            + (f"; {left_out} configs left out (failed or disagreed)" if left_out else ""))  # fmt: skip


def time_w8a8(device, smoke: bool, calls: int) -> list[dict]:
    n = 32 if smoke else 8192
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8, generator=g)  # (N, K): w.t() is column-major
    sa, sw = torch.rand(n, device=device, generator=g) / 100, torch.rand(n, device=device, generator=g) / 100
    out = torch.float32 if smoke else torch.bfloat16
    variants = {
        "torch._int_mm (int32 out)": lambda: torch._int_mm(a, w.t()),
        "labkit int8_linear (bf16 out, fused dequant)": lambda: qk.int8_linear(a, w, sa, sw, None, out, "triton"),
    }
    if not smoke:
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
        variants["bf16 torch.matmul"] = lambda: b @ b
    seconds, _ = side_by_side(variants, device, max(3, calls // 10))
    base = seconds["torch._int_mm (int32 out)"]
    rows = []
    for name, s in seconds.items():
        tops = 2 * n**3 / s / 1e12
        rows.append({"suite": "quant", "name": f"W8A8 {n}^3", "baseline": "torch._int_mm (int32 out)", "variant": name,
                     "baseline_s": base, "variant_s": s, "speedup": base / s, "tops": tops,
                     "device": _device_name(device)})  # fmt: skip
        log(f"{name:46s} {s * 1e3:8.3f} ms  {tops:7.1f} TOPS  {100 * base / s:5.1f}% of _int_mm")
    ratio = base / seconds["labkit int8_linear (bf16 out, fused dequant)"]
    label = "w8a8 vs torch._int_mm"
    log(
        f"BAR {label}: {100 * ratio:.1f}% (bar {100 * BARS[label]:.0f}%) -> {'MET' if ratio >= BARS[label] else 'NOT MET'}"
    )
    return rows


def time_mixed_precision(device, smoke: bool) -> list[dict]:
    from labkit.model import LabGPT, get_config

    config = get_config("nano") if smoke else get_config("gpt2", block_size=1024)
    batch, seq = (2, 32) if smoke else (8, 1024)
    rows = []
    for label, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        torch.manual_seed(0)
        model = LabGPT(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        step = lambda m=model, o=optimizer, d=dtype: quant.train_step(m, o, x, x, autocast_dtype=d)  # noqa: E731
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = loop_time(step, 3 if smoke else 8, device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rows.append({"suite": "quant", "name": f"LabGPT {'nano' if smoke else 'gpt2'} train step {batch}x{seq}",
                     "variant": label, "variant_s": seconds, "peak_memory_bytes": peak,
                     "device": _device_name(device)})  # fmt: skip
        memory = f"peak {peak / 2**30:.2f} GiB" if peak is not None else "(peak memory: CUDA only)"
        log(f"train step {label:14s} {seconds * 1e3:8.1f} ms  {memory}")
        del model, optimizer
    rows[1]["baseline"], rows[1]["baseline_s"] = "fp32", rows[0]["variant_s"]
    rows[1]["speedup"] = rows[0]["variant_s"] / rows[1]["variant_s"]
    return rows


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu (interpreter, {platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="folder for gpu_results_quant.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--calls", type=int, default=50, help="back-to-back calls per timing")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 on a CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    calls = 2 if args.smoke else args.calls
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": _device_name(device),
              "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run cut short by a time limit still leaves its figures
        result["autotune"] = {
            " ".join(map(str, key)): [[str(cfg), s] for cfg, s in timings] for key, timings in qk.autotune_log.items()
        }
        (out / "gpu_results_quant.json").write_text(json.dumps(result, indent=1, default=str))

    result["checks"] = check_kernels(device, args.smoke)
    result["loss_scaler"] = check_loss_scaler(device)
    result["all_checks_ok"] = all(r["ok"] for r in result["checks"]) and result["loss_scaler"]["ok"]
    save()
    result["weight_only"] = time_weight_only(device, args.smoke, calls)
    log_autotune_winners()
    save()
    result["w8a8"] = time_w8a8(device, args.smoke, calls)
    save()
    result["mixed_precision"] = time_mixed_precision(device, args.smoke)
    save()
    log(f"all checks ok: {result['all_checks_ok']}; wrote {out / 'gpu_results_quant.json'}")


if __name__ == "__main__":
    main()
