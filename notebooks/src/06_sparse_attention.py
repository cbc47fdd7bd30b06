# %% [markdown]
# # 06 · Sparse attention: from O(n²) to O(n·k)
#
# **Goals.** See why attention costs O(n²); draw the three classic sparse patterns (local
# window, strided, block-sparse with global tokens); read an implementation that really does
# O(n·k) work (gathering blocks, not masking a dense matrix) and check it against PyTorch's
# attention; measure it against dense attention on this machine; put it into LabGPT and
# measure what it costs in perplexity and task accuracy, before and after a short fine-tune;
# read the FlashAttention-2 kernel in Triton that does the same on a GPU.
#
# **Expected run time.** About 1.5 minutes on the kit's 2-core test CPU (a laptop may take twice as long).
#
# **The survey's claim, tested here.** "Sparse attention mechanisms reduce the quadratic
# complexity of self-attention to linear or sublinear scales, significantly enhancing
# throughput": given a sequence length `n` and a sparsity factor `k`, the complexity drops
# from O(n²) to O(n·k).

# %%
import math
import os

import torch

if not torch.cuda.is_available():
    # lets one cell below run the Triton kernel itself in Triton's CPU interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib.pyplot as plt
import torch.nn.functional as F

import labkit
from labkit import bench, check, data, kernels, sparse
from labkit.evaluation import evaluate, perplexity
from labkit.train import finetune, validation_text

labkit.seed_everything(0)
# One thread: sparse attention runs many medium-sized ops, and on a shared or busy CPU each
# multi-threaded op can wait a whole scheduler time slice for its second thread. Dense and
# sparse are always timed side by side under the same setting, so their ratio is fair.
torch.set_num_threads(1)
validation = validation_text(20_000)

# %% [markdown]
# ## 1. The idea
#
# Causal self-attention over `n` tokens scores every query against every earlier key:
# `n(n+1)/2` dot products of length `d`, then a softmax over each row and a weighted sum of
# values. Double `n` and the work quadruples.
#
# Sparse attention decides *in advance* which pairs to score: each query sees `k` keys, so
# the work is `n·k`. With `k` fixed (a window of 256, say) the cost grows linearly in `n`.
# For a 4096-token sequence:

# %%
n, d = 4096, 64
dense_pairs = n * (n + 1) // 2
for k in (64, 256, 1024):
    print(f"window k={k:>4}: {n * k - k * (k - 1) // 2:>10,} scored pairs vs {dense_pairs:,} dense causal "
          f"({dense_pairs / (n * k - k * (k - 1) // 2):.1f}x fewer)")

# %% [markdown]
# ## 2. Three patterns
#
# - **Local (sliding window)**: query `i` sees keys `i−w+1 … i`. Longformer and Mistral use it.
# - **Strided** (the Sparse Transformer, Child et al. 2019): one head sees the last `s`
#   keys, another every `s`-th key before that; together any position reaches any earlier
#   one in two steps, with about `2√n` keys per query when `s ≈ √n`.
# - **Block-sparse with global tokens** (BigBird, Longformer): the sequence is cut into
#   blocks; a query block sees a few neighbouring blocks, and every query sees the first
#   "global" block(s). Blocks suit hardware: a block pair is one small dense matmul.
#
# Each is a boolean mask, True where query `i` (row) may see key `j` (column):

# %%
T = 64
masks = {
    "local, window 12": sparse.pattern_mask("local", T, window=12),
    "strided, stride 8": sparse.pattern_mask("strided", T, stride=8),
    "block 8, 2 local + 1 global": sparse.pattern_mask("block", T, block_size=8, local_blocks=2, global_blocks=1),
}
sparse.plot_masks(masks)
plt.show()
for name, mask in masks.items():
    print(f"{name:<28} keys per query: mean {mask.sum(1).float().mean():.1f}, max {mask.sum(1).max()}")

# %% [markdown]
# ## 3. A mask is not a speedup
#
# The oracle for every pattern is dense attention under the mask,
# `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`. It is correct, but it still
# computes all `n²` scores and throws most of them away. To save work, the code must never
# compute the masked pairs. `sliding_window_attention` cuts the queries into blocks of `b`;
# block `r` needs only keys `rb−w+1 … rb+b−1`, a contiguous slice of `w+b−1` keys (a view:
# no copy). Each block is then one small dense attention, `b` queries by `w+b−1` keys, with
# the same band mask inside every slice. The work is `n·(w+b−1)` scores instead of `n²/2`:

# %%
labkit.show_source(sparse.sliding_window_attention)

# %% [markdown]
# Each step's scores (`b × span` per head) are small enough to stay in cache. The block-
# sparse version gathers, for each query block, the key blocks its layout row names (a
# copy this time: they are not contiguous), a few query blocks per step:

# %%
labkit.show_source(sparse.block_sparse_attention)

# %% [markdown]
# **The oracle check**, live: both must equal dense masked attention to 1e-5 in fp32, for
# lengths that are not a multiple of the block size, and for a few new queries after a
# cache of keys (decoding).

# %%
for T, S, window in ((200, 200, 37), (1000, 1000, 256), (5, 300, 64), (1, 513, 100)):
    g = torch.Generator().manual_seed(T + S)
    q, k, v = torch.randn(2, 4, T, 32, generator=g), torch.randn(2, 4, S, 32, generator=g), torch.randn(2, 4, S, 32, generator=g)
    oracle = sparse.masked_attention(q, k, v, sparse.sliding_window_mask(S, window)[S - T :])
    err = (sparse.sliding_window_attention(q, k, v, window) - oracle).abs().max().item()
    print(f"sliding  T={T:>4} S={S:>4} window={window:>3}: equal to masked SDPA within 1e-5: {err < 1e-5}")
    layout = sparse.block_layout(math.ceil(S / 32), local_blocks=3, global_blocks=1)
    oracle = sparse.masked_attention(q, k, v, sparse.block_sparse_mask(S, 32, 3, 1)[S - T :])
    err = (sparse.block_sparse_attention(q, k, v, layout, 32) - oracle).abs().max().item()
    print(f"block    T={T:>4} S={S:>4} 32-blocks 3+1:   equal to masked SDPA within 1e-5: {err < 1e-5}")

# %% [markdown]
# ## 4. Measured: dense vs sliding on this CPU
#
# Window 256 at 4096 tokens (one sequence, 8 heads of 64, fp32), against PyTorch's dense
# causal attention (a fused kernel that already skips the upper triangle), side by side:

# %%
# NBVAL_IGNORE_OUTPUT
q, k, v = sparse.random_qkv(4096)
layout = sparse.block_layout(4096 // 64, local_blocks=5, global_blocks=1)
with torch.no_grad():
    rows = bench.compare({
        "dense causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sliding window 256": lambda: sparse.sliding_window_attention(q, k, v, 256),
        "block-sparse 64 x (5+1)": lambda: sparse.block_sparse_attention(q, k, v, layout, 64),
    }, warmup=1, repeat=5)

# %%
dense_pairs = 4096 * 4097 // 2
window_pairs = 4096 * 320  # sliding window: each block of 64 queries scores 255 + 64 keys, rounded up to 320
block_pairs = 4096 * int(layout.sum(1).max()) * 64  # block-sparse: each query, its row's kept blocks (padded)
print(f"pairs scored: dense causal {dense_pairs:,}; sliding window {window_pairs:,} ({dense_pairs / window_pairs:.1f}x "
      f"fewer); block-sparse {block_pairs:,} ({dense_pairs / block_pairs:.1f}x fewer); the exact window of section 1 "
      f"would be {dense_pairs / (4096 * 256 - 256 * 255 // 2):.1f}x")

# %% [markdown]
# The scored pairs drop by the ratios printed: the sliding-window kernel's blocks of 64 queries
# each score a span of 255+64 keys, rounded up to 320 whole keys (more than the exact window
# needs), and the block-sparse kernel scores 6 blocks of 64 keys for every query (5 local, 1
# global). The time drops less, because the dense
# kernel is one fused call while ours runs a matmul, a mask, a softmax and a matmul per
# block, each through memory. How does each grow with the length? On log-log axes a power
# law `time ∝ n^p` is a straight line of slope `p`:

# %%
# NBVAL_IGNORE_OUTPUT
lengths = (256, 512, 1024, 2048, 4096, 8192)
sweep = sparse.time_vs_length(lengths, window=256, repeat=3)
tail = [r for r in sweep if r["T"] >= 2048]  # fit where n >> window: below that, overheads and the ramp-up dominate
slope_dense = sparse.fit_slope([r["T"] for r in tail], [r["dense_s"] for r in tail])
slope_sliding = sparse.fit_slope([r["T"] for r in tail], [r["sliding_s"] for r in tail])
fig, ax = plt.subplots(figsize=(6, 3.8))
ax.loglog(lengths, [1e3 * r["dense_s"] for r in sweep], "o-", label=f"dense causal (slope {slope_dense:.2f})")
ax.loglog(lengths, [1e3 * r["sliding_s"] for r in sweep], "s-", label=f"sliding window 256 (slope {slope_sliding:.2f})")
ax.set_xticks(lengths, [str(n) for n in lengths])
ax.set_xticks([], minor=True)
ax.set(xlabel="sequence length n", ylabel="ms per call", title="attention time vs length, measured here (fit: n ≥ 2048)")
ax.legend()
plt.show()
for r in sweep:
    print(f"n={r['T']:>5}: dense {1e3 * r['dense_s']:8.1f} ms, sliding {1e3 * r['sliding_s']:7.1f} ms, {r['speedup']:.2f}x")

# %% [markdown]
# Slopes near 2 and 1: quadratic and linear, as the math says (fitted from 2048 tokens, 8
# windows, up). Below a few windows the sliding version does about as much work as dense
# (every query sees almost everything anyway) and its per-block overheads show.
#
# ## 5. LabGPT with a window
#
# `sparse.use_sliding_window(model, w)` switches every layer of the `tiny` teacher to
# window `w` (its context is 512 characters). Perplexity on held-out text, and accuracy on
# three tasks whose *vague* prompts only make sense with their two demonstrations (40
# prompts each):

# %%
model, tokenizer = labkit.load_model("tiny")
TASKS = ("sentiment", "string", "arithmetic")


def quality(m):
    accuracy = sum(evaluate(m, tokenizer, task, "vague", 2, n=40) for task in TASKS) / len(TASKS)
    return perplexity(m, tokenizer, validation), accuracy


prompt_lengths = [len(e.prompt) for task in TASKS for e in data.examples(task, "vague", 2, n=40)]
print(f"prompt lengths: {min(prompt_lengths)}..{max(prompt_lengths)} characters")
for task in TASKS:
    lengths = [len(e.prompt) for e in data.examples(task, "vague", 2, n=40)]
    print(f"  {task:<10} {min(lengths)}..{max(lengths)}: {sum(n > 43 for n in lengths)} of {len(lengths)} longer than "
          f"43 characters, window 8's receptive field")
before = {512: quality(model)}
print(f"dense (window 512): perplexity {before[512][0]:.3f}, task accuracy {100 * before[512][1]:.1f}%")
for window in (8, 16, 32, 64, 128):
    sparse.use_sliding_window(model, window)
    before[window] = quality(model)
    print(f"window {window:>3}: perplexity {before[window][0]:8.3f}, task accuracy {100 * before[window][1]:5.1f}%, "
          f"receptive field of the last layer {sparse.receptive_field(window, model.config.n_layer)} characters")

# %% [markdown]
# A window of 64 costs little, 32 a lot, 16 and 8 break the model: it was trained seeing
# all 512 characters and now misses most of them. The *receptive field* column explains why
# small windows are not hopeless: layer 2 reads layer 1's outputs, which already summarise
# their own windows, so after 6 layers a window of `w` reaches `6(w−1)+1` characters back.
#
# ### A short fine-tune with the pattern
#
# Train the model *with* the window for 20 steps (8 × 256 characters, AdamW at 3e-4, fresh
# text): it learns to route information through the layers instead of looking far back.

# %%
after = {}
for window in (8, 16):
    tuned, _ = labkit.load_model("tiny")
    sparse.use_sliding_window(tuned, window)
    losses = finetune(tuned, steps=20, batch_size=8, seq_len=256, lr=3e-4, progress=False)
    after[window] = quality(tuned)
    print(f"window {window}: perplexity {before[window][0]:.2f} -> {after[window][0]:.2f}, "
          f"task accuracy {100 * before[window][1]:.1f}% -> {100 * after[window][1]:.1f}% "
          f"(dense model: {before[512][0]:.2f}, {100 * before[512][1]:.1f}%)")

# %%
windows = sorted(before)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(windows, [before[w][0] for w in windows], "o-", label="window at inference only")
ax1.plot(list(after), [v[0] for v in after.values()], "s", color="tab:green", ms=9, label="after a 20-step fine-tune")
ax1.set(xscale="log", yscale="log", xlabel="window (characters)", ylabel="perplexity", title="LabGPT tiny")
ax1.legend()
ax2.plot(windows, [100 * before[w][1] for w in windows], "o-")
ax2.plot(list(after), [100 * v[1] for v in after.values()], "s", color="tab:green", ms=9)
ax2.set(xscale="log", xlabel="window (characters)", ylabel="task accuracy (%)", title="vague prompts, 2 demonstrations")
for ax in (ax1, ax2):
    ax.set_xticks(windows, [str(w) if w < 512 else "512\n(dense)" for w in windows])
    ax.set_xticks([], minor=True)
fig.tight_layout()
plt.show()

# %% [markdown]
# Twenty steps recover most of what window 16 lost: the weights did not need to change
# much, the model had to learn to pass information along through its layers rather than
# read it directly. Window 8 stays far behind, and its receptive field (43 characters) is
# only part of the reason: every sentiment prompt is longer than that, but the arithmetic
# prompts fit whole (the lengths printed above) and still fail. Seeing everything through
# six narrow hops is harder than seeing it directly, and twenty steps do not teach it.
#
# **Does sparse attention make LabGPT faster?** Count first. Per token and layer, the linear
# layers cost `24·C²` FLOPs whatever the window; attention costs `4·C` per key it sees:

# %%
C, L, T = model.config.n_embd, model.config.n_layer, 512
linear_flops = 24 * C * C * L * T + 2 * T * C * model.config.vocab_size  # qkv, proj, MLP; the head
for window in (512, 64, 16):
    keys = sum(min(i + 1, window) for i in range(T))
    attention_flops = 4 * C * L * keys
    total = linear_flops + attention_flops
    print(f"window {window:>3}: attention {100 * attention_flops / total:4.1f}% of {total / 1e9:.2f} GFLOP per 512-token sequence")

# %% [markdown]
# Attention is under a fifth of LabGPT's work at 512 tokens, so even free attention would
# make a forward pass at most ~1.2x faster (Amdahl's law). Measured, 8 × 512 characters:

# %%
# NBVAL_IGNORE_OUTPUT
batch = torch.randint(0, 100, (8, 512))
dense_model, _ = labkit.load_model("tiny")
window_model = sparse.use_sliding_window(labkit.load_model("tiny")[0], 64)
with torch.no_grad():
    rows = bench.compare({"dense SDPA": lambda: dense_model(batch), "sliding window 64": lambda: window_model(batch)},
                         warmup=1, repeat=5)

# %% [markdown]
# **The survey's claim, on LabGPT:** the complexity really drops from O(n²) to O(n·k)
# (section 4 measures slopes near 2 and 1), but "significantly enhancing throughput" needs
# sequences long compared with the window, where attention dominates; at LabGPT's 512
# characters the gain is bounded by ~1.2x, and the window costs quality unless the model is
# trained with it.
#
# ## 6. On a GPU: FlashAttention with block skipping
#
# A GPU kernel should not even write the scores to memory. FlashAttention keeps, per query,
# a running maximum `m`, a running sum `l` and a running output `acc`, and folds in one key
# block at a time (the *online softmax*); a block entirely in the future, or entirely
# outside the window, is simply never visited. Here is the algorithm in plain PyTorch:

# %%
labkit.show_source(kernels.flash_attention_blockwise)

# %% [markdown]
# And the Triton kernel, which is the same loop with one program per query block, `exp2`
# with `log2(e)` folded into the scale, and three loops per program: the masked left edge
# of the window, the unmasked middle, the masked diagonal. On Hopper GPUs (H100, H200) the
# autotuner also tries configs that fetch the K and V tiles through **tensor descriptors**
# (`USE_TMA`: the Tensor Memory Accelerator copies a whole tile in one instruction). The
# descriptor sees K as one (batch·heads·keys, head dim) matrix, so a tile that runs past one
# head's last key holds the *next head's* rows: the masked loop replaces those scores and
# values instead of trusting them to be zero.

# %%
from labkit.kernels.flash_attention import _kernels as build_flash_kernel  # the module, not the function of that name

labkit.show_source(build_flash_kernel)

# %% [markdown]
# On this CPU, `kernels.flash_attention` runs its PyTorch reference. With
# `TRITON_INTERPRET=1` (set in the first cell), the *same kernel code* runs in Triton's
# interpreter: slow, but it is the kernel itself. One tiny run of each variant against the
# reference:

# %%
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
for window in (None, 12):
    path = "triton" if kernels.interpreting() or torch.cuda.is_available() else "reference"
    out = kernels.flash_attention(q, k, v, causal=True, window=window, backend=path)
    err = (out - kernels.flash_attention_reference(q, k, v, causal=True, window=window)).abs().max().item()
    print(f"window={window}: the {'reference' if path == 'reference' else 'Triton kernel'} equals the "
          f"reference within 1e-5: {err < 1e-5}")
print("blockwise PyTorch version equal too:",
      (kernels.flash_attention_blockwise(q, k, v, window=12, block_m=16, block_n=16)
       - kernels.flash_attention_reference(q, k, v, window=12)).abs().max().item() < 1e-5)

# %% [markdown]
# On an H100 or H200, `python benchmarks/gpu_check_attention.py --out DIR` checks the kernel
# against SDPA in fp16/bf16/fp32 and measures the two targets: at least 75% of SDPA's
# TFLOP/s at 4096 tokens (batch 4, 16 heads of 128, causal, bf16), and window 1024 at 16384
# tokens at least 4.5x faster than dense causal SDPA. The kit's recorded H100 runs, before
# and after the TMA configs joined the autotuner:

# %%
for label, name in (("pointer loads", "gpu_results_attention_h100.json"),
                    ("with TMA configs", "gpu_results_attention_h100_run4.json")):  # fmt: skip
    run = bench.recorded_results(name)
    if run is None:
        print("benchmarks/ is not beside this install: see benchmarks/RESULTS.md in the repository")
        break
    causal, window = run["bar_causal_4096"], run["bar_window_1024_at_16384"]
    print(f"{run['info']['device']}, {label}: causal T=4096 at {100 * causal['fraction_of_sdpa']:.1f}% of SDPA "
          f"(bar 75%); window 1024 at T=16384 {window['speedup']:.2f}x dense causal SDPA (bar 4.5x)")

# %% [markdown]
# With a GPU here, the cell below measures the first one on yours.

# %%
# NBVAL_IGNORE_OUTPUT
if torch.cuda.is_available():
    q, k, v = (torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kernels.flash_attention(q, k, v)  # autotune first
    rows = bench.compare({"SDPA causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          "Triton flash_attention": lambda: kernels.flash_attention(q, k, v)}, warmup=3, repeat=20)
    print(f"Triton at {100 * rows[1]['speedup']:.0f}% of SDPA's speed")
else:
    print("no GPU here: the kernel ran in the interpreter above")

# %% [markdown]
# ## 7. The widget: window, stride, block size, sequence length
#
# The three patterns at your settings (drawn for the first 128 positions), how many keys
# each query scores at the full length, and the measured time of sliding vs dense attention
# at that length.

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def patterns_view(fig, window, stride, block_size, seq_len):
    shown = min(seq_len, 128)
    local = sparse.pattern_mask("local", shown, window=window)
    strided = sparse.pattern_mask("strided", shown, stride=stride)
    block = sparse.pattern_mask("block", shown, block_size=block_size, local_blocks=2, global_blocks=1)
    sparse.plot_masks({f"local w={window}": local, f"strided s={stride}": strided, f"block b={block_size}": block}, fig)
    q, k, v = sparse.random_qkv(seq_len, heads=4)
    with torch.no_grad():
        t_dense = bench.measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=1, repeat=3).median_s
        t_sliding = bench.measure(lambda: sparse.sliding_window_attention(q, k, v, window), warmup=1, repeat=3).median_s
    keys = {"dense": (seq_len + 1) / 2, "local": min(window, (seq_len + 1) / 2),
            "strided": stride + (seq_len / 2) / stride, "block": 2.5 * block_size}  # mean keys per query, roughly
    return (", ".join(f"{name} ~{v:.0f} keys/query" for name, v in keys.items())
            + f"\nn={seq_len}: dense {1e3 * t_dense:.1f} ms, sliding window {window} {1e3 * t_sliding:.1f} ms "
            f"({t_dense / t_sliding:.2f}x)")


explore(patterns_view, figsize=(10, 3.6), window=(4, 512, 4, 32), stride=(2, 64, 1, 8), block_size=(4, 64, 4, 16),
        seq_len=(128, 8192, 128, 1024))

# %% [markdown]
# ## Your turn
#
# **Exercise.** Write the `(T, T)` boolean mask of causal sliding-window attention: query
# `i` sees keys `i−window+1 … i` (exactly `window` keys once `i ≥ window−1`).

# %%
def window_mask(T, window):
    # your code: True where key j is at most window-1 steps before query i, and not after it
    return torch.ones(T, T, dtype=torch.bool).tril().triu(-window)


passed = check.window_mask(window_mask)

# %%
from labkit.solutions import sparse as solutions

passed = check.window_mask(solutions.window_mask)

# %% [markdown]
# ## Takeaways
#
# - Dense attention scores `n²/2` pairs; a fixed window, stride or block layout scores
#   `n·k`: linear in `n`. Measured here: slopes near 2 and 1 on log-log axes.
# - A mask alone saves nothing: the code must skip the work (gather the needed blocks; on
#   a GPU, skip whole tiles in the kernel's loop).
# - Stacked layers widen the view (`layers × window`), so moderate windows cost little, and
#   a short fine-tune with the pattern recovers most of what window 16 loses (not window 8's).
# - The speedup pays only for sequences much longer than the window; at LabGPT's 512
#   characters dense attention is not the bottleneck.
#
# ## References
#
# - R. Child, S. Gray, A. Radford, I. Sutskever, *Generating Long Sequences with Sparse Transformers*, 2019.
# - I. Beltagy, M. Peters, A. Cohan, *Longformer: The Long-Document Transformer*, 2020.
# - M. Zaheer et al., *Big Bird: Transformers for Longer Sequences*, NeurIPS 2020.
# - T. Dao et al., *FlashAttention*, NeurIPS 2022; T. Dao, *FlashAttention-2*, 2023.
# - A. Jiang et al., *Mistral 7B* (sliding-window attention), 2023.
