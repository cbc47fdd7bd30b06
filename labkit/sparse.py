"""Sparse attention: let each query see k keys instead of all n, so O(n²) work becomes O(n·k).

Dense causal attention scores every (query, key) pair with key ≤ query: n²/2 dot products
for a sequence of n tokens, and an n x n score matrix. Most of those weights are tiny.
Sparse attention fixes, before looking at the data, which pairs to score:

* **local (sliding window)**: query i sees keys i-window+1 … i (Longformer, Mistral);
* **strided** (Sparse Transformer, Child et al. 2019): query i sees the last `stride` keys
  and every `stride`-th key before them, so two layers connect any pair of positions;
* **block-sparse with global tokens** (BigBird, Longformer): the sequence is cut into
  blocks; a query block sees a few neighbouring key blocks plus the first "global" blocks
  that everyone reads.

Each pattern is a boolean mask (``pattern_mask``), and attention under a mask is
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)``: the oracle. But a mask alone
saves nothing -- the dense kernel still computes n² scores and throws most away. The speed
comes from never computing the masked pairs: ``sliding_window_attention`` cuts the queries
into blocks and gives each block only the slice of keys its window touches (n·(window +
block) scores); ``block_sparse_attention`` gathers the key blocks a layout names. Both equal
the dense masked oracle. The Triton kernel in ``labkit.kernels.flash_attention`` does the
same on a GPU without ever writing a score to memory.

Shapes follow ``labkit.model``: q (B, nh, T, hs), k and v (B, nh, S, hs), S ≥ T, where the T
queries are the last T of the S positions (S > T while decoding with a KV cache).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._args import check_int
from .kernels.flash_attention import check_attention_inputs
from .model import LabGPT, register_attention

PATTERNS = ("local", "strided", "block")
CHUNK_BYTES = 1 << 20  # score tensor per step of the loop: small enough to stay in cache, big enough to amortise


_check_positive = check_int


# ---------------------------------------------------------------------------------------
# Patterns as boolean masks: True where query i (row) may attend key j (column).
# ---------------------------------------------------------------------------------------
def _positions(T: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(T, device=device).unsqueeze(1)  # queries down the rows
    j = torch.arange(T, device=device).unsqueeze(0)  # keys along the columns
    return i, j


def sliding_window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(T, T) mask of causal local attention: query i sees keys i-window+1 … i."""
    _check_positive("T", T)
    _check_positive("window", window)
    i, j = _positions(T, device)
    return (j <= i) & (j > i - window)


def strided_mask(T: int, stride: int, device=None) -> torch.Tensor:
    """(T, T) mask of the Sparse Transformer's strided pattern (both of its heads, united).

    Head one sees the last ``stride`` keys, head two every ``stride``-th key back: any key is
    reachable from any later query in two hops, with about 2·sqrt(n) keys per query when
    stride ≈ sqrt(n).
    """
    _check_positive("T", T)
    _check_positive("stride", stride)
    i, j = _positions(T, device)
    return (j <= i) & ((i - j < stride) | ((i - j) % stride == 0))


@functools.cache
def block_layout(n_blocks: int, local_blocks: int = 2, global_blocks: int = 1) -> torch.Tensor:
    """(n_blocks, n_blocks) layout: which key blocks each query block attends (causal).

    Query block r sees its own block and the ``local_blocks - 1`` before it, plus the first
    ``global_blocks`` blocks (global tokens, read by every query).
    """
    _check_positive("n_blocks", n_blocks)
    _check_positive("local_blocks", local_blocks)
    if isinstance(global_blocks, bool) or not isinstance(global_blocks, int) or global_blocks < 0:
        raise ValueError(f"global_blocks must be an int >= 0, got {global_blocks!r}")
    r, c = _positions(n_blocks)
    return (c <= r) & ((r - c < local_blocks) | (c < global_blocks))


def block_sparse_mask(T: int, block_size: int, local_blocks: int = 2, global_blocks: int = 1, device=None):
    """(T, T) element mask of ``block_layout``: a block's pairs are kept or dropped together (then made causal)."""
    _check_positive("T", T)
    _check_positive("block_size", block_size)
    n_blocks = math.ceil(T / block_size)
    layout = block_layout(n_blocks, local_blocks, global_blocks).to(device)
    expanded = layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:T, :T]
    i, j = _positions(T, device)
    return expanded & (j <= i)


def pattern_mask(
    pattern: str,
    T: int,
    *,
    window: int = 64,
    stride: int = 16,
    block_size: int = 16,
    local_blocks: int = 2,
    global_blocks: int = 1,
    device=None,
) -> torch.Tensor:
    """The (T, T) mask of a named pattern: "local", "strided" or "block"."""
    if pattern == "local":
        return sliding_window_mask(T, window, device)
    if pattern == "strided":
        return strided_mask(T, stride, device)
    if pattern == "block":
        return block_sparse_mask(T, block_size, local_blocks, global_blocks, device)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def density(mask: torch.Tensor) -> float:
    """Kept pairs as a fraction of the causal pairs (1.0 = dense causal attention)."""
    T = mask.size(-1)
    return mask.sum().item() / (T * (T + 1) / 2)


def plot_masks(masks: dict[str, torch.Tensor], fig=None):
    """Draw masks side by side (dark = attended), each titled with its density; returns the figure."""
    import matplotlib.pyplot as plt

    fig = fig or plt.figure(figsize=(3.2 * len(masks), 3.4))
    axes = fig.subplots(1, len(masks), squeeze=False)[0]
    for ax, (name, mask) in zip(axes, masks.items()):
        ax.imshow(mask.cpu().numpy(), cmap="Greys", interpolation="nearest")
        ax.set(title=f"{name}\n{100 * density(mask):.1f}% of causal pairs", xlabel="key j", ylabel="query i")
    fig.tight_layout()
    return fig


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The oracle: dense attention under a (T, S) boolean mask, O(n²) whatever the mask."""
    check_attention_inputs(q, k, v)
    want = (q.size(-2), k.size(-2))
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape[-2:]) != want:
        raise ValueError(f"mask must be a bool tensor of shape (T, S) = {want} (True: the query may see the key), "
                         f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")  # fmt: skip
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------
# O(n·k) attention: score only the key blocks a query block needs.
# ---------------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ + bias) v for query blocks; q comes pre-scaled by 1/sqrt(hs).

    q (..., b, hs), k and v (..., span, hs), bias (..., b, span): 0 where a pair is attended,
    the dtype's lowest finite value where it is not. Adding a bias is much cheaper than
    ``masked_fill`` with a broadcast mask, and a finite lowest value (not -inf) keeps padding
    rows that see nothing finite (uniform weights, discarded later) instead of NaN, which
    would leak into gradients; any real key wins over them by exp(-huge) = 0.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)).add_(bias)  # (..., b, span)
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (..., b, hs)


def _bias(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a mask: lowest finite value where ``blocked``, 0 elsewhere."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, torch.finfo(dtype).min)


def _chunk(batch_heads: int, block: int, span: int, element_size: int) -> int:
    """How many query blocks to process per step so that a step's scores fill about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (batch_heads * block * span * element_size))


def default_block_size(window: int) -> int:
    """Query block size for a window: about the window (the gathered span is window + block - 1), 16..64."""
    return min(64, max(16, window))


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block_size: int | None = None
) -> torch.Tensor:
    """Causal local attention, query i over keys i-window+1 … i, in O(n·(window + block)) work.

    Queries are cut into blocks of b = ``block_size``. Block r (queries rb … rb+b-1) needs
    only keys rb-window+1 … rb+b-1: a contiguous slice of window+b-1 keys (rounded up to a
    multiple of 16), so each block is one small dense attention over a slice -- a view, no
    copy -- with the mask added as a 0/lowest bias inside the matmul (``baddbmm``). The same
    band (query r of the block sees span positions r+extra … r+extra+window-1) applies to
    every block; only the first blocks (keys before position 0, padded) and the last
    (padding after the end) need more masking. Equal to
    ``masked_attention(q, k, v, sliding_window_mask(...))``.

    q (B, nh, T, hs), k and v (B, nh, S, hs) with S ≥ T: the queries are the last T positions
    (decoding with a KV cache). Returns (B, nh, T, hs).
    """
    check_attention_inputs(q, k, v)
    _check_positive("window", window)
    if block_size is not None:
        _check_positive("block_size", block_size)
    B, nh, T, hs = q.shape
    offset = k.size(2) - T  # keys before the first query (the cache)
    first_key = max(0, offset - window + 1)  # older keys are outside every query's window
    k, v, offset = k[:, :, first_key:], v[:, :, first_key:], offset - first_key
    b = min(block_size or default_block_size(window), T)
    n_blocks = math.ceil(T / b)
    span = -(-(window - 1 + b) // 16) * 16  # keys a block needs, rounded up: aligned matmuls run ~2x faster
    extra = span - (window - 1 + b)  # the oldest keys of a span, which no query of the block uses
    left = span - b - offset  # padding before key 0, so that block r's span starts at padded key r*b
    right = n_blocks * b - T  # padding after the end, to whole blocks
    q = F.pad(q * (1.0 / math.sqrt(hs)), (0, 0, 0, right)).reshape(B * nh, -1, hs)  # (B*nh, n_blocks*b, hs), scaled
    k = F.pad(k, (0, 0, left, right)).reshape(B * nh, -1, hs)  # (B*nh, left + S + right, hs)
    v = F.pad(v, (0, 0, left, right)).reshape(B * nh, -1, hs)

    r = torch.arange(b, device=q.device).view(b, 1)  # query within its block
    c = torch.arange(span, device=q.device).view(1, span)  # key within the span
    band = (c >= r + extra) & (c < r + extra + window)  # (b, span): the window, the same in every block
    outside = _bias(~band, q.dtype)  # 0 inside the window, lowest value outside
    real_keys = (left, k.size(1) - right)  # padded indices of the first and one-past-last real key
    out = []
    for start in range(0, n_blocks * b, b):
        bias = outside
        if start < real_keys[0] or start + span > real_keys[1]:  # a span that reaches into the padding
            key = start + c
            bias = _bias(~(band & (key >= real_keys[0]) & (key < real_keys[1])), q.dtype)
        scores = torch.baddbmm(bias, q[:, start : start + b], k[:, start : start + span].transpose(1, 2))  # bias + q kᵀ
        out.append(torch.bmm(torch.softmax(scores, dim=-1), v[:, start : start + span]))  # (B*nh, b, hs)
    return torch.cat(out, dim=1).view(B, nh, n_blocks * b, hs)[:, :, :T]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = True,
) -> torch.Tensor:
    """Attention over the (query block, key block) pairs that ``layout`` keeps, gathered: O(n·k).

    ``layout`` is (n, n) boolean with n = ceil(S / block_size): layout[r, c] says whether query
    block r attends key block c (``block_layout`` builds the usual one). With ``causal``, pairs
    with key > query are also removed inside the kept blocks. Each query block gathers its
    kept key blocks (padded to the longest row), so the work is n · (kept blocks per row) ·
    block_size² instead of n². Equal to ``masked_attention`` with the expanded mask.

    q (B, nh, T, hs), k and v (B, nh, S, hs), S ≥ T, queries the last T positions.
    """
    check_attention_inputs(q, k, v)
    _check_positive("block_size", block_size)
    B, nh, T, hs = q.shape
    S = k.size(2)
    n = math.ceil(S / block_size)
    if layout.dtype != torch.bool or tuple(layout.shape) != (n, n):
        raise ValueError(
            f"layout must be a ({n}, {n}) bool tensor (ceil(S={S} / block_size={block_size}) blocks a side), "
            f"got {tuple(layout.shape)} {layout.dtype}"
        )
    layout = layout.to(q.device)
    if causal:
        layout = layout & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if not bool(layout.diagonal().all()):
            raise ValueError("layout must keep every diagonal block under causal attention (each query sees itself)")
    elif not bool(layout.any(dim=1).all()):
        raise ValueError("layout must keep at least one key block in every row")
    offset = S - T
    first_block = offset // block_size  # the query blocks that hold our T queries
    bs = block_size
    q_blocks = F.pad(q * (1.0 / math.sqrt(hs)), (0, 0, offset - first_block * bs, n * bs - S))  # scaled once
    q_blocks = q_blocks.view(B, nh, n - first_block, bs, hs)
    k_blocks = F.pad(k, (0, 0, 0, n * bs - S)).view(B, nh, n, bs, hs)
    v_blocks = F.pad(v, (0, 0, 0, n * bs - S)).view(B, nh, n, bs, hs)

    rows = layout[first_block:]  # (n_q, n)
    width = int(rows.sum(dim=1).max())  # kept blocks in the fullest row
    columns = torch.arange(n, device=q.device).expand_as(rows)
    order = torch.where(rows, columns, columns + n).sort(dim=1).values[:, :width]  # kept columns first, in order
    kept = order < n  # (n_q, width): False where a short row is padded
    index = torch.where(kept, order, 0)  # the key block to gather (block 0 stands in for padding)

    offs = torch.arange(bs, device=q.device)
    key_pos = (index.unsqueeze(-1) * bs + offs).flatten(1)  # (n_q, width*bs) absolute key positions
    query_pos = (first_block + torch.arange(n - first_block, device=q.device)).view(-1, 1) * bs + offs  # (n_q, bs)
    allowed = kept.repeat_interleave(bs, 1).unsqueeze(1) & (key_pos < S).unsqueeze(1)
    if causal:
        allowed = allowed & (key_pos.unsqueeze(1) <= query_pos.unsqueeze(2))
    bias = _bias(~allowed, q.dtype)  # (n_q, bs, width*bs)

    step = _chunk(B * nh, bs, width * bs, q.element_size())
    out = []
    for s in range(0, n - first_block, step):
        idx = index[s : s + step]  # (chunk, width) key blocks to gather
        k_gathered = k_blocks[:, :, idx].flatten(3, 4)  # (B, nh, chunk, width*bs, hs)
        v_gathered = v_blocks[:, :, idx].flatten(3, 4)
        out.append(_attend(q_blocks[:, :, s : s + step], k_gathered, v_gathered, bias[s : s + step]))
    start = offset - first_block * bs
    return torch.cat(out, dim=2).flatten(2, 3)[:, :, start : start + T]


# ---------------------------------------------------------------------------------------
# LabGPT backends: attention(q, k, v, q_offset) with the queries at q_offset … q_offset+T-1.
# ---------------------------------------------------------------------------------------
def _check_offset(q: torch.Tensor, k: torch.Tensor, q_offset: int) -> None:
    if q_offset != k.size(2) - q.size(2):
        raise ValueError(
            f"q_offset must equal the cached length S - T = {k.size(2) - q.size(2)} (queries are the newest "
            f"positions), got {q_offset}"
        )


def sliding_backend(window: int):
    """A LabGPT attention backend (``fn(q, k, v, q_offset)``) for a sliding window."""
    _check_positive("window", window)

    def attend(q, k, v, q_offset: int = 0):
        _check_offset(q, k, q_offset)
        return sliding_window_attention(q, k, v, window)

    attend.__name__ = f"sliding_window_{window}"
    return attend


def block_sparse_backend(block_size: int, local_blocks: int = 2, global_blocks: int = 1):
    """A LabGPT attention backend for block-sparse attention with global blocks."""
    _check_positive("block_size", block_size)
    block_layout(1, local_blocks, global_blocks)  # validate the counts now, not at the first forward

    def attend(q, k, v, q_offset: int = 0):
        _check_offset(q, k, q_offset)
        layout = block_layout(math.ceil(k.size(2) / block_size), local_blocks, global_blocks)
        return block_sparse_attention(q, k, v, layout, block_size)

    attend.__name__ = f"block_sparse_{block_size}_{local_blocks}_{global_blocks}"
    return attend


def use_sliding_window(model: LabGPT, window: int) -> LabGPT:
    """Switch every layer of ``model`` to sliding-window attention (backend "sliding-<window>")."""
    name = f"sliding-{window}"
    register_attention(name, sliding_backend(window))
    return model.set_attention(name)


def use_block_sparse(model: LabGPT, block_size: int, local_blocks: int = 2, global_blocks: int = 1) -> LabGPT:
    """Switch every layer of ``model`` to block-sparse attention ("block-<size>-<local>-<global>")."""
    name = f"block-{block_size}-{local_blocks}-{global_blocks}"
    register_attention(name, block_sparse_backend(block_size, local_blocks, global_blocks))
    return model.set_attention(name)


register_attention("sliding", sliding_backend(64))  # a fixed default; use_sliding_window picks any window


def receptive_field(window: int, n_layer: int) -> int:
    """How far back the last layer can see: each layer reaches window-1 positions further."""
    return n_layer * (window - 1) + 1


# ---------------------------------------------------------------------------------------
# Measuring: dense vs sparse, side by side, and how each grows with the sequence length.
# ---------------------------------------------------------------------------------------
def random_qkv(T: int, batch: int = 1, heads: int = 8, head_dim: int = 64, seed: int = 0, device=None, dtype=None):
    """Seeded q, k, v of shape (batch, heads, T, head_dim) for timings and checks."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, T, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))


def time_vs_length(
    lengths, window: int, batch: int = 1, heads: int = 8, head_dim: int = 64, repeat: int = 3, show: bool = False
) -> list[dict]:
    """Median seconds of dense causal SDPA and of sliding-window attention at each length, measured together."""
    from .bench import compare

    rows = []
    with torch.no_grad():
        for T in lengths:
            q, k, v = random_qkv(T, batch, heads, head_dim)
            variants = {
                f"dense causal T={T}": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                f"sliding w={window} T={T}": lambda: sliding_window_attention(q, k, v, window),
            }
            dense, sliding = compare(variants, warmup=1, repeat=repeat, suite="sparse", show=show)
            rows.append({"T": T, "dense_s": dense["variant_s"], "sliding_s": sliding["variant_s"],
                         "speedup": sliding["speedup"], "rows": [dense, sliding]})  # fmt: skip
    return rows


def fit_slope(lengths, seconds) -> float:
    """Slope of log(time) against log(length): 2 for quadratic growth, 1 for linear."""
    x = torch.tensor([math.log(n) for n in lengths], dtype=torch.float64)
    y = torch.tensor([math.log(s) for s in seconds], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def _register():
    from .bench import compare, register_suite

    @register_suite("sparse")
    def sparse_suite(quick: bool = False) -> list[dict]:
        """Sliding-window (256) and block-sparse attention vs dense causal SDPA at 4096 tokens, and time vs length."""
        rows = []
        q, k, v = random_qkv(4096)  # batch 1, 8 heads, head dim 64 (GPT-2's)
        layout = block_layout(4096 // 64, local_blocks=5, global_blocks=1)  # ~ the same keys per query
        print("4096 tokens, 8 heads x 64, fp32, window 256 (block-sparse: 64-token blocks, 5 local + 1 global)")
        with torch.no_grad():
            variants = {
                "dense causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "sliding window 256": lambda: sliding_window_attention(q, k, v, 256),
                "block-sparse 64x(5+1)": lambda: block_sparse_attention(q, k, v, layout, 64),
            }
            rows += compare(variants, warmup=1 if quick else 2, repeat=5 if quick else 10, suite="sparse")
        lengths = (1024, 2048, 4096) if quick else (256, 512, 1024, 2048, 4096, 8192)
        sweep = time_vs_length(lengths, window=256, repeat=3 if quick else 5)
        for r in sweep:
            rows += r["rows"]
            print(f"T={r['T']:>5}: dense {1e3 * r['dense_s']:8.2f} ms, sliding {1e3 * r['sliding_s']:7.2f} ms, "
                  f"{r['speedup']:.2f}x")  # fmt: skip
        tail = [r for r in sweep if r["T"] >= 2048]  # fit where T >> window (8 windows and up)
        print(f"log-log slopes (T >= 2048): dense {fit_slope([r['T'] for r in tail], [r['dense_s'] for r in tail]):.2f}, "
              f"sliding {fit_slope([r['T'] for r in tail], [r['sliding_s'] for r in tail]):.2f}")  # fmt: skip
        return rows


_register()
