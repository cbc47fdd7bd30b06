# %% [markdown]
# # 13 · Low rank: truncated SVD, CP and Tucker
#
# **Goals.** Replace a weight matrix by the product of two thin ones,
# `W ≈ U_k Σ_k V_kᵀ`; choose the rank by a parameter budget or by retained energy; measure
# what it saves (parameters, FLOPs, time) and what it costs (perplexity, task accuracy),
# before and after a short fine-tune; then go beyond matrices with two tensor
# decompositions written from scratch, CP (by alternating least squares) and Tucker (HOSVD,
# refined by HOOI).
#
# **Expected run time.** About 1.5 minutes on the kit's 2-core test CPU (a laptop may take twice as long).
#
# **The survey's claim, tested here.** Low-rank approximation can make a model ~30% smaller
# "with minimal impact" on accuracy.

# %%
import warnings

import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

import labkit
from labkit import bench, check, data, lowrank
from labkit.evaluation import evaluate, perplexity
from labkit.train import finetune, validation_text

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
validation = validation_text(40_000)

# %% [markdown]
# ## 1. The idea
#
# A `d_out × d_in` matrix costs `d_out·d_in` parameters and, applied to a batch of `B`
# vectors, `2·B·d_out·d_in` FLOPs. Its rank-`k` factorisation `W ≈ (U_k √Σ_k)(√Σ_k V_kᵀ)` is
# two linears, `d_in → k → d_out`, costing `k·(d_in + d_out)` of each: it pays when
# `k < d_in·d_out / (d_in + d_out)` (for a square matrix, `k < d/2`).
#
# **Eckart–Young** says the truncated SVD is the best rank-`k` approximation in the
# Frobenius norm, with error exactly `√(Σ_{i>k} σ_i²)`. That is our oracle.

# %%
labkit.show_source(lowrank.svd_linear)

# %%
torch.manual_seed(0)
linear = torch.nn.Linear(96, 64)
for k in (8, 32, 64):
    approx = lowrank.svd_linear(linear, rank=k)
    W = linear.weight.detach().double()
    sigma = torch.linalg.svdvals(W)
    error = ((approx.weight.double() - W).norm() / W.norm()).item()
    eckart_young = (sigma[k:].pow(2).sum().sqrt() / W.norm()).item()
    print(f"rank {k:>2}: relative error {error:.6f}, Eckart-Young bound {eckart_young:.6f}, "
          f"equal: {abs(error - eckart_young) < 1e-6}; parameters {sum(p.numel() for p in approx.parameters())} "
          f"vs {sum(p.numel() for p in linear.parameters())}")

# %% [markdown]
# ## 2. How low is LabGPT's rank?
#
# The singular values of trained weights decide how much a truncation costs. Cumulative
# energy `Σ_{i<k} σ_i² / Σ σ²` for a few of the `tiny` teacher's matrices:

# %%
model, tokenizer = labkit.load_model("tiny")
fig, ax = plt.subplots(figsize=(6, 3.5))
for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.5.mlp.c_proj", "transformer.h.3.attn.c_proj"):
    sigma = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double())
    energy = (sigma**2).cumsum(0) / (sigma**2).sum()
    ax.plot(torch.arange(1, len(sigma) + 1) / len(sigma), energy, label=name.removeprefix("transformer."))
    k90 = lowrank.rank_for_energy(sigma, 0.9)
    print(f"{name:<30} {tuple(model.get_submodule(name).weight.shape)}: 90% of the energy in {k90} of {len(sigma)} directions")
ax.set(xlabel="fraction of singular values kept", ylabel="energy kept", title="LabGPT tiny: singular value energy")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# 90% of the energy sits in a quarter to just over a third of the directions (printed above). That
# sounds low-rank, but the last 10% is spread thin over everything else, and a factorisation
# saves parameters only below `d_in·d_out / (d_in + d_out)` directions (96 for a 192 × 192
# matrix): keeping half a square matrix's parameters keeps 48 directions, fewer than 90% of
# the energy needs. Expect the price to appear somewhere between keeping 70% and 50%.
#
# ## 3. The rank sweep on LabGPT
#
# `compress_model(model, keep=f)` gives every linear layer (the tied embedding/head
# excepted) the largest rank whose factors hold at most a fraction `f` of its parameters.
# For each `f`: the model's parameters, its forward FLOPs (counted by PyTorch's
# `FlopCounterMode`, the oracle for FLOPs), perplexity on held-out text, and accuracy on the
# five tasks (specific prompts, 40 each).

# %%
def tokens_flops(m):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.zeros((1, 256), dtype=torch.long))
    return counter.get_total_flops()


def task_accuracy(m):
    return sum(evaluate(m, tokenizer, task, "specific", 0, n=40) for task in data.tasks()) / len(data.tasks())


base_params, base_flops = lowrank.parameter_count(model), tokens_flops(model)
sweep, compressed = [], {}
for keep in (None, 0.85, 0.7, 0.55, 0.4, 0.25):
    m, _ = labkit.load_model("tiny")
    if keep is not None:
        lowrank.compress_model(m, keep=keep)
    compressed[keep or 1.0] = m
    row = {"keep": keep or 1.0, "params": lowrank.parameter_count(m) / base_params, "flops": tokens_flops(m) / base_flops,
           "ppl": perplexity(m, tokenizer, validation), "accuracy": task_accuracy(m)}
    sweep.append(row)
    print(f"keep {row['keep']:.2f}: parameters {100 * row['params']:5.1f}%, FLOPs {100 * row['flops']:5.1f}%, "
          f"perplexity {row['ppl']:7.3f}, task accuracy {100 * row['accuracy']:5.1f}%")

# %% [markdown]
# And the measured time of a forward pass (batch 8 × 256 tokens, median of 5) for each:

# %%
# NBVAL_IGNORE_OUTPUT
batch = torch.randint(0, 100, (8, 256))
with torch.no_grad():
    rows = bench.compare({f"keep {k:.2f}": (lambda m=m: m(batch)) for k, m in compressed.items()}, warmup=1, repeat=5)

# %% [markdown]
# **The survey's claim, checked on LabGPT.** At `keep = 0.7` the model is ~29% smaller (the
# embedding table is not compressed) and loses almost nothing: the claim holds here. Below
# ~55% of the parameters the cost grows fast, and at 40% the model is broken.
#
# ### Fine-tuning recovers much of it
#
# A short fine-tune (40 steps of 8 × 256 tokens, AdamW at 2e-4, fresh text) lets the
# factors adapt to each other. Extra training helps any model, so the same fine-tune of the
# uncompressed model is the control: recovery is judged against it, not against the
# model before the fine-tune.

# %%
control, _ = labkit.load_model("tiny")
finetune(control, steps=40, batch_size=8, seq_len=256, lr=2e-4, progress=False)
control_ppl = perplexity(control, tokenizer, validation)
print(f"control, uncompressed: perplexity {sweep[0]['ppl']:.3f} -> {control_ppl:.3f} after the same fine-tune")
recovered = {}
for keep in (0.55, 0.4):
    m, _ = labkit.load_model("tiny")
    lowrank.compress_model(m, keep=keep)
    finetune(m, steps=40, batch_size=8, seq_len=256, lr=2e-4, progress=False)
    recovered[keep] = {"ppl": perplexity(m, tokenizer, validation), "accuracy": task_accuracy(m)}
    before = next(r for r in sweep if r["keep"] == keep)
    print(f"keep {keep}: perplexity {before['ppl']:.3f} -> {recovered[keep]['ppl']:.3f} (control {control_ppl:.3f}), "
          f"task accuracy {100 * before['accuracy']:.1f}% -> {100 * recovered[keep]['accuracy']:.1f}%")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot([100 * r["params"] for r in sweep], [r["ppl"] for r in sweep], "o-", label="after SVD")
ax1.plot([100 * next(r["params"] for r in sweep if r["keep"] == k) for k in recovered], [v["ppl"] for v in recovered.values()],
         "s", color="tab:green", label="after a 40-step fine-tune")
ax1.set(xlabel="parameters kept (%)", ylabel="perplexity", yscale="log", title="quality vs size")
ax1.legend()
ax2.plot([100 * r["params"] for r in sweep], [100 * r["accuracy"] for r in sweep], "o-")
ax2.plot([100 * next(r["params"] for r in sweep if r["keep"] == k) for k in recovered],
         [100 * v["accuracy"] for v in recovered.values()], "s", color="tab:green")
ax2.set(xlabel="parameters kept (%)", ylabel="task accuracy (%)", title="specific prompts, 5 tasks")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Is it faster?
#
# Fewer FLOPs become less time only when the matmuls are big enough to be compute-bound.
# An SVD linear of rank `d/4` does half the FLOPs of a dense `d × d` one; at batch 256:

# %%
# NBVAL_IGNORE_OUTPUT
speedups = {}
for d in (192, 384, 768, 1024):
    dense = torch.nn.Linear(d, d)
    thin = lowrank.svd_linear(dense, rank=d // 4)
    x = torch.randn(256, d)
    with torch.no_grad():
        rows = bench.compare({f"dense {d}x{d}": lambda: dense(x), f"rank {d // 4}": lambda: thin(x)}, warmup=5, repeat=20)
    speedups[d] = rows[1]["speedup"]
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(list(speedups), list(speedups.values()), "o-")
ax.axhline(2.0, ls="--", color="gray", lw=0.8, label="FLOP ratio (2x)")
ax.set(xlabel="d", ylabel="speedup of rank d/4 vs dense", title="batch 256, measured here")
ax.legend()
plt.show()

# %% [markdown]
# The measured speedup approaches the 2× FLOP ratio as `d` grows (GPT-2's width is 768); at
# small widths the matmuls last microseconds and overheads make the ratio vary from run to
# run.
#
# ## 5. Beyond matrices: CP and Tucker
#
# Weights can be stacked into higher-order tensors, for example the attention projections
# `W_q, W_k, W_v, W_o` of every layer as one `24 × 192 × 192` tensor, and decomposed jointly:
#
# - **CP** (CANDECOMP/PARAFAC): `X ≈ Σ_r w_r · a_r ⊗ b_r ⊗ c_r`, a sum of `R` rank-one
#   tensors, fitted by alternating least squares: fix all factors but one, solve a linear
#   least-squares problem for it, cycle.
# - **Tucker**: `X ≈ G ×₁ U₁ ×₂ U₂ ×₃ U₃`, a small core tensor times an orthonormal basis per
#   mode; HOSVD takes each basis from the SVD of the tensor unfolded along that mode, HOOI
#   refines them.

# %%
labkit.show_source(lowrank.cp_als)

# %% [markdown]
# **The oracles.** On synthetic tensors of known rank, both must recover the tensor to
# 1e-5; on a matrix, Tucker must equal the truncated SVD.

# %%
g = torch.Generator().manual_seed(0)
factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (10, 12, 14)]
known_cp = torch.einsum("ir,jr,kr->ijk", *factors)
cp = lowrank.cp_als(known_cp, rank=3)
print(f"CP-ALS on a rank-3 tensor: relative error {lowrank.relative_error(cp.reconstruct(), known_cp):.1e} (< 1e-5: "
      f"{lowrank.relative_error(cp.reconstruct(), known_cp) < 1e-5})")
core = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
bases = [torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0] for n, r in ((8, 2), (9, 3), (10, 4))]
known_tucker = lowrank.mode_product(lowrank.mode_product(lowrank.mode_product(core, bases[0], 0), bases[1], 1), bases[2], 2)
tk = lowrank.tucker(known_tucker, (2, 3, 4))
tucker_err = lowrank.relative_error(tk.reconstruct(), known_tucker)
print(f"Tucker on a multilinear-rank (2,3,4) tensor: relative error {tucker_err:.1e} (< 1e-5: {tucker_err < 1e-5})")
M = torch.randn(30, 20, generator=g, dtype=torch.float64)
U, S, Vh = torch.linalg.svd(M, full_matrices=False)
svd5 = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
svd_gap = lowrank.relative_error(lowrank.tucker(M, (5, 5)).reconstruct(), svd5)
print(f"Tucker of a matrix with ranks (5, 5) vs truncated SVD: difference {svd_gap:.1e} (< 1e-5: {svd_gap < 1e-5})")

# %% [markdown]
# Applied to LabGPT's attention projections (the reconstructed weights are put back in the
# model; the decompositions share bases across all 24 matrices):

# %%
C = model.config.n_embd


def attention_tensor(m):
    mats = []
    for block in m.transformer.h:
        mats += [*block.attn.c_attn.weight.detach().split(C, dim=0), block.attn.c_proj.weight.detach()]
    return torch.stack(mats)  # (4 * n_layer, C, C): q, k, v, o of every layer


def put_back(m, tensor):
    with torch.no_grad():
        for i, block in enumerate(m.transformer.h):
            block.attn.c_attn.weight.copy_(torch.cat(list(tensor[4 * i : 4 * i + 3]), dim=0))
            block.attn.c_proj.weight.copy_(tensor[4 * i + 3])


X = attention_tensor(model)
print("attention tensor:", tuple(X.shape))
results = []
for label, make in (
    ("Tucker (24,176,176)", lambda: lowrank.tucker(X, (24, 176, 176), n_iter=1)),
    ("Tucker (24,160,160)", lambda: lowrank.tucker(X, (24, 160, 160), n_iter=1)),
    ("Tucker (24,128,128)", lambda: lowrank.tucker(X, (24, 128, 128), n_iter=1)),
    ("CP rank 256", lambda: lowrank.cp_als(X, 256, n_iter_max=25, tol=1e-6)),
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decomposition = make()
    m, _ = labkit.load_model("tiny")
    put_back(m, decomposition.reconstruct())
    results.append({"name": label, "kept": decomposition.n_params / X.numel(),
                    "error": lowrank.relative_error(decomposition.reconstruct(), X), "ppl": perplexity(m, tokenizer, validation)})
    note = " (stopped at its iteration budget: warned)" if caught else ""
    print(f"{label:<20} attention parameters {100 * results[-1]['kept']:5.1f}%, relative error {results[-1]['error']:.3f}, "
          f"perplexity {results[-1]['ppl']:9.3f}{note}")

# %% [markdown]
# Against per-matrix truncated SVD at a similar size (from the sweep above, which compressed
# *every* linear layer, MLPs included):

# %%
tucker_mid = next(r for r in results if r["name"] == "Tucker (24,160,160)")
svd_mid = next(r for r in sweep if r["keep"] == 0.7)
print(f"Tucker, {100 * tucker_mid['kept']:.0f}% of the attention weights: perplexity {tucker_mid['ppl']:.3f} "
      f"(+{tucker_mid['ppl'] - sweep[0]['ppl']:.3f})")
print(f"SVD, {100 * svd_mid['params']:.0f}% of the whole model:          perplexity {svd_mid['ppl']:.3f} "
      f"(+{svd_mid['ppl'] - sweep[0]['ppl']:.3f})")

# %% [markdown]
# Sharing one basis across q, k, v and o of all layers costs more than giving each matrix
# its own: these matrices do not share a small common subspace. CP, which models the
# tensor as a sum of rank-one pieces, was tried only at a small budget (its rank-256 terms
# hold 12% of the attention parameters, and ALS had not converged when it stopped), so its
# ruinous perplexity says that 12% is far too little, not that CP is worse than Tucker at
# an equal budget. Tensor decompositions shine
# on weights that really are multi-way (convolution kernels, embedding tables reshaped into
# tensor trains); for a transformer's projections, per-matrix SVD is the better tool.
#
# ## 6. The widget: choose the rank by parameters or by energy

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def compress_view(fig, amount, rule):
    m, _ = labkit.load_model("tiny")
    if rule == "keep parameters":
        lowrank.compress_model(m, keep=amount)
    else:
        lowrank.compress_model(m, energy=amount)
    ppl, size = perplexity(m, tokenizer, validation), lowrank.parameter_count(m) / base_params
    ax = fig.add_subplot()
    ax.plot([100 * r["params"] for r in sweep], [r["ppl"] for r in sweep], "o-", color="lightgray", label="keep sweep")
    ax.plot([100 * size], [ppl], "o", color="tab:red", ms=10, label=f"{rule} = {amount}")
    ax.set(xlabel="parameters kept (%)", ylabel="perplexity", yscale="log")
    ax.legend()
    return f"{rule} {amount}: {100 * size:.1f}% of the parameters, perplexity {ppl:.3f}"


explore(compress_view, amount=(0.3, 1.0, 0.05, 0.7), rule=["keep parameters", "keep energy"])

# %% [markdown]
# ## Your turn
#
# **Exercise.** The largest rank `k` whose two factors hold at most a fraction `keep` of a
# `d_out × d_in` matrix's parameters (never more than the matrix's smaller side).

# %%
def rank_for_compression(d_out, d_in, keep):
    # your code: the factors cost k * (d_in + d_out)
    return int(keep * min(d_out, d_in))


passed = check.rank_for_compression(rank_for_compression)

# %%
from labkit.solutions import lowrank as solutions

passed = check.rank_for_compression(solutions.rank_for_compression)

# %% [markdown]
# ## Takeaways
#
# - Truncated SVD is the optimal low-rank approximation of each matrix (Eckart–Young), and
#   a rank-`k` pair of linears costs `k·(d_in + d_out)`: it pays only below
#   `d_in·d_out / (d_in + d_out)` (`d/2` for a square matrix).
# - On LabGPT, ~30% fewer parameters cost almost nothing (the survey's claim holds); beyond
#   ~45% the damage grows quickly, and a short fine-tune recovers much of it.
# - Fewer FLOPs are faster only for matrices wide enough to be compute-bound.
# - CP and Tucker generalise SVD to tensors; on attention projections stacked across layers,
#   Tucker compresses worse than per-matrix SVD (CP was tried only at a budget far too small
#   to compare).
#
# ## References
#
# - C. Eckart, G. Young, *The approximation of one matrix by another of lower rank*, 1936.
# - T. Kolda, B. Bader, *Tensor Decompositions and Applications*, SIAM Review 2009.
# - L. De Lathauwer, B. De Moor, J. Vandewalle, *A Multilinear Singular Value Decomposition*, 2000.
# - E. Denton et al., *Exploiting Linear Structure Within Convolutional Networks*, NeurIPS 2014.
