"""FlashAttention-2 forward in Triton, with causal and sliding-window block skipping.

Attention ``softmax(q kᵀ / sqrt(d)) v`` written naively stores a T x S score matrix: at
T = S = 16384 that is 1 GiB per head in fp32, read and written several times. FlashAttention
never stores it. Each program owns BLOCK_M queries and walks over the keys BLOCK_N at a time,
keeping three running quantities per query (the **online softmax**):

    m   the largest score seen so far        m_new = max(m, rowmax(s))
    l   the sum of exp(score - m)            l_new = l · exp(m - m_new) + rowsum(exp(s - m_new))
    acc the weighted sum of values           acc_new = acc · exp(m - m_new) + exp(s - m_new) @ v

and divides ``acc / l`` once at the end. When the running maximum grows, the old sums are
rescaled by ``exp(m - m_new)``: the result is exactly softmax attention, computed in one pass
over K and V with everything else in registers.

The FlashAttention-2 structure (Dao, 2023) is what this kernel follows: the loop over key
blocks is *inside* a program that owns a query block (so queries are loaded once and each
program writes its own output), the division by ``l`` is deferred to the end, and the key
range is split by what masking it needs:

- blocks entirely visible to every query of the block run an **unmasked** loop;
- the few blocks that straddle the causal diagonal (or the window's left edge) run a
  **masked** loop;
- blocks entirely in the future (or, with ``window``, entirely too old) are **never visited**:
  causal attention does half the work, and a window of w over n keys does O(n·w).

Two small tricks: ``exp2`` instead of ``exp`` (the hardware instruction), with log2(e) folded
into the score scale once; and masked scores set to -1e6 rather than -inf, so a row that sees
nothing yet in a block keeps finite numbers (they vanish as exp2(-1e6 - m) = 0 once it does).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from . import choose_backend, fastest, interpreting, tma_supported
from .matmul_kernel import check_launch_sizes

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2(e))


@functools.cache
def _kernels():
    """Build the kernel on first use, so that importing labkit never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def attend_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, q_pos, offs_n, lo, hi, S, window, qk_scale, stride_kn, stride_vn,
        k_desc, v_desc, kv_row,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    ):  # fmt: skip
        # one stretch of keys lo..hi, BLOCK_N at a time: the online-softmax update
        k_ptrs += lo * stride_kn
        v_ptrs += lo * stride_vn
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            k_pos = start_n + offs_n
            if USE_TMA:  # one TMA copy per tile; rows past this head's S are masked in the scores below
                k = k_desc.load([kv_row + start_n, 0])
                v = v_desc.load([kv_row + start_n, 0])
            elif MASKED:  # the last block may run past the keys: load zeros there
                k = tl.load(k_ptrs, mask=k_pos[:, None] < S, other=0.0)
                v = tl.load(v_ptrs, mask=k_pos[:, None] < S, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            if UPCAST:  # only under the CPU interpreter, whose bf16 tl.dot is wrong (triton 3.9)
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) raw scores, fp32
            if MASKED:
                keep = k_pos[None, :] < S
                if CAUSAL:
                    keep = keep & (k_pos[None, :] <= q_pos[:, None])
                if WINDOWED:
                    keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
                # a floor, not an offset: masked scores become -1e6 whatever they were (rows past S with TMA come
                # from the next head, any value; and a visible score below -1e6 must still beat every masked one)
                s = tl.where(keep, s * qk_scale, -1.0e6)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                s = s - m_new[:, None]
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                s = s * qk_scale - m_new[:, None]  # one fused multiply-add per score
            p = tl.math.exp2(s)
            alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if USE_TMA and MASKED:  # p is 0 there, but 0 x inf or NaN in another head's values is not
                v = tl.where(k_pos[:, None] < S, v, 0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        return acc, l_i, m_i

    # Triton looks a kernel's callees up among its module's globals, not in this closure
    globals()["attend_blocks"] = attend_blocks

    @triton.jit
    def flash_attention_kernel(
        Q, K, V, Out, T, S, q_offset, window, qk_scale, H,
        stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, stride_kn, stride_kd,
        stride_vz, stride_vh, stride_vn, stride_vd, stride_oz, stride_oh, stride_om, stride_od, k_desc, v_desc,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, EVEN_M: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    ):  # fmt: skip
        start_m = tl.program_id(0)  # which block of queries
        if CAUSAL:  # the last query blocks have the most keys: launch them first, so short ones fill the tail
            start_m = tl.num_programs(0) - 1 - start_m
        off_hz = tl.program_id(1)  # which (batch, head)
        off_z, off_h = off_hz // H, off_hz % H
        kv_row = off_hz * S  # with TMA, K and V are seen as (B·H·S, D): this head's first row
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        k_ptrs = K + off_z * stride_kz + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + off_z * stride_vz + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_M:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        q_pos = q_offset + offs_m  # absolute positions of our queries (the last T of S)
        if CAUSAL:
            q_lo = q_offset + start_m * BLOCK_M  # first and last query of the block
            q_hi = q_lo + BLOCK_M - 1
            diag_lo = (q_lo // BLOCK_N) * BLOCK_N  # key blocks from here on straddle the diagonal
            diag_hi = tl.minimum(q_hi + 1, S)
            full_lo = 0
            if WINDOWED:  # keys before q_hi-window+1 are masked for some query: a masked left edge
                full_lo = tl.minimum((tl.maximum(q_hi - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, diag_lo)
                edge_lo = (tl.maximum(q_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
                acc, l_i, m_i = attend_blocks(
                    acc, l_i, m_i, q, k_ptrs, v_ptrs, q_pos, offs_n, edge_lo, full_lo, S, window, qk_scale,
                    stride_kn, stride_vn, k_desc, v_desc, kv_row, True, CAUSAL, WINDOWED, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
                )  # fmt: skip
            acc, l_i, m_i = attend_blocks(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, q_pos, offs_n, full_lo, diag_lo, S, window, qk_scale,
                stride_kn, stride_vn, k_desc, v_desc, kv_row, False, CAUSAL, WINDOWED, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
            )  # fmt: skip
            acc, l_i, m_i = attend_blocks(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, q_pos, offs_n, diag_lo, diag_hi, S, window, qk_scale,
                stride_kn, stride_vn, k_desc, v_desc, kv_row, True, CAUSAL, WINDOWED, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
            )  # fmt: skip
        else:  # every key: whole blocks unmasked, then the ragged tail masked
            full_hi = (S // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = attend_blocks(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, q_pos, offs_n, 0, full_hi, S, window, qk_scale,
                stride_kn, stride_vn, k_desc, v_desc, kv_row, False, CAUSAL, WINDOWED, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
            )  # fmt: skip
            acc, l_i, m_i = attend_blocks(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, q_pos, offs_n, full_hi, S, S, window, qk_scale,
                stride_kn, stride_vn, k_desc, v_desc, kv_row, True, CAUSAL, WINDOWED, BLOCK_N, UPCAST, DOT_PRECISION, USE_TMA,
            )  # fmt: skip

        out = acc / l_i[:, None]  # the deferred softmax division, once per query
        o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        if EVEN_M:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < T)

    return triton, flash_attention_kernel


@dataclass(frozen=True)
class AttentionConfig:
    """One candidate launch: query and key block sizes, pipeline depth, warps per program."""

    block_m: int
    block_n: int
    num_stages: int
    num_warps: int
    tma: bool = False  # K and V tiles fed by the Tensor Memory Accelerator (sm_90+)

    def __post_init__(self) -> None:
        check_launch_sizes(self, ("block_m", "block_n"))


# FlashAttention-2 tiles known to do well on Ampere/Hopper at head dim 64-128: 128 queries x 64
# keys with 8 warps is the usual winner, 64 x 64 with 4 warps for short or windowed rows.
# autotune() measures them on the first call for a shape and keeps the fastest.
CONFIGS = [
    AttentionConfig(128, 64, 3, 8),
    AttentionConfig(128, 64, 2, 8),
    AttentionConfig(128, 128, 2, 8),
    AttentionConfig(128, 64, 3, 4),
    AttentionConfig(64, 64, 3, 4),
    AttentionConfig(64, 64, 2, 4),
    AttentionConfig(128, 32, 3, 4),
    AttentionConfig(128, 128, 3, 8),
    AttentionConfig(128, 64, 4, 8),
]
# Hopper (sm_90+): the same tiles with K and V loaded through tensor descriptors
TMA_CONFIGS = [
    AttentionConfig(128, 64, 3, 8, tma=True),
    AttentionConfig(128, 128, 3, 8, tma=True),
    AttentionConfig(128, 64, 4, 8, tma=True),
    AttentionConfig(64, 64, 3, 4, tma=True),
    AttentionConfig(128, 128, 2, 8, tma=True),
]
INTERPRETER_CONFIG = AttentionConfig(16, 16, 1, 1)  # the interpreter is slow: small tiles, no tuning
_tuned: dict[tuple, AttentionConfig] = {}
autotune_log: dict[tuple, list[tuple[AttentionConfig, float | None]]] = {}


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries_last: bool = True) -> None:
    """q (B, H, T, D), k and v (B, H, S, D); with ``queries_last`` (causal), T ≤ S: the queries are the last T keys."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, heads, sequence, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"k and v must share a shape (B, H, S, D) and q have the same B, H, D: got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.size(-1) < 1:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}")
    if q.size(2) < 1 or k.size(2) < 1 or (queries_last and q.size(2) > k.size(2)):
        raise ValueError(
            f"sequence lengths must be >= 1 and, when causal, q's ({q.size(2)}) <= the keys' ({k.size(2)}): the "
            "queries are the last positions"
        )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None) -> None:
    check_attention_inputs(q, k, v, queries_last=causal)
    if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"q, k, v dtypes must match and be one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if not causal:
            raise ValueError("window needs causal=True (the window is the last `window` keys up to each query)")


def attention_mask(T: int, S: int, causal: bool = True, window: int | None = None, device=None) -> torch.Tensor:
    """(T, S) boolean mask: query i sits at position S - T + i; True where it may see key j."""
    q_pos = torch.arange(T, device=device).view(T, 1) + (S - T)
    k_pos = torch.arange(S, device=device).view(1, S)
    keep = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
    return keep


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None
) -> torch.Tensor:
    """The oracle and the CPU path: softmax(q kᵀ / sqrt(d), masked) v in fp32, rounded to the input dtype."""
    _check(q, k, v, causal, window)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
    scores = scores.masked_fill(~attention_mask(q.size(2), k.size(2), causal, window, q.device), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def flash_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """The kernel's algorithm in plain PyTorch (slow, for reading): online softmax over key blocks.

    Each query block walks over the key blocks it can see, skipping the rest, and keeps a
    running max ``m``, sum ``l`` and output ``acc``; one division at the end.
    """
    _check(q, k, v, causal, window)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (rows of a tile), got {value!r}")
    T, S = q.size(2), k.size(2)
    scale = 1.0 / math.sqrt(q.size(-1))
    mask = attention_mask(T, S, causal, window, q.device)
    out = torch.empty_like(q)
    for m0 in range(0, T, block_m):
        qb = q[:, :, m0 : m0 + block_m].float()
        m = torch.full(qb.shape[:-1], float("-inf"), device=q.device)  # running max per query
        total = torch.zeros(qb.shape[:-1], device=q.device)  # running sum of exp(score - m), "l" in the paper
        acc = torch.zeros_like(qb)  # running sum of exp(score - m) · v
        for n0 in range(0, S, block_n):
            keep = mask[m0 : m0 + block_m, n0 : n0 + block_n]
            if not keep.any():  # a block entirely in the future or outside the window: skipped
                continue
            s = (qb @ k[:, :, n0 : n0 + block_n].float().transpose(-2, -1)) * scale
            s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new.unsqueeze(-1)).nan_to_num(0.0)  # rows that see nothing yet: all zero
            alpha = torch.exp(m - m_new).nan_to_num(0.0)  # exp(-inf - (-inf)) is NaN: nothing to rescale
            total = total * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + p @ v[:, :, n0 : n0 + block_n].float()
            m = m_new
        out[:, :, m0 : m0 + block_m] = (acc / total.unsqueeze(-1)).to(q.dtype)
    return out


def _padded_head_dim(d: int) -> int:
    """tl.dot needs a power-of-two inner size of at least 16: pad the head dim with zeros up to one."""
    return max(16, 1 << (d - 1).bit_length())


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, causal: bool, window: int | None,
    cfg: AttentionConfig, sm_scale: float,
) -> torch.Tensor:  # fmt: skip
    """Run the kernel once with ``cfg``, writing into ``out`` (all four (B, H, *, D) with D a power of two)."""
    triton, kernel = _kernels()
    B, H, T, D = q.shape
    S = k.size(2)
    upcast = interpreting() and not q.is_cuda
    k_desc = v_desc = None
    if cfg.tma and not tma_possible(k, v):  # e.g. a tuned TMA config, now given a non-contiguous K
        cfg = dataclasses.replace(cfg, tma=False)
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(k.view(B * H * S, D), [cfg.block_n, D])
        v_desc = TensorDescriptor.from_tensor(v.view(B * H * S, D), [cfg.block_n, D])
    grid = (triton.cdiv(T, cfg.block_m), B * H)  # one program per (query block, batch x head)
    kernel[grid](
        q, k, v, out, T, S, S - T, window or 0, sm_scale * LOG2E, H,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), k_desc, v_desc,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, WINDOWED=window is not None,
        EVEN_M=T % cfg.block_m == 0, UPCAST=upcast, USE_TMA=cfg.tma,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        num_stages=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


def tma_possible(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can K and V be read through tensor descriptors? Contiguous (B, H, S, D), 16-byte aligned
    rows, on a GPU of compute capability 9.0+ (or the CPU interpreter, which emulates TMA)."""
    return tma_supported(k) and all(t.is_contiguous() and (t.size(-1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (k, v))  # fmt: skip


def tuning_key(q: torch.Tensor, k: torch.Tensor, causal: bool, window: int | None) -> tuple:
    """Shapes that share a tuned config: lengths rounded up to powers of two, so that decoding
    (one more key each step) does not re-tune at every step."""
    B, H, T, D = q.shape
    pow2 = lambda n: 1 << (n - 1).bit_length()
    return (B, H, pow2(T), pow2(k.size(2)), D, q.dtype, causal, window, q.device)


def autotune(q, k, v, out, causal, window, sm_scale, configs=None) -> AttentionConfig:
    """Time every candidate on these operands (median of repeats) and remember the fastest."""
    key = tuning_key(q, k, causal, window)
    if key not in _tuned:
        run = lambda cfg: launch(q, k, v, out, causal, window, cfg, sm_scale)
        if configs is None:
            configs = CONFIGS + (TMA_CONFIGS if tma_possible(k, v) else [])
        _tuned[key], autotune_log[key] = fastest(configs, run, q.device)
    return _tuned[key]


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel: with ``config``, or the autotuned best for this shape."""
    _check(q, k, v, causal, window)
    D = q.size(-1)
    sm_scale = 1.0 / math.sqrt(D)  # of the true head dim: padding adds zeros to q·k, not terms
    Dp = _padded_head_dim(D)
    if Dp != D:
        q, k, v = (torch.nn.functional.pad(t, (0, Dp - D)) for t in (q, k, v))
    out = torch.empty_like(q)
    if config is None:
        interpreted = interpreting() and not q.is_cuda
        config = INTERPRETER_CONFIG if interpreted else autotune(q, k, v, out, causal, window, sm_scale)
    launch(q, k, v, out, causal, window, config, sm_scale)
    return out[..., :D] if Dp != D else out


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v without storing the scores; q (B, H, T, D), k and v (B, H, S, D).

    ``causal``: query i (at position S - T + i) sees keys up to its position. ``window``: it
    also sees only the last ``window`` of them (sliding-window attention; blocks outside the
    window are skipped, so the work is O(S · window)). fp16, bf16 or fp32 in, fp32
    accumulation, output in the input dtype. Runs the Triton kernel on CUDA (or under
    TRITON_INTERPRET=1), the PyTorch reference elsewhere; ``backend`` forces one. The kernel
    is forward-only: when a gradient is needed, "auto" takes the (differentiable) reference.
    """
    _check(q, k, v, causal, window)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend == "triton" and needs_grad:
        raise ValueError("backend='triton' is forward-only: run it under torch.no_grad() or use backend='reference'")
    if choose_backend(backend, q, k, v) == "triton" and not needs_grad:
        return flash_attention_triton(q, k, v, causal, window)
    return flash_attention_reference(q, k, v, causal, window)


def attention_tflops(batch: int, heads: int, seq: int, head_dim: int, seconds: float, causal: bool = True) -> float:
    """Forward TFLOP/s by the usual count: 4·B·H·T²·D (two matmuls), halved when causal."""
    flops = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return flops / seconds / 1e12


def _register():
    from ..bench import compare, device_label, register_suite
    from ..device import get_device
    from ..model import register_attention

    def flash_backend(q, k, v, q_offset: int = 0):
        if q_offset != k.size(2) - q.size(2):
            raise ValueError(f"q_offset must be S - T = {k.size(2) - q.size(2)}, got {q_offset}")
        return flash_attention(q, k, v, causal=True)

    register_attention("flash", flash_backend)  # LabGPT with this kernel: model.set_attention("flash")

    @register_suite("flash")
    def flash_suite(quick: bool = False) -> list[dict]:
        """Flash attention (Triton) vs SDPA, bf16, batch 4 x 16 heads x head dim 128; CPU: the reference, small."""
        device = get_device()
        on_gpu = device.type == "cuda"
        dtype = torch.bfloat16 if on_gpu else torch.float32
        backend = "auto" if on_gpu else "reference"  # not the interpreter, even where TRITON_INTERPRET=1
        shapes = ([(4, 16, 4096, 128)] if quick else [(4, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128)]) \
            if on_gpu else [(1, 4, 512, 64)]  # fmt: skip
        rows = []
        for B, H, T, D in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(3))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            variants = {
                "sdpa causal": lambda: sdpa(q, k, v, is_causal=True),
                "flash_attention causal": lambda: flash_attention(q, k, v, causal=True, backend=backend),
            }
            print(f"B={B} H={H} T={T} D={D} {dtype} on {device_label(device)}" + ("" if on_gpu else " (reference)"))
            for row in compare(variants, warmup=3, repeat=10 if on_gpu else 3, suite="flash"):
                row["name"] = f"{row['variant']} T={T}"
                row["tflops"] = attention_tflops(B, H, T, D, row["variant_s"])
                rows.append(row)
        return rows


_register()
