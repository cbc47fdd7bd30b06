"""What bounds the kernels of the two open bars? Nsight Compute's view of them, for a GPU session.

    bash benchmarks/gpu_ncu.sh "$OUT"             # on the device machine: ncu runs this file twice

This file is ncu's target program and, with ``--summarize``, the reader of what ncu wrote:

- ``decode`` (issue 10): GPT-2-small-shaped LabGPT in bf16, ``serving.fused_decode_step`` tuned on
  whole steps at 160 positions (as ``gpu_check_serving.py`` measures it), then one token with the
  greedy choice inside, between ``torch.cuda.profiler.start()`` and ``stop()``: ncu, started with
  ``--profile-from-start off``, profiles those 39 kernels and nothing of the tuning before them.
- ``int4`` (issue 5): the weight-only GEMVs at the bar's shape (batch 1, K=8192, N=28672): cuBLAS's
  bf16 GEMV, the int8 kernel, and the int4 kernel with each of its three unpackings (bytes, float
  words, fp16 halves) in the configs the H100 autotuner ranked first, once each; two of them again
  with group-major scales, and the K-major kernel (weights stored as ``quant_kernels.k_major``) in three configs.
- ``--summarize FILE.csv``: one line a kernel out of ncu's ``--page raw --csv`` output: time, DRAM
  throughput as a share of the peak, bytes read, achieved occupancy, registers, grid, and the three
  stall reasons that cost the most cycles per issued instruction.

On a CPU (``--device cpu``, with ``TRITON_INTERPRET=1``) the targets run at toy sizes with no
profiler: a check that this file works before a GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import quant, serving  # noqa: E402
from labkit.kernels import quant_kernels as qk  # noqa: E402
from labkit.kernels.quant_kernels import GemvConfig  # noqa: E402
from labkit.model import LabGPT, get_config  # noqa: E402


@contextlib.contextmanager
def profiled(device: torch.device):
    """The range ncu profiles: between cudaProfilerStart and Stop (nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


def decode(device: torch.device) -> None:
    torch.manual_seed(0)
    name, prompt_len, tokens = ("gpt2", 32, 256) if device.type == "cuda" else ("nano", 3, 8)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LabGPT(get_config(name)).to(device, dtype).eval()
    cache = serving.SlotCache(model, 1)
    with torch.no_grad():
        token = cache.admit(model, 0, list(range(1, prompt_len + 1))).argmax().view(1)
        length = prompt_len + tokens // 2
        kwargs = {} if device.type == "cuda" else {"replays": 1, "rounds": 1}
        tuning = serving.tune_fused_decode_step(model, cache, length=length, **kwargs)
        print(f"tuned at {length} positions: {tuning['after_s'] * 1e6:.1f} us a step, timed on whole steps")
        for key, config in tuning["chosen"].items():
            print(f"  {key[0]} {key[1:4]}: {config}")
        cache.length.fill_(length)
        serving.fused_decode_step(model, cache, token, next_tokens=token)  # warm: every kernel compiled
        cache.length.fill_(length)
        with profiled(device):
            serving.fused_decode_step(model, cache, token, next_tokens=token)
    print(f"profiled one token at {length} positions: next token {int(token)}")


INT4_CONFIGS = {  # the H100 autotuner's leaders on 2026-11-27 (gpu_check_quant_h100_1127_run1.log)
    "int4 bytes 16x512 w4": GemvConfig(16, 512, 1, 4, 3),
    "int4 words 128x128 w2": GemvConfig(128, 128, 1, 2, 4, True),
    "int4 halves 64x128 w2": GemvConfig(64, 128, 1, 2, 4, True, True),
    "int4 halves 128x128 w2": GemvConfig(128, 128, 1, 2, 4, True, True),
    "int4 halves 64x128 split4 w2": GemvConfig(64, 128, 4, 2, 4, True, True),  # added after that run
}
INT4_GROUP_MAJOR = ("int4 bytes 16x512 w4", "int4 halves 128x128 w2")  # also with scales stored group by group
INT4_KMAJOR = {"int4 K-major 1024 split8 w4": GemvConfig(1024, 32, 8, 4, 3),
               "int4 K-major words 1024 split8 w4": GemvConfig(1024, 32, 8, 4, 3, True),
               "int4 K-major words 2048 split8 w8": GemvConfig(2048, 32, 8, 8, 3, True)}  # fmt: skip


def int4(device: torch.device) -> None:
    m, k, n, group = (1, 8192, 28672, 128) if device.type == "cuda" else (1, 256, 64, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, generator=g, dtype=dtype) / k**0.5
    x = torch.randn(m, k, device=device, generator=g, dtype=dtype)
    w8, s8, _ = quant.quantize(w, 8, axis=0, symmetric=True)
    s8 = s8.flatten()
    q4, s4, z4, _ = quant.int4_parameters(w, group)
    p4 = qk.pack_int4(q4)
    calls = {"bf16 F.linear": lambda: F.linear(x, w),
             "int8 8x1024 w4": lambda: qk.int8_weight_only_linear_triton(x, w8, s8, config=GemvConfig(8, 1024, 1, 4, 2))}  # fmt: skip
    for label, config in INT4_CONFIGS.items():
        calls[label] = lambda config=config: qk.int4_weight_only_linear_triton(x, p4, s4, z4, group, config=config)
    s4g, z4g = qk.group_major(s4), qk.group_major(z4)
    for label in INT4_GROUP_MAJOR:
        calls[f"{label} group-major"] = lambda config=INT4_CONFIGS[label]: qk.int4_weight_only_linear_triton(
            x, p4, s4g, z4g, group, config=config)  # fmt: skip
    p4k = qk.k_major(p4)  # the K-major kernel (split K: its zeroed fp32 buffer and copy are kernels of their own)
    for label, config in INT4_KMAJOR.items():
        calls[label] = lambda config=config: qk.int4_weight_only_linear_triton(x, p4k, s4g, z4g, group, config=config)
    reference = qk.int4_weight_only_linear_reference(x, p4, s4, z4, group).float()
    for label, call in calls.items():  # compile, and check, outside the profiled range
        if label.startswith("int4"):
            err = (call().float() - reference).abs().max().item() / reference.abs().max().item()
            print(f"{label}: largest error {err:.1e} of the largest output")
        else:
            call()
    with profiled(device):
        for call in calls.values():
            call()
    print("profiled, in this order: " + ", ".join(calls))


# ncu --page raw metric names (Nsight Compute 2023-2025; gpu_ncu.sh asks for each) and how to show them:
# label, the unit shown, its format
COLUMNS = {
    "gpu__time_duration.sum": ("time", "us", "{:.2f} us"),
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("DRAM", "%", "{:.0f}%"),
    "dram__bytes_read.sum": ("read", "MB", "{:.2f} MB"),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("occupancy", "%", "{:.0f}%"),
    "launch__registers_per_thread": ("regs", "", "{:.0f}"),
    "launch__grid_size": ("grid", "", "{:.0f}"),
}
STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")
# what one of ncu's units is in the unit shown (``--print-units base`` gives the first of each)
UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
         "byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}  # fmt: skip


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(path: str) -> list[str]:
    """One line a profiled kernel from ncu's ``--csv --page raw`` output (a header row, a row of units, then
    a row a kernel; lines before the header, e.g. ncu's own messages, are skipped)."""
    if not Path(path).is_file():
        return [f"{path}: not written (ncu failed before profiling anything? see its log)"]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r and "ID" in r), None)
    if start is None:
        return [f"{path}: no kernel rows (did ncu profile anything? see its log)"]
    header, lines = rows[start], []
    units = rows[start + 1] if start + 1 < len(rows) else []
    for row in rows[start + 1 :]:
        if len(row) != len(header) or not row[header.index("ID")].strip().isdigit():
            continue  # the units row, or a broken line
        values = dict(zip(header, row))
        unit = dict(zip(header, units))
        parts = [values["Kernel Name"][:40].ljust(40)]
        for metric, (label, shown, fmt) in COLUMNS.items():
            v = _number(values.get(metric, ""))
            if v is not None and shown in ("us", "MB"):
                v = v * UNITS[unit[metric]] if unit.get(metric) in UNITS else None  # an unknown unit: not guessed
            parts.append(f"{label} " + (fmt.format(v) if v is not None else "?"))
        stalls = sorted(((_number(v) or 0.0, name[len(STALL[0]) : -len(STALL[1])]) for name, v in values.items()
                         if name.startswith(STALL[0]) and name.endswith(STALL[1])), reverse=True)  # fmt: skip
        parts.append("stalls " + ", ".join(f"{name} {cycles:.1f}" for cycles, name in stalls[:3] if cycles > 0))
        lines.append("  ".join(parts))
    return lines or [f"{path}: a header but no kernel rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("decode", "int4"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--summarize", metavar="CSV", help="print one line a kernel of ncu's --page raw --csv file")
    args = parser.parse_args()
    if args.summarize:
        print("\n".join(summarize(args.summarize)))
        return
    if args.what is None:
        parser.error("name a target (decode or int4) or --summarize a CSV")
    {"decode": decode, "int4": int4}[args.what](torch.device(args.device))


if __name__ == "__main__":
    main()
