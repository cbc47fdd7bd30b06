"""Quantization and mixed precision: small integers for weights and activations, 16-bit floats for training.

Affine quantization maps a real x to an integer q on a grid of 2^bits levels, and back:

    q = clamp(round(x / s) + z, q_min, q_max)        x̂ = (q - z) · s

(the survey writes q = round(x / s + z): the same thing, since the zero point z is an integer).
The scale s is the grid's step and the zero point z the integer that stands for 0.0, so 0.0
(padding, ReLU zeros) is stored exactly. Inside the clipping range [(q_min - z) s, (q_max - z) s]
the error is at most s / 2; outside it, values are clipped. Choosing the range is calibration:
min-max keeps every value, percentile clips rare outliers, MSE-optimal searches for the clip
that minimises ||x - x̂||². Symmetric quantization fixes z = 0 and uses the signed grid
±(2^(bits-1) - 1); asymmetric uses the unsigned grid 0..2^bits - 1 and fits [min, max].

One scale can serve a whole tensor, each output channel (row of a weight), or each group of
``group_size`` consecutive weights in a row: finer groups follow the data better and cost
more scales.

Then: post-training quantization of LabGPT by module swap (``quantize_model``), with three
schemes, int8 and int4 weight-only (decode: memory-bound, fewer bytes win) and W8A8
(prefill: compute-bound, int8 arithmetic wins); quantization-aware training (fake quantization
with a straight-through estimator); and mixed-precision training with a dynamic loss scaler
written from scratch (``LossScaler``), equal to ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._args import check_int
from ._derived import derived
from .kernels.quant_kernels import (
    group_major,
    int4_weight_only_linear,
    int8_linear,
    int8_weight_only_linear,
    pack_int4,
    unpack_int4,
)
from .model import replace_linears

EPS = torch.finfo(torch.float32).eps  # smallest scale, as PyTorch's observers use: a constant tensor still gets one
METHODS = ("minmax", "percentile", "mse")
SCHEMES = ("int8_weight_only", "int4_weight_only", "w8a8")
GRANULARITIES = ("tensor", "channel", "group")  # of the int4 scheme's scales


# ---------------------------------------------------------------------------------------
# Checks: bad input is a ValueError naming the argument and what is allowed.
# ---------------------------------------------------------------------------------------
def _check_bits(bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")


def _check_float(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16, float64), got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: there is nothing to quantize")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf: no finite scale can represent it")
    if x.dtype == torch.float64 and bool((x.abs() > torch.finfo(torch.float32).max).any()):
        raise ValueError(f"{name} holds values beyond float32's range (±3.4e38): scales are float32")


def _check_granularity(x: torch.Tensor, axis, group_size) -> None:
    if axis is not None and group_size is not None:
        raise ValueError("pass axis (per channel) or group_size (per group along the last dimension), not both")
    if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool) or not -x.dim() <= axis < x.dim()):
        raise ValueError(f"axis must be an int in {-x.dim()}..{x.dim() - 1} for a {x.dim()}-D tensor, got {axis!r}")
    if group_size is not None:
        if x.dim() == 0:
            raise ValueError("group_size needs a tensor of at least one dimension (groups run along the last one)")
        last = x.shape[-1]
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or last % group_size:
            divisors = [d for d in range(1, last + 1) if last % d == 0]
            raise ValueError(
                f"group_size must be a positive int that divides the last dimension ({last}); allowed: "
                f"{divisors if len(divisors) <= 12 else divisors[:6] + ['...'] + divisors[-3:]}; got {group_size!r}"
            )


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(q_min, q_max): -(2^(b-1) - 1)..2^(b-1) - 1 if symmetric (a grid symmetric about 0), else 0..2^b - 1."""
    _check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _storage_dtype(symmetric: bool) -> torch.dtype:
    return torch.int8 if symmetric else torch.uint8


# ---------------------------------------------------------------------------------------
# Granularity: view the tensor as rows, one quantization group per row.
# ---------------------------------------------------------------------------------------
def _param_shape(x: torch.Tensor, axis: int | None, group_size: int | None) -> tuple:
    """The shape of x's scales (and zero points) at this granularity, as ``calibrate`` returns them."""
    if group_size is not None:  # groups of consecutive elements along the last dimension, row by row
        return (*x.shape[:-1], x.shape[-1] // group_size)
    if axis is not None:  # one group per index along axis; params keep x's rank (broadcastable)
        return tuple(n if d == axis % x.dim() else 1 for d, n in enumerate(x.shape))
    return ()  # per tensor: a 0-d scale


def _as_groups(x: torch.Tensor, axis: int | None, group_size: int | None) -> tuple[torch.Tensor, tuple]:
    """(G, E) rows (one group per row) and the shape the G scales take beside x."""
    if group_size is not None:
        rows = x.reshape(-1, group_size)
    elif axis is not None:
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    else:
        rows = x.reshape(1, -1)
    return rows, _param_shape(x, axis, group_size)


def _fit_param(name: str, value: torch.Tensor, x: torch.Tensor, axis: int | None, group_size: int | None):
    """A given scale or zero point, checked (and a 1-D per-channel one reshaped) against the granularity."""
    expected = _param_shape(x, axis, group_size)
    if value.dim() == 0 or tuple(value.shape) == expected:
        return value
    if axis is not None and value.dim() == 1 and value.numel() == x.shape[axis]:  # as torch.quantize_per_channel
        return value.reshape(expected)
    what = ("per tensor" if axis is None and group_size is None
            else f"per channel along axis {axis}" if axis is not None else f"per group of {group_size}")
    raise ValueError(f"{name} has shape {tuple(value.shape)}; {what} a {tuple(x.shape)} tensor takes a single value "
                     f"(0-d) or shape {expected}" + (f" (or ({x.shape[axis]},))" if axis is not None else ""))  # fmt: skip


def _expand(param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast per-tensor/channel/group parameters to ``shape``; groups repeat along their dimension."""
    if param.dim() == 0:
        return param
    for d, (p, n) in enumerate(zip(param.shape, shape)):
        if p not in (1, n):
            param = param.repeat_interleave(n // p, dim=d)  # (..., n/g, ...) -> (..., n, ...)
    return param


# ---------------------------------------------------------------------------------------
# Calibration: choose the clipping range [lo, hi] of each group, then the scale and zero point.
# ---------------------------------------------------------------------------------------
def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point for clipping ranges [lo, hi] (tensors of one shape), as PyTorch's observers compute them.

    The range is widened to include 0, so zero is exact. Symmetric: s = max(|lo|, hi) / q_max, z = 0.
    Asymmetric: s = (hi - lo) / (2^bits - 1), z = q_min - round(lo / s). s is at least EPS.
    """
    qmin, qmax = integer_range(bits, symmetric)
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / (float(qmax - qmin) / 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
    scale = torch.clamp(scale, min=EPS)
    if symmetric:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero_point = torch.clamp(qmin - torch.round(lo / scale).to(torch.int32), qmin, qmax)
    return scale, zero_point


def _fake_quantize_rows(rows, scale, zero_point, qmin, qmax):
    """dequantize(quantize(rows)) with one (scale, zero point) per row: (G, E), (G,), (G,)."""
    q = torch.clamp(torch.round(rows * torch.reciprocal(scale)[:, None]) + zero_point[:, None], qmin, qmax)
    return (q - zero_point[:, None]) * scale[:, None]


def clipping_range(rows: torch.Tensor, bits: int, symmetric: bool, method: str = "minmax", percentile: float = 99.9):
    """(lo, hi) per row of ``rows`` (G, E), by min-max, percentile, or the MSE-optimal clip.

    - ``minmax``: the smallest and largest value: nothing is clipped, outliers stretch the grid.
    - ``percentile``: the values at ``percentile`` and 100 - ``percentile`` percent (of |x| if
      symmetric): the rarest ``100 - percentile`` percent are clipped.
    - ``mse``: search the clip that minimises the squared error ||x - x̂||² per row, the balance
      of rounding error (a wide grid has coarse steps) and clipping error: shrink the upper end
      of the min-max range by a factor α in 0.2..1 (81 steps) and keep each row's best, then do
      the same for the lower end (symmetric grids have one end, |x| max, searched once).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "percentile":
        if not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
        n = rows.shape[1]
        k_hi = min(n, max(1, math.ceil(percentile / 100 * n)))
        if symmetric:
            hi = rows.abs().kthvalue(k_hi, dim=1).values
            return -hi, hi
        k_lo = max(1, n + 1 - k_hi)
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if method == "minmax":
        return lo, hi
    qmin, qmax = integer_range(bits, symmetric)
    alphas = torch.linspace(0.2, 1.0, 81).tolist()

    def search(make_range):
        """The range make_range(α) with the smallest squared error, per row."""
        best_error, best_lo, best_hi = torch.full_like(lo, float("inf")), lo, hi
        for alpha in alphas:
            cand_lo, cand_hi = make_range(alpha)
            scale, zero_point = qparams_from_range(cand_lo, cand_hi, bits, symmetric)
            error = (_fake_quantize_rows(rows, scale, zero_point, qmin, qmax) - rows).pow(2).sum(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_lo, best_hi = torch.where(better, cand_lo, best_lo), torch.where(better, cand_hi, best_hi)
        return best_lo, best_hi

    if symmetric:
        absmax = torch.maximum(-lo, hi)
        return search(lambda alpha: (-alpha * absmax, alpha * absmax))
    lo, hi = search(lambda alpha: (lo, alpha * hi))  # the upper end first, the lower end fixed
    return search(lambda alpha: (alpha * lo, hi))  # then the lower end


def calibrate(
    x: torch.Tensor,
    bits: int = 8,
    axis: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    method: str = "minmax",
    percentile: float = 99.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The observer: (scale, zero_point) for ``x`` at this granularity and clipping ``method``.

    Per tensor: 0-d tensors. Per channel (``axis``): x's rank, size 1 except along ``axis``.
    Per group (``group_size`` along the last dimension): (*x.shape[:-1], x.shape[-1] // group_size).
    """
    _check_bits(bits)
    _check_float(x)
    _check_granularity(x, axis, group_size)
    rows, shape = _as_groups(x.detach().float(), axis, group_size)
    lo, hi = clipping_range(rows, bits, symmetric, method, percentile)
    scale, zero_point = qparams_from_range(lo, hi, bits, symmetric)
    return scale.reshape(shape), zero_point.reshape(shape)


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    axis: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    method: str = "minmax",
    scale: torch.Tensor | float | None = None,
    zero_point: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q = clamp(round(x / s) + z, q_min, q_max): returns (q, scale, zero_point).

    q is int8 if ``symmetric`` (grid ±(2^(bits-1) - 1)) else uint8 (0..2^bits - 1). The scale and
    zero point come from ``calibrate`` (``method``), unless given. Like PyTorch's kernels it
    multiplies by the reciprocal 1/s, so at 8 bits q equals ``torch.quantize_per_tensor`` /
    ``quantize_per_channel(...).int_repr()`` bit for bit.
    """
    _check_bits(bits)
    _check_float(x)
    _check_granularity(x, axis, group_size)
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale: pass both, or neither (to calibrate)")
        scale, zero_point = calibrate(x, bits, axis, group_size, symmetric, method)
    else:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        given = torch.as_tensor(0 if zero_point is None else zero_point)
        if given.is_floating_point() and not bool((given == given.round()).all()):
            raise ValueError(f"zero_point must be an integer, got {zero_point!r}")
        zero_point = given.to(device=x.device, dtype=torch.int32)
        scale, zero_point = _fit_param("scale", scale, x, axis, group_size), _fit_param(
            "zero_point", zero_point, x, axis, group_size)
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError("scale must be finite and > 0")
        qmin, qmax = integer_range(bits, symmetric)
        if symmetric and bool((zero_point != 0).any()):
            raise ValueError(f"zero_point must be 0 when symmetric=True, got {zero_point.tolist()}")
        if bool((zero_point < qmin).any()) or bool((zero_point > qmax).any()):
            raise ValueError(f"zero_point must be in {qmin}..{qmax} for {bits} bits, got {zero_point.tolist()}")
    qmin, qmax = integer_range(bits, symmetric)
    inv_scale = torch.reciprocal(_expand(scale.float(), x.shape))
    q = torch.round(x.float() * inv_scale) + _expand(zero_point, x.shape)
    return torch.clamp(q, qmin, qmax).to(_storage_dtype(symmetric)), scale, zero_point


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x̂ = (q - z) · s, with per-tensor, per-channel or per-group parameters (shapes as ``calibrate`` returns)."""
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"q must be an integer tensor (what quantize returns), got {getattr(q, 'dtype', type(q))}")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    zero_point = torch.as_tensor(zero_point, device=q.device)
    if zero_point.is_floating_point() and not bool((zero_point == zero_point.round()).all()):
        raise ValueError(f"zero_point must hold integers, got {zero_point.tolist()}")
    for name, param in (("scale", scale), ("zero_point", zero_point)):
        fits = param.dim() == 0 or (param.dim() == q.dim() and all(
            p in (1, n) or (p and n % p == 0) for p, n in zip(param.shape, q.shape)))
        if not fits:
            raise ValueError(f"{name} of shape {tuple(param.shape)} does not fit q of shape {tuple(q.shape)}: it must "
                             "be 0-d, or have q's rank with each size 1, q's size, or a divisor of it (groups), as "
                             "quantize returns it")  # fmt: skip
    return ((q.to(torch.int32) - _expand(zero_point, q.shape)).float() * _expand(scale, q.shape)).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int = 8, **kwargs) -> torch.Tensor:
    """dequantize(quantize(x)): x rounded to the grid, in x's dtype (no gradient trick: see ste_fake_quantize)."""
    q, scale, zero_point = quantize(x, bits, **kwargs)
    return dequantize(q, scale, zero_point, dtype=x.dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (token) of a 2-D x: (q (M, K) int8, scales (M,)).

    The dynamic activation quantization of W8A8: computed on the fly for every input. Equal to
    ``quantize(x, 8, axis=0, symmetric=True)`` for finite x, written for speed (no temporary |x|,
    in-place rounding): on a CPU these passes over the activations are most of W8A8's overhead.
    Unlike ``quantize`` it does not look for NaN or inf (that would cost a pass, and a device sync
    on a GPU): a row holding one gets a non-finite scale, and its outputs in W8A8 are NaN.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty 2-D float tensor (tokens, features), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")  # fmt: skip
    x = x.float()
    absmax = torch.maximum(x.amax(dim=1), -x.amin(dim=1))  # (M,) max |x| per row, without a temporary |x|
    scales = torch.clamp(absmax / 127.0, min=EPS)
    q = x * torch.reciprocal(scales)[:, None]  # |q| <= 127 (to a few ulps): no clamp needed
    return q.round_().to(torch.int8), scales


# ---------------------------------------------------------------------------------------
# Quantized linear layers (module swap, as in gpt-fast): same call signature as nn.Linear.
# ---------------------------------------------------------------------------------------
class _QuantizedLinear(nn.Module):
    """Shared parts: a float bias (trainable: fine-tuning may adapt it), sizes, and extra_repr."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _check_input(self, x) -> None:
        """A float tensor whose last dimension is in_features (else a clear ValueError, not a reshape error)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} takes a float tensor (..., in_features={self.in_features}), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")  # fmt: skip

    def _finish(self, y: torch.Tensor, shape) -> torch.Tensor:
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _kernel_backend(x: torch.Tensor) -> str:
    """Layers run the Triton kernels on GPUs only (the interpreter would crawl through a whole model), and
    the reference when a gradient is needed: the kernels have no backward."""
    return "reference" if not x.is_cuda or (torch.is_grad_enabled() and x.requires_grad) else "auto"


class _Int8PerChannelLinear(_QuantizedLinear):
    """int8 weights, symmetric, one fp32 scale per output channel: what both int8 schemes store."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale, _ = quantize(linear.weight.detach(), bits=8, axis=0, symmetric=True)
        module.weight.copy_(q)
        module.scales.copy_(scale.flatten())
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]


class Int8WeightOnlyLinear(_Int8PerChannelLinear):
    """nn.Linear with int8 weights (symmetric, one scale per output channel) and float activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = int8_weight_only_linear(x.reshape(-1, self.in_features), self.weight, self.scales, _kernel_backend(x))
        return self._finish(y, x.shape)


def _check_granularity_name(granularity) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _check_int4_group(group_size, in_features: int) -> None:
    """An int4 group: an even int >= 2 (two 4-bit weights share a byte) that divides ``in_features``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2 \
            or in_features % group_size:
        allowed = [g for g in range(2, in_features + 1, 2) if in_features % g == 0]
        raise ValueError(f"group_size must be an even int >= 2 that divides in_features ({in_features}); allowed: "
                         f"{allowed if len(allowed) <= 12 else allowed[:6] + ['...'] + allowed[-3:]}; got {group_size!r}")


def _int4_qparams(weight: torch.Tensor, group_size: int | None, granularity: str):
    """Asymmetric 4-bit min-max (scales fp16 (out, G), zeros int32 (out, G), the group length) of a (out, in) weight.

    Per tensor and per channel are groups too, of a whole row (G = 1): one storage format
    for all three. Scales are rounded to fp16 (2 bytes per group instead of 4) before use.
    """
    _check_granularity_name(granularity)
    _check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if granularity == "group":
        scale, zero_point = calibrate(weight, bits=4, group_size=group_size)
        length = group_size
    else:
        scale, zero_point = calibrate(weight, bits=4, axis=0 if granularity == "channel" else None)
        length = in_features
    scale = scale.expand(out_features, 1) if scale.dim() == 0 else scale  # per tensor: the same for every row
    zero_point = zero_point.expand(out_features, 1) if zero_point.dim() == 0 else zero_point
    return scale.reshape(out_features, -1).half(), zero_point.reshape(out_features, -1), length


def int4_parameters(weight: torch.Tensor, group_size: int | None = 32, granularity: str = "group"):
    """Asymmetric 4-bit quantization of a (out, in) weight: (q uint8 0..15, scales fp16, zeros uint8, group length).

    The weights are quantized with the fp16-rounded scales: what is stored is what was used.
    """
    scale, zero_point, length = _int4_qparams(weight, group_size, granularity)
    q, _, _ = quantize(weight, bits=4, group_size=length, scale=scale.float(), zero_point=zero_point)
    return q, scale, zero_point.to(torch.uint8), length


class Int4WeightOnlyLinear(_QuantizedLinear):
    """nn.Linear with 4-bit weights packed two per byte, one fp16 scale and zero point per group of a row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32) -> None:
        super().__init__(in_features, out_features, bias)
        if in_features % 2:
            raise ValueError(f"in_features must be even to pack two 4-bit weights per byte, got {in_features}")
        _check_int4_group(group_size, in_features)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        # (out, groups), stored group by group (quant_kernels.group_major): a GPU kernel's step reads one group of
        # consecutive rows, one contiguous run. .to(), copies and load_state_dict keep the layout.
        self.register_buffer("scales", group_major(torch.ones(out_features, groups, dtype=torch.float16)))
        self.register_buffer("zeros", group_major(torch.zeros(out_features, groups, dtype=torch.uint8)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, granularity: str = "group") -> Int4WeightOnlyLinear:
        """Per group of ``group_size`` (granularity "group"), per output channel ("channel") or per tensor ("tensor")."""
        q, scales, zeros, length = int4_parameters(linear.weight.detach(), group_size, granularity)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, length)
        module.weight.copy_(pack_int4(q))
        module.scales.copy_(scales)
        module.zeros.copy_(zeros)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(unpack_int4(self.weight), self.scales.float(), self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = int4_weight_only_linear(x.reshape(-1, self.in_features), self.weight, self.scales, self.zeros,
                                    self.group_size, _kernel_backend(x))  # fmt: skip
        return self._finish(y, x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


# ---------------------------------------------------------------------------------------
# W8A8 on a CPU: oneDNN's int8 linear with the weights packed once, where it is exact.
# ---------------------------------------------------------------------------------------
def _onednn_linear(x_int8, packed, w_scales, w_zeros) -> torch.Tensor:
    """(x_int8 @ Wᵀ) · w_scales in fp32 from weights packed by ``torch.ops.onednn.qlinear_prepack``.

    oneDNN's fast int8 path multiplies unsigned by signed bytes (the VNNI instruction), so the
    activations go in as q + 128 with zero point 128 (flipping q's sign bit adds 128 to an int8,
    one pass over bytes), and oneDNN subtracts 128 · Σ_k W[n, k] for us.
    """
    x_u8 = x_int8.view(torch.uint8).bitwise_xor(0x80)
    return torch.ops.onednn.qlinear_pointwise(
        x_u8, 1.0, 128, packed, w_scales, w_zeros, None, 1.0, 0, torch.float32, "none", [None], ""
    )


_ONEDNN_INT8: list[bool] = []  # the answer of cpu_int8_backend's self-check, once computed


def cpu_int8_backend() -> str:
    """Which integer matmul W8A8Linear uses on this CPU: ``"onednn"`` or ``"_int_mm"``.

    ``"onednn"`` (``torch.ops.onednn.qlinear_pointwise`` on weights packed once, the per-channel
    scales applied inside the GEMM) when this PyTorch has it and it is exact here. CPUs without
    VNNI multiply bytes with an instruction whose int16 pair sums saturate at the extremes, so a
    self-check multiplies extreme values once and compares them with ``torch._int_mm``; otherwise
    ``"_int_mm"`` (oneDNN's int8 GEMM too, repacking the weights at every call).
    """
    if not _ONEDNN_INT8:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(-127, 128, (6, 64), generator=g, dtype=torch.int8)
            w = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
            x[:2], w[:2] = 127, 127  # every pair of products at the extreme: 2 · 255 · 127 > 2^15
            x[1], w[1] = -127, -127
            scales = torch.rand(8, generator=g) + 0.5
            packed = torch.ops.onednn.qlinear_prepack(w, None)
            got = _onednn_linear(x, packed, scales, torch.zeros(8, dtype=torch.int64))
            ok = torch.allclose(got, torch._int_mm(x, w.t()).float() * scales, rtol=1e-6, atol=0.0)
        except (AttributeError, RuntimeError, NotImplementedError):  # no such op in this build, or no oneDNN
            ok = False
        _ONEDNN_INT8.append(ok)
    return "onednn" if _ONEDNN_INT8[0] else "_int_mm"


class W8A8Linear(_Int8PerChannelLinear):
    """int8 weights (per channel) and int8 activations (per token, quantized on the fly): an integer matmul.

    The integer matmul is the Triton kernel on GPUs and oneDNN's on CPUs: ``cpu_int8_backend()``
    says whether with weights packed once (``"onednn"``, packed at the first call and again
    whenever the weights change) or through ``torch._int_mm``. Rounding the activations has no
    useful gradient, so this layer is for inference only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:  # no tokens: nothing to quantize (an empty batch, as nn.Linear takes it)
            return x.new_zeros(*x.shape[:-1], self.out_features)
        x_int8, x_scales = quantize_per_token(x2)  # dynamic: a fresh scale for every token, every call
        bias = self.bias.detach() if self.bias is not None else None
        if self._use_onednn(x2):
            y = _onednn_linear(x_int8, *self._packed())  # acc · w_scales, fused into the GEMM
            y = torch.addcmul(bias, y, x_scales[:, None]) if bias is not None else y.mul_(x_scales[:, None])
            y = y.to(x.dtype)
        else:
            y = int8_linear(x_int8, self.weight, x_scales, self.scales, bias, x.dtype, _kernel_backend(x_int8))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _use_onednn(self, x2: torch.Tensor) -> bool:
        """Packed weights pay where repacking them at every call would cost more than oneDNN's fixed cost
        per call (about 40 µs on the kit's test CPU): big weights (1 MiB and more) and 16 rows and more."""
        big = self.in_features * self.out_features >= 2**20 and x2.shape[0] >= 16
        tracing = torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()
        return big and x2.device.type == "cpu" and not tracing and cpu_int8_backend() == "onednn"

    def _packed(self) -> tuple:
        """oneDNN's packed copy of the weights (and the scales it was packed with), made once per weight version."""
        def pack() -> tuple:
            zeros = torch.zeros(self.out_features, dtype=torch.int64)
            return torch.ops.onednn.qlinear_prepack(self.weight, None), self.scales.float().contiguous(), zeros

        return derived(self, "_onednn", (self.weight, self.scales), pack)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weights behind (oneDNN's opaque tensor cannot be copied)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_onednn", None)
        return state


def quantize_model(
    model: nn.Module, scheme: str, group_size: int = 32, granularity: str = "group", only=None
) -> nn.Module:
    """Post-training quantization by module swap, in place: every linear but the tied head; returns ``model``.

    Schemes: ``"int8_weight_only"`` (symmetric, per output channel), ``"int4_weight_only"``
    (asymmetric; per group of ``group_size`` along the input dimension, or per ``granularity``
    "channel" or "tensor") and ``"w8a8"`` (int8 weights per channel, int8 activations per token,
    dynamic). The embeddings, LayerNorms and the tied head stay in floating point.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    _check_granularity_name(granularity)
    if scheme == "int4_weight_only" and granularity == "group":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head" and (only is None or only(name)):
                try:
                    _check_int4_group(group_size, module.in_features)
                except ValueError as err:
                    raise ValueError(f"layer {name} (in_features {module.in_features}): {err}") from None
    factories: dict[str, Callable[[str, nn.Linear], nn.Module]] = {
        "int8_weight_only": lambda name, linear: Int8WeightOnlyLinear.from_linear(linear),
        "int4_weight_only": lambda name, linear: Int4WeightOnlyLinear.from_linear(linear, group_size, granularity),
        "w8a8": lambda name, linear: W8A8Linear.from_linear(linear),
    }
    return replace_linears(model, factories[scheme], only=only)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (a tied weight once): what the model occupies in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def layer_errors(original: nn.Module, quantized: nn.Module) -> dict[str, float]:
    """Relative error ||W - Ŵ|| / ||W|| of each quantized layer against the float layer it replaced."""
    errors = {}
    for name, module in quantized.named_modules():
        if hasattr(module, "dequantized_weight"):
            w = original.get_submodule(name).weight.detach().float()
            errors[name] = ((module.dequantized_weight() - w).norm() / w.norm()).item()
    return errors


# ---------------------------------------------------------------------------------------
# Quantization-aware training: fake quantization with a straight-through estimator.
# ---------------------------------------------------------------------------------------
class FakeQuantize(torch.autograd.Function):
    """Forward: (clamp(round(x / s) + z) - z) · s. Backward: the straight-through estimator.

    round() has zero gradient almost everywhere, so training through it would never move the
    weights. The STE pretends the rounding is the identity: the gradient passes straight
    through, except where x was clipped (outside the grid), where it is 0 — as in PyTorch's
    ``torch.fake_quantize_per_channel_affine``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        q = torch.round(x * torch.reciprocal(scale)) + zero_point  # scale, zero_point broadcast to x
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return ((torch.clamp(q, qmin, qmax) - zero_point) * scale).to(x.dtype)  # fp32 scales: back to x's dtype

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None


def int4_fake_quantize(weight: torch.Tensor, group_size: int | None = 32, granularity: str = "group") -> torch.Tensor:
    """The int4 weight-only scheme simulated in floating point, with a straight-through gradient.

    Scale and zero point are recomputed from the current weights (min-max) at every call and
    get no gradient; the forward value equals what ``Int4WeightOnlyLinear`` would compute with.
    """
    scale, zero_point, _ = _int4_qparams(weight.detach(), group_size, granularity)
    scale = _expand(scale.float(), weight.shape)
    return FakeQuantize.apply(weight, scale, _expand(zero_point.float(), weight.shape), 0, 15)


class QATLinear(nn.Linear):
    """nn.Linear that trains its fp32 weight through 4-bit fake quantization (the seed's Dequantize(Quantize(W))·x).

    It is an nn.Linear, so ``quantize_model(model, "int4_weight_only", group_size, granularity)``
    converts it afterwards into the real thing, with the same numbers as its forward pass.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32, granularity: str = "group"
    ) -> None:
        super().__init__(in_features, out_features, bias)
        _check_granularity_name(granularity)
        if granularity == "group":
            _check_int4_group(group_size, in_features)
        self.group_size, self.granularity = group_size, granularity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, int4_fake_quantize(self.weight, self.group_size, self.granularity), self.bias)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", int4 per {self.granularity}"
            + (f" of {self.group_size}" if self.granularity == "group" else "")
        )


def prepare_qat(model: nn.Module, group_size: int = 32, granularity: str = "group") -> nn.Module:
    """Swap every linear (but the tied head) for a QATLinear sharing its weights, in place; returns ``model``."""
    _check_granularity_name(granularity)

    def factory(name: str, linear: nn.Linear) -> QATLinear:
        if granularity == "group":
            try:
                _check_int4_group(group_size, linear.in_features)
            except ValueError as err:
                raise ValueError(f"layer {name} (in_features {linear.in_features}): {err}") from None
        qat = QATLinear(linear.in_features, linear.out_features, linear.bias is not None, group_size, granularity)
        qat.weight, qat.bias = linear.weight, linear.bias  # the same Parameters: the optimizer sees the masters
        return qat.to(linear.weight.device)

    return replace_linears(model, factory)


# ---------------------------------------------------------------------------------------
# Mixed precision: dynamic loss scaling, written from scratch.
# ---------------------------------------------------------------------------------------
class LossScaler:
    """Dynamic loss scaling, the algorithm of ``torch.amp.GradScaler`` written out.

    fp16 gradients underflow: anything below 2^-25 (half the smallest subnormal, 2^-24) rounds
    to 0. Multiplying the loss by a large scale S multiplies every gradient by S (the chain
    rule is linear), lifting them into range; dividing the gradients by S before the
    optimizer step undoes it. Too large an S overflows
    to inf: then the step is skipped and S halves. After ``growth_interval`` clean steps in a
    row S doubles, to probe for the largest scale that does not overflow.

    Use it like GradScaler: ``scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not init_scale > 0 or not math.isfinite(init_scale):
            raise ValueError(f"init_scale must be finite and > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        check_int("growth_interval", growth_interval)
        self.scale_value = torch.tensor(init_scale, dtype=torch.float32)  # fp32, as GradScaler keeps it
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.growth_tracker = 0  # clean steps since the last change of scale
        # per optimizer, since the last update(), as GradScaler keeps it: whether its gradients were
        # unscaled, whether they held an inf or a NaN, whether it stepped (or skipped its step)
        self._optimizers: dict[int, dict] = {}
        self.history: list[dict] = []  # one {"scale", "skipped"} per update(): the scale used, and the outcome

    def get_scale(self) -> float:
        return self.scale_value.item()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss · S: backward through it gives gradients · S."""
        return loss * self.scale_value.to(loss.device)

    @property
    def found_inf(self) -> bool:
        """Whether a gradient unscaled since the last update() held an inf or a NaN (any optimizer's)."""
        return any(state["found_inf"] for state in self._optimizers.values())

    def _state(self, optimizer: torch.optim.Optimizer) -> dict:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return self._optimizers.setdefault(id(optimizer), {"unscaled": False, "found_inf": False, "stepped": False})

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient of ``optimizer`` by S (multiply by 1/S, computed in float64 then rounded,
        as PyTorch does), and note whether any of them holds an inf or a NaN."""
        state = self._state(optimizer)
        if state["unscaled"]:
            raise ValueError("unscale_ was already called on this optimizer since the last update()")
        if state["stepped"]:
            raise ValueError("unscale_ was called after step() on this optimizer; call update() first")
        inv_scale = self.scale_value.double().reciprocal().float()
        found = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                found = found or not bool(torch.isfinite(p.grad).all())
                p.grad.mul_(inv_scale.to(p.grad.device))
        state["found_inf"], state["unscaled"] = found, True

    def step(self, optimizer: torch.optim.Optimizer):
        """Unscale (if not done yet), then step the optimizer, unless one of its gradients overflowed: then
        skip. Each optimizer is judged on its own gradients; update() backs off if any of them overflowed."""
        state = self._state(optimizer)
        if state["stepped"]:
            raise ValueError("step was already called on this optimizer since the last update()")
        if not state["unscaled"]:
            self.unscale_(optimizer)
        state["stepped"] = True
        return None if state["found_inf"] else optimizer.step()

    def update(self) -> None:
        """Back off after an overflow (in any optimizer's gradients); grow after ``growth_interval`` clean
        steps in a row."""
        found_inf = self.found_inf
        self.history.append({"scale": self.get_scale(), "skipped": found_inf})
        if found_inf:
            self.scale_value = (self.scale_value.double() * self.backoff_factor).float()
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                grown = (self.scale_value.double() * self.growth_factor).float()
                if torch.isfinite(grown):  # never grow into inf
                    self.scale_value = grown
                self.growth_tracker = 0
        self._optimizers = {}


def train_step(model, optimizer, x, y, autocast_dtype: torch.dtype | None = None, scaler=None) -> float:
    """One training step: forward (under autocast to ``autocast_dtype`` if given), backward, optimizer step.

    The weights stay fp32 (the master copy): autocast runs each matmul in the low-precision
    dtype on casts of them, and the optimizer updates the fp32 originals. With ``scaler``
    (a LossScaler or GradScaler), the loss is scaled and steps with inf/NaN gradients skipped.
    """
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.item()


# ---------------------------------------------------------------------------------------
# The PTQ table: quality, memory and speed of each scheme, side by side.
# ---------------------------------------------------------------------------------------
PTQ_VARIANTS = {  # label -> quantize_model arguments (None: the fp32 model itself)
    "fp32": None,
    "int8 weight-only": dict(scheme="int8_weight_only"),
    "int4 weight-only, groups of 32": dict(scheme="int4_weight_only", group_size=32),
    "int4 weight-only, per channel": dict(scheme="int4_weight_only", granularity="channel"),
    "int4 weight-only, per tensor": dict(scheme="int4_weight_only", granularity="tensor"),
    "w8a8": dict(scheme="w8a8"),
}


def scheme_table(
    variants: dict | None = None,
    text: str | None = None,
    n_task: int = 40,
    prefill_shape: tuple[int, int] | None = (4, 256),
    decode_tokens: int = 32,
    repeat: int = 5,
    model_name: str = "tiny",
) -> list[dict]:
    """One row per variant: perplexity, task accuracy, weight bytes, and (if ``prefill_shape``) measured speed.

    ``variants`` maps a label to ``quantize_model`` arguments (None: unquantized); each quantizes
    a fresh copy of the shipped model. Accuracy: specific zero-shot prompts, ``n_task`` per task,
    averaged over the 5 tasks. Speed, measured side by side after the quality columns: one
    forward pass of ``prefill_shape`` (batch, tokens), and greedy decoding of ``decode_tokens``
    tokens at batch 1 with the KV cache (per token); medians of ``repeat`` runs.
    """
    from . import data, load_model
    from .bench import compare
    from .evaluation import evaluate, perplexity
    from .train import validation_text

    text = text or validation_text(40_000)
    base, tokenizer = load_model(model_name)
    rows, models = [], {}
    for label, arguments in (variants or PTQ_VARIANTS).items():
        model = copy.deepcopy(base)
        if arguments is not None:
            quantize_model(model, **arguments)
        models[label] = model
        accuracy = sum(evaluate(model, tokenizer, t, "specific", 0, n=n_task) for t in data.tasks()) / len(data.tasks())
        rows.append(
            {
                "variant": label,
                "perplexity": perplexity(model, tokenizer, text),
                "accuracy": accuracy,
                "weight_bytes": weight_bytes(model),
            }
        )
    if prefill_shape is None:
        return rows
    idx = torch.randint(0, 100, prefill_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = compare({k: (lambda m=m: m(idx)) for k, m in models.items()}, warmup=1, repeat=repeat, show=False)
        decode = compare(
            {k: (lambda m=m: m.generate(idx[:1, :16], decode_tokens, temperature=0)) for k, m in models.items()},
            warmup=1,
            repeat=repeat,
            show=False,
        )
    for row, p, d in zip(rows, prefill, decode):
        row.update(prefill_s=p["variant_s"], decode_s_per_token=d["variant_s"] / decode_tokens)
    return rows


class NoOpLinear(nn.Module):
    """A stand-in for a linear layer that costs (almost) nothing: a forward pass minus its matmuls."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class Int8GemmOnlyLinear(nn.Module):
    """A stand-in for a W8A8 linear that runs only its integer matmul (``torch._int_mm`` on a fixed int8
    input of the right shape) and none of the quantizing and dequantizing around it: a model made of
    these shows the best any W8A8 implementation could reach with this machine's int8 GEMM."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.register_buffer("weight_t", quantize(linear.weight.detach(), 8, axis=0, symmetric=True)[0].t())
        self._inputs: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows not in self._inputs:
            self._inputs[rows] = torch.randint(-127, 128, (rows, x.shape[-1]), dtype=torch.int8, device=x.device)
        torch._int_mm(self._inputs[rows], self.weight_t)
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _register() -> None:
    from .bench import compare_rounds, register_suite

    @register_suite("quant")
    def quant_suite(quick: bool = False) -> list[dict]:
        """W8A8 linear vs fp32 nn.Linear vs PyTorch dynamic int8 (M=256, K=N=2048); LabGPT tiny W8A8 prefill."""
        from . import load_model
        from .evaluation import perplexity
        from .train import validation_text

        rounds, repeat = (3, 3) if quick else (3, 7)
        torch.manual_seed(0)
        linear = nn.Linear(2048, 2048)
        x = torch.randn(256, 2048)
        w8a8 = W8A8Linear.from_linear(linear)
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
        x_int8, w_t = torch.randint(-127, 128, (256, 2048), dtype=torch.int8), w8a8.weight.t()
        variants = {
            "fp32 nn.Linear 256x2048x2048": lambda: linear(x),
            "labkit W8A8Linear": lambda: w8a8(x),
            "torch quantize_dynamic int8": lambda: dynamic(x),
            "torch._int_mm alone (no quantize/dequantize)": lambda: torch._int_mm(x_int8, w_t),
        }
        with torch.no_grad():
            rows = compare_rounds(variants, rounds, repeat, suite="quant")
            exact = linear(x)
            for row in rows[:3]:  # how far each output is from fp32's (per-token activations vs per-tensor)
                row["relative_error"] = ((variants[row["variant"]]() - exact).norm() / exact.norm()).item()
        print("output error vs fp32: " + ", ".join(f"{r['variant']} {r['relative_error']:.2e}" for r in rows[1:3]))

        model, tokenizer = load_model("tiny")
        quantized = quantize_model(copy.deepcopy(model), "w8a8")
        instant = replace_linears(copy.deepcopy(model), lambda name, linear: NoOpLinear(linear.out_features))
        gemm_only = replace_linears(copy.deepcopy(model), lambda name, linear: Int8GemmOnlyLinear(linear))
        idx = torch.randint(0, 100, (4, 256), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            prefill = compare_rounds(
                {
                    "tiny fp32 prefill 4x256": lambda: model(idx),
                    "tiny W8A8 prefill 4x256": lambda: quantized(idx),
                    "tiny fp32 prefill without its linears (Amdahl bound)": lambda: instant(idx),
                    "tiny prefill with only the int8 GEMMs of its linears (W8A8's bound here)": lambda: gemm_only(idx),
                },
                rounds,
                repeat,
                suite="quant",
            )
        text = validation_text(5_000 if quick else 40_000)
        ppl_fp32, ppl_w8a8 = perplexity(model, tokenizer, text), perplexity(quantized, tokenizer, text)
        for row in prefill:
            row["perplexity"] = ppl_w8a8 if "W8A8" in row["variant"] else ppl_fp32
        print(f"perplexity: fp32 {ppl_fp32:.4f}, W8A8 {ppl_w8a8:.4f} ({100 * (ppl_w8a8 / ppl_fp32 - 1):+.2f}%)")
        return rows + prefill


_register()
