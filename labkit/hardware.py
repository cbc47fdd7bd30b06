"""Hardware acceleration: counting FLOPs and bytes, measuring peaks, and the roofline.

The roofline model (Williams, Waterman and Patterson, 2009): a kernel that does F
floating-point operations and moves B bytes between memory and the chip has
*arithmetic intensity* I = F / B (FLOP per byte). On a device with peak compute P
(FLOP/s) and memory bandwidth W (byte/s) it cannot run faster than

    attainable(I) = min(P, W * I)

Left of the ridge point I* = P / W a kernel is memory-bound (more FLOPs per byte would
help); right of it, compute-bound (only faster arithmetic helps). Every kit kernel and
baseline is placed on this plot by its measured rate.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ._args import check_int
from .bench import device_label, measure
from .device import get_device
from .model import GPTConfig

DATASHEET = Path(__file__).resolve().parent.parent / "data" / "hardware_datasheet.csv"
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


# ---------------------------------------------------------------------------------------
# Counting: FLOPs (a multiply-add is 2) and the minimum bytes that must cross memory.
# ---------------------------------------------------------------------------------------
def _check_sizes(low: int = 1, **sizes) -> None:
    """Each size an int >= ``low`` (a ValueError naming it): counts of negative sizes are not counts.
    ``bytes_per_element`` may be any number > 0 (int4 packs two elements a byte: 0.5)."""
    for name, value in sizes.items():
        if name == "bytes_per_element":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"bytes_per_element must be a number > 0 (0.5 for int4), got {value!r}")
        else:
            check_int(name, value, low)


def matmul_flops(m: int, n: int, k: int) -> int:
    """(m, k) @ (k, n): m*n dot products of length k, a multiply and an add each."""
    for name, v in (("m", m), ("n", n), ("k", k)):
        check_int(name, v)
    return 2 * m * n * k


def matmul_bytes(m: int, n: int, k: int, bytes_per_element: int = 2) -> int:
    """Read A and B once, write C once: the least traffic any kernel can have."""
    _check_sizes(m=m, n=n, k=k, bytes_per_element=bytes_per_element)
    return (m * k + k * n + m * n) * bytes_per_element


def causal_pairs(q_len: int, kv_len: int) -> int:
    """Number of (query, key) pairs a causal mask keeps, queries at the end of the keys."""
    _check_sizes(q_len=q_len, kv_len=kv_len)
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len})")
    offset = kv_len - q_len  # query i sits at position offset + i and sees keys 0..offset+i
    return sum(offset + i + 1 for i in range(q_len))


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = True) -> int:
    """softmax(Q K^T) V: 2*d FLOPs per pair for Q K^T and 2*d for the weighted sum of V.

    Causal attention computes only the kept pairs (softmax's few FLOPs per pair are left out).
    """
    _check_sizes(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must be <= kv_len ({kv_len})")
    pairs = causal_pairs(q_len, kv_len) if causal else q_len * kv_len
    return 4 * batch * heads * pairs * head_dim


def attention_bytes(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, bytes_per_element: int = 2) -> int:
    """A fused (flash) kernel reads Q, K, V and writes O once; the score matrix never leaves the chip."""
    _check_sizes(batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                 bytes_per_element=bytes_per_element)  # fmt: skip
    return batch * heads * (2 * q_len + 2 * kv_len) * head_dim * bytes_per_element


def forward_flops(config: GPTConfig, batch: int, seq_len: int, causal: bool = True) -> int:
    """FLOPs of one LabGPT forward pass over (batch, seq_len) tokens: every matmul and attention.

    ``causal=True`` counts only the attention pairs the mask keeps (the useful work);
    ``causal=False`` counts all T x T pairs, which is what a masked dense kernel computes.
    """
    _check_sizes(batch=batch, seq_len=seq_len)
    C, L, T = config.n_embd, config.n_layer, seq_len
    per_token_linear = L * (2 * C * 3 * C + 2 * C * C + 2 * C * 4 * C * 2) + 2 * C * config.vocab_size
    attn = L * attention_flops(batch, config.n_head, T, T, config.head_size, causal=causal)
    return batch * T * per_token_linear + attn


def weight_bytes(config: GPTConfig, bytes_per_element: int = 4) -> int:
    """Bytes of the weights a forward pass reads (the tied head counted once)."""
    _check_sizes(bytes_per_element=bytes_per_element)
    C, L = config.n_embd, config.n_layer
    per_layer = 12 * C * C + 13 * C  # qkv, proj, MLP up and down with biases, two LayerNorms
    return (config.vocab_size * C + config.block_size * C + L * per_layer + 2 * C) * bytes_per_element


def forward_bytes(config: GPTConfig, batch: int, seq_len: int, bytes_per_element: int = 4) -> int:
    """Bytes an unfused forward pass moves: the weights once, and each operation's inputs and outputs.

    Per token and layer: qkv projection C in, 3C out; attention 3C in, C out; output
    projection C + C; MLP C + 4C and 4C + C; two LayerNorms 2C each: 24C elements. Plus the
    embeddings (C) and the logits (vocab). Attention scores are not counted (a fused kernel
    keeps them on chip).
    """
    _check_sizes(batch=batch, seq_len=seq_len)
    C, V = config.n_embd, config.vocab_size
    activations = batch * seq_len * (config.n_layer * 24 * C + C + V)
    return weight_bytes(config, bytes_per_element) + activations * bytes_per_element


def decode_step_flops(config: GPTConfig, batch: int, context_len: int) -> int:
    """FLOPs to generate one token per sequence with a KV cache holding ``context_len`` tokens."""
    _check_sizes(batch=batch)
    _check_sizes(0, context_len=context_len)
    C, L = config.n_embd, config.n_layer
    linear = L * (2 * C * 3 * C + 2 * C * C + 2 * C * 4 * C * 2) + 2 * C * config.vocab_size
    return batch * linear + L * attention_flops(batch, config.n_head, 1, context_len + 1, config.head_size)


def decode_step_bytes(config: GPTConfig, batch: int, context_len: int, bytes_per_element: int = 4) -> int:
    """Bytes a decode step must move: all weights, plus each sequence's cached keys and values."""
    _check_sizes(batch=batch)
    _check_sizes(0, context_len=context_len)
    cache = 2 * config.n_layer * batch * (context_len + 1) * config.n_embd * bytes_per_element
    return weight_bytes(config, bytes_per_element) + cache


# ---------------------------------------------------------------------------------------
# Measuring the device at hand.
# ---------------------------------------------------------------------------------------
@dataclass
class Peak:
    """A measured rate: ``value`` FLOP/s (or byte/s for bandwidth) and how it was measured."""

    name: str
    value: float
    unit: str
    seconds: float
    size: int
    device: str


def _matmul_operands(fmt: str, n: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    if fmt == "int8":
        a = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8, generator=g)
        b = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8, generator=g)
        # torch._int_mm wants B column-major on CUDA (the fast layout: see notebook 01)
        return a, b.t().contiguous().t()
    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt]
    return (
        torch.randn(n, n, device=device, dtype=dtype, generator=g),
        torch.randn(n, n, device=device, dtype=dtype, generator=g),
    )


def matmul_rate(fmt: str, n: int, device=None, repeat: int = 5) -> Peak | None:
    """Measured FLOP/s (OP/s for int8) of an n x n x n matmul in ``fmt``; None if unsupported here."""
    if fmt not in ("fp32", "tf32", "bf16", "fp16", "int8"):
        raise ValueError(f"fmt must be one of fp32, tf32, bf16, fp16, int8; got {fmt!r}")
    check_int("n", n, 16)
    device = torch.device(device) if device is not None else get_device()
    if fmt == "tf32" and device.type != "cuda":
        return None  # TF32 is an NVIDIA tensor-core format
    a, b = _matmul_operands(fmt, n, device)
    fn = (lambda: torch._int_mm(a, b)) if fmt == "int8" else (lambda: a @ b)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = fmt == "tf32"
    try:
        m = measure(fn, warmup=2, repeat=repeat, device=device)
    except RuntimeError:
        return None  # e.g. no int8 matmul kernel for this device
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    unit = "OP/s" if fmt == "int8" else "FLOP/s"
    return Peak(f"{fmt} matmul", matmul_flops(n, n, n) / m.median_s, unit, m.median_s, n, device_label(device))


def copy_bandwidth(n_bytes: int | None = None, device=None, repeat: int = 5) -> Peak:
    """Measured memory bandwidth of a large copy, counting bytes read plus bytes written."""
    device = torch.device(device) if device is not None else get_device()
    n_bytes = n_bytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    if n_bytes < 1 << 20:
        raise ValueError(f"n_bytes must be at least 1 MiB to measure memory, not cache; got {n_bytes}")
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), warmup=2, repeat=repeat, device=device)
    return Peak("copy bandwidth", 2 * src.numel() * 4 / m.median_s, "B/s", m.median_s, n_bytes, device_label(device))


def measure_peaks(device=None, n: int | None = None, formats=("fp32", "tf32", "bf16", "fp16", "int8")) -> dict:
    """Peaks of this device: {fmt: FLOP/s} for matmuls and "bandwidth": byte/s."""
    device = torch.device(device) if device is not None else get_device()
    n = n or (8192 if device.type == "cuda" else 1024)
    peaks = {}
    for fmt in formats:
        p = matmul_rate(fmt, n, device)
        if p is not None:
            peaks[fmt] = p.value
    peaks["bandwidth"] = copy_bandwidth(device=device).value
    return peaks


def roofline_time(flops: float, n_bytes: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline's lower bound on run time: the slower of computing and moving the data."""
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError("peak_flops and bandwidth must be positive")
    return max(flops / peak_flops, n_bytes / bandwidth)


def bound(flops: float, n_bytes: float, peak_flops: float, bandwidth: float) -> str:
    """'memory' if the kernel sits left of the ridge point, else 'compute'."""
    return "memory" if flops / n_bytes < peak_flops / bandwidth else "compute"


def roofline_plot(peaks: dict, points: list[dict] | None = None, ax=None, title: str | None = None):
    """Roofs for each measured format, and points {name, flops, bytes, seconds} placed on them."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    bandwidth = peaks["bandwidth"]
    intensities = [2.0**e for e in range(-4, 13)]
    colors = {"fp32": "tab:blue", "tf32": "tab:cyan", "bf16": "tab:green", "fp16": "tab:olive", "int8": "tab:red"}
    for fmt, peak in peaks.items():
        if fmt == "bandwidth":
            continue
        ax.plot(
            intensities,
            [min(peak, bandwidth * i) for i in intensities],
            color=colors.get(fmt, "gray"),
            lw=1.5,
            label=f"{fmt} roof {peak / 1e12:.3g} T/s",
        )
    for i, p in enumerate(points or []):
        intensity, rate = p["flops"] / p["bytes"], p["flops"] / p["seconds"]
        ax.scatter([intensity], [rate], zorder=3, s=30, edgecolor="k")
        offset = (5, -11) if i % 2 == 0 else (5, 6)  # alternate, so neighbours' labels do not collide
        ax.annotate(p["name"], (intensity, rate), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP / s")
    ax.set_title(title or f"roofline, memory {bandwidth / 1e9:.0f} GB/s", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return ax


# ---------------------------------------------------------------------------------------
# Number formats: range, precision, and what each does to a matmul.
# ---------------------------------------------------------------------------------------
NUMBER_FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8")
_TORCH_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
if hasattr(torch, "float8_e4m3fn"):
    _TORCH_FLOAT.update({"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2})


def format_properties() -> list[dict]:
    """Bits, largest value, smallest normal value and epsilon (spacing just above 1) of each format."""
    rows = []
    for fmt in NUMBER_FORMATS:
        if fmt == "int8":
            info = torch.iinfo(torch.int8)
            rows.append({"format": fmt, "bits": 8, "max": float(info.max), "smallest_normal": 1.0, "epsilon": 1.0})
        elif fmt == "tf32":  # fp32's 8-bit exponent, fp16's 10-bit mantissa, stored in 32 bits
            f = torch.finfo(torch.float32)
            rows.append({"format": fmt, "bits": 19, "max": f.max, "smallest_normal": f.tiny, "epsilon": 2.0**-10})
        elif fmt in _TORCH_FLOAT:
            f = torch.finfo(_TORCH_FLOAT[fmt])
            rows.append({"format": fmt, "bits": f.bits, "max": f.max, "smallest_normal": f.tiny, "epsilon": f.eps})
    return rows


def round_to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 values rounded to the nearest value ``fmt`` can hold (int8: symmetric per-tensor scale)."""
    if fmt not in NUMBER_FORMATS:
        raise ValueError(f"fmt must be one of {NUMBER_FORMATS}, got {fmt!r}")
    x = x.float()
    if fmt == "tf32":
        # keep 10 of fp32's 23 mantissa bits, rounding to nearest even: add half of the dropped
        # part (plus the last kept bit, for ties), then clear the 13 dropped bits
        bits = x.view(torch.int32)
        bits = bits + (0xFFF + ((bits >> 13) & 1))
        return (bits & ~0x1FFF).view(torch.float32)
    if fmt == "int8":
        scale = x.abs().max().clamp_min(1e-12) / 127
        return (x / scale).round().clamp(-127, 127) * scale
    if fmt not in _TORCH_FLOAT:
        raise ValueError(f"{fmt} needs torch >= 2.1 (float8 dtypes)")
    return x.to(_TORCH_FLOAT[fmt]).float()


def matmul_error(fmt: str, n: int = 256, seed: int = 0) -> float:
    """Relative error ||Q(A) Q(B) - A B|| / ||A B|| with inputs rounded to ``fmt``, products summed exactly.

    This isolates the error of *storing* the operands in a format (what tensor cores read);
    the accumulation is done in float64, like an fp32 accumulator over a short sum.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    exact = a.double() @ b.double()
    approx = round_to_format(a, fmt).double() @ round_to_format(b, fmt).double()
    return ((approx - exact).norm() / exact.norm()).item()


# ---------------------------------------------------------------------------------------
# Datasheets and what-ifs.
# ---------------------------------------------------------------------------------------
def datasheet() -> list[dict]:
    """Rows of data/hardware_datasheet.csv, numbers as floats (None where a figure is absent)."""
    with open(DATASHEET, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    numeric = (
        "fp32_tflops",
        "tf32_tflops",
        "bf16_tflops",
        "fp16_tflops",
        "fp8_tflops",
        "int8_tops",
        "memory_bandwidth_gbs",
        "memory_gb",
        "power_w",
    )
    for row in rows:
        for key in numeric:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
    return rows


WHAT_IF_FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


def what_if(flops: float, n_bytes: float, fmt: str = "bf16", rows: list[dict] | None = None) -> list[dict]:
    """Roofline time of a workload (``flops``, ``n_bytes``) on every datasheet device that has ``fmt``."""
    if fmt not in WHAT_IF_FORMATS:
        raise ValueError(f"fmt must be one of {WHAT_IF_FORMATS} (the datasheet's columns), got {fmt!r}")
    key = "int8_tops" if fmt == "int8" else f"{fmt}_tflops"
    out = []
    for row in rows or datasheet():
        peak = row.get(key) or (row.get("bf16_tflops") if fmt == "fp16" else None)
        if not peak or not row["memory_bandwidth_gbs"]:
            continue
        t = roofline_time(flops, n_bytes, peak * 1e12, row["memory_bandwidth_gbs"] * 1e9)
        out.append(
            {
                "device": row["name"],
                "seconds": t,
                "bound": bound(flops, n_bytes, peak * 1e12, row["memory_bandwidth_gbs"] * 1e9),
            }
        )
    return out


GPT3 = GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288)  # 175B (Brown et al., 2020)


def _register():
    from .bench import compare, register_suite

    @register_suite("hardware")
    def hardware_suite(quick: bool = False) -> list[dict]:
        """Matmul rate per number format (fp32 baseline) and copy bandwidth, on this device."""
        device = get_device()
        n = (2048 if quick else 8192) if device.type == "cuda" else (512 if quick else 1024)
        variants = {}
        for fmt in ("fp32", "tf32", "bf16", "fp16", "int8"):
            if fmt == "tf32" and device.type != "cuda":
                continue
            a, b = _matmul_operands(fmt, n, device)
            if fmt == "int8":
                variants[fmt] = lambda a=a, b=b: torch._int_mm(a, b)
            elif fmt == "tf32":
                variants[fmt] = lambda a=a, b=b: _with_tf32(a, b)
            else:
                variants[fmt] = lambda a=a, b=b: a @ b
        print(f"{n}^3 matmul per format on {device_label(device)}")
        rows = compare(variants, baseline="fp32", warmup=2, repeat=5, suite="hardware")
        for row in rows:
            row["name"] = f"{row['variant']} matmul {n}^3"
            row["tflops"] = matmul_flops(n, n, n) / row["variant_s"] / 1e12
            print(f"  {row['variant']:<5} {row['tflops']:.3g} T(FL)OP/s")
        bw = copy_bandwidth(device=device)
        print(f"copy bandwidth: {bw.value / 1e9:.1f} GB/s (read + write)")
        rows.append(
            {
                "suite": "hardware",
                "name": "copy bandwidth",
                "baseline": "copy",
                "variant": "copy",
                "baseline_s": bw.seconds,
                "variant_s": bw.seconds,
                "speedup": 1.0,
                "device": bw.device,
                "gbs": bw.value / 1e9,
            }
        )
        return rows


def _with_tf32(a, b):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


_register()
