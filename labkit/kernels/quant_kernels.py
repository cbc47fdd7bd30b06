"""Quantized linear layers in Triton: int8 and int4 weight-only GEMV/GEMM, and the W8A8 int8 GEMM.

Three kernels, each beside the PyTorch reference that is its CPU path and its test oracle:

- ``int8_weight_only_linear(x, w_int8, scales)``: y = x Wᵀ with W = w_int8 · scale (one scale
  per output channel). At batch 1 (decoding) this is a matrix-vector product, and a GEMV
  does 2 FLOPs per weight it reads: it is bound by memory bandwidth, so reading 1-byte
  weights instead of 2-byte bf16 ones can make it up to 2x faster. The int8 weights are
  converted as they are loaded ("dequantization fused into the load"); the per-channel scale
  multiplies the finished dot product once, since Σ_k x_k (q_nk s_n) = s_n Σ_k x_k q_nk.
- ``int4_weight_only_linear(x, w_packed, scales, zeros, group_size)``: two 4-bit weights per
  byte (the even column in the low nibble), one scale and zero point per ``group_size``
  weights of a row: up to 4x fewer bytes than bf16. Inside a group
  Σ_k x_k (q_k - z) s = s (Σ_k x_k q_k - z Σ_k x_k), so the kernel sums raw nibbles times x
  and applies scale and zero once per group.
- ``int8_linear(x_int8, w_int8, x_scales, w_scales)``: W8A8. Both operands are int8, the
  tensor cores multiply them into an int32 accumulator, and the epilogue turns it into
  floats: y_mn = acc_mn · sx_m · sw_n (+ bias_n). It pays where the matmul is compute-bound
  (prefill, big batches): int8 tensor cores do twice the operations per second of bf16 ones.

Weight-only kernels have two shapes: a GEMV (few rows of x; no tensor cores, each program
owns BLOCK_N output channels and walks along K, accumulating elementwise products in a
(BLOCK_N, BLOCK_K) register tile that is summed once at the end, optionally split along K
across SPLIT_K programs) and a GEMM (tl.dot on dequantized tiles) for many rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import choose_backend, fastest, interpreting
from .matmul_kernel import TileConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 8  # up to this many rows of x, weight-only kernels run as GEMVs (decode); above, as GEMMs


@functools.cache
def _kernels():
    """Build the kernels on first use, so that importing labkit never imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def int8_gemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        # program (m, pid_k, pid_n): row m of x, K-slice pid_k, output channels pid_n*BLOCK_N..; the rows
        # vary fastest, so the programs that read the same weights run together and share them in L2
        m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # rows past the edge wrap: computed, never stored
        offs_k = tl.arange(0, BLOCK_K)
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k_start + offs_k)[None, :]  # (BLOCK_N, BLOCK_K)
        x_ptrs = x_ptr + m * stride_xm + k_start + offs_k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # elementwise products, summed once at the end
        for k in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")  # weights are read once: do not keep them
                x = tl.load(x_ptrs, eviction_policy="evict_last")  # x is read by every program: keep it
            else:
                inside = (k + offs_k) < K
                w = tl.load(w_ptrs, mask=inside[None, :], other=0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=inside, other=0.0, eviction_policy="evict_last")
            # the fused dequant, int8 -> fp32 in registers, without the int-to-float instruction (GPUs run it
            # at a quarter of the rate of integer and float arithmetic: too slow to keep up with memory here).
            # The float whose bits are 0x4B0000vv is 2^23 + vv exactly; with vv = q + 128 (q's top bit
            # flipped: one logical op together with the OR), subtracting 2^23 + 128 leaves q, exactly.
            bits = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) | 0x4B000000
            acc += (bits.to(tl.float32, bitcast=True) - 8388736.0) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n)  # (BLOCK_N,): the per-channel scale, once
        out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + out, y.to(y_ptr.dtype.element_ty), mask=out < N)
        else:  # K-slices add their partial sums into an fp32 buffer
            tl.atomic_add(y_ptr + m * stride_ym + out, y, mask=out < N)

    @triton.jit
    def int4_gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # like int8_gemv_kernel, but a byte holds columns 2j (low nibble) and 2j+1 (high nibble), and a
        # scale and zero point serve GROUP columns. A K-block holds G = BLOCK_K // GROUP whole groups,
        # loaded as a (BLOCK_N, G, GROUP // 2) tile of bytes: the sum over its last axis is Σ_group q x.
        G: tl.constexpr = BLOCK_K // GROUP
        HALF: tl.constexpr = GROUP // 2
        m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_g = tl.arange(0, G)
        offs_h = tl.arange(0, HALF)
        byte = offs_g[:, None] * HALF + offs_h[None, :]  # (G, HALF): byte offsets inside a K-block
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)  # Σ s (Σ q x - z Σ x), group by group
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            group_in = (k0 + offs_g * GROUP) < K  # K is a multiple of GROUP: groups are wholly in or out
            packed = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + (k0 // 2 + byte)[None, :, :],
                             mask=group_in[None, :, None], other=0, eviction_policy="evict_first")  # fmt: skip
            # nibbles to floats with integer ops (as in int8_gemv_kernel): the low one as q, the high one
            # still in place (16 q), compensated by scaling its x by 1/16 (exact: a power of two)
            bits = packed.to(tl.int32)
            low = ((bits & 0x0F) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # column k0 + 2j
            high16 = ((bits & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 16 x column k0 + 2j + 1
            x_even = tl.load(x_ptr + m * stride_xm + k0 + 2 * byte, mask=group_in[:, None], other=0.0,
                             eviction_policy="evict_last").to(tl.float32)  # fmt: skip
            x_odd = tl.load(x_ptr + m * stride_xm + k0 + 2 * byte + 1, mask=group_in[:, None], other=0.0,
                            eviction_policy="evict_last").to(tl.float32)  # fmt: skip
            qx = tl.sum(low * x_even[None, :, :] + high16 * (x_odd * 0.0625)[None, :, :], axis=2)  # (BLOCK_N, G): Σ q x
            x_sum = tl.sum(x_even + x_odd, axis=1)  # (G,): Σ x
            group = k0 // GROUP + offs_g
            params = offs_n[:, None] * stride_sn + group[None, :] * stride_sg
            scale = tl.load(s_ptr + params, mask=group_in[None, :], other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + params, mask=group_in[None, :], other=0).to(tl.float32)
            acc += scale * (qx - zero * x_sum[None, :])  # s (Σ q x - z Σ x)
        y = tl.sum(acc, axis=1)
        out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + out, y.to(y_ptr.dtype.element_ty), mask=out < N)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + out, y, mask=out < N)

    @triton.jit
    def weight_only_gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
        INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        # many rows of x: dequantize a (BLOCK_K, BLOCK_N) tile of Wᵀ into x's dtype, then tl.dot; int4 does
        # two dots, over the even and the odd columns (the low and the high nibbles). A plain 2-D grid of
        # output tiles: prefill-shaped inputs are compute-bound, where weight-only quantization gains little.
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        if INT4:
            offs_b = tl.arange(0, BLOCK_K // 2)
            for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP: one scale and zero per tile column
                packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 // 2 + offs_b)[:, None])  # (BK/2, BN)
                scale = tl.load(s_ptr + offs_n * stride_sn + (k0 // GROUP) * stride_sg).to(tl.float32)
                zero = tl.load(z_ptr + offs_n * stride_sn + (k0 // GROUP) * stride_sg).to(tl.float32)
                low = (((packed & 0xF).to(tl.float32) - zero[None, :]) * scale[None, :]).to(dtype)
                high = (((packed >> 4).to(tl.float32) - zero[None, :]) * scale[None, :]).to(dtype)
                x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * offs_b)[None, :]).to(dtype)
                x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * offs_b + 1)[None, :]).to(dtype)
                acc = tl.dot(x_even, low, acc, input_precision=PRECISION)
                acc = tl.dot(x_odd, high, acc, input_precision=PRECISION)
            y = acc
        else:
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                inside = (k0 + offs_k) < K
                w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=inside[:, None], other=0)
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=inside[None, :], other=0.0
                )
                acc = tl.dot(x.to(dtype), w.to(dtype), acc, input_precision=PRECISION)  # int8 is exact in bf16
            y = acc * tl.load(s_ptr + offs_n)[None, :]  # per-channel scale after the sum
        out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + out_m[:, None] * stride_ym + out_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(out_m[:, None] < M) & (out_n[None, :] < N))  # fmt: skip

    @triton.jit
    def int8_gemm_kernel(
        a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        # C = (A_int8 @ B_int8) * sa[:, None] * sb[None, :] + bias: int32 accumulation, float epilogue
        # grouped ordering, as in matmul_kernel: neighbouring programs share tiles of x and W in L2
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        first_pid_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % (GROUP_M * num_pid_n)) % group_size_m)
        pid_n = (pid % (GROUP_M * num_pid_n)) // group_size_m
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # exact: |sum| <= 127 * 127 * K
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 x int8 -> int32 on the tensor cores
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        # the epilogue: dequantize while the tile is still in registers (no int32 round trip to memory)
        c = acc.to(tl.float32) * tl.load(sa_ptr + offs_m)[:, None] * tl.load(sb_ptr + offs_n)[None, :]
        if HAS_BIAS:
            c += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + out_m[:, None] * stride_cm + out_n[None, :], c.to(c_ptr.dtype.element_ty),
                 mask=(out_m[:, None] < M) & (out_n[None, :] < N))  # fmt: skip

    @triton.jit
    def int4_gemv_words_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
        HALVES: tl.constexpr, ASM: tl.constexpr,
    ):  # fmt: skip
        # the packed bytes read as 32-bit words (N, K / 8): word j of a row holds columns 8j..8j+7, column
        # 8j + i in bits 4i..4i+3. A step takes BLOCK_W words of each row (8·BLOCK_W columns, inside one
        # group). HALVES=False: each nibble is shifted to bits 16..19 and OR-ed under the exponent of 2^23:
        # the float is 2^23 + q·2^16, exactly. Times x·2^-16 that is 2^7·x + q·x: the 2^7·x parts of a word
        # depend on x alone and are taken off once per word, with the zero point's z·Σx, before the group's
        # scale. Per weight: a shift, a logical op and a multiply-add, and no sum across threads in the loop.
        # HALVES=True: the nibbles as fp16 halves (1024 + q, or 1024 + 16 q against x/16), below: per weight
        # half a logical op, a conversion and a multiply-add; the conversions run beside the integer unit,
        # which is half as fast as the float one on Hopper.
        BK: tl.constexpr = 8 * BLOCK_W
        m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_w = tl.arange(0, BLOCK_W)
        k_per_split = tl.cdiv(K, SPLIT_K * BK) * BK
        k_start = pid_k * k_per_split
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BK):
            u = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 8 + offs_w)[None, :],
                        eviction_policy="evict_first").to(tl.uint32, bitcast=True)  # fmt: skip
            xb = x_ptr + m * stride_xm + k0 + offs_w * 8
            group = k0 // GROUP
            scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg).to(tl.float32)
            zero = tl.load(z_ptr + offs_n * stride_sn + group * stride_sg).to(tl.float32)
            if HALVES:
                x0 = tl.load(xb + 0, eviction_policy="evict_last").to(tl.float32)
                x1 = tl.load(xb + 1, eviction_policy="evict_last").to(tl.float32)
                x2 = tl.load(xb + 2, eviction_policy="evict_last").to(tl.float32)
                x3 = tl.load(xb + 3, eviction_policy="evict_last").to(tl.float32)
                x4 = tl.load(xb + 4, eviction_policy="evict_last").to(tl.float32)
                x5 = tl.load(xb + 5, eviction_policy="evict_last").to(tl.float32)
                x6 = tl.load(xb + 6, eviction_policy="evict_last").to(tl.float32)
                x7 = tl.load(xb + 7, eviction_policy="evict_last").to(tl.float32)
                # the 8 nibbles of each 32-bit word u as floats: 1024 + q for columns 0, 2, 4, 6 and 1024 + 16 q for
                # columns 1, 3, 5, 7. Two logical ops put two nibbles under the exponent of two fp16 1024s at once
                # ((u & 0x000F000F) | 0x64006400: columns 0 and 4; mask 0x00F000F0: 1 and 5, sixteen times larger;
                # the same on u >> 8 for 2, 6, 3, 7), and each half converts to fp32 in one instruction: per weight
                # half a logical op and one conversion. Triton cannot name a register's two halves, so on a GPU
                # this is inline PTX; ASM=False computes the same numbers in Triton (the interpreter runs no PTX).
                if ASM:
                    f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
                        asm="""{
                        .reg .b32 a, b, c, d, s, m;
                        .reg .b16 h<8>;
                        mov.b32 m, 0x64006400;
                        lop3.b32 a, $8, 0x000F000F, m, 0xea;
                        lop3.b32 b, $8, 0x00F000F0, m, 0xea;
                        shr.u32 s, $8, 8;
                        lop3.b32 c, s, 0x000F000F, m, 0xea;
                        lop3.b32 d, s, 0x00F000F0, m, 0xea;
                        mov.b32 {h0, h4}, a;
                        mov.b32 {h1, h5}, b;
                        mov.b32 {h2, h6}, c;
                        mov.b32 {h3, h7}, d;
                        cvt.f32.f16 $0, h0;
                        cvt.f32.f16 $1, h1;
                        cvt.f32.f16 $2, h2;
                        cvt.f32.f16 $3, h3;
                        cvt.f32.f16 $4, h4;
                        cvt.f32.f16 $5, h5;
                        cvt.f32.f16 $6, h6;
                        cvt.f32.f16 $7, h7;
                        }""",
                        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
                        args=[u],
                        dtype=(tl.float32,) * 8,
                        is_pure=True,
                        pack=1,
                    )  # lop3 0xea: (a & b) | c. mov.b32 {lo, hi}: the low half first
                else:
                    f0, f1, f2, f3, f4, f5, f6, f7 = (
                        (u & 0xF).to(tl.float32) + 1024.0, ((u >> 4) & 0xF).to(tl.float32) * 16.0 + 1024.0,
                        ((u >> 8) & 0xF).to(tl.float32) + 1024.0, ((u >> 12) & 0xF).to(tl.float32) * 16.0 + 1024.0,
                        ((u >> 16) & 0xF).to(tl.float32) + 1024.0, ((u >> 20) & 0xF).to(tl.float32) * 16.0 + 1024.0,
                        ((u >> 24) & 0xF).to(tl.float32) + 1024.0, ((u >> 28) & 0xF).to(tl.float32) * 16.0 + 1024.0,
                    )  # fmt: skip
                # Σ f·x' = Σ q x + 1024 (x0 + x2 + x4 + x6) + 64 (x1 + x3 + x5 + x7): start from minus the latter
                bias = 1024.0 * (x0 + x2 + x4 + x6) + 64.0 * (x1 + x3 + x5 + x7)
                t = f0 * x0[None, :] - bias[None, :]
                t += f1 * (x1 * 0.0625)[None, :]
                t += f2 * x2[None, :]
                t += f3 * (x3 * 0.0625)[None, :]
                t += f4 * x4[None, :]
                t += f5 * (x5 * 0.0625)[None, :]
                t += f6 * x6[None, :]
                t += f7 * (x7 * 0.0625)[None, :]
                sum_x = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
                acc += scale[:, None] * (t - zero[:, None] * sum_x[None, :])  # s (Σ q x - z Σ x)
            else:
                t = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
                b = tl.zeros((BLOCK_W,), dtype=tl.float32)
                for i in tl.static_range(8):
                    xi = tl.load(xb + i, eviction_policy="evict_last").to(tl.float32)
                    if i < 4:
                        nib = (u << (16 - 4 * i)) & 0xF0000
                    elif i == 4:
                        nib = u & 0xF0000
                    else:
                        nib = (u >> (4 * i - 16)) & 0xF0000
                    f = (nib | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q·2^16
                    t += f * (xi * 0.0000152587890625)[None, :]  # x · 2^-16
                    b += xi
                # t = 2^7 Σx + Σ q x over each word: s (Σ q x - z Σ x) = s (t - (2^7 + z) Σx)
                acc += scale[:, None] * (t - (128.0 + zero)[:, None] * b[None, :])
        y = tl.sum(acc, axis=1)
        out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + out, y.to(y_ptr.dtype.element_ty), mask=out < N)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + out, y, mask=out < N, sem="relaxed")

    @triton.jit
    def int4_gemv_kmajor_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wk, stride_sg, stride_ym,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # the packed weights stored K-major ((K/2, N) bytes: byte (j, n) holds columns 2j and 2j+1 of output n) and
        # the scales and zero points group-major ((K/g, N)). A program takes BLOCK_N consecutive outputs and walks
        # its K-slice a byte row at a time: each row is one contiguous run of BLOCK_N bytes, each thread holds the
        # same outputs in every row, so Σ q x builds up in the thread's own registers (no sum across threads, ever)
        # and the group's scale and zero point apply once per step of BLOCK_J rows (inside one group):
        # s (Σ q x - z Σ x). x's two values a row are the same for every thread (a broadcast load). As in the word
        # kernel, each nibble goes under the exponent of 2^23, in the top mantissa bits 19-22: the float is
        # 2^23 + q·2^19, which times x·2^-19 is 16·x + q·x (16·x, not the word kernel's 2^7·x: less to cancel); the
        # 16·x parts depend on x alone and come off once a step. Per weight: its byte taken out of the loaded word,
        # shifts and logical ops, a multiply-add (the words kernel below needs fewer).
        m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        rows_per_split = tl.cdiv(K // 2, SPLIT_K * BLOCK_J) * BLOCK_J  # K/2 is a multiple of BLOCK_J (GROUP/2 is)
        j_start = pid_k * rows_per_split
        y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j0 in range(j_start, tl.minimum(j_start + rows_per_split, K // 2), BLOCK_J):
            t = tl.zeros((BLOCK_N,), dtype=tl.float32)
            sum_even = 0.0
            sum_odd = 0.0
            for jj in tl.static_range(BLOCK_J):
                row = tl.load(w_ptr + (j0 + jj) * stride_wk + offs_n, mask=n_in, other=0, eviction_policy="evict_first")
                x_even = tl.load(x_ptr + m * stride_xm + 2 * (j0 + jj)).to(tl.float32)
                x_odd = tl.load(x_ptr + m * stride_xm + 2 * (j0 + jj) + 1).to(tl.float32)
                bits = row.to(tl.int32)
                low = (((bits << 19) & 0x00780000) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q·2^19
                high = (((bits << 15) & 0x00780000) | 0x4B000000).to(tl.float32, bitcast=True)  # the high nibble's
                t += low * (x_even * 0.0000019073486328125)  # x · 2^-19
                t += high * (x_odd * 0.0000019073486328125)
                sum_even += x_even
                sum_odd += x_odd
            group = (2 * j0) // GROUP
            scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_in, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_in, other=0).to(tl.float32)
            qx = t - 16.0 * (sum_even + sum_odd)  # Σ q x
            y += scale * (qx - zero * (sum_even + sum_odd))
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_in)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + offs_n, y, mask=n_in, sem="relaxed")

    @triton.jit
    def int4_gemv_kmajor_words_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wk, stride_sg, stride_ym, MAGIC,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # int4_gemv_kmajor_kernel reading each byte row as 32-bit words (N % 4 == 0): word w of a row holds the
        # bytes of outputs 4w..4w+3, output 4w + i in bits 8i..8i+7. Each nibble is shifted straight from the word
        # to mantissa bits 19-22 and put under the exponent of 2^23: a shift and a logical op per weight, with no
        # byte taken out of the word first; the four outputs of a word keep four accumulators. MAGIC is 2^23's bits
        # (0x4B000000), an argument rather than a constant: with both the mask and it as constants, ptxas spent two
        # logical ops a weight (compiled for sm_90), with it in a register one three-input LOP3.
        BLOCK_W: tl.constexpr = BLOCK_N // 4
        m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
        w_in = offs_w < N // 4
        rows_per_split = tl.cdiv(K // 2, SPLIT_K * BLOCK_J) * BLOCK_J
        j_start = pid_k * rows_per_split
        y0 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        y1, y2, y3 = y0, y0, y0
        for j0 in range(j_start, tl.minimum(j_start + rows_per_split, K // 2), BLOCK_J):
            t0 = tl.zeros((BLOCK_W,), dtype=tl.float32)
            t1, t2, t3 = t0, t0, t0
            sum_x = 0.0
            for jj in tl.static_range(BLOCK_J):
                u = tl.load(w_ptr + (j0 + jj) * stride_wk + offs_w, mask=w_in, other=0, eviction_policy="evict_first")
                x_even = tl.load(x_ptr + m * stride_xm + 2 * (j0 + jj)).to(tl.float32)
                x_odd = tl.load(x_ptr + m * stride_xm + 2 * (j0 + jj) + 1).to(tl.float32)
                xe = x_even * 0.0000019073486328125  # x · 2^-19
                xo = x_odd * 0.0000019073486328125
                # byte i's low nibble (bits 8i..8i+3) and high one (8i+4..8i+7) to bits 19-22: shifts 19 - 8i and
                # 15 - 8i (right shifts of a signed word fill the top bits, which the mask drops)
                t0 += (((u << 19) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xe
                t0 += (((u << 15) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xo
                t1 += (((u << 11) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xe
                t1 += (((u << 7) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xo
                t2 += (((u << 3) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xe
                t2 += (((u >> 1) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xo
                t3 += (((u >> 5) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xe
                t3 += (((u >> 9) & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * xo
                sum_x += x_even + x_odd
            params = s_ptr + ((2 * j0) // GROUP) * stride_sg + 4 * offs_w  # the group's scales of outputs 4w
            zeros = z_ptr + ((2 * j0) // GROUP) * stride_sg + 4 * offs_w
            # s (Σ q x - z Σ x), Σ q x = t - 16 Σ x
            y0 += tl.load(params, mask=w_in, other=0.0).to(tl.float32) * (
                t0 - (16.0 + tl.load(zeros, mask=w_in, other=0).to(tl.float32)) * sum_x)
            y1 += tl.load(params + 1, mask=w_in, other=0.0).to(tl.float32) * (
                t1 - (16.0 + tl.load(zeros + 1, mask=w_in, other=0).to(tl.float32)) * sum_x)
            y2 += tl.load(params + 2, mask=w_in, other=0.0).to(tl.float32) * (
                t2 - (16.0 + tl.load(zeros + 2, mask=w_in, other=0).to(tl.float32)) * sum_x)
            y3 += tl.load(params + 3, mask=w_in, other=0.0).to(tl.float32) * (
                t3 - (16.0 + tl.load(zeros + 3, mask=w_in, other=0).to(tl.float32)) * sum_x)
        out = y_ptr + m * stride_ym + 4 * offs_w
        if SPLIT_K == 1:
            tl.store(out, y0.to(y_ptr.dtype.element_ty), mask=w_in)
            tl.store(out + 1, y1.to(y_ptr.dtype.element_ty), mask=w_in)
            tl.store(out + 2, y2.to(y_ptr.dtype.element_ty), mask=w_in)
            tl.store(out + 3, y3.to(y_ptr.dtype.element_ty), mask=w_in)
        else:
            tl.atomic_add(out, y0, mask=w_in, sem="relaxed")
            tl.atomic_add(out + 1, y1, mask=w_in, sem="relaxed")
            tl.atomic_add(out + 2, y2, mask=w_in, sem="relaxed")
            tl.atomic_add(out + 3, y3, mask=w_in, sem="relaxed")

    return _Kernels(triton, int8_gemv_kernel, int4_gemv_kernel, weight_only_gemm_kernel, int8_gemm_kernel,
                    int4_gemv_words_kernel, int4_gemv_kmajor_kernel, int4_gemv_kmajor_words_kernel)  # fmt: skip


class _Kernels(NamedTuple):
    """What ``_kernels()`` builds: Triton itself and the kernels (iterable, for ``kernels.ptx``)."""

    triton: object
    int8_gemv: object
    int4_gemv: object
    weight_only_gemm: object
    int8_gemm: object
    int4_gemv_words: object
    int4_gemv_kmajor: object
    int4_gemv_kmajor_words: object


# ---------------------------------------------------------------------------------------
# Launch configurations. GEMV: (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages); GEMM: tiles.
# The fastest depends on the GPU and the shape, so the wrappers time them (autotune) per shape.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    """One GEMV launch: output channels and K-columns per program, K-slices, warps, pipeline depth."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    words: bool = False  # int4 only: the kernel that reads 32-bit words of 8 nibbles (int4_gemv_words_kernel)
    halves: bool = False  # the word kernel only: unpack nibbles as fp16 halves (HALVES in the kernel)

    def __post_init__(self) -> None:
        if self.halves and not self.words:
            raise ValueError("GemvConfig.halves needs words=True (it is a way of unpacking the word kernel's words)")


# At K=8192, N=28672 there are thousands of output channels: many small programs keep every SM
# busy without splitting K; split-K is for few, long rows (e.g. N=4096, K=14336).
# (block_n, block_k, split_k, warps, stages):
GEMV_CONFIGS = [GemvConfig(*c) for c in (
    (8, 512, 1, 4, 3), (16, 512, 1, 4, 3), (16, 256, 1, 4, 4), (32, 256, 1, 4, 3), (8, 1024, 1, 4, 2),
    (16, 1024, 1, 8, 2), (4, 1024, 1, 2, 3), (32, 512, 1, 8, 3), (16, 512, 2, 4, 3), (32, 512, 4, 8, 3),
)]  # fmt: skip
INT4_GEMV_CONFIGS = [GemvConfig(*c) for c in (
    (8, 512, 1, 4, 3), (16, 512, 1, 4, 3), (16, 256, 1, 4, 3), (32, 256, 1, 4, 3), (8, 1024, 1, 4, 2),
    (16, 1024, 1, 8, 2), (32, 512, 1, 8, 3), (4, 1024, 1, 2, 3), (16, 512, 2, 4, 3),
    # the word kernel (BLOCK_K = 8 words of a row per step, inside one group): many rows per thread, so that
    # each x value loaded serves many weights (compiled for sm_90: 4.4-5.2 instructions a weight in its loop,
    # against 6.6-7.0 for the byte kernel above)
    (128, 128, 1, 2, 4, True), (256, 128, 1, 4, 3, True), (64, 128, 1, 1, 4, True), (128, 128, 2, 2, 4, True),
    (256, 128, 2, 4, 3, True), (64, 128, 1, 2, 4, True), (32, 128, 1, 1, 4, True),
    # the same unpacking nibbles as fp16 halves: 3.7 instructions a weight, 0.9 of them integer (against 2.6)
    (128, 128, 1, 2, 4, True, True), (256, 128, 1, 4, 3, True, True), (64, 128, 1, 1, 4, True, True),
    (128, 128, 2, 2, 4, True, True), (128, 128, 1, 4, 4, True, True), (64, 128, 1, 2, 4, True, True),
    # steps of 64 columns, for groups of 64
    (128, 64, 1, 2, 4, True), (128, 64, 1, 2, 4, True, True), (256, 64, 1, 4, 3, True, True),
    # K split 4 or 8 ways: each program walks 8-16 steps instead of 64 (a row of 8192 columns), so a GPU holds
    # more programs and each waits on fewer loads in a row. On the H100 the word kernels above (64 steps a
    # program, 224-896 programs of 1-4 warps) ran at 94 us against the byte kernel's 86 (16 steps a program)
    (64, 128, 4, 2, 4, True, True), (32, 128, 4, 1, 4, True, True), (128, 128, 4, 4, 4, True, True),
    (64, 128, 8, 2, 4, True, True), (32, 128, 8, 1, 3, True, True), (64, 128, 4, 2, 4, True),
)]  # fmt: skip
# The K-major kernel (weights stored as ``k_major`` makes them): BLOCK_N outputs a program (8 bytes of a row a thread:
# 8-byte loads), block_k k-values (block_k / 2 byte rows) a step inside one group, K split so that the programs fill
# the GPU (28672 outputs at 256-2048 a program, split 4-16 ways: 112-896 programs)
INT4_KMAJOR_CONFIGS = [GemvConfig(*c) for c in (
    (1024, 32, 16, 4, 3), (1024, 32, 8, 4, 3), (512, 32, 8, 2, 3), (512, 32, 16, 2, 3), (1024, 64, 8, 4, 2),
    (2048, 32, 8, 8, 3), (256, 32, 4, 1, 4),
    # reading each row as 32-bit words (4 outputs each; N a multiple of 4): no byte taken out of a word first
    (1024, 32, 8, 4, 3, True), (1024, 32, 16, 4, 3, True), (512, 32, 8, 2, 3, True), (2048, 32, 8, 8, 3, True),
    (1024, 64, 8, 4, 2, True), (512, 32, 16, 2, 3, True), (2048, 32, 16, 8, 2, True),
)]  # fmt: skip
# (block_m, block_n, block_k, stages, warps):
WEIGHT_ONLY_GEMM_CONFIGS = [TileConfig(*c) for c in (
    (128, 128, 64, 3, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (16, 128, 128, 4, 4),
)]  # fmt: skip
# int8 tensor cores like 128-deep K tiles (128 bytes: one 128-byte swizzled row of shared memory)
INT8_GEMM_CONFIGS = [TileConfig(*c) for c in (
    (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 4), (128, 128, 128, 4, 8),
    (128, 256, 128, 4, 8), (128, 128, 64, 5, 4), (64, 128, 128, 4, 4), (64, 64, 64, 3, 4),
)]  # fmt: skip
# The int4 GEMVs' argument types as ``kernels.ptx`` compiles them without a GPU (tests, tools/compile_sweep.py,
# notebook 08): bf16 activations, scales and zero points, at the bar's shape
_INT4_ARGS = dict(x_ptr="*bf16", s_ptr="*bf16", z_ptr="*bf16", y_ptr="*bf16", N="i32", K="i32", stride_xm="i32",
                  stride_wn="i32", stride_sn="i32", stride_sg="i32", stride_ym="i32")  # fmt: skip
_KMAJOR_ARGS = dict(x_ptr="*bf16", s_ptr="*bf16", z_ptr="*bf16", y_ptr="*bf16", N="i32", K="i32", stride_xm="i32",
                    stride_wk="i32", stride_sg="i32", stride_ym="i32")  # fmt: skip
GPU_SIGNATURES = {"int4_gemv_kernel": dict(_INT4_ARGS, w_ptr="*u8"),
                  "int4_gemv_words_kernel": dict(_INT4_ARGS, w_ptr="*i32"),
                  "int4_gemv_kmajor_kernel": dict(_KMAJOR_ARGS, w_ptr="*u8"),
                  "int4_gemv_kmajor_words_kernel": dict(_KMAJOR_ARGS, w_ptr="*i32", MAGIC="i32")}  # fmt: skip


def gpu_spec(name: str, num_warps: int = 4, **constexprs) -> dict:
    """An int4 GEMV kernel with these constexprs and warps, as ``kernels.ptx.kernel_report`` takes it."""
    from .ptx import kernel_spec

    return kernel_spec(GPU_SIGNATURES, name, num_warps, **constexprs)


INTERPRETER_GEMV = GemvConfig(4, 32, 1, 1, 1)  # the interpreter is slow: small blocks, no tuning
INTERPRETER_GEMM = TileConfig(16, 16, 32, 1, 1, 2)
_tuned: dict[tuple, object] = {}
autotune_log: dict[tuple, list] = {}  # key -> [(config, seconds or None)], for the curious


def _autotune(key: tuple, configs: list, run, device, reference=None) -> object:
    """The fastest config for ``key`` (measured once, with ``kernels.fastest``), remembered per shape.
    ``reference()``, if given, is the oracle's output each config must agree with; it is computed only
    when the shape is tuned, never on the calls after."""
    if key not in _tuned:
        check = None
        if reference is not None:
            expected = reference()
            check = lambda out: _agree(out, expected)  # noqa: E731
        _tuned[key], autotune_log[key] = fastest(configs, run, device, check)
    return _tuned[key]


def _choose(backend: str | None, *tensors: torch.Tensor) -> str:
    """``choose_backend``, answering at once for CPU tensors outside the interpreter (the common CPU case).

    A small model calls its linears hundreds of times a second; looking for the triton package
    on every call would cost more than the arithmetic of a small layer.
    """
    if backend == "reference" or (backend in (None, "auto") and not interpreting() and not any(t.is_cuda for t in tensors)):
        return "reference"
    return choose_backend(backend, *tensors)


def _on_interpreter(t: torch.Tensor) -> bool:
    return interpreting() and not t.is_cuda


# ---------------------------------------------------------------------------------------
# Checks: shapes, dtypes, devices. Bad input is a ValueError that names the argument.
# ---------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, k: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor of dtype {FLOAT_DTYPES}, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) to match the weight's in_features, got {tuple(x.shape)}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def _check_int8_weight(w_int8: torch.Tensor, scales: torch.Tensor) -> None:
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(f"w_int8 must be a 2-D int8 tensor (out, in), got {w_int8.dtype} {tuple(w_int8.shape)}")
    if scales.shape != (w_int8.shape[0],) or not scales.is_floating_point():
        raise ValueError(
            f"scales must be a floating tensor of shape ({w_int8.shape[0]},), one per output channel; "
            f"got {scales.dtype} {tuple(scales.shape)}"
        )


def _check_int4_weight(w_packed, scales, zeros, group_size) -> None:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(
            f"w_packed must be a 2-D uint8 tensor (out, in // 2), got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size ({group_size}) must divide in_features ({k}); allowed: the even divisors of {k}")
    want = (n, k // group_size)
    if scales.shape != want or zeros.shape != want:
        raise ValueError(
            f"scales and zeros must have shape {want} (out, in // group_size), got {tuple(scales.shape)} and "
            f"{tuple(zeros.shape)}"
        )
    if not scales.is_floating_point():
        raise ValueError(f"scales must be floating point, got {scales.dtype}")


def _check_int8_linear(x_int8, w_int8, x_scales, w_scales, bias) -> None:
    if x_int8.dtype != torch.int8 or x_int8.dim() != 2:
        raise ValueError(f"x_int8 must be a 2-D int8 tensor (M, K), got {x_int8.dtype} {tuple(x_int8.shape)}")
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(f"w_int8 must be a 2-D int8 tensor (N, K), got {w_int8.dtype} {tuple(w_int8.shape)}")
    if x_int8.shape[1] != w_int8.shape[1]:
        raise ValueError(
            f"x_int8 is {tuple(x_int8.shape)} and w_int8 is {tuple(w_int8.shape)}: their last dimensions (K) must match"
        )
    if x_scales.shape != (x_int8.shape[0],) or not x_scales.is_floating_point():
        raise ValueError(
            f"x_scales must be floating, shape ({x_int8.shape[0]},) (one per row); got {tuple(x_scales.shape)}"
        )
    if w_scales.shape != (w_int8.shape[0],) or not w_scales.is_floating_point():
        raise ValueError(
            f"w_scales must be floating, shape ({w_int8.shape[0]},) (one per channel); got {tuple(w_scales.shape)}"
        )
    if bias is not None and bias.shape != (w_int8.shape[0],):
        raise ValueError(f"bias must have shape ({w_int8.shape[0]},), got {tuple(bias.shape)}")


# ---------------------------------------------------------------------------------------
# int8 weight-only: y = x (q s)ᵀ = (x qᵀ) s
# ---------------------------------------------------------------------------------------
def int8_weight_only_linear_reference(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The oracle and the CPU path: multiply by the int8 weights in fp32, then scale each output channel."""
    _check_int8_weight(w_int8, scales)
    _check_x(x, w_int8.shape[1])
    return ((x.float() @ w_int8.float().t()) * scales.float()).to(x.dtype)  # (..., K) @ (K, N) -> (..., N)


def _split_k_output(y: torch.Tensor, split_k: int) -> torch.Tensor:
    """Where a GEMV's programs write: ``y`` itself, or with K split, a zeroed fp32 buffer they add into atomically."""
    return y if split_k == 1 else torch.zeros(y.shape, device=y.device, dtype=torch.float32)


def _split_k_result(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``y``, holding the split-K buffer's sums in its own dtype where the programs wrote to a buffer."""
    if out is not y:
        y.copy_(out)
    return y


def _launch_int8_gemv(x2, w, scales, y, cfg: GemvConfig):
    k = _kernels()
    triton, gemv = k.triton, k.int8_gemv
    M, K = x2.shape
    N = w.shape[0]
    out = _split_k_output(y, cfg.split_k)
    grid = (M, cfg.split_k, triton.cdiv(N, cfg.block_n))
    gemv[grid](
        x2, w, scales, out, N, K, x2.stride(0), w.stride(0), out.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        EVEN_K=K % (cfg.block_k * cfg.split_k) == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return _split_k_result(y, out)


def _launch_weight_only_gemm(x2, w, scales, zeros, group, y, cfg: TileConfig):
    k = _kernels()
    triton, gemm = k.triton, k.weight_only_gemm
    M, K = x2.shape
    N = w.shape[0]
    int4 = zeros is not None
    block_k = min(cfg.block_k, group) if int4 else cfg.block_k
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))
    gemm[grid](
        x2, w, scales, zeros if int4 else scales, y, M, N, K, x2.stride(0), w.stride(0),
        scales.stride(0), scales.stride(1) if int4 else 0, y.stride(0), INT4=int4, GROUP=group if int4 else 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, UPCAST=_on_interpreter(x2), PRECISION="ieee" if x2.dtype == torch.float32 else None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def _agree(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """A kernel's output agrees with the reference's to the output dtype's rounding (relative to the largest)."""
    tolerance = 1e-4 if out.dtype == torch.float32 else 1e-2
    scale = expected.float().abs().max().clamp_min(1e-12)
    return bool(((out.float() - expected.float()).abs().max() / scale <= tolerance).item())


def _run_weight_only(x, n: int, key: tuple, gemv_configs: list, config, launch_gemv, launch_gemm,
                     reference) -> torch.Tensor:  # fmt: skip
    """GEMV for up to GEMV_MAX_ROWS rows of x (or a GemvConfig), GEMM above; autotuned per shape unless ``config``.
    The autotuner times only configs whose output agrees with ``reference(x2)`` (the PyTorch oracle)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    gemv = x2.shape[0] <= GEMV_MAX_ROWS if config is None else isinstance(config, GemvConfig)
    launch = launch_gemv if gemv else launch_gemm
    if config is None and _on_interpreter(x2):
        config = INTERPRETER_GEMV if gemv else INTERPRETER_GEMM
    elif config is None:
        candidates = gemv_configs if gemv else WEIGHT_ONLY_GEMM_CONFIGS
        key = (*key, "gemv" if gemv else "gemm", *x2.shape, n, x.device)
        config = _autotune(key, candidates, lambda c: launch(x2, y, c), x.device, lambda: reference(x2))
    launch(x2, y, config)
    return y.reshape(*x.shape[:-1], n)


def int8_weight_only_linear_triton(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, config: GemvConfig | TileConfig | None = None
) -> torch.Tensor:
    """Launch the Triton kernel: a GEMV for up to GEMV_MAX_ROWS rows of x, a GEMM above; autotuned per shape."""
    _check_int8_weight(w_int8, scales)
    _check_x(x, w_int8.shape[1])
    _check_same_device(x=x, w_int8=w_int8, scales=scales)
    w, scales = w_int8.contiguous(), scales.contiguous()  # the kernels read scales[n] at s_ptr + n
    return _run_weight_only(
        x, w.shape[0], ("int8", x.dtype), GEMV_CONFIGS, config,
        lambda x2, y, c: _launch_int8_gemv(x2, w, scales, y, c),
        lambda x2, y, c: _launch_weight_only_gemm(x2, w, scales, None, 1, y, c),
        lambda x2: int8_weight_only_linear_reference(x2, w, scales),
    )  # fmt: skip


def int8_weight_only_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """y = x Wᵀ for W = w_int8 · scales[:, None] (nn.Linear layout, out × in), without bias.

    Runs the Triton kernel on CUDA (or under TRITON_INTERPRET=1), the PyTorch reference
    elsewhere; ``backend`` forces one ("triton", "reference").
    """
    _check_int8_weight(w_int8, scales)
    _check_x(x, w_int8.shape[1])
    if _choose(backend, x, w_int8, scales) == "triton":
        return int8_weight_only_linear_triton(x, w_int8, scales)
    return int8_weight_only_linear_reference(x, w_int8, scales)


# ---------------------------------------------------------------------------------------
# int4 weight-only: two nibbles per byte, a scale and a zero point per group
# ---------------------------------------------------------------------------------------
def unpack_int4(w_packed: torch.Tensor) -> torch.Tensor:
    """(out, in // 2) uint8 -> (out, in) uint8 in 0..15: byte j holds column 2j (low) and 2j+1 (high)."""
    low, high = w_packed & 0xF, w_packed >> 4
    return torch.stack((low, high), dim=-1).reshape(w_packed.shape[0], -1)  # (out, in/2, 2) -> (out, in)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) integers in 0..15 -> (out, in // 2) uint8, two per byte (column 2j in the low nibble)."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"q must be 2-D with an even number of columns, got shape {tuple(q.shape)}")
    if q.is_floating_point() or bool((q < 0).any()) or bool((q > 15).any()):
        raise ValueError("q must hold integers in 0..15 (4-bit, unsigned)")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _triton_group(group_size: int) -> bool:
    """The kernels' tiles take whole groups of 32, 64, 128...: tl.dot needs 16 packed bytes at least."""
    return group_size >= 32 and group_size & (group_size - 1) == 0


def int4_weight_only_linear_reference(x, w_packed, scales, zeros, group_size: int) -> torch.Tensor:
    """The oracle and the CPU path: unpack, dequantize W = (q - z) s group by group, multiply in fp32."""
    _check_int4_weight(w_packed, scales, zeros, group_size)
    _check_x(x, 2 * w_packed.shape[1])
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    q = unpack_int4(w_packed).view(n, k // group_size, group_size).float()  # (N, K/g, g): one group per row
    w = ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(n, k)  # (q - z) s, group by group
    return (x.float() @ w.t()).to(x.dtype)


def _launch_int4_gemv(x2, w, scales, zeros, group, y, cfg: GemvConfig):
    if cfg.words:
        return _launch_int4_gemv_words(x2, w, scales, zeros, group, y, cfg)
    k = _kernels()
    triton, gemv = k.triton, k.int4_gemv
    M, K = x2.shape
    N = w.shape[0]
    block_k = max(cfg.block_k, group)  # whole groups per K-block
    split_k = min(cfg.split_k, triton.cdiv(K, block_k))
    out = _split_k_output(y, split_k)
    grid = (M, split_k, triton.cdiv(N, cfg.block_n))
    gemv[grid](
        x2, w, scales, zeros, out, N, K, x2.stride(0), w.stride(0), scales.stride(0), scales.stride(1), out.stride(0),
        GROUP=group, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return _split_k_result(y, out)


def _launch_int4_gemv_words(x2, w, scales, zeros, group, y, cfg: GemvConfig):
    k = _kernels()
    triton, kernel = k.triton, k.int4_gemv_words
    M, K = x2.shape
    N = w.shape[0]
    if K % 8 or group % cfg.block_k or cfg.block_k % 8 or w.data_ptr() % 4:
        raise ValueError(f"the word kernel needs K % 8 == 0 ({K}), block_k dividing the group ({cfg.block_k}, "
                         f"{group}) and 4-byte aligned weights")  # fmt: skip
    words = w.view(torch.int32)  # (N, K / 8): each row's bytes, four at a time
    split_k = min(cfg.split_k, triton.cdiv(K, cfg.block_k))
    out = _split_k_output(y, split_k)
    kernel[(M, split_k, triton.cdiv(N, cfg.block_n))](
        x2, words, scales, zeros, out, N, K, x2.stride(0), words.stride(0), scales.stride(0), scales.stride(1),
        out.stride(0),
        GROUP=group, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_k // 8, SPLIT_K=split_k,
        HALVES=cfg.halves, ASM=x2.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return _split_k_result(y, out)


def _launch_int4_gemv_kmajor(x2, w, scales, zeros, group, y, cfg: GemvConfig):
    k = _kernels()
    M, K = x2.shape
    N = w.shape[0]
    if cfg.halves or cfg.block_k % 2 or group % cfg.block_k or cfg.words and (N % 4 or cfg.block_n % 4):
        raise ValueError(f"the K-major kernel takes configs whose block_k (k-values a step, {cfg.block_k}) is even and "
                         f"divides the group ({group}); its words read 4 outputs at once (N = {N}, block_n = "
                         f"{cfg.block_n}: multiples of 4), without halves")  # fmt: skip
    split_k = min(cfg.split_k, K // cfg.block_k)
    out = _split_k_output(y, split_k)
    kernel, rows, magic = k.int4_gemv_kmajor, w, ()
    if cfg.words:  # the (K/2, N) bytes as (K/2, N/4) 32-bit words
        kernel, rows, magic = k.int4_gemv_kmajor_words, w.t().view(torch.int32).t(), (0x4B000000,)
    kernel[(M, split_k, k.triton.cdiv(N, cfg.block_n))](
        x2, rows, scales, zeros, out, N, K, x2.stride(0), rows.stride(1), scales.stride(1), out.stride(0), *magic,
        GROUP=group, BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_k // 2, SPLIT_K=split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return _split_k_result(y, out)


def _int4_gemv_candidates(dtype: torch.dtype, group_size: int, kmajor: bool = False) -> list[GemvConfig]:
    """The GEMV configs that can run this case. The word kernel's steps stay inside a group (its block_k must
    divide the group size). fp32 activations ask for fp32 accuracy: the fp16-halves unpacking keeps about 13
    bits of each q·x (1024·x rides beside it), invisible in a 16-bit output but not in a 32-bit one."""
    if kmajor:
        return [c for c in INT4_KMAJOR_CONFIGS if group_size % c.block_k == 0]
    return [c for c in INT4_GEMV_CONFIGS
            if not (c.words and group_size % c.block_k) and (dtype != torch.float32 or not c.halves)]  # fmt: skip


def k_major(w_packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 weights (N, K/2) stored K-major: the same bytes, as a view of a contiguous (K/2, N) tensor. A
    byte row then holds one pair of columns of every output: a GEMV program owning consecutive outputs reads
    each step's bytes as contiguous runs and never sums across threads inside its loop (with ``group_major``
    scales, also one run a step)."""
    return group_major(w_packed)  # the same storage trick: the transpose made contiguous, seen transposed back


def _is_k_major(w: torch.Tensor) -> bool:
    return w.shape[0] > 1 and w.stride(0) == 1 and w.t().is_contiguous()


def group_major(t: torch.Tensor) -> torch.Tensor:
    """A (N, G) tensor of per-group scales or zero points, stored group by group: the same values, as a view of a
    contiguous (G, N) tensor. A GEMV step reads one group of BLOCK_N consecutive rows: stored row by row those
    are BLOCK_N values one row of groups apart (a memory transaction each); stored group by group, one run."""
    return t.t().contiguous().t()


def _is_group_major(t: torch.Tensor) -> bool:
    return t.shape[0] > 1 and t.stride(0) == 1


def _scale_layout(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales row-major or group-major (kept as given), other strides made row-major; zeros laid out as the scales
    (the kernels read both at the same offsets)."""
    if not (scales.is_contiguous() or _is_group_major(scales) and scales.t().is_contiguous()):
        scales = scales.contiguous()
    if zeros.stride() != scales.stride():
        zeros = torch.empty_strided(scales.shape, scales.stride(), dtype=zeros.dtype, device=zeros.device).copy_(zeros)
    return scales, zeros


def int4_weight_only_linear_triton(x, w_packed, scales, zeros, group_size: int, config=None) -> torch.Tensor:
    """Launch the Triton kernel: GEMV for few rows of x, GEMM above; autotuned per shape and layout (scales
    row-major, or group-major as ``group_major`` stores them; weights row-major, or K-major as ``k_major`` stores
    them, which takes its own GEMV kernels and group-major scales: others are copied so at every call)."""
    _check_int4_weight(w_packed, scales, zeros, group_size)
    _check_x(x, 2 * w_packed.shape[1])
    _check_same_device(x=x, w_packed=w_packed, scales=scales, zeros=zeros)
    if not _triton_group(group_size):
        raise ValueError(f"the Triton int4 kernel needs a power-of-two group_size >= 32, got {group_size}")
    kmajor = _is_k_major(w_packed)
    w = w_packed if kmajor else w_packed.contiguous()
    if kmajor and not (_is_group_major(scales) and scales.t().is_contiguous()):
        scales = group_major(scales)  # the K-major kernels read a group's scales as one run along N (else a copy)
    scales, zeros = _scale_layout(scales, zeros)
    layout = "K-major" if kmajor else "group-major" if _is_group_major(scales) else "row-major"
    return _run_weight_only(
        x, w.shape[0], ("int4", group_size, x.dtype, layout), _int4_gemv_candidates(x.dtype, group_size, kmajor),
        config,
        lambda x2, y, c: (_launch_int4_gemv_kmajor if kmajor else _launch_int4_gemv)(x2, w, scales, zeros, group_size,
                                                                                    y, c),
        # many rows: the GEMM reads row-major bytes (a K-major layer pays a copy here; it is made for decoding)
        lambda x2, y, c: _launch_weight_only_gemm(x2, w.contiguous(), scales, zeros, group_size, y, c),
        lambda x2: int4_weight_only_linear_reference(x2, w, scales, zeros, group_size),
    )  # fmt: skip


def int4_weight_only_linear(x, w_packed, scales, zeros, group_size: int, backend: str | None = None) -> torch.Tensor:
    """y = x Wᵀ for W[n, k] = (q[n, k] - zeros[n, k // g]) · scales[n, k // g], q packed two per byte.

    Runs the Triton kernel on CUDA (or under TRITON_INTERPRET=1), the PyTorch reference
    elsewhere; ``backend`` forces one ("triton", "reference").
    """
    _check_int4_weight(w_packed, scales, zeros, group_size)
    _check_x(x, 2 * w_packed.shape[1])
    chosen = _choose(backend, x, w_packed, scales, zeros)
    if chosen == "triton" and (backend == "triton" or _triton_group(group_size)):
        return int4_weight_only_linear_triton(x, w_packed, scales, zeros, group_size)
    return int4_weight_only_linear_reference(x, w_packed, scales, zeros, group_size)


# ---------------------------------------------------------------------------------------
# W8A8: int8 x int8 -> int32, dequantized in the epilogue
# ---------------------------------------------------------------------------------------
def int8_linear_reference(x_int8, w_int8, x_scales, w_scales, bias=None, out_dtype=None) -> torch.Tensor:
    """The oracle and the CPU path: an exact integer matmul, then acc · sx[:, None] · sw[None, :] (+ bias).

    On the CPU the integer matmul is ``torch._int_mm`` (oneDNN's int8 GEMM, VNNI where the CPU
    has it). On CUDA the oracle multiplies in float64, exact for any K below 2^53 / 127².
    """
    _check_int8_linear(x_int8, w_int8, x_scales, w_scales, bias)
    if x_int8.is_cuda:
        acc = (x_int8.double() @ w_int8.double().t()).float()
    else:
        acc = torch._int_mm(x_int8, w_int8.t()).float()  # (M, K) @ (K, N) column-major -> int32 (M, N)
    if torch.compiler.is_compiling():  # traced (torch.compile, torch.export): out of place, the compiler fuses it;
        y = acc * x_scales.float()[:, None] * w_scales.float()  # torch 2.5's export rejects the in-place form
        y = y + bias.float() if bias is not None else y
    else:
        y = acc.mul_(x_scales.float()[:, None]).mul_(w_scales.float())  # in place: no temporaries of (M, N)
        if bias is not None:
            y.add_(bias.float())
    return y.to(out_dtype or x_scales.dtype)


def _launch_int8_gemm(a, w, sa, sb, bias, c, cfg: TileConfig):
    k = _kernels()
    triton, gemm = k.triton, k.int8_gemm
    M, K = a.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    gemm[grid](
        a, w, sa, sb, bias if bias is not None else sa, c, M, N, K,
        a.stride(0), a.stride(1), w.stride(1), w.stride(0), c.stride(0),  # B = wᵀ: (K, N) with K contiguous
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, EVEN_K=K % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return c


def int8_linear_triton(x_int8, w_int8, x_scales, w_scales, bias=None, out_dtype=None, config=None) -> torch.Tensor:
    """Launch the Triton W8A8 GEMM (autotuned per shape)."""
    _check_int8_linear(x_int8, w_int8, x_scales, w_scales, bias)
    _check_same_device(x_int8=x_int8, w_int8=w_int8, x_scales=x_scales, w_scales=w_scales, bias=bias)
    a, w = x_int8.contiguous(), w_int8.contiguous()
    sa, sb = x_scales.float().contiguous(), w_scales.float().contiguous()
    c = torch.empty((a.shape[0], w.shape[0]), device=a.device, dtype=out_dtype or x_scales.dtype)
    if config is None:
        config = INTERPRETER_GEMM if _on_interpreter(a) else _autotune(
            ("int8 w8a8", a.shape[0], w.shape[0], a.shape[1], c.dtype, bias is not None, a.device), INT8_GEMM_CONFIGS,
            lambda cfg: _launch_int8_gemm(a, w, sa, sb, bias, c, cfg), a.device)  # fmt: skip
    return _launch_int8_gemm(a, w, sa, sb, bias, c, config)


def int8_linear(
    x_int8: torch.Tensor,
    w_int8: torch.Tensor,
    x_scales: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """W8A8 linear: (x_int8 @ w_int8ᵀ) · x_scales[:, None] · w_scales[None, :] (+ bias), in ``out_dtype``.

    x_int8 (M, K) holds activations quantized per row (token), w_int8 (N, K) weights per output
    channel, both symmetric. ``out_dtype`` defaults to the scales' dtype.
    """
    _check_int8_linear(x_int8, w_int8, x_scales, w_scales, bias)
    if _choose(backend, x_int8, w_int8) == "triton":
        return int8_linear_triton(x_int8, w_int8, x_scales, w_scales, bias, out_dtype)
    return int8_linear_reference(x_int8, w_int8, x_scales, w_scales, bias, out_dtype)
