# %% [markdown]
# # 07 · Pruning: zeros, neurons, heads and 2:4
#
# **Goals.** Implement the survey's magnitude pruning rule `W' = W·1(|W| ≥ τ)` and hit a target
# sparsity exactly, layer by layer or globally; remove whole MLP neurons and attention heads so
# the matrices really shrink; try NVIDIA's 2:4 pattern; measure what each costs in perplexity
# and task accuracy (with and without fine-tuning) and what it buys in time and bytes, honestly.
#
# **Expected run time.** About 1 to 2.5 minutes on the kit's 2-core test CPU (a laptop may take twice as long). The long sweep (32 pruned
# models, 12 of them fine-tuned, and a fine-tuned dense control) ran offline with `python tools/prune_sweep.py`; the notebook
# loads its results and runs a short live version.
#
# **The survey's claim, tested here.** Pruning "removes redundant neurons and connections",
# by weight magnitude or by structured methods that remove entire neurons.

# %%
import copy
import json

import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

import labkit
from labkit import bench, check, data, plots, prune
from labkit.evaluation import evaluate, perplexity
from labkit.model import MLP, GPTConfig
from labkit.train import validation_text

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
validation = validation_text(20_000)
model, tokenizer = labkit.load_model("tiny")


def task_accuracy(m, n=20):
    """Mean exact-match accuracy over the five tasks (specific zero-shot prompts)."""
    return sum(evaluate(m, tokenizer, task, "specific", 0, n=n) for task in data.tasks()) / len(data.tasks())

# %% [markdown]
# ## 1. The rule, and an exact sparsity
#
# Magnitude pruning keeps a weight when its magnitude reaches a threshold τ:
# `W' = W · 1(|W| ≥ τ)`. Usually we want a *sparsity* `s` (the fraction of zeros) rather than
# a τ: sort the magnitudes, and τ is the smallest one kept. With `n` weights, exactly
# `k = round(s·n)` are zeroed. When several weights share the magnitude at the boundary, no τ
# can split them; `magnitude_prune` ranks the weights instead (a stable sort: equal
# magnitudes go in index order), so the count is exact every time.

# %%
labkit.show_source(prune._prune_mask)
labkit.show_source(prune.magnitude_prune)

# %% [markdown]
# **The oracle checks, live.** On a real matrix of the `tiny` model: the number of zeros is
# exactly `round(s·n)`, every pruned magnitude is at most every kept one, and the threshold
# rule at `τ = threshold_for_sparsity(W, s)` gives the same mask. Then a matrix full of ties.

# %%
W = model.transformer.h[2].mlp.c_fc.weight.detach()
for s in (0.1, 0.5, 0.9, 0.97):
    pruned, mask = prune.magnitude_prune(W, sparsity=s)
    tau = prune.threshold_for_sparsity(W, s)
    print(f"s={s:.2f}: {int((pruned == 0).sum()):>6} zeros of {W.numel()} (round(s·n) = {round(s * W.numel())}); "
          f"max pruned |w| <= min kept |w|: {bool(W.abs()[~mask].max() <= W.abs()[mask].min())}; "
          f"same mask as |W| >= tau: {torch.equal(mask, W.abs() >= tau)}")
ties = torch.tensor([[1.0, -1.0, 1.0, 2.0], [-1.0, 1.0, 3.0, 1.0]])
print("ties: sparsity 0.25 of", ties.tolist(), "->", prune.magnitude_prune(ties, sparsity=0.25)[0].tolist())

# %% [markdown]
# ## 2. Layer-wise or global?
#
# *Layer-wise* pruning gives every matrix the same sparsity; *global* pruning uses one
# threshold for all of them, so matrices with smaller weights lose more. The four kinds of
# matrix in LabGPT have different typical magnitudes, and so very different shares under a
# global 70%:

# %%
linears = {name: [] for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
for block in model.transformer.h:
    for name in linears:
        linears[name].append(block.get_submodule(name).weight.detach())
glob = prune.prune_model(model, 0.7, scope="global")
for name, weights in linears.items():
    pruned_share = [1 - glob.transformer.h[i].get_submodule(name).mask.float().mean().item() for i in range(6)]
    print(f"{name:<12} median |w| {torch.cat([w.flatten() for w in weights]).abs().median():.4f}; "
          f"global 70% prunes {100 * min(pruned_share):4.1f}%..{100 * max(pruned_share):4.1f}% of it")
layer = prune.prune_model(model, 0.7)
print(f"perplexity at 70% sparsity: layer-wise {perplexity(layer, tokenizer, validation):.3f}, "
      f"global {perplexity(glob, tokenizer, validation):.3f} (dense {perplexity(model, tokenizer, validation):.3f})")

# %% [markdown]
# Global pruning leaves some attention matrices with under 10% of their weights while the
# MLP matrices keep about 15–40% (printed above), and on LabGPT that is much worse than layer-wise pruning (the
# offline sweep below agrees, in perplexity, at every sparsity from 30% on): a matrix stripped nearly bare
# is a bottleneck, however small its weights were. A weight's magnitude says little about
# its effect when the matrices' inputs differ in scale; that is what activation-aware
# scores such as Wanda's `|W|·‖x‖` correct. Magnitude compares like with like.
#
# ## 3. Structured pruning: remove neurons and heads
#
# Zeros scattered through a matrix leave its shape, and its matmul, unchanged. Removing a
# whole **MLP neuron** `j` deletes row `j` of `c_fc` (and its bias) and column `j` of
# `c_proj`; removing an **attention head** deletes its `q`, `k`, `v` rows of `c_attn` and its
# columns of `c_proj`. The matrices become physically smaller.
#
# Which units go? Those with the lowest importance:
#
# - a neuron: `‖c_fc.weight[j, :]‖ · ‖c_proj.weight[:, j]‖` (what it reads times what it
#   writes; no data needed);
# - a head: the norm of its contribution to the attention output, `‖y_h · W_proj[:, h]ᵀ‖`,
#   over a calibration batch of text (`y_h` is the head's output, `W_proj[:, h]` its columns
#   of `c_proj`).

# %%
labkit.show_source(prune.neuron_importance)
labkit.show_source(prune.head_output_norms)
labkit.show_source(prune.PrunedSelfAttention.forward)

# %% [markdown]
# The head scores of `tiny` on the calibration batch, as each head's share of its layer's
# total. In layer 0, three heads carry almost everything and three almost nothing; the
# deeper layers spread the work evenly, so no head there is free to remove:

# %%
scores = torch.stack(prune.head_importance(model))  # (layers, heads)
fig, ax = plt.subplots(figsize=(5, 3))
image = ax.imshow(scores / scores.sum(dim=1, keepdim=True), cmap="viridis")
ax.set(xlabel="head", ylabel="layer", title="share of each layer's attention output")
fig.colorbar(image)
plt.show()
kept = prune.select_heads(model, 0.5)
print("heads kept per layer at 50%:", [k.tolist() for k in kept])

# %% [markdown]
# **The oracle: structured == masked.** Removing a unit must give the same outputs as
# zeroing it in the original model (zeroed rows and columns contribute exactly nothing). Both
# structures, on `tiny`, on a batch of text, and greedy generation with the KV cache (the
# pruned attention uses the first `H` head slots of the cache):

# %%
x = prune.calibration_batch(4, 128, seed=5)
keep_neurons = prune.select_neurons(model, 0.5)
keep_heads = prune.select_heads(model, 0.5)
with torch.no_grad():
    for label, pruned, masked in (
        ("neurons 50%", prune.prune_model(model, 0.5, "neurons"), prune.mask_neurons(model, keep_neurons)),
        ("heads 50%", prune.prune_model(model, 0.5, "heads"), prune.mask_heads(model, keep_heads)),
    ):
        diff = (pruned(x) - masked(x)).abs().max().item()
        same_text = torch.equal(pruned.generate(x[:1, :32], 40, temperature=0), masked.generate(x[:1, :32], 40, temperature=0))
        block = pruned.transformer.h[0]
        print(f"{label}: c_attn {tuple(block.attn.c_attn.weight.shape)}, c_fc {tuple(block.mlp.c_fc.weight.shape)}; "
              f"max |pruned - masked| = {diff:.1e} (< 1e-4: {diff < 1e-4}); same greedy text: {same_text}")

# %% [markdown]
# ### 2:4 semi-structured sparsity
#
# In every group of 4 consecutive weights of a row, the 2 smallest magnitudes are zeroed:
# exactly 50% sparsity, in a pattern NVIDIA's sparse tensor cores (Ampere and later) can
# skip. The groups run along the input dimension, the one a matmul sums over.

# %%
labkit.show_source(prune.semi_structured_mask)
pruned24 = prune.prune_model(model, 0.5, "2:4")
groups_ok = all(
    bool((m.mask.reshape(-1, 4).sum(dim=1) == 2).all())
    for b in pruned24.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
)
print("every group of 4 keeps exactly 2:", groups_ok, "| block weight sparsity:", round(prune.weight_sparsity(pruned24), 4))
print("first row of layer 0's c_fc, 12 weights:", [round(v, 3) for v in pruned24.transformer.h[0].mlp.c_fc.weight[0, :12].tolist()])

# %% [markdown]
# ## 4. Accuracy vs sparsity
#
# The offline sweep (`tools/prune_sweep.py`): each structure at several sparsities,
# evaluated as pruned ("one-shot") and after **iterative pruning with fine-tuning**: three
# rounds, each pruning further on the cubic schedule `s·(1 − (1 − r/3)³)` (Zhu & Gupta, 2017)
# and then fine-tuning for 20 steps of 8 × 256 tokens (`labkit.train.finetune`). Perplexity
# on 60k held-out characters, accuracy on 60 prompts per task. The x axis is the fraction of
# the blocks' weights removed, the price that is comparable across structures (removing 50%
# of the heads removes 50% of the attention weights, a sixth of a block's weights).

# %%
sweep = json.loads((labkit.DATA_DIR / "prune_sweep.json").read_text())
runs = sweep["runs"]
print(sweep["meta"]["command"], "|", sweep["meta"]["machine"])
dense = next(r for r in runs if r["structure"] == "dense" and r["finetune"] == "none")
control = next(r for r in runs if r["structure"] == "dense" and r["finetune"] != "none")
print(f"dense: perplexity {dense['perplexity']:.3f}, accuracy {100 * dense['mean_accuracy']:.1f}%; "
      f"dense fine-tuned the same way (control): {control['perplexity']:.3f}, {100 * control['mean_accuracy']:.1f}%")
print(f"{'structure':<22}{'sparsity':>9}{'weights gone':>13}{'ppl':>9}{'acc %':>7}{'ppl tuned':>11}{'acc % tuned':>12}")
curves = {}
for r in runs:
    if r["structure"] == "dense" or r["finetune"].startswith("one-shot"):
        continue
    key = f"{r['structure']} ({r['scope']})" if r["structure"] == "unstructured" else r["structure"]
    curves.setdefault(key, {}).setdefault(r["finetune"] != "none", []).append(r)
for key, by_tuning in curves.items():
    tuned = {round(r["sparsity"], 3): r for r in by_tuning.get(True, [])}
    for r in by_tuning[False]:
        t = tuned.get(round(r["sparsity"], 3))
        after = f"{t['perplexity']:>11.3f}{100 * t['mean_accuracy']:>12.1f}" if t else f"{'-':>11}{'-':>12}"
        print(f"{key:<22}{r['sparsity']:>9.2f}{100 * r['weight_sparsity']:>12.1f}%{r['perplexity']:>9.3f}"
              f"{100 * r['mean_accuracy']:>7.1f}{after}")
for r in runs:  # the same budget of fine-tuning, spent after one cut or between gradual cuts
    if r["structure"] == "neurons" and r["sparsity"] == 0.5 and r["finetune"] != "none":
        print(f"neurons 50%, {r['finetune']:<20}: perplexity {r['perplexity']:.3f}, accuracy {100 * r['mean_accuracy']:.1f}%")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
colors = dict(zip(curves, ("tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red")))
for key, by_tuning in curves.items():
    for tuned, rows in sorted(by_tuning.items()):
        rows = [dense] + sorted(rows, key=lambda r: r["weight_sparsity"])
        xs = [100 * r["weight_sparsity"] for r in rows]
        style = dict(color=colors[key], ls="--" if tuned else "-", marker="s" if tuned else "o", ms=4,
                     label=f"{key}{', fine-tuned' if tuned else ''}")
        ax1.plot(xs, [r["perplexity"] for r in rows], **style)
        ax2.plot(xs, [100 * r["mean_accuracy"] for r in rows], **style)
ax1.set(xlabel="block weights removed (%)", ylabel="perplexity", yscale="log", title="held-out perplexity (log)")
ax2.set(xlabel="block weights removed (%)", ylabel="task accuracy (%)", title="5 tasks, specific zero-shot prompts")
handles, labels = ax2.get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
fig.tight_layout(rect=(0, 0.12, 1, 1))
plt.show()

# %% [markdown]
# **What the sweep says.**
#
# - **Little is free in a small, well-trained model.** Without fine-tuning, 30% of the weights
#   go at no cost (perplexity 1.464 vs 1.465, accuracy 100%), 50% cost ~4 points of
#   accuracy, 60% halve it, and at 70% LabGPT is broken (perplexity 9.5, accuracy 0%). The
#   90% sparsities reported for large, over-parameterised networks do not transfer to a
#   2.8M-parameter model that uses its weights.
# - **Per weight removed, structures hurt more.** 50% of the heads is only 17% of the block
#   weights, yet leaves 25% accuracy; 50% of the MLP neurons (33% of the weights) leaves
#   19%. 2:4 (50% of the weights in a forced pattern) sits between: 60%, against 96% for
#   free-form 50%.
# - **Fine-tuning recovers much of it.** 60 steps (0.12M tokens) bring 2:4 back to 99% and
#   perplexity 1.48, unstructured 70% to 90%, half the heads or half the neurons to ~90%.
#   Mind the control: the *dense* model fine-tuned the same way also improves (1.465 →
#   1.452), so part of every perplexity gain is simply more training on this data.
# - **Gradual is not better at this budget.** Pruning 50% of the neurons at once and then
#   fine-tuning 60 steps did as well as the 3-round schedule (the last two lines printed
#   under the table): the schedule leaves only 20 steps after its last round. Zhu & Gupta's
#   schedule pays off over thousands of steps.
#
# ### A short live version
#
# The same experiment at one point, small enough to run here: 50% of the MLP neurons,
# pruned in one shot, then pruned iteratively (2 rounds, each followed by 6 fine-tuning
# steps of 4 × 128 tokens). Perplexity on 20k characters, accuracy on 20 prompts per task.

# %%
one_shot = prune.prune_model(model, 0.5, "neurons")
tuned, history = prune.iterative_prune(model, 0.5, "neurons", rounds=2, steps_per_round=6, batch_size=4, seq_len=128)
for label, m in (("dense", model), ("neurons 50%, one-shot", one_shot), ("neurons 50%, iterative + 12 steps", tuned)):
    print(f"{label:<34} perplexity {perplexity(m, tokenizer, validation):6.2f}, task accuracy {100 * task_accuracy(m):5.1f}%")
print("rounds:", [(round(h["sparsity"], 3), round(h["loss_last"], 2)) for h in history])

# %% [markdown]
# ## 5. Honest speed
#
# ### Zeros do not make a dense matmul faster
#
# A dense kernel (here MKL/oneDNN on the CPU, cuBLAS on a GPU) multiplies and adds every
# entry of the matrix; a zero costs exactly what any other number costs. PyTorch's FLOP
# counter agrees: a 90%-unstructured model does the same FLOPs as the dense one.

# %%
def forward_flops(m):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.zeros((1, 256), dtype=torch.long))
    return counter.get_total_flops()


structured = {"dense": model, "unstructured 90%": prune.prune_model(model, 0.9), "2:4 (masked dense)": pruned24,
              "neurons 50%": one_shot, "heads 50%": prune.prune_model(model, 0.5, "heads")}
for name, m in structured.items():
    print(f"{name:<20} forward FLOPs for 256 tokens: {forward_flops(m) / 1e9:.3f} G "
          f"({100 * forward_flops(m) / forward_flops(model):.0f}% of dense)")

# %% [markdown]
# And measured: the whole model (batch 4 × 256 tokens), each variant side by side.
#
# The timings in this section run on **one thread**: the ratios then reflect the work each
# variant does and stay stable on a shared or busy machine (with several threads, one thread
# that the operating system pauses stalls the others at every matmul). Set
# `TIMING_THREADS = torch.get_num_threads()` to time with every core; `python -m labkit.bench
# prune` reports both.

# %%
# NBVAL_IGNORE_OUTPUT
from contextlib import contextmanager

TIMING_THREADS = 1


@contextmanager
def timing_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


batch = prune.calibration_batch(4, 256, seed=6)
with timing_threads(), torch.no_grad():
    rows = bench.compare({name: (lambda m=m: m(batch)) for name, m in structured.items()}, warmup=1, repeat=3)
plots.speedup_bars(rows)
plt.show()

# %% [markdown]
# Structured pruning is faster because every matmul it touches is smaller. The MLP alone,
# at `tiny`'s width (192 → 768, a batch of 8 × 256 tokens) and at GPT-2's (768 → 3072):

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
for width, n_tokens in ((192, 2048), (768, 1024)):
    mlp = MLP(GPTConfig(n_embd=width, n_head=1)).eval()
    smaller = copy.deepcopy(mlp)
    prune.remove_neurons(smaller, prune.neuron_importance(smaller).argsort(descending=True)[: 2 * width])
    h = torch.randn(n_tokens, width)
    with timing_threads(), torch.no_grad():
        bench.compare({f"MLP {width}->{4 * width}": lambda: mlp(h), "50% of the neurons": lambda: smaller(h)},
                      warmup=3, repeat=15)

# %% [markdown]
# ### What unstructured sparsity does buy: storage, and speed only when very sparse
#
# Stored in a compressed format, the zeros are not stored. PyTorch's CSR format keeps each
# nonzero value (4 bytes) *and its column index* (8 bytes, int64), plus one row pointer per
# row: at 50% sparsity that is **larger** than the dense matrix. A bitmask (one bit per
# position) is cheaper; 2:4 stores a 2-bit index per kept value, the same size as a bitmask
# at 50%, but in a layout the sparse tensor cores can read.

# %%
W = model.transformer.h[2].mlp.c_fc.weight.detach()
print(f"{'sparsity':>8} {'dense':>9} {'CSR int64':>10} {'bitmask':>9} {'2:4':>9}  (KiB, {tuple(W.shape)} fp32)")
for s in (0.5, 0.7, 0.9, 0.95):
    w = prune.magnitude_prune(W, sparsity=s)[0]
    sizes = [prune.dense_bytes(w), prune.csr_bytes(w), prune.bitmask_bytes(w)]
    two_four = f"{prune.semi_structured_bytes(w) / 1024:9.1f}" if s == 0.5 else f"{'-':>9}"
    print(f"{s:>8.2f} " + " ".join(f"{b / 1024:9.1f}" for b in sizes) + f" {two_four}")

# %% [markdown]
# A sparse *kernel* (`torch.sparse` CSR times a dense matrix) skips the zeros, but pays for
# indirect, irregular memory access on every nonzero. On a 768 → 3072 layer with 512 tokens:

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
wide = torch.nn.Linear(768, 3072)
h = torch.randn(512, 768)
timings = {}
with timing_threads(), torch.no_grad():
    dense_time = bench.measure(lambda: wide(h), warmup=2, repeat=5).median_s
    for s in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        w, mask = prune.magnitude_prune(wide.weight, sparsity=s)
        csr = prune.CSRLinear(prune.MaskedLinear(w, wide.bias, mask))
        timings[s] = dense_time / bench.measure(lambda: csr(h), warmup=2, repeat=5).median_s
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([100 * s for s in timings], list(timings.values()), "o-")
ax.axhline(1.0, color="gray", ls="--", lw=0.8)
ax.set(xlabel="sparsity (%)", ylabel="speedup of CSR vs dense", yscale="log", title="torch.sparse CSR matmul, measured here")
plt.show()
print({f"{100 * s:.0f}%": f"{v:.2f}x" for s, v in timings.items()})

# %% [markdown]
# On this CPU the sparse kernel needs somewhere between 80% and 90% zeros just to break even
# (the exact point moves with the machine), and wins clearly only beyond that, where LabGPT
# is broken even after fine-tuning (section 4: 90% gives accuracy 0%). At the sparsities the
# model survives, 50-70%, the sparse kernel is *slower* than the dense one, almost 3x at 50%
# and 1.6x at 70% on the kit's test CPU (this run's ratios are printed above). That is
# why unstructured sparsity is a storage technique here, not a speed technique.
#
# ### 2:4, measured as it is
#
# On a CPU there is no 2:4 kernel: the masked dense weight runs the dense matmul (the
# `2:4 (masked dense)` bar above, as fast as dense). On an NVIDIA GPU from Ampere on,
# `prune_model(..., "2:4")` stores fp16/bf16 weights as `torch.sparse` semi-structured tensors
# (`to_sparse_semi_structured`), which the sparse tensor cores multiply. The promise is up to
# 2× on the matmul. The kit's own run on an H100
# (`benchmarks/gpu_check_prune.py`), read from its recorded results:

# %%
run = bench.recorded_results("gpu_results_prune_h100.json")
if run is None:
    print("benchmarks/ is not beside this install: see benchmarks/RESULTS.md in the repository")
else:
    print(run["device"], "| torch", run["torch"])
    for row in run["linear_2_4"]:
        m, k, n = row["shape"]
        print(f"F.linear {m:>5} rows x {k} x {n} fp16: dense {row['dense_s'] * 1e3:.3f} ms, "
              f"2:4 {row['sparse_s'] * 1e3:.3f} ms = {row['speedup']:.2f}x")
    for name, speedup in run["labgpt"]["speedup"].items():
        print(f"LabGPT GPT-2-small shape, 8 x 512 tokens, {name}: {speedup:.2f}x dense")

# %% [markdown]
# Where the matrix is huge (8192 rows of input), the sparse tensor cores win; with fewer rows,
# the semi-structured path costs about half a millisecond per call whatever its size, and a
# whole model with 48 such layers runs an order of magnitude *slower* than dense. 2:4 is a
# speed technique only for large batched matmuls, and only with a kernel that keeps its
# fixed costs down. Removing half the MLP neurons, faster on this CPU, was not faster on the
# H100 either (the last line above): at this size the GPU's time is not in the MLP's FLOPs,
# and the kit has not yet profiled where it went. The cell below measures 2:4 if this
# machine has such a GPU.

# %%
# NBVAL_IGNORE_OUTPUT
if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
    from torch.sparse import to_sparse_semi_structured

    for n in (2048, 8192):
        a = torch.randn(n, n, device="cuda", dtype=torch.float16)
        w = a * prune.semi_structured_mask(a)
        sparse_w, xg = to_sparse_semi_structured(w), torch.randn(n, n, device="cuda", dtype=torch.float16)
        bench.compare({f"dense fp16 {n}^3": lambda: torch.mm(w, xg), "2:4 semi-structured": lambda: torch.mm(sparse_w, xg)})
else:
    print("no NVIDIA GPU with sparse tensor cores here: 2:4 runs as a masked dense matmul (see the bars above)")

# %% [markdown]
# ## 6. The widget: sparsity, structure, fine-tuning
#
# Prune `tiny` with the chosen structure and sparsity (2:4 is always 50%), optionally
# fine-tune for a few steps (4 × 128 tokens each), and place the result against the offline
# sweep. Perplexity on 10k characters.

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore

short_text = validation[:10_000]


def pruning_view(fig, sparsity, structure, finetune_steps):
    sparsity = 0.5 if structure == "2:4" else sparsity
    if finetune_steps:
        m, _ = prune.iterative_prune(model, sparsity, structure, rounds=1, steps_per_round=finetune_steps,
                                     batch_size=4, seq_len=128)
    else:
        m = prune.prune_model(model, sparsity, structure)
    ppl = perplexity(m, tokenizer, short_text)
    ax = fig.add_subplot()
    for key, by_tuning in curves.items():
        rows = [dense] + sorted(by_tuning[False], key=lambda r: r["weight_sparsity"])
        ax.plot([100 * r["weight_sparsity"] for r in rows], [r["perplexity"] for r in rows], "-", color=colors[key],
                alpha=0.5, label=key)
    ax.plot([100 * prune.weight_sparsity(m)], [ppl], "*", color="k", ms=14, label="this model")
    ax.set(xlabel="block weights removed (%)", ylabel="perplexity", yscale="log")
    ax.legend(fontsize=7)
    return (f"{structure} at {sparsity:.2f}, {finetune_steps} fine-tuning steps: {100 * prune.weight_sparsity(m):.1f}% "
            f"of the block weights gone, perplexity {ppl:.3f}")


explore(pruning_view, sparsity=(0.0, 0.9, 0.05, 0.5), structure=["neurons", "heads", "unstructured", "2:4"],
        finetune_steps=(0, 30, 5, 0))

# %% [markdown]
# ## Your turn
#
# **Exercise 1.** The magnitude threshold τ for a target sparsity: `W·1(|W| ≥ τ)` must zero
# exactly `k = round(sparsity · n)` of the `n` weights (the tests use weights with distinct
# magnitudes). The starter assumes magnitudes are spread evenly between 0 and the largest;
# they are not.

# %%
def threshold_for_sparsity(w, sparsity):
    # your code: which magnitude separates the k smallest from the rest?
    return sparsity * w.abs().max()


passed = check.threshold_for_sparsity(threshold_for_sparsity)

# %%
from labkit.solutions import prune as solutions

passed = check.threshold_for_sparsity(solutions.threshold_for_sparsity)

# %% [markdown]
# **Exercise 2.** Head importance. Given `y` (…, n_head·hs), the input of `c_proj` (the
# heads' outputs side by side), and `c_proj`'s weight `W` (C, n_head·hs), return a tensor
# of `n_head` scores: the norm of what `c_proj` makes of each head, `‖y_h · W[:, h]ᵀ‖` over
# all tokens. The checker judges the ranking. The starter scores each head by the size of its
# own output, forgetting that `c_proj` may shrink it.

# %%
def head_importance(y, proj_weight, n_head):
    hs = proj_weight.shape[1] // n_head
    # your code: project each head's slice of y by its columns of proj_weight
    return y.reshape(-1, n_head, hs).norm(dim=(0, 2))


passed = check.head_importance(head_importance)

# %%
passed = check.head_importance(solutions.head_importance)

# %% [markdown]
# ## Takeaways
#
# - Magnitude pruning `W·1(|W| ≥ τ)` at an exact sparsity is a sort: τ is the smallest
#   magnitude kept. When magnitudes tie, rank the weights (a stable sort) instead of
#   thresholding.
# - Layer-wise beats global on LabGPT: one global threshold strips the matrices whose
#   weights happen to be small nearly bare. A magnitude only compares like with like.
# - The survey's "redundant neurons and connections" holds in part: about 30% of the weights,
#   or 25% of the MLP neurons, go almost for free; beyond ~50% everything breaks without
#   fine-tuning, and a short fine-tune recovers much of it (2:4 fully).
# - Zeros are not speed. Unstructured sparsity saves bytes in a compressed format (CSR with
#   int64 indices is smaller than dense only beyond 67% zeros) and time only with a sparse
#   kernel at very high sparsity. Structured pruning shrinks the matmuls, and was faster on
#   this CPU, but costs the most accuracy per weight removed, and at GPU sizes the smaller
#   matmuls were not faster (the recorded H100 run above). 2:4 needs the hardware: a masked
#   dense matmul on a CPU; on an H100 it won only on the largest matmul and made the whole
#   model slower.
#
# ## References
#
# - S. Han, J. Pool, J. Tran, W. Dally, *Learning both Weights and Connections for Efficient Neural Networks*, NeurIPS 2015.
# - S. Han, H. Mao, W. Dally, *Deep Compression*, ICLR 2016 (the survey's reference 4).
# - M. Zhu, S. Gupta, *To prune, or not to prune: exploring the efficacy of pruning for model compression*, 2017.
# - P. Michel, O. Levy, G. Neubig, *Are Sixteen Heads Really Better than One?*, NeurIPS 2019.
# - A. Mishra et al., *Accelerating Sparse Deep Neural Networks*, 2021 (2:4 on NVIDIA Ampere).
# - E. Frantar, D. Alistarh, *SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot*, ICML 2023.
