"""Fused kernels for decoding one token at a time with the KV cache: the serving lab's GPU path.

At batch 1 a decode step reads every weight once and does 2 FLOPs with each: it should be
bound by memory bandwidth. On a GPU, with a model as small as GPT-2-small, it is bound by
something else first: the number of kernels. Eager PyTorch runs about 14 kernels per layer
(layer norms, three linears and their bias adds, reshapes, the cache writes, attention over
the cache, GELU, residual adds), and each costs a few microseconds even replayed from a CUDA
graph, while its bytes would take under one. So this module does a layer in five kernels:

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

plus ``embed`` before the first layer and ``decode_linear(x, W_head, ln=ln_f)`` after the
last: 5 · n_layer + 2 kernels a token. The residual stream and every activation stay in
fp32; weights and the cache keep the model's dtype.

Each kernel sits beside its PyTorch reference, which is the CPU path and the test oracle
(the kernels run under ``TRITON_INTERPRET=1`` in the tests). ``serving.fused_decode_step``
chains them into a whole decode step that a CUDA graph can capture: no shape depends on the
position, and nothing waits for the host.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import fastest
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
    import triton.language as tl

    @triton.jit
    def embed_kernel(tok_ptr, length_ptr, pos_ptr, wte_ptr, wpe_ptr, x_ptr, C, T_MAX, BLOCK: tl.constexpr):
        # x[b] = wte[token] + wpe[pos], pos = the row's length (clamped to the context); the length moves on here
        b, blk = tl.program_id(0), tl.program_id(1)
        pos = tl.minimum(tl.load(length_ptr + b), T_MAX - 1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < C
        tok = tl.load(tok_ptr + b)
        x = tl.load(wte_ptr + tok * C + offs, mask=inside, other=0.0).to(tl.float32)
        x += tl.load(wpe_ptr + pos * C + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(x_ptr + b * C + offs, x, mask=inside)
        if blk == 0:
            tl.store(pos_ptr + b, pos)
            tl.store(length_ptr + b, pos + 1)

    @triton.jit
    def linear_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, lnw_ptr, lnb_ptr, m_ptr, l_ptr, a_ptr, kc_ptr, vc_ptr, pos_ptr,
        N, K, eps, stride_xm, stride_wn, stride_ym, stride_cb, stride_ch, stride_ct,
        C: tl.constexpr, HS: tl.constexpr, SPLITS: tl.constexpr, PROLOGUE: tl.constexpr,
        HAS_BIAS: tl.constexpr, GELU: tl.constexpr, ACCUMULATE: tl.constexpr, KV_WRITE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # program (m, pid_k, pid_n): row m, K-slice pid_k, outputs pid_n*BLOCK_N..; a GEMV as in
        # quant_kernels.int8_gemv_kernel, with a prologue (PROLOGUE 1: LayerNorm of the row; 2: merge the
        # attention parts into the row) and an epilogue (bias, GELU, add into y, write k and v to the cache)
        m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # rows past the edge wrap: computed, never stored
        offs_k = tl.arange(0, BLOCK_K)
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        mean = 0.0
        rstd = 1.0
        if PROLOGUE == 1:  # LayerNorm statistics of the whole row, two passes (as exact as torch's)
            s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                s1 += tl.load(x_ptr + m * stride_xm + k + offs_k, mask=k + offs_k < K, other=0.0).to(tl.float32)
            mean = tl.sum(s1, axis=0) / K
            s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + m * stride_xm + k + offs_k, mask=k + offs_k < K, other=0.0).to(tl.float32)
                d = tl.where(k + offs_k < K, xk - mean, 0.0)
                s2 += d * d
            rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # elementwise products, summed once at the end
        for k in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            kk = k + offs_k
            inside = kk < K
            if PROLOGUE == 2:  # x_k = Σ_p 2^(m_p - M) a_pk / Σ_p 2^(m_p - M) l_p for head k // HS
                offs_s = tl.arange(0, SPLITS)
                part = (m * (K // HS) + kk // HS)[None, :] * SPLITS + offs_s[:, None]  # (SPLITS, BLOCK_K)
                mx = tl.load(m_ptr + part, mask=inside[None, :], other=0.0)
                wgt = tl.exp2(mx - tl.max(mx, axis=0)[None, :])  # an empty split has m = -inf: weight 0
                lsum = tl.load(l_ptr + part, mask=inside[None, :], other=1.0)
                a = tl.load(a_ptr + part * HS + (kk % HS)[None, :], mask=inside[None, :], other=0.0)
                xk = tl.sum(wgt * a, axis=0) / tl.sum(wgt * lsum, axis=0)
            else:
                xk = tl.load(x_ptr + m * stride_xm + kk, mask=inside, other=0.0).to(tl.float32)
                if PROLOGUE == 1:
                    g = tl.load(lnw_ptr + kk, mask=inside, other=0.0).to(tl.float32)
                    beta = tl.load(lnb_ptr + kk, mask=inside, other=0.0).to(tl.float32)
                    xk = (xk - mean) * rstd * g + beta
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=inside[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)  # fmt: skip
            acc += w * xk[None, :]
        y = tl.sum(acc, axis=1)
        out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = out < N
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n).to(tl.float32)
            y += tl.where(pid_k == 0, bias, 0.0)  # once, by the first K-slice
        if GELU:  # tanh GELU (GPT-2's): 0.5 y (1 + tanh u) = y / (1 + e^(-2u))
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y / (1.0 + tl.exp(-2.0 * u))
        dst = y_ptr + m * stride_ym + out
        if ACCUMULATE:  # the residual stream: y += result
            if SPLIT_K == 1:
                tl.store(dst, tl.load(dst, mask=keep, other=0.0) + y, mask=keep)
            else:
                tl.atomic_add(dst, y, mask=keep)
        else:
            tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=keep)
        if KV_WRITE:  # outputs C..2C are the new key, 2C..3C the new value: into the cache at the row's position
            pos = tl.load(pos_ptr + m)
            c = out % C
            slot = m * stride_cb + (c // HS) * stride_ch + pos * stride_ct + c % HS
            tl.store(kc_ptr + slot, y.to(kc_ptr.dtype.element_ty), mask=keep & (out // C == 1))
            tl.store(vc_ptr + slot, y.to(vc_ptr.dtype.element_ty), mask=keep & (out // C == 2))

    @triton.jit
    def attention_kernel(
        qkv_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, a_ptr, qk_scale,
        stride_qm, stride_cb, stride_ch, stride_ct,
        H: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        # program (b·H + h, s): positions [s·chunk, (s+1)·chunk) ∩ [0, pos] of row b, head h; online softmax
        bh, s = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        length = tl.load(pos_ptr + b) + 1
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_T) * BLOCK_T
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < HS
        q = tl.load(qkv_ptr + b * stride_qm + h * HS + offs_d, mask=d_in, other=0.0).to(tl.float32) * qk_scale
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), dtype=tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        base = b * stride_cb + h * stride_ch
        for t0 in range(start, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_in = offs_t < end
            kv = base + offs_t[:, None] * stride_ct + offs_d[None, :]
            both = t_in[:, None] & d_in[None, :]
            keys = tl.load(kc_ptr + kv, mask=both, other=0.0).to(tl.float32)
            scores = tl.where(t_in, tl.sum(keys * q[None, :], axis=1), float("-inf"))  # log2 units
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new)
            values = tl.load(vc_ptr + kv, mask=both, other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
            m_i = m_new
        part = bh * SPLITS + s
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(a_ptr + part * HS + offs_d, acc, mask=d_in)

    return triton, embed_kernel, linear_kernel, attention_kernel


# ---------------------------------------------------------------------------------------
# Launch configurations (GEMV: BLOCK_N, BLOCK_K, SPLIT_K, warps, stages), timed per shape on a GPU.
# Decoding matrices are small (768 x 2304 in GPT-2-small): programs must be small and many.
# ---------------------------------------------------------------------------------------
DECODE_GEMV_CONFIGS = [GemvConfig(*c) for c in (
    (4, 256, 1, 2, 3), (8, 256, 1, 4, 3), (16, 256, 1, 4, 3), (8, 512, 1, 4, 2), (16, 128, 1, 4, 4),
    (4, 512, 1, 2, 2), (32, 256, 1, 8, 3), (8, 256, 2, 4, 3), (8, 256, 4, 4, 3), (4, 256, 4, 2, 3),
    (16, 256, 4, 4, 3), (16, 512, 2, 8, 2),
)]  # fmt: skip
INTERPRETER_DECODE_GEMV = GemvConfig(8, 32, 1, 1, 1)
ATTENTION_BLOCK_T = 16  # positions per step of the attention loop (and the unit a split is rounded to)
_tuned: dict[tuple, GemvConfig] = {}
autotune_log: dict[tuple, list] = {}


def default_splits(x: torch.Tensor, rows_times_heads: int) -> int:
    """Sequence splits for decode attention: about two programs per SM on a GPU, 4 elsewhere (a power of two)."""
    if not x.is_cuda:
        return 4
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
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
    if pos.shape != (rows,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be an integer tensor of shape ({rows},), got {pos.dtype} {tuple(pos.shape)}")


# ---------------------------------------------------------------------------------------
# The embedding: x = wte[token] + wpe[position]; the position is the row's length, which moves on.
# ---------------------------------------------------------------------------------------
def embed_reference(tokens, length, wte, wpe) -> tuple[torch.Tensor, torch.Tensor]:
    pos = length.clamp(max=wpe.shape[0] - 1)
    x = wte[tokens].float() + wpe[pos].float()
    length.copy_(pos + 1)
    return x, pos


def embed(tokens: torch.Tensor, length: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, backend=None):
    """(x (B, C) fp32, pos (B,)): each row's token and position embedded; ``length`` += 1 in place (clamped)."""
    if tokens.dim() != 1 or tokens.shape != length.shape:
        raise ValueError(f"tokens and length must be 1-D and of one shape, got {tuple(tokens.shape)} "
                         f"and {tuple(length.shape)}")  # fmt: skip
    _check_2d("wte", wte)
    _check_2d("wpe", wpe, wte.shape[1])
    if _choose(backend, tokens, wte) == "reference":
        return embed_reference(tokens, length, wte, wpe)
    triton, kernel, _, _ = _kernels()
    B, C = tokens.shape[0], wte.shape[1]
    x = torch.empty(B, C, device=wte.device, dtype=torch.float32)
    pos = torch.empty_like(length)
    block = min(1024, triton.next_power_of_2(C))
    kernel[(B, triton.cdiv(C, block))](tokens, length, pos, wte.contiguous(), wpe.contiguous(), x, C, wpe.shape[0],
                                       BLOCK=block)  # fmt: skip
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
                     n_head: int, splits: int | None = None, backend=None) -> AttentionParts:  # fmt: skip
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
    triton, _, _, kernel = _kernels()
    m = torch.empty(B, n_head, splits, device=qkv.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, n_head, splits, hs, device=qkv.device, dtype=torch.float32)
    kernel[(B * n_head, splits)](
        qkv, k_cache, v_cache, pos, m, lsum, acc, LOG2E / math.sqrt(hs),
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=n_head, HS=hs, BLOCK_D=triton.next_power_of_2(hs), SPLITS=splits, BLOCK_T=ATTENTION_BLOCK_T,
        num_warps=2 if hs <= 64 else 4,
    )  # fmt: skip
    return AttentionParts(m, lsum, acc)


# ---------------------------------------------------------------------------------------
# The GEMV with a prologue and an epilogue.
# ---------------------------------------------------------------------------------------
def decode_linear_reference(x, weight, bias=None, ln=None, gelu=False, out=None, kv=None) -> torch.Tensor:
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
    if out is not None:
        return out.add_(y)
    return y


def decode_linear(
    x: torch.Tensor | AttentionParts,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: tuple | None = None,
    gelu: bool = False,
    out: torch.Tensor | None = None,
    kv: tuple | None = None,
    backend: str | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y = epilogue(prologue(x) Wᵀ + b) for a few rows (decoding): one kernel.

    ``x`` is (B, K), or the ``AttentionParts`` of ``decode_attention`` (merged in the prologue).
    ``ln=(weight, bias, eps)`` applies a LayerNorm to x first. ``gelu`` applies tanh-GELU.
    ``out`` (B, N), fp32: the result is added into it (the residual stream) and ``out`` is
    returned. ``kv=(k_cache, v_cache, pos)``: columns C..2C of y (the key) and 2C..3C (the
    value) are also written into the caches at each row's ``pos``, with C = N / 3.
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
    anchor = x.acc if parts else x
    if _choose(backend, anchor, weight) == "reference":
        return decode_linear_reference(x, weight, bias, ln, gelu, out, kv)
    y = out if out is not None else torch.empty(B, N, device=weight.device, dtype=torch.float32)
    key = ("decode_linear", B, N, K, weight.dtype, parts, ln is not None, gelu, out is not None, kv is not None,
           weight.device)  # fmt: skip
    if config is None and _on_interpreter(weight):
        config = INTERPRETER_DECODE_GEMV
    elif config is None:
        if key not in _tuned:
            scratch = y.clone() if out is not None else y  # tuning must not add into the residual stream
            candidates = [c for c in DECODE_GEMV_CONFIGS if out is not None or c.split_k == 1]
            _tuned[key], autotune_log[key] = fastest(
                candidates, lambda c: _launch_linear(x, weight, bias, ln, gelu, scratch, out is not None, kv, c),
                weight.device,
            )
        config = _tuned[key]
    elif config.split_k > 1 and out is None:
        raise ValueError("split_k > 1 needs out (the K-slices add into it)")
    _launch_linear(x, weight, bias, ln, gelu, y, out is not None, kv, config)
    return y


def _launch_linear(x, weight, bias, ln, gelu, y, accumulate, kv, cfg: GemvConfig) -> None:
    triton, _, kernel, _ = _kernels()
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
        m, lsum, acc, k_cache, v_cache, pos, N, K, float(eps), stride_xm, w.stride(0), y.stride(0), *cache_strides,
        C=N // 3 if kv is not None else 1, HS=hs, SPLITS=splits, PROLOGUE=2 if parts else (1 if ln is not None else 0),
        HAS_BIAS=bias is not None, GELU=gelu, ACCUMULATE=accumulate, KV_WRITE=kv is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
