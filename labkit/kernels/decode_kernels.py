"""Fused kernels for decoding one token at a time with the KV cache: the serving lab's GPU path.

At batch 1 a decode step reads every weight once and does 2 FLOPs with each: it should be
bound by memory bandwidth. On a GPU, with a model as small as GPT-2-small, it is bound by
something else first: the number of kernels. Eager PyTorch runs about 14 kernels per layer
(layer norms, three linears and their bias adds, reshapes, the cache writes, attention over
the cache, GELU, residual adds), and each costs a few microseconds even replayed from a CUDA
graph, while its bytes would take under one. So this module does a layer in five kernels, or three.

Five (``fused_decode_step(..., kernels_per_layer=5)``):

1. ``decode_linear(x, W_qkv, b, ln=ln_1, kv=(k_cache, v_cache, pos))``: LayerNorm as the
   prologue of the GEMV (every program normalizes the row itself: C floats, from L2), then
   the qkv projection and its bias; the new key and value go straight into the cache.
2. ``decode_attention(qkv, k_cache, v_cache, pos, n_head)``: the new query against its
   cached keys, the sequence split into ``splits`` parts run by separate programs
   (flash-decoding: one head alone is too little work to keep a GPU busy). Each part leaves
   its running max m, its sum l = Σ exp(s - m) and its weighted values a = Σ exp(s - m) v.
3. ``decode_linear(parts, W_o, b, out=x)``: the parts are merged in the GEMV's prologue,
   softmax-exact: y = Σ_p e^(m_p - M) a_p / Σ_p e^(m_p - M) l_p with M = max_p m_p; then
   the output projection, added into the residual stream x.
4. ``decode_linear(x, W_fc, b, ln=ln_2, gelu=True)``: LayerNorm, the MLP's first linear, GELU.
5. ``decode_linear(h, W_proj, b, out=x)``: the MLP's second linear, added into x.

Three (the default): 1 as above (also zeroing the next residual buffer); then
``decode_attention_proj``, each head's attention times its columns of W_o, added into x
atomically; then ``decode_mlp``, the whole MLP, each program a block of hidden units through
both linears, added into the second residual buffer (which becomes x for the next layer). Its
configs may hold a row in two tiles (768 = 512 + 256: no registers on masked columns) and deal
the hidden units evenly over the SMs (``MLPConfig``).

Plus ``embed`` before the first layer and ``decode_linear(x, W_head, ln=ln_f)`` after the
last: 5 or 3 · n_layer + 2 kernels a token. The residual stream and every activation stay in
fp32; weights and the cache keep the model's dtype. On Hopper, kernels are launched with
programmatic dependent launch (``pdl``): a kernel may start while the previous one finishes,
loads what no kernel of the step writes (its weights, its LayerNorm's weight and bias, and in
the attention the keys and values of the earlier positions) and only then waits for the
previous one's output; after the wait, as few round trips to memory as it can (the row to
normalize loaded once). ``ptx.loads_around_wait`` counts the loads on each side.

Each kernel sits beside its PyTorch reference, which is the CPU path and the test oracle
(the kernels run under ``TRITON_INTERPRET=1`` in the tests; ``kernels.ptx`` compiles them
for sm_90 in the tests too). ``serving.fused_decode_step`` chains them into a whole decode
step that a CUDA graph can capture: no shape depends on the position, and nothing waits for
the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._args import check_int
from .._derived import derived
from . import MIN_TRITON_PDL, fastest, triton_at_least
from .matmul_kernel import _num_sms
from .quant_kernels import GemvConfig, _choose, _on_interpreter

LOG2E = 1.4426950408889634


class AttentionParts(NamedTuple):
    """Partial attention of every (row, head, split): running max (log2 units), sum and weighted values."""

    m: torch.Tensor  # (B, H, S) max of the split's scores · log2(e), -inf for an empty split
    denom: torch.Tensor  # (B, H, S) Σ 2^(score - m), the softmax denominator of the split
    acc: torch.Tensor  # (B, H, S, head_size) Σ 2^(score - m) v


@functools.cache
def _kernels():
    """Build the kernels on first use, so that importing labkit never imports Triton."""
    import triton

    from . import decode_triton as t

    return triton, t.embed_kernel, t.linear_kernel, t.attention_kernel, t.attention_proj_kernel, t.mlp_kernel


def _greedy_kernel():
    from . import decode_triton as t

    return t.greedy_kernel


# ---------------------------------------------------------------------------------------
# Launch configurations (GEMV: BLOCK_N, BLOCK_K, SPLIT_K, warps, stages), timed per shape on a GPU.
# Decoding matrices are small (768 x 2304 in GPT-2-small): programs must be small and many.
# ---------------------------------------------------------------------------------------
# A config whose BLOCK_K covers K (and SPLIT_K 1) loads the program's weights in one tile before it waits for its
# input (PREFETCH): with programmatic dependent launch that load overlaps the previous kernel.
DECODE_GEMV_CONFIGS = [GemvConfig(*c) for c in (
    (4, 256, 1, 2, 3), (8, 256, 1, 4, 3), (16, 256, 1, 4, 3), (8, 512, 1, 4, 2), (16, 128, 1, 4, 4),
    (4, 512, 1, 2, 2), (32, 256, 1, 8, 3), (8, 256, 2, 4, 3), (8, 256, 4, 4, 3), (4, 256, 4, 2, 3),
    (16, 256, 4, 4, 3), (16, 512, 2, 8, 2),
    # one tile covers K <= 1024 (GPT-2-small's 768): the weights are loaded before the wait for the input
    (2, 1024, 1, 2, 1), (4, 1024, 1, 4, 1), (8, 1024, 1, 4, 1), (16, 1024, 1, 8, 1),
)]  # fmt: skip
INTERPRETER_DECODE_GEMV = GemvConfig(8, 32, 1, 1, 1)
ATTENTION_BLOCK_T = 16  # positions per step of the attention loop (and the unit a split is rounded to)
_tuned: dict[tuple, GemvConfig] = {}
autotune_log: dict[tuple, list] = {}
_candidates: dict[tuple, list] = {}  # each key's candidate configs, as last launched
_recording: list | None = None  # the keys launched inside recording_keys()


def pdl_supported(t: torch.Tensor) -> bool:
    """Programmatic dependent launch: a CUDA GPU of compute capability 9.0+ (Hopper) and a Triton that has it
    (``kernels.MIN_TRITON_PDL`` or newer: 3.4 has ``gdc_wait`` but cannot compile it)."""
    if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9 or not triton_at_least(MIN_TRITON_PDL):
        return False
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait")


def _pdl_args(pdl: bool) -> dict:
    """Launch arguments: the kernel's USE_PDL switch, and the launch flag that lets it overlap its predecessor."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


def default_splits(x: torch.Tensor, rows_times_heads: int) -> int:
    """Sequence splits for decode attention: about two programs per SM on a GPU, 4 elsewhere (a power of two)."""
    if not x.is_cuda:
        return 4
    sms = _num_sms(x.device)
    return max(1, min(32, 1 << max(0, math.ceil(math.log2(2 * sms / rows_times_heads)))))


# ---------------------------------------------------------------------------------------
# Checks: bad input is a ValueError that names the argument.
# ---------------------------------------------------------------------------------------
def _check_2d(name: str, t: torch.Tensor, cols: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating tensor, got {getattr(t, 'dtype', type(t))} "
                         f"{tuple(getattr(t, 'shape', ()))}")  # fmt: skip
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, rows: int) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be (rows, heads, positions, head_size), got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[0] != rows or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError(f"the caches must hold {rows} rows, contiguous in head_size, with equal strides")
    if pos.shape != (rows,) or pos.dtype not in (torch.int32, torch.int64) or not pos.is_contiguous():
        raise ValueError(f"pos must be a contiguous integer tensor of shape ({rows},), got {pos.dtype} "
                         f"{tuple(pos.shape)}")  # fmt: skip
    # the positions' values are checked where that costs nothing: on a GPU reading them would stall it (and break a
    # CUDA graph's capture); there the fused step's embed kernel keeps them inside the cache
    positions = k_cache.shape[2]
    if not pos.is_cuda and pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= positions):
        raise ValueError(f"pos must lie in [0, {positions}) (the cache's positions), got {pos.tolist()}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a tensor view can touch: [first, last) addresses."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_apart(written: str, w: torch.Tensor | None, others: dict) -> None:
    """A kernel's programs read their inputs while others write ``w``: the memory must not overlap."""
    if w is None:
        return
    a0, a1 = _span(w)
    for name, t in others.items():
        if t is not None and t.device == w.device:
            b0, b1 = _span(t)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{written} must not overlap {name}: programs of one kernel would read what "
                                 f"others write")  # fmt: skip


# ---------------------------------------------------------------------------------------
# The embedding: x = wte[token] + wpe[position]; the position is the row's length, which moves on.
# ---------------------------------------------------------------------------------------
def embed_reference(tokens, length, wte, wpe) -> tuple[torch.Tensor, torch.Tensor]:
    pos = length.clamp(max=wpe.shape[0] - 1)
    x = wte[tokens].float() + wpe[pos].float()
    length.copy_(pos + 1)
    return x, pos


def embed(tokens: torch.Tensor, length: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, backend=None,
          pdl: bool = False):  # fmt: skip
    """(x (B, C) fp32, pos (B,)): each row's token and position embedded; ``length`` += 1 in place (clamped)."""
    if tokens.dim() != 1 or tokens.shape != length.shape:
        raise ValueError(f"tokens and length must be 1-D and of one shape, got {tuple(tokens.shape)} "
                         f"and {tuple(length.shape)}")  # fmt: skip
    _check_2d("wte", wte)
    _check_2d("wpe", wpe, wte.shape[1])
    if not length.is_contiguous():
        raise ValueError("length must be contiguous (the kernel moves each row's length on in place)")
    if tokens.dtype not in (torch.int32, torch.int64) or length.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens and length must be integer tensors, got {tokens.dtype} and {length.dtype}")
    # their values are checked where that costs nothing (as _check_cache does): off a GPU. On one, the tokens come
    # from the model's own greedy choice and the lengths from this kernel, which keeps them inside wpe
    if not tokens.is_cuda and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= wte.shape[0]):
        raise ValueError(f"tokens must be ids in 0..{wte.shape[0] - 1} (wte's rows), got {tokens.tolist()}")
    if not length.is_cuda and length.numel() and int(length.min()) < 0:
        raise ValueError(f"length must be >= 0 (positions already in each row's cache), got {length.tolist()}")
    if _choose(backend, tokens, wte) == "reference":
        return embed_reference(tokens, length, wte, wpe)
    tokens = tokens.contiguous()
    triton, kernel, *_ = _kernels()
    B, C = tokens.shape[0], wte.shape[1]
    x = torch.empty(B, C, device=wte.device, dtype=torch.float32)
    pos = torch.empty_like(length)
    block = min(1024, triton.next_power_of_2(C))
    kernel[(B,)](tokens, length, pos, wte.contiguous(), wpe.contiguous(), x, C, wpe.shape[0], BLOCK=block,
                 **_pdl_args(pdl))  # fmt: skip
    return x, pos


# ---------------------------------------------------------------------------------------
# Attention of one new query per row over its cache, split along the sequence.
# ---------------------------------------------------------------------------------------
def _split_of(length: torch.Tensor, positions: int, splits: int, block_t: int) -> torch.Tensor:
    """(B, positions): which split each cached position belongs to (as the kernel divides the work)."""
    chunk = (torch.div(length + splits - 1, splits, rounding_mode="floor") + block_t - 1) // block_t * block_t
    return torch.arange(positions, device=length.device)[None, :] // chunk[:, None]


def decode_attention_reference(qkv, k_cache, v_cache, pos, n_head: int, splits: int,
                               block_t: int = ATTENTION_BLOCK_T) -> AttentionParts:  # fmt: skip
    B, C = qkv.shape[0], qkv.shape[1] // 3
    hs = C // n_head
    q = qkv[:, :C].float().view(B, n_head, 1, hs)
    T = k_cache.shape[2]
    scores = (q @ k_cache.float().transpose(-1, -2))[:, :, 0] * (LOG2E / math.sqrt(hs))  # (B, H, T), log2 units
    length = pos + 1
    visible = torch.arange(T, device=qkv.device)[None, :] < length[:, None]  # (B, T)
    split = _split_of(length, T, splits, block_t)  # (B, T)
    mine = (split[:, None, :] == torch.arange(splits, device=qkv.device)[None, :, None]) & visible[:, None, :]
    mine = mine[:, None]  # (B, 1, S, T): position t is split s's and visible
    s = scores[:, :, None, :].expand(B, n_head, splits, T)
    m = torch.where(mine, s, float("-inf")).amax(-1)  # (B, H, S)
    p = torch.where(mine, torch.exp2(s - torch.where(m.isinf(), 0.0, m)[..., None]), 0.0)
    return AttentionParts(m, p.sum(-1), p @ v_cache.float())


def merge_attention(parts: AttentionParts) -> torch.Tensor:
    """Merge the splits, exactly: (B, H·head_size) = Σ_p 2^(m_p - M) a_p / Σ_p 2^(m_p - M) l_p per head."""
    w = torch.exp2(parts.m - parts.m.amax(-1, keepdim=True))  # (B, H, S)
    y = (w[..., None] * parts.acc).sum(2) / (w * parts.denom).sum(2)[..., None]  # (B, H, hs)
    return y.flatten(1)


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     n_head: int, splits: int | None = None, backend=None, pdl: bool = False) -> AttentionParts:  # fmt: skip
    """Attention of each row's new query (the first third of ``qkv``) over cache positions 0..pos, causal.

    The cache must already hold the row's new key and value at ``pos``. Returns the
    ``splits`` partial results per (row, head); ``merge_attention`` (or the next GEMV's
    prologue) combines them.
    """
    _check_2d("qkv", qkv)
    B, C3 = qkv.shape
    if not isinstance(n_head, int) or n_head < 1 or C3 % (3 * n_head):
        raise ValueError(f"n_head must be a positive int dividing qkv's width / 3 ({C3 // 3}), got {n_head!r}")
    _check_cache(k_cache, v_cache, pos, B)
    hs = C3 // 3 // n_head
    if k_cache.shape[1] != n_head or k_cache.shape[3] != hs:
        raise ValueError(f"the caches must be (rows, {n_head}, positions, {hs}), got {tuple(k_cache.shape)}")
    splits = default_splits(qkv, B * n_head) if splits is None else splits
    if not isinstance(splits, int) or splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two >= 1, got {splits!r}")
    if _choose(backend, qkv, k_cache) == "reference":
        return decode_attention_reference(qkv, k_cache, v_cache, pos, n_head, splits)
    qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
    triton, _, _, kernel, *_ = _kernels()
    m = torch.empty(B, n_head, splits, device=qkv.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, n_head, splits, hs, device=qkv.device, dtype=torch.float32)
    kernel[(B * n_head, splits)](
        qkv, k_cache, v_cache, pos, m, lsum, acc, LOG2E / math.sqrt(hs),
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=n_head, HS=hs, BLOCK_D=triton.next_power_of_2(hs), SPLITS=splits, BLOCK_T=ATTENTION_BLOCK_T,
        num_warps=2 if hs <= 64 else 4, **_pdl_args(pdl),
    )  # fmt: skip
    return AttentionParts(m, lsum, acc)


# ---------------------------------------------------------------------------------------
# The GEMV with a prologue and an epilogue.
# ---------------------------------------------------------------------------------------
def decode_linear_reference(x, weight, bias=None, ln=None, gelu=False, out=None, kv=None, zero=None,
                            argmax=None) -> torch.Tensor:  # fmt: skip
    h = merge_attention(x) if isinstance(x, AttentionParts) else x.float()
    if ln is not None:
        h = F.layer_norm(h, (h.shape[-1],), ln[0].float(), None if ln[1] is None else ln[1].float(), ln[2])
    y = h @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if kv is not None:
        k_cache, v_cache, pos = kv
        B, H, _, hs = k_cache.shape
        C = H * hs
        rows = torch.arange(B, device=y.device)
        k_cache[rows, :, pos] = y[:, C : 2 * C].view(B, H, hs).to(k_cache.dtype)
        v_cache[rows, :, pos] = y[:, 2 * C :].view(B, H, hs).to(v_cache.dtype)
    if zero is not None:
        zero.zero_()
    if argmax is not None:
        torch.maximum(argmax, pack_best(*y.max(dim=-1)), out=argmax)
    if out is not None:
        return out.add_(y)
    return y


# ---------------------------------------------------------------------------------------
# Greedy decoding inside the kernels: the last GEMV folds each block's largest logit into one int64 a row.
# ---------------------------------------------------------------------------------------
GREEDY_EMPTY = -(2**63) + 1  # below every packed (value, index): a row's best before any block folds in


def pack_best(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(value, index) pairs as int64s whose order is the value's, then the smaller index's: the max of
    these is the argmax as ``torch.argmax`` returns it (the first index of the largest value). A float's
    bits, read as an int32, order as the float once a negative one's magnitude bits are flipped."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0, as argmax sees it
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return (key << 32) | (0x7FFFFFFF - indices.long())


def greedy_buffer(rows: int, device=None) -> torch.Tensor:
    """The int64 a row that ``decode_linear(..., argmax=)`` folds into, empty (``GREEDY_EMPTY``)."""
    return torch.full((rows,), GREEDY_EMPTY, dtype=torch.long, device=device)


def greedy_tokens_reference(best: torch.Tensor, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    tokens.copy_((0x7FFFFFFF - (best & 0x7FFFFFFF)).clamp(max=vocab - 1))
    best.fill_(GREEDY_EMPTY)
    return tokens


def greedy_tokens(best: torch.Tensor, tokens: torch.Tensor, vocab: int, backend=None, pdl: bool = False):
    """Each row's greedy token, unpacked from ``best`` into ``tokens`` (in place, e.g. the next step's
    input), and ``best`` emptied for the next step: one small kernel. Returns ``tokens``."""
    if best.dtype != torch.long or best.dim() != 1 or not best.is_contiguous():
        raise ValueError(f"best must be a contiguous 1-D int64 tensor, got {best.dtype} {tuple(best.shape)}")
    if tokens.shape != best.shape or tokens.dtype not in (torch.int32, torch.int64) or not tokens.is_contiguous():
        raise ValueError(f"tokens must be a contiguous integer tensor of shape {tuple(best.shape)}, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")  # fmt: skip
    check_int("vocab", vocab)
    if _choose(backend, best) == "reference":
        return greedy_tokens_reference(best, tokens, vocab)
    _greedy_kernel()[(best.shape[0],)](best, tokens, vocab, EMPTY=GREEDY_EMPTY, **_pdl_args(pdl))
    return tokens


def decode_linear(
    x: torch.Tensor | AttentionParts,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: tuple | None = None,
    gelu: bool = False,
    out: torch.Tensor | None = None,
    kv: tuple | None = None,
    zero: torch.Tensor | None = None,
    argmax: torch.Tensor | None = None,
    backend: str | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """y = epilogue(prologue(x) Wᵀ + b) for a few rows (decoding): one kernel.

    ``x`` is (B, K), or the ``AttentionParts`` of ``decode_attention`` (merged in the prologue).
    ``ln=(weight, bias, eps)`` applies a LayerNorm to x first. ``gelu`` applies tanh-GELU.
    ``out`` (B, N), fp32: the result is added into it (the residual stream) and ``out`` is
    returned. ``kv=(k_cache, v_cache, pos)``: columns C..2C of y (the key) and 2C..3C (the
    value) are also written into the caches at each row's ``pos``, with C = N / 3.
    ``zero`` (B, Z) fp32 with Z <= N is set to 0 on the side (the next residual accumulator
    of ``fused_decode_step``'s three-kernel layer), saving a launch. ``argmax`` (B,) int64
    (``greedy_buffer``): each row's largest output and its index, packed (``pack_best``), are
    folded in by atomic max, so greedy decoding needs no separate pass over the logits
    (``greedy_tokens`` unpacks them).
    """
    parts = isinstance(x, AttentionParts)
    _check_2d("weight", weight)
    N, K = weight.shape
    if parts:
        B, H, S, hs = x.acc.shape
        if H * hs != K or x.m.shape != (B, H, S) or x.denom.shape != (B, H, S):
            raise ValueError(f"attention parts of {H} heads x {hs} do not match the weight's {K} input features")
        if S & (S - 1):
            raise ValueError(f"the attention parts' splits must be a power of two, got {S}")
    else:
        _check_2d("x", x, K)
        B = x.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if ln is not None and (len(ln) != 3 or ln[0].shape != (K,) or (ln[1] is not None and ln[1].shape != (K,))):
        raise ValueError(f"ln must be (weight ({K},), bias ({K},) or None, eps)")
    if out is not None and (out.shape != (B, N) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous fp32 tensor of shape ({B}, {N}), got {out.dtype} {tuple(out.shape)}")
    if out is not None and gelu:
        raise ValueError("gelu and out cannot be combined: the sum of K-slices would pass through GELU piecewise")
    if kv is not None:
        _check_cache(kv[0], kv[1], kv[2], B)
        if N % 3 or kv[0].shape[1] * kv[0].shape[3] != N // 3:
            raise ValueError(f"kv: the weight's {N} outputs must be q, k and v of {kv[0].shape[1]} heads x "
                             f"{kv[0].shape[3]}")  # fmt: skip
    if zero is not None and (zero.dim() != 2 or zero.shape[0] != B or zero.shape[1] > N or zero.dtype != torch.float32
                             or not zero.is_contiguous()):  # fmt: skip
        raise ValueError(f"zero must be a contiguous fp32 tensor of shape ({B}, Z) with Z <= {N}, got "
                         f"{zero.dtype} {tuple(zero.shape)}")  # fmt: skip
    if argmax is not None:
        if argmax.shape != (B,) or argmax.dtype != torch.long or not argmax.is_contiguous():
            raise ValueError(f"argmax must be a contiguous int64 tensor of shape ({B},) (greedy_buffer), got "
                             f"{argmax.dtype} {tuple(argmax.shape)}")  # fmt: skip
        if out is not None:
            raise ValueError("argmax and out cannot be combined: the argmax is of whole outputs, not of added parts")
    inputs = {"parts.m": x.m, "parts.denom": x.denom, "parts.acc": x.acc} if parts else {"x": x}
    _check_apart("out", out, inputs)
    _check_apart("zero", zero, {**inputs, "out": out})
    anchor = x.acc if parts else x
    if _choose(backend, anchor, weight) == "reference":
        return decode_linear_reference(x, weight, bias, ln, gelu, out, kv, zero, argmax)
    y = out if out is not None else torch.empty(B, N, device=weight.device, dtype=torch.float32)
    if config is not None and config.split_k > 1 and out is None:
        raise ValueError("split_k > 1 needs out (the K-slices add into it)")
    if config is not None and config.split_k > 1 and kv is not None:
        raise ValueError("split_k > 1 cannot write the cache (kv): each K-slice would store its own partial sum")
    key = ("decode_linear", B, N, K, weight.dtype, parts, ln is not None, gelu, out is not None, kv is not None,
           weight.device, pdl)  # fmt: skip
    candidates = [c for c in DECODE_GEMV_CONFIGS if c.split_k == 1 or (out is not None and kv is None)]
    config = _config(key, config, candidates, INTERPRETER_DECODE_GEMV, weight, y, out is not None,
                     lambda c, y: _launch_linear(x, weight, bias, ln, gelu, y, out is not None, kv, zero, c, pdl))  # fmt: skip
    _launch_linear(x, weight, bias, ln, gelu, y, out is not None, kv, zero, config, pdl, argmax)
    return y


def _config(key: tuple, config, candidates: list, interpreter_config, weight: torch.Tensor, y: torch.Tensor,
            accumulates: bool, launch):  # fmt: skip
    """The launch configuration: ``config`` if given, a fixed small one under the interpreter, else the
    fastest of ``candidates`` for this shape, timed once by ``launch(config, output)``. A kernel that
    adds into its output is timed adding into a copy: tuning must not add into the residual stream."""
    if config is not None:
        return config
    _candidates[key] = candidates
    if _recording is not None and key not in _recording:
        _recording.append(key)
    if key in _tuned:  # tuned here, or chosen by serving.tune_fused_decode_step (also under the interpreter)
        return _tuned[key]
    if _on_interpreter(weight):
        return interpreter_config
    target = y.clone() if accumulates else y
    _tuned[key], autotune_log[key] = fastest(candidates, lambda c: launch(c, target), weight.device)
    return _tuned[key]


@contextlib.contextmanager
def recording_keys():
    """Collect the tuning keys of the kernels launched inside the block, in launch order, each once
    (``serving.tune_fused_decode_step`` tries each key's candidates, ``candidates(key)``)."""
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer


def candidates(key: tuple) -> list:
    """The launch configurations a kernel's autotuner chooses among for this key (seen at a launch)."""
    if key not in _candidates:
        raise ValueError(f"no kernel was launched with key {key!r}")
    return list(_candidates[key])


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A bias or LayerNorm vector as the kernels index it (ptr + offsets): stride 1. A no-op when it already is."""
    return None if t is None else t.contiguous()


def _launch_linear(x, weight, bias, ln, gelu, y, accumulate, kv, zero, cfg: GemvConfig, pdl: bool = False,
                   argmax: torch.Tensor | None = None) -> None:  # fmt: skip
    triton, _, kernel, *_ = _kernels()
    bias = _vector(bias)
    ln = (_vector(ln[0]), _vector(ln[1]), ln[2]) if ln is not None else None
    parts = isinstance(x, AttentionParts)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    N, K = w.shape
    B = y.shape[0]
    dummy = y  # unused pointer arguments (their branches are compiled out)
    if parts:
        hs, splits = x.acc.shape[-1], x.acc.shape[2]
        xs, stride_xm = dummy, 0
        m, lsum, acc = x.m.contiguous(), x.denom.contiguous(), x.acc.contiguous()
    else:
        hs, splits = 1, 1
        xs, stride_xm = x, x.stride(0)
        m = lsum = acc = dummy
        if x.stride(1) != 1:
            xs = x.contiguous()
            stride_xm = xs.stride(0)
    if kv is not None:
        k_cache, v_cache, pos = kv
        hs = k_cache.shape[3]
        cache_strides = k_cache.stride()[:3]
    else:
        k_cache = v_cache = pos = dummy
        cache_strides = (0, 0, 0)
    lnw, lnb, eps = ln if ln is not None else (dummy, None, 0.0)
    grid = (B, cfg.split_k, triton.cdiv(N, cfg.block_n))
    kernel[grid](
        xs, w, bias if bias is not None else dummy, y, lnw, lnb if lnb is not None else torch.zeros_like(lnw),
        m, lsum, acc, k_cache, v_cache, pos, zero if zero is not None else dummy,
        argmax if argmax is not None else dummy, N, K, float(eps), stride_xm,
        w.stride(0), y.stride(0), *cache_strides, zero.shape[1] if zero is not None else 0,
        C=N // 3 if kv is not None else 1, HS=hs, SPLITS=splits, PROLOGUE=2 if parts else (1 if ln is not None else 0),
        HAS_BIAS=bias is not None, GELU=gelu, ACCUMULATE=accumulate, KV_WRITE=kv is not None, ZERO=zero is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, PREFETCH=cfg.block_k >= K and cfg.split_k == 1, ARGMAX=argmax is not None,
        **_pdl_args(pdl),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The three-kernel layer: attention fused with its output projection; the whole MLP in one kernel.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionProjConfig:
    """Outputs of the projection per program, positions per step of the attention loop, warps."""

    block_n: int
    block_t: int
    num_warps: int = 4


@dataclass(frozen=True)
class MLPConfig:
    """Hidden units per program, columns per step along the model width, warps; and two ways to spend
    fewer registers, or fewer SMs idle:

    - ``tail``: a row that fits one ``block_k`` tile is held as two, the largest power of two up to
      the width and the rest rounded up to one (GPT-2-small's 768 = 512 + 256 exactly, where a
      1024-wide tile spends a quarter of its registers on masked columns; a width of 600 keeps 40
      masked of 512 + 128; a power of two stays one tile). Registers decide which CTAs share an SM.
    - ``per_sm``: the hidden units are dealt out evenly, about ``per_sm`` programs an SM, each owning
      ceil(hidden / (SMs · per_sm)) units of its ``block_h`` rows (GPT-2-small on 132 SMs with
      per_sm 1: 128 programs of 24 units, where 32 a program make 96 and leave 36 SMs idle).
    """

    block_h: int
    block_k: int
    num_warps: int = 4
    tail: bool = False
    per_sm: int = 0


ATTENTION_PROJ_CONFIGS = [AttentionProjConfig(*c) for c in (
    (64, 16, 2), (64, 32, 4), (128, 32, 4), (32, 16, 2), (128, 64, 4), (256, 32, 8), (64, 64, 4), (32, 32, 2),
    (16, 32, 2), (32, 64, 4),
    # a long context in few steps: more positions in flight per program (the first block_t positions load before
    # the PDL wait: up to 256, a whole decode of GPT-2-small's 33-288 positions in the serving check, nearly)
    (64, 128, 4), (128, 128, 8), (32, 128, 4), (64, 256, 8), (128, 256, 8),
)]  # fmt: skip
MLP_CONFIGS = [MLPConfig(*c) for c in (
    (8, 256, 4), (16, 256, 4), (32, 256, 8), (16, 128, 4), (4, 256, 2), (32, 128, 4), (64, 128, 8), (8, 128, 2),
    (4, 1024, 4), (8, 1024, 4), (8, 1024, 8), (16, 1024, 8),  # whole rows in one tile: loaded before the wait
    (2, 1024, 2), (4, 1024, 8), (16, 1024, 4), (32, 512, 8), (16, 1024, 2), (32, 1024, 8),
    # whole rows without masked columns (tail), and the hidden units dealt evenly over the SMs (per_sm)
    (32, 1024, 8, True), (16, 1024, 4, True), (32, 1024, 8, True, 1), (16, 1024, 4, True, 2), (32, 1024, 8, False, 1),
)]  # fmt: skip
INTERPRETER_ATTENTION_PROJ = AttentionProjConfig(32, 16, 1)
INTERPRETER_MLP = MLPConfig(8, 32, 1)


# The kernels' argument types as ``kernels.ptx`` compiles them without a GPU (for sm_90, in the tests,
# ``tools/compile_sweep.py`` and notebook 16): a bf16 model's decode (weights and cache bf16, activations fp32).
_P16, _P32, _I32, _I64 = "*bf16", "*fp32", "i32", "*i64"
GPU_SIGNATURES = {
    "linear_kernel": dict(x_ptr=_P32, w_ptr=_P16, b_ptr=_P16, y_ptr=_P32, lnw_ptr=_P16, lnb_ptr=_P16, m_ptr=_P32,
                          l_ptr=_P32, a_ptr=_P32, kc_ptr=_P16, vc_ptr=_P16, pos_ptr=_I64, z_ptr=_P32, best_ptr=_I64,
                          N=_I32, K=_I32, eps="fp32", stride_xm=_I32, stride_wn=_I32, stride_ym=_I32, stride_cb=_I32,
                          stride_ch=_I32, stride_ct=_I32, Z=_I32),
    "attention_proj_kernel": dict(qkv_ptr=_P32, kc_ptr=_P16, vc_ptr=_P16, pos_ptr=_I64, w_ptr=_P16, b_ptr=_P16,
                                  x_ptr=_P32, qk_scale="fp32", N=_I32, stride_qm=_I32, stride_cb=_I32, stride_ch=_I32,
                                  stride_ct=_I32, stride_wn=_I32, stride_xm=_I32),
    "mlp_kernel": dict(x_ptr=_P32, lnw_ptr=_P16, lnb_ptr=_P16, wfc_ptr=_P16, bfc_ptr=_P16, wpt_ptr=_P16, bp_ptr=_P16,
                       out_ptr=_P32, eps="fp32", C=_I32, HIDDEN=_I32, stride_xm=_I32, stride_fc=_I32, stride_pt=_I32,
                       stride_om=_I32),
    "attention_kernel": dict(qkv_ptr=_P32, kc_ptr=_P16, vc_ptr=_P16, pos_ptr=_I64, m_ptr=_P32, l_ptr=_P32, a_ptr=_P32,
                             qk_scale="fp32", stride_qm=_I32, stride_cb=_I32, stride_ch=_I32, stride_ct=_I32),
    "embed_kernel": dict(tok_ptr=_I64, length_ptr=_I64, pos_ptr=_I64, wte_ptr=_P16, wpe_ptr=_P16, x_ptr=_P32, C=_I32,
                         T_MAX=_I32),
    "greedy_kernel": dict(best_ptr=_I64, tok_ptr=_I64, N=_I32),
}  # fmt: skip


def gpu_spec(name: str, num_warps: int = 4, **constexprs) -> dict:
    """A kernel of ``decode_triton`` with these constexprs and warps, as ``kernels.ptx.kernel_report`` takes it."""
    from .ptx import kernel_spec

    return kernel_spec(GPU_SIGNATURES, name, num_warps, **constexprs)


def mlp_spec(cfg: MLPConfig, width: int = 768, hidden: int = 3072, sms: int = 132, pdl: bool = True) -> dict:
    """The MLP kernel as ``decode_mlp`` launches ``cfg`` (GPT-2-small's shape on an H100's 132 SMs by default),
    for ``kernels.ptx.kernel_report``."""
    return gpu_spec("mlp_kernel", cfg.num_warps, USE_PDL=pdl, **mlp_launch(cfg, width, hidden, sms)[1])


def transposed_weight(linear: torch.nn.Module) -> torch.Tensor:
    """``linear.weight`` transposed and contiguous (in, out), made once per weight version and kept on the module
    (``labkit._derived.derived``).

    The fused MLP kernel reads a block of hidden units' columns of W_proj: stored transposed, each is a
    contiguous row.
    """
    w = linear.weight
    return derived(linear, "_transposed_weight", (w,), lambda: w.detach().t().contiguous())


def decode_attention_proj_reference(qkv, k_cache, v_cache, pos, n_head, weight, bias, out) -> torch.Tensor:
    y = merge_attention(decode_attention_reference(qkv, k_cache, v_cache, pos, n_head, 1))
    return decode_linear_reference(y, weight, bias, out=out)


def decode_attention_proj(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, n_head: int,
    weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, backend: str | None = None,
    config: AttentionProjConfig | None = None, pdl: bool = False,
) -> torch.Tensor:  # fmt: skip
    """out += attention(q over the cache, positions 0..pos) Wᵀ + b: attention and output projection, one kernel.

    A program takes one head of one row and a block of the projection's outputs: it runs the
    head's attention over the row's positions (recomputed by each block of outputs: cheap
    next to reading the weights), multiplies by that head's columns of W, and adds the result
    into ``out`` atomically (every head adds into the same outputs).

    With ``pdl`` a program loads ``pos`` and the cache at the positions before ``pos`` before it waits
    for the kernel launched just before it: that kernel may write the new key and value at ``pos``
    (``decode_linear(..., kv=)`` does) and ``qkv``, but not ``pos`` or the earlier positions, which
    must come from kernels launched before it (in ``serving.fused_decode_step``: the step's
    ``embed``, and earlier steps).
    """
    _check_2d("qkv", qkv)
    B, C3 = qkv.shape
    if not isinstance(n_head, int) or n_head < 1 or C3 % (3 * n_head):
        raise ValueError(f"n_head must be a positive int dividing qkv's width / 3 ({C3 // 3}), got {n_head!r}")
    _check_cache(k_cache, v_cache, pos, B)
    C = C3 // 3
    _check_2d("weight", weight, C)
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if out.shape != (B, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape ({B}, {N}), got {out.dtype} {tuple(out.shape)}")
    _check_apart("out", out, {"qkv": qkv})
    if _choose(backend, qkv, k_cache) == "reference":
        return decode_attention_proj_reference(qkv, k_cache, v_cache, pos, n_head, weight, bias, out)
    qkv = qkv if qkv.stride(1) == 1 else qkv.contiguous()
    key = ("decode_attention_proj", B, N, C, n_head, weight.dtype, k_cache.shape[2], weight.device, pdl)
    config = _config(key, config, ATTENTION_PROJ_CONFIGS, INTERPRETER_ATTENTION_PROJ, weight, out, True,
                     lambda c, y: _launch_attention_proj(qkv, k_cache, v_cache, pos, n_head, weight, bias, y, c, pdl))  # fmt: skip
    _launch_attention_proj(qkv, k_cache, v_cache, pos, n_head, weight, bias, out, config, pdl)
    return out


def _launch_attention_proj(qkv, k_cache, v_cache, pos, n_head, weight, bias, out, cfg: AttentionProjConfig,
                           pdl: bool = False) -> None:  # fmt: skip
    triton, *_, kernel, _ = _kernels()
    B, N = out.shape
    hs = qkv.shape[1] // 3 // n_head
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    bias = _vector(bias)
    kernel[(B * n_head, triton.cdiv(N, cfg.block_n))](
        qkv, k_cache, v_cache, pos, w, bias if bias is not None else out, out, LOG2E / math.sqrt(hs), N,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), w.stride(0), out.stride(0),
        H=n_head, HS=hs, BLOCK_D=triton.next_power_of_2(hs), BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        HAS_BIAS=bias is not None, num_warps=cfg.num_warps, **_pdl_args(pdl),
    )  # fmt: skip


def decode_mlp_reference(x, ln, fc_weight, fc_bias, proj_weight_t, proj_bias, out) -> torch.Tensor:
    h = decode_linear_reference(x, fc_weight, fc_bias, ln=ln, gelu=True)
    return out.add_(x.float()).add_(decode_linear_reference(h, proj_weight_t.t(), proj_bias))


def decode_mlp(
    x: torch.Tensor, ln: tuple, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight_t: torch.Tensor,
    proj_bias: torch.Tensor | None, out: torch.Tensor, backend: str | None = None, config: MLPConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:  # fmt: skip
    """out += x + MLP(LayerNorm(x)), the MLP = GELU(· W_fcᵀ + b_fc) W_projᵀ + b_proj: one kernel.

    ``proj_weight_t`` is W_proj transposed, (hidden, C) (``transposed_weight(mlp.c_proj)``).
    A program takes a block of hidden units: their rows of W_fc give their activations, and
    their rows of W_projᵀ what they add to each output, atomically (every block adds into
    the same outputs). The residual x is added once, so with ``out`` zeroed beforehand it
    becomes the residual stream after the block. ``out`` must not be ``x``.
    """
    _check_2d("x", x)
    B, C = x.shape
    _check_2d("fc_weight", fc_weight, C)
    hidden = fc_weight.shape[0]
    _check_2d("proj_weight_t", proj_weight_t, C)
    if proj_weight_t.shape[0] != hidden:
        raise ValueError(f"proj_weight_t must be ({hidden}, {C}) (W_proj transposed), got {tuple(proj_weight_t.shape)}")
    for name, b, n in (("fc_bias", fc_bias, hidden), ("proj_bias", proj_bias, C)):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    if len(ln) != 3 or ln[0].shape != (C,) or (ln[1] is not None and ln[1].shape != (C,)):
        raise ValueError(f"ln must be (weight ({C},), bias ({C},) or None, eps)")
    if out.shape != (B, C) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape ({B}, {C}), got {out.dtype} {tuple(out.shape)}")
    _check_apart("out", out, {"x": x})
    if _choose(backend, x, fc_weight) == "reference":
        return decode_mlp_reference(x, ln, fc_weight, fc_bias, proj_weight_t, proj_bias, out)
    key = ("decode_mlp", B, C, hidden, fc_weight.dtype, fc_weight.device, pdl)
    config = _config(key, config, MLP_CONFIGS, INTERPRETER_MLP, fc_weight, out, True,
                     lambda c, y: _launch_mlp(x, ln, fc_weight, fc_bias, proj_weight_t, proj_bias, y, c, pdl))  # fmt: skip
    _launch_mlp(x, ln, fc_weight, fc_bias, proj_weight_t, proj_bias, out, config, pdl)
    return out


def mlp_launch(cfg: MLPConfig, width: int, hidden: int, sms: int) -> tuple[int, dict]:
    """(programs a row, the kernel's constexprs) for ``cfg`` on an MLP of this width and hidden size, on a
    device of ``sms`` SMs: what ``decode_mlp`` launches, and what ``gpu_spec`` compiles."""
    prefetch = cfg.block_k >= width
    block_k, block_r = cfg.block_k, 0
    if cfg.tail and prefetch:
        block_k = 1 << (width.bit_length() - 1)  # the largest power of two up to the width
        block_r = 0 if block_k == width else 1 << (width - block_k - 1).bit_length()  # the rest, rounded up
    units = cfg.block_h
    if cfg.per_sm:
        units = -(-hidden // (sms * cfg.per_sm))
        if units > cfg.block_h:
            raise ValueError(f"{cfg} deals {units} hidden units to a program on {sms} SMs, more than its "
                             f"block_h ({cfg.block_h}) rows")  # fmt: skip
    constexprs = dict(BLOCK_H=cfg.block_h, BLOCK_K=block_k, BLOCK_R=block_r, UNITS=units, PREFETCH=prefetch)
    return -(-hidden // units), constexprs


def _launch_mlp(x, ln, fc_weight, fc_bias, proj_weight_t, proj_bias, out, cfg: MLPConfig, pdl: bool = False) -> None:
    *_, kernel = _kernels()
    B, C = x.shape
    hidden = fc_weight.shape[0]
    programs, constexprs = mlp_launch(cfg, C, hidden, _num_sms(x.device))  # 4 "SMs" on the interpreter
    wfc = fc_weight if fc_weight.stride(1) == 1 else fc_weight.contiguous()
    wpt = proj_weight_t if proj_weight_t.stride(1) == 1 else proj_weight_t.contiguous()
    xs = x if x.stride(1) == 1 else x.contiguous()
    lnw, lnb = _vector(ln[0]), _vector(ln[1]) if ln[1] is not None else torch.zeros_like(ln[0])
    fc_bias = _vector(fc_bias) if fc_bias is not None else torch.zeros(hidden, device=x.device)  # no biases
    proj_bias = _vector(proj_bias) if proj_bias is not None else torch.zeros(C, device=x.device)
    kernel[(B, programs)](
        xs, lnw, lnb, wfc, fc_bias, wpt, proj_bias, out, float(ln[2]), C, hidden,
        xs.stride(0), wfc.stride(0), wpt.stride(0), out.stride(0), num_warps=cfg.num_warps, **constexprs,
        **_pdl_args(pdl),
    )  # fmt: skip
