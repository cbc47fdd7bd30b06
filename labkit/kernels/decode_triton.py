"""The Triton side of ``decode_kernels`` (read that module first): imported only when a kernel is first
launched, so that importing labkit never imports Triton. Kernels call the small ``@triton.jit``
helpers at the top, which Triton looks up among this module's globals."""

import triton
import triton.language as tl


@triton.jit
def layernorm_stats(row_ptr, K, eps, BLOCK_K: tl.constexpr):
    # mean and 1/std of a row of K floats, in two passes (as exact as torch's LayerNorm)
    offs = tl.arange(0, BLOCK_K)
    s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        s1 += tl.load(row_ptr + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
    mean = tl.sum(s1, axis=0) / K
    s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        xk = tl.load(row_ptr + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
        d = tl.where(k + offs < K, xk - mean, 0.0)
        s2 += d * d
    return mean, 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K + eps)


@triton.jit
def layernorm_tile(row_ptr, offs, K, g, beta, eps):
    # LayerNorm of a row that fits one tile, given its (prefetched) weight g and bias beta: the row is loaded
    # once and both statistics come from registers (the same two-pass arithmetic as layernorm_stats)
    inside = offs < K
    x = tl.load(row_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    d = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / K + eps)
    return d * rstd * g + beta


@triton.jit
def layernorm_tiles(row_ptr, offs_a, offs_b, K, g_a, beta_a, g_b, beta_b, eps):
    # layernorm_tile for a row held as two tiles (columns offs_a, then offs_b): both halves normalized
    in_a, in_b = offs_a < K, offs_b < K
    x_a = tl.load(row_ptr + offs_a, mask=in_a, other=0.0).to(tl.float32)
    x_b = tl.load(row_ptr + offs_b, mask=in_b, other=0.0).to(tl.float32)
    mean = (tl.sum(x_a, axis=0) + tl.sum(x_b, axis=0)) / K
    d_a = tl.where(in_a, x_a - mean, 0.0)
    d_b = tl.where(in_b, x_b - mean, 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(d_a * d_a, axis=0) + tl.sum(d_b * d_b, axis=0)) / K + eps)
    return d_a * rstd * g_a + beta_a, d_b * rstd * g_b + beta_b


@triton.jit
def load_tile(ptr, offs, K):
    # a vector of K weights (a LayerNorm's weight or bias) in fp32, zero past the edge
    return tl.load(ptr + offs, mask=offs < K, other=0.0).to(tl.float32)

@triton.jit
def attend(q, k_ptr, v_ptr, start, end, stride_t, offs_d, d_in, BLOCK_T: tl.constexpr):
    # online softmax of q (scaled to log2 units) over the keys at positions start..end-1 of one head:
    # (running max m, Σ 2^(s - m), Σ 2^(s - m) v); an empty range leaves (-inf, 0, 0)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros(q.shape, dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < end
        kv = offs_t[:, None] * stride_t + offs_d[None, :]
        both = t_in[:, None] & d_in[None, :]
        keys = tl.load(k_ptr + kv, mask=both, other=0.0).to(tl.float32)
        scores = tl.where(t_in, tl.sum(keys * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        values = tl.load(v_ptr + kv, mask=both, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
        m_i = m_new
    return m_i, l_i, acc

@triton.jit
def gelu(y):  # tanh GELU (GPT-2's): 0.5 y (1 + tanh u) = y / (1 + e^(-2u))
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y / (1.0 + tl.exp(-2.0 * u))

@triton.jit
def grid_dependency_wait(USE_PDL: tl.constexpr):
    # with programmatic dependent launch (Hopper+), a kernel may start while the one before it finishes;
    # it must wait for that one's writes before reading anything it produced
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(USE_PDL: tl.constexpr):
    # let the next kernel start launching (it will wait for this one's writes in grid_dependency_wait)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def embed_kernel(tok_ptr, length_ptr, pos_ptr, wte_ptr, wpe_ptr, x_ptr, C, T_MAX, BLOCK: tl.constexpr,
                 USE_PDL: tl.constexpr):  # fmt: skip
    # x[b] = wte[token] + wpe[pos], pos = the row's length (clamped to the context); the length moves on here.
    # One program per row: the one that reads the length is the one that moves it on.
    b = tl.program_id(0)
    grid_dependency_wait(USE_PDL)
    launch_dependents(USE_PDL)
    pos = tl.minimum(tl.load(length_ptr + b), T_MAX - 1)
    tok = tl.load(tok_ptr + b)
    for c in range(0, C, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        inside = offs < C
        x = tl.load(wte_ptr + tok * C + offs, mask=inside, other=0.0).to(tl.float32)
        x += tl.load(wpe_ptr + pos * C + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(x_ptr + b * C + offs, x, mask=inside)
    tl.store(pos_ptr + b, pos)
    tl.store(length_ptr + b, pos + 1)


@triton.jit
def gemv_input(x_ptr, m, stride_xm, kk, K, lnw_ptr, lnb_ptr, mean, rstd, m_ptr, l_ptr, a_ptr, HS: tl.constexpr,
               SPLITS: tl.constexpr, PROLOGUE: tl.constexpr):  # fmt: skip
    # columns kk of the GEMV's input row m: x itself (PROLOGUE 0), LayerNorm(x) (1), or the attention parts
    # merged (2): x_k = Σ_p 2^(m_p - M) a_pk / Σ_p 2^(m_p - M) l_p for head k // HS
    inside = kk < K
    if PROLOGUE == 2:
        offs_s = tl.arange(0, SPLITS)
        part = (m * (K // HS) + kk // HS)[None, :] * SPLITS + offs_s[:, None]  # (SPLITS, BLOCK_K)
        mx = tl.load(m_ptr + part, mask=inside[None, :], other=0.0)
        wgt = tl.exp2(mx - tl.max(mx, axis=0)[None, :])  # an empty split has m = -inf: weight 0
        lsum = tl.load(l_ptr + part, mask=inside[None, :], other=1.0)
        a = tl.load(a_ptr + part * HS + (kk % HS)[None, :], mask=inside[None, :], other=0.0)
        xk = tl.sum(wgt * a, axis=0) / tl.sum(wgt * lsum, axis=0)
    else:
        if PROLOGUE == 1:
            xk = layernormed(x_ptr + m * stride_xm, kk, K, lnw_ptr, lnb_ptr, mean, rstd)
        else:
            xk = tl.load(x_ptr + m * stride_xm + kk, mask=inside, other=0.0).to(tl.float32)
    return xk


@triton.jit
def linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lnw_ptr, lnb_ptr, m_ptr, l_ptr, a_ptr, kc_ptr, vc_ptr, pos_ptr, z_ptr, best_ptr,
    N, K, eps, stride_xm, stride_wn, stride_ym, stride_cb, stride_ch, stride_ct, Z,
    C: tl.constexpr, HS: tl.constexpr, SPLITS: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, ACCUMULATE: tl.constexpr, KV_WRITE: tl.constexpr,
    ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr, ARGMAX: tl.constexpr,
):  # fmt: skip
    # program (m, pid_k, pid_n): row m, K-slice pid_k, outputs pid_n*BLOCK_N..; a GEMV as in
    # quant_kernels.int8_gemv_kernel, with a prologue (PROLOGUE 1: LayerNorm of the row; 2: merge the
    # attention parts into the row) and an epilogue (bias, GELU, add into y, write k and v to the cache)
    m, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # rows past the edge wrap: computed, never stored
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH:  # one tile holds the program's whole slice of W: load it before waiting for the input
        w_all = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
        if PROLOGUE == 1:  # and the LayerNorm's weight and bias
            g_all = load_tile(lnw_ptr, offs_k, K)
            beta_all = load_tile(lnb_ptr, offs_k, K)
    grid_dependency_wait(USE_PDL)
    launch_dependents(USE_PDL)
    if PREFETCH:
        if PROLOGUE == 1:  # the row loaded once: one round trip to memory after the wait, not three
            xk = layernorm_tile(x_ptr + m * stride_xm, offs_k, K, g_all, beta_all, eps)
        else:
            xk = gemv_input(x_ptr, m, stride_xm, offs_k, K, lnw_ptr, lnb_ptr, 0.0, 1.0, m_ptr, l_ptr, a_ptr, HS,
                            SPLITS, PROLOGUE)  # fmt: skip
        y = tl.sum(w_all.to(tl.float32) * xk[None, :], axis=1)
    else:
        mean = 0.0
        rstd = 1.0
        if PROLOGUE == 1:
            mean, rstd = layernorm_stats(x_ptr + m * stride_xm, K, eps, BLOCK_K)
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # elementwise products, summed once at the end
        for k in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            kk = k + offs_k
            xk = gemv_input(x_ptr, m, stride_xm, kk, K, lnw_ptr, lnb_ptr, mean, rstd, m_ptr, l_ptr, a_ptr, HS,
                            SPLITS, PROLOGUE)  # fmt: skip
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=(kk < K)[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)  # fmt: skip
            acc += w * xk[None, :]
        y = tl.sum(acc, axis=1)
    out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = out < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)  # once, by the first K-slice
    if GELU:
        y = gelu(y)
    dst = y_ptr + m * stride_ym + out
    if ACCUMULATE:  # the residual stream: y += result
        if SPLIT_K == 1:
            tl.store(dst, tl.load(dst, mask=keep, other=0.0) + y, mask=keep)
        else:
            tl.atomic_add(dst, y, mask=keep, sem="relaxed")
    else:
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=keep)
    if KV_WRITE:  # outputs C..2C are the new key, 2C..3C the new value: into the cache at the row's position
        pos = tl.load(pos_ptr + m)
        c = out % C
        slot = m.to(tl.int64) * stride_cb + (c // HS) * stride_ch + pos * stride_ct + c % HS  # caches pass 2^31
        tl.store(kc_ptr + slot, y.to(kc_ptr.dtype.element_ty), mask=keep & (out // C == 1))
        tl.store(vc_ptr + slot, y.to(vc_ptr.dtype.element_ty), mask=keep & (out // C == 2))
    if ZERO:  # on the side: set row m of a (B, Z) buffer to 0 (the next residual accumulator)
        if pid_k == 0:
            tl.store(z_ptr + m * Z + out, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=out < Z)
    if ARGMAX:  # greedy decoding: this block's largest output (its first index on ties) folded into row m's best
        v = tl.where(keep, y, float("-inf"))
        top = tl.max(v, axis=0)
        first = tl.min(tl.where(v == top, out, N), axis=0)
        tl.atomic_max(best_ptr + m, pack_best(top + 0.0, first), sem="relaxed")  # + 0.0: -0.0 ties +0.0


@triton.jit
def pack_best(value, index):
    # (value, index) as one int64 whose signed order is the value's, then the smaller index's: an atomic max of
    # these keeps a row's argmax as torch.argmax does (the first index of the largest value). The float's bits
    # are an int whose order is the float's once a negative one's magnitude bits are flipped.
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def greedy_kernel(best_ptr, tok_ptr, N, EMPTY: tl.constexpr, USE_PDL: tl.constexpr):
    # row b's greedy token out of its packed best (as the next step's input), and the best emptied for that step
    b = tl.program_id(0)
    grid_dependency_wait(USE_PDL)
    launch_dependents(USE_PDL)
    packed = tl.load(best_ptr + b)
    index = 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)
    tl.store(tok_ptr + b, tl.minimum(index, N - 1).to(tok_ptr.dtype.element_ty))  # never past the vocabulary
    tl.store(best_ptr + b, packed * 0 + EMPTY)

@triton.jit
def attention_kernel(
    qkv_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, a_ptr, qk_scale,
    stride_qm, stride_cb, stride_ch, stride_ct,
    H: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # program (b·H + h, s): positions [s·chunk, (s+1)·chunk) ∩ [0, pos] of row b, head h; online softmax
    bh, s = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    grid_dependency_wait(USE_PDL)
    launch_dependents(USE_PDL)
    length = tl.load(pos_ptr + b) + 1
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_T) * BLOCK_T
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HS
    q = tl.load(qkv_ptr + b * stride_qm + h * HS + offs_d, mask=d_in, other=0.0).to(tl.float32) * qk_scale
    head = b.to(tl.int64) * stride_cb + h * stride_ch  # 64-bit: a whole cache may pass 2^31 elements
    m_i, l_i, acc = attend(q, kc_ptr + head, vc_ptr + head,
                           start, end, stride_ct, offs_d, d_in, BLOCK_T)  # fmt: skip
    part = bh * SPLITS + s
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(a_ptr + part * HS + offs_d, acc, mask=d_in)

@triton.jit
def attention_proj_kernel(
    qkv_ptr, kc_ptr, vc_ptr, pos_ptr, w_ptr, b_ptr, x_ptr, qk_scale, N,
    stride_qm, stride_cb, stride_ch, stride_ct, stride_wn, stride_xm,
    H: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # program (b·H + h, pid_n): head h's attention over all of row b's positions, times its slice of the
    # output projection, W[n, h·HS:(h+1)·HS] for BLOCK_N outputs n, added into x (atomically: H heads add)
    bh, pid_n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    # Before the wait, what no kernel of this step writes: the weights, and the keys and values of the row's
    # earlier positions (0..pos-1, the first BLOCK_T of them), written by earlier steps. pos itself comes from
    # the step's embed kernel, two or more kernels back: with PDL this kernel starts only once every program of
    # the one before it has waited, so the kernel before that one has finished.
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (h * HS + offs_d)[None, :], mask=n_in[:, None] & d_in[None, :],
                other=0.0, eviction_policy="evict_first").to(tl.float32)  # fmt: skip
    pos = tl.load(pos_ptr + b)
    head = b.to(tl.int64) * stride_cb + h * stride_ch  # 64-bit: a whole cache may pass 2^31 elements
    offs_t = tl.arange(0, BLOCK_T)
    earlier = offs_t < pos
    kv = offs_t[:, None] * stride_ct + offs_d[None, :]
    both = earlier[:, None] & d_in[None, :]
    keys = tl.load(kc_ptr + head + kv, mask=both, other=0.0)
    values = tl.load(vc_ptr + head + kv, mask=both, other=0.0)
    grid_dependency_wait(USE_PDL)
    launch_dependents(USE_PDL)
    # after it: the query, and the new key and value (at pos), which the kernel before this one wrote
    q = tl.load(qkv_ptr + b * stride_qm + h * HS + offs_d, mask=d_in, other=0.0).to(tl.float32) * qk_scale
    k_new = tl.load(kc_ptr + head + pos * stride_ct + offs_d, mask=d_in, other=0.0).to(tl.float32)
    v_new = tl.load(vc_ptr + head + pos * stride_ct + offs_d, mask=d_in, other=0.0).to(tl.float32)
    scores = tl.where(earlier, tl.sum(keys.to(tl.float32) * q[None, :], axis=1), float("-inf"))
    s_new = tl.sum(k_new * q, axis=0)
    m_i = tl.maximum(tl.max(scores, axis=0), s_new)  # finite: the new position is always there
    p = tl.exp2(scores - m_i)
    p_new = tl.exp2(s_new - m_i)
    l_i = tl.sum(p, axis=0) + p_new
    acc = tl.sum(p[:, None] * values.to(tl.float32), axis=0) + p_new * v_new
    # the earlier positions past the first tile, BLOCK_T..pos-1 (none at short lengths), merged in exactly
    m_r, l_r, acc_r = attend(q, kc_ptr + head, vc_ptr + head, BLOCK_T, pos, stride_ct, offs_d, d_in, BLOCK_T)
    m_all = tl.maximum(m_i, m_r)
    alpha, beta = tl.exp2(m_i - m_all), tl.exp2(m_r - m_all)  # beta = 0 when nothing was left (m_r = -inf)
    l_i = l_i * alpha + l_r * beta
    acc = acc * alpha + acc_r * beta
    o = acc / l_i  # (BLOCK_D,): this head's output
    y = tl.sum(w * o[None, :], axis=1)
    if HAS_BIAS:
        y += tl.where(h == 0, tl.load(b_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32), 0.0)
    tl.atomic_add(x_ptr + b * stride_xm + offs_n, y, mask=n_in, sem="relaxed")

@triton.jit
def mlp_kernel(
    x_ptr, lnw_ptr, lnb_ptr, wfc_ptr, bfc_ptr, wpt_ptr, bp_ptr, out_ptr, eps, C, HIDDEN,
    stride_xm, stride_fc, stride_pt, stride_om,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
    UNITS: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # program (m, pid): hidden units pid·UNITS.. (UNITS <= BLOCK_H of them) of the MLP of row m, start to end:
    # LayerNorm, their rows of W_fc, bias, GELU, then their rows of W_projᵀ (each a column of W_proj), added
    # into out. Program 0 also adds x itself and the projection's bias: out (zeroed before) becomes x + MLP(x).
    tl.static_assert(UNITS <= BLOCK_H, "a program's hidden units must fit its block of rows")
    m, pid = tl.program_id(0), tl.program_id(1)
    offs_h = pid * UNITS + tl.arange(0, BLOCK_H)
    h_in = offs_h < HIDDEN
    if UNITS < BLOCK_H:  # the block's last rows belong to the next program
        h_in = h_in & (tl.arange(0, BLOCK_H) < UNITS)
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH:  # the program's rows of both matrices fit one tile each (two with a tail): load them before
        # waiting for x
        w_fc = load_rows(wfc_ptr, offs_h, stride_fc, offs_k, h_in, C)
        w_pt = load_rows(wpt_ptr, offs_h, stride_pt, offs_k, h_in, C)
        g_all = load_tile(lnw_ptr, offs_k, C)
        beta_all = load_tile(lnb_ptr, offs_k, C)
        if BLOCK_R > 0:  # the rows' tail, columns BLOCK_K.. (768 = 512 + 256: no registers on masked columns)
            offs_r = BLOCK_K + tl.arange(0, BLOCK_R)
            w_fc_r = load_rows(wfc_ptr, offs_h, stride_fc, offs_r, h_in, C)
            w_pt_r = load_rows(wpt_ptr, offs_h, stride_pt, offs_r, h_in, C)
            g_r = load_tile(lnw_ptr, offs_r, C)
            beta_r = load_tile(lnb_ptr, offs_r, C)
    grid_dependency_wait(USE_PDL)
    launch_dependents(USE_PDL)
    if PREFETCH:  # the row loaded once after the wait
        if BLOCK_R > 0:
            xn, xn_r = layernorm_tiles(x_ptr + m * stride_xm, offs_k, offs_r, C, g_all, beta_all, g_r, beta_r, eps)
            hidden = tl.sum(w_fc.to(tl.float32) * xn[None, :], axis=1)
            hidden += tl.sum(w_fc_r.to(tl.float32) * xn_r[None, :], axis=1)
        else:
            xn = layernorm_tile(x_ptr + m * stride_xm, offs_k, C, g_all, beta_all, eps)
            hidden = tl.sum(w_fc.to(tl.float32) * xn[None, :], axis=1)
    else:
        mean, rstd = layernorm_stats(x_ptr + m * stride_xm, C, eps, BLOCK_K)
        acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
        for k in range(0, C, BLOCK_K):
            kk = k + offs_k
            w = tl.load(wfc_ptr + offs_h[:, None] * stride_fc + kk[None, :], mask=h_in[:, None] & (kk < C)[None, :],
                        other=0.0, eviction_policy="evict_first").to(tl.float32)  # fmt: skip
            acc += w * layernormed(x_ptr + m * stride_xm, kk, C, lnw_ptr, lnb_ptr, mean, rstd)[None, :]
        hidden = tl.sum(acc, axis=1)
    hidden += tl.load(bfc_ptr + offs_h, mask=h_in, other=0.0).to(tl.float32)
    hidden = tl.where(h_in, gelu(hidden), 0.0)  # (BLOCK_H,)
    if PREFETCH:
        mlp_output(w_pt.to(tl.float32), hidden, x_ptr + m * stride_xm, bp_ptr, out_ptr + m * stride_om, offs_k, C,
                   pid == 0)  # fmt: skip
        if BLOCK_R > 0:
            mlp_output(w_pt_r.to(tl.float32), hidden, x_ptr + m * stride_xm, bp_ptr, out_ptr + m * stride_om, offs_r,
                       C, pid == 0)  # fmt: skip
    else:
        for n in range(0, C, BLOCK_K):
            nn = n + offs_k
            wt = tl.load(wpt_ptr + offs_h[:, None] * stride_pt + nn[None, :], mask=h_in[:, None] & (nn < C)[None, :],
                         other=0.0, eviction_policy="evict_first").to(tl.float32)  # fmt: skip
            mlp_output(wt, hidden, x_ptr + m * stride_xm, bp_ptr, out_ptr + m * stride_om, nn, C, pid == 0)


@triton.jit
def load_rows(ptr, offs_h, stride, offs, h_in, C):
    # rows offs_h (where h_in), columns offs (below C) of a weight matrix, read once: not kept in the caches
    mask = h_in[:, None] & (offs < C)[None, :]
    return tl.load(ptr + offs_h[:, None] * stride + offs[None, :], mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def layernormed(row_ptr, kk, C, lnw_ptr, lnb_ptr, mean, rstd):
    inside = kk < C
    xk = tl.load(row_ptr + kk, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(lnw_ptr + kk, mask=inside, other=0.0).to(tl.float32)
    beta = tl.load(lnb_ptr + kk, mask=inside, other=0.0).to(tl.float32)
    return (xk - mean) * rstd * g + beta


@triton.jit
def mlp_output(wt, hidden, x_row_ptr, bp_ptr, out_row_ptr, nn, C, first):
    # outputs nn of this block of hidden units, added into out; the first block also adds x and the bias
    inside = nn < C
    y = tl.sum(wt * hidden[:, None], axis=0)  # (BLOCK_K,)
    if first:
        y += tl.load(bp_ptr + nn, mask=inside, other=0.0).to(tl.float32)
        y += tl.load(x_row_ptr + nn, mask=inside, other=0.0).to(tl.float32)
    tl.atomic_add(out_row_ptr + nn, y, mask=inside, sem="relaxed")
