# %% [markdown]
# # 03 · Tensor parallelism: one layer's matrices split across processes
#
# **Goals.** Split a linear layer by columns and by rows and see why each is exact; build
# Megatron-LM's MLP and attention from them with the two conjugate functions `f` and `g`;
# split LabGPT across 2 processes and check its logits and gradients against one process;
# count and time the communication it costs.
#
# **Expected run time.** About 15 seconds on the kit's 2-core test CPU (a laptop may take twice as long).
#
# The survey: the model's layers are partitioned across devices, each computing
#
# $$y_i = W_i\,x$$
#
# on its part of the parameters, and "the results are aggregated". *How* they are
# aggregated is the whole design: concatenated (column split) or summed (row split).

# %%
import matplotlib.pyplot as plt
import torch

import labkit
from labkit import check, widgets
from labkit.model import get_config
from labkit.parallel import launch, tensor

labkit.seed_everything(0)

# %% [markdown]
# ## 1. Two ways to split `y = W x`, in one process
#
# `W` is `out × in` (as in `nn.Linear`). Cut its **rows** (output features) into pieces
# `W_1, W_2`: each piece gives part of `y`, and `y = [W_1 x ; W_2 x]` (concatenate). Cut its
# **columns** (input features) into `W_1, W_2` with the matching pieces `x_1, x_2` of the
# input: `y = W_1 x_1 + W_2 x_2` (a sum: one all-reduce between processes).
#
# A warning about names: Megatron-LM writes the layer as `Y = X A`, with `A = Wᵀ`, and names
# the split after `A`'s columns. So its **column-parallel** linear cuts the *rows* of
# `nn.Linear.weight` (concatenate), and its **row-parallel** linear cuts our *columns* (sum).
# The code below uses Megatron's names.

# %%
torch.manual_seed(0)
W, x = torch.randn(6, 4), torch.randn(4)
rows = [W[:3], W[3:]]  # column-parallel linear: each rank holds some output features
cols, xs = [W[:, :2], W[:, 2:]], [x[:2], x[2:]]  # row-parallel: some input features
print("by rows, concatenated:", torch.allclose(torch.cat([w @ x for w in rows]), W @ x))
print("by columns, summed:   ", torch.allclose(sum(w @ xi for w, xi in zip(cols, xs)), W @ x))

# %% [markdown]
# **Megatron's MLP** chains the two: `c_fc` column-parallel (each rank computes its slice of
# the 4C hidden features), GELU on each slice (elementwise, so no communication), then
# `c_proj` row-parallel (its input is exactly the slice the rank has). One all-reduce at the
# end of the forward pass, one in the backward pass.
#
# Autograd needs two conjugate operations at the edges of the parallel region:
#
# | | forward | backward |
# |---|---|---|
# | `f` (enter) | identity: every rank uses the same x | all-reduce: x's gradient is the sum of every rank's part |
# | `g` (leave) | all-reduce: sum the partial outputs | identity |

# %%
labkit.show_source(tensor.ColumnParallelLinear)
labkit.show_source(tensor.RowParallelLinear)

# %% [markdown]
# **Attention** splits by heads: rank `r` of `t` computes heads `r·h/t … (r+1)·h/t − 1`. In
# LabGPT's fused `c_attn` weight (`3C × C`: all of q's rows, then k's, then v's) its rows
# are that head range taken in each of q, k and v; the output projection `c_proj` is
# row-parallel over the same features. A tensor-parallel size must divide the heads:

# %%
labkit.show_source(tensor.ParallelSelfAttention.__init__)
for tp in (2, 4):
    try:
        tensor.check_tensor_parallel_size(get_config("tiny"), tp)
        print(f"tp={tp}: fine for tiny's {get_config('tiny').n_head} heads")
    except ValueError as err:
        print(f"tp={tp}: ValueError: {err}")

# %% [markdown]
# ## 2. The oracle: LabGPT split 2 ways equals LabGPT in one process
#
# Each of 2 processes builds the same seeded LabGPT, keeps its half of every block, runs a
# batch forward and backward, and compares with the whole model: the logits, and each
# sharded parameter's gradient against the matching slice of the whole model's gradient.

# %%
for config in ("nano", "tiny"):
    res = launch.launch(tensor.logits_and_gradients, 2, config)
    r = res[0]
    print(f"{config:>5}: max |logits - one process| = {max(x['max_logit_diff'] for x in res):.1e}, "
          f"max |grad - slice of one process's grad| = {max(x['max_grad_diff'] for x in res):.1e}  "
          f"(both <= 1e-5: {max(max(x['max_logit_diff'], x['max_grad_diff']) for x in res) <= 1e-5})")
    print(f"       parameters per rank {r['params_here']:,} of {r['params_full']:,}; forward all-reduces "
          f"{r['forward_all_reduces']} ({r['forward_bytes']:,} bytes)")

# %% [markdown]
# Two all-reduces per layer in the forward pass (attention, MLP) and two in the backward,
# each of the full activation `B × T × C`. Their size grows with the batch and the
# sequence, not with the parameters: tensor parallelism moves *activations*, data
# parallelism moves *gradients*. That is why tensor-parallel groups live inside one node,
# on NVLink (hundreds of GB/s), and data-parallel groups span nodes.
#
# ## 3. Measured: memory per rank, time, and the share spent communicating
#
# Forward pass of LabGPT `tiny`, batch 4 × 128 tokens, split 1, 2 and 3 ways (each process
# with `max(1, 2 // t)` threads on this 2-core machine: at `t = 3`, three single-threaded
# processes share two cores). Parameters per rank fall as `1/t` for the
# blocks (embeddings stay whole); the time is the honest part.

# %%
# NBVAL_IGNORE_OUTPUT
results = {t: launch.launch(tensor.forward_times, t, "tiny")[0] for t in (1, 2, 3)}
for t, r in results.items():
    print(f"tp={t}: {r['params_here']:>9,} parameters per rank, forward {1e3 * r['forward_s']:6.1f} ms, "
          f"all-reduce {1e3 * r['all_reduce_s']:5.1f} ms ({r['all_reduce_s'] / r['forward_s']:.0%}), "
          f"{r['all_reduce_bytes']:,} bytes")
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
ts = list(results)
a1.bar([str(t) for t in ts], [results[t]["params_here"] / 1e6 for t in ts])
a1.set(xlabel="tensor-parallel size", ylabel="M parameters per rank", title="memory per rank")
a2.bar([str(t) for t in ts], [1e3 * (results[t]["forward_s"] - results[t]["all_reduce_s"]) for t in ts], label="compute")
a2.bar([str(t) for t in ts], [1e3 * results[t]["all_reduce_s"] for t in ts],
       bottom=[1e3 * (results[t]["forward_s"] - results[t]["all_reduce_s"]) for t in ts], label="all-reduce")
a2.set(xlabel="tensor-parallel size", ylabel="ms per forward", title="time per forward (this CPU)")
a2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# On one 2-core machine, splitting does not make a forward faster: the processes share the
# same cores, and gloo's all-reduce goes through the loopback network stack (and the
# all-reduce time includes waiting for the slower rank). What tensor parallelism buys is
# **memory**: a model whose layers do not fit one device runs on several. On GPUs joined
# by NVLink the all-reduces are fast and the matmuls shrink, so time falls too -- up to
# the point where each rank's matmuls get too thin to keep a GPU busy (why Megatron
# keeps `t ≤ 8`, one node).
#
# ## 4. Explore: the tensor-parallel size
#
# Parameters per rank and all-reduce bytes per forward, from the real split, as `t` and
# the sequence length change.

# %%
# NBVAL_IGNORE_OUTPUT
def experiment(fig, tp, seq_len):
    r = launch.launch(tensor.forward_times, tp, "tiny", 4, seq_len, 3)[0]
    ax = fig.add_subplot()
    compute = r["forward_s"] - r["all_reduce_s"]
    ax.barh(["forward"], [1e3 * compute], label="compute")
    ax.barh(["forward"], [1e3 * r["all_reduce_s"]], left=[1e3 * compute], label="all-reduce")
    ax.set(xlabel="ms", title=f"tp={tp}, 4 x {seq_len} tokens: {r['params_here']:,} params/rank")
    ax.legend()
    return f"all-reduce bytes per forward: {r['all_reduce_bytes']:,}"


widgets.explore(experiment, tp=[2, 1, 3, 6], seq_len=[128, 32, 256, 512])

# %% [markdown]
# ## 5. Exercise: which rows does rank `r` hold?
#
# Return the row indices (a `torch.long` tensor) of the fused `3C × C` qkv weight that
# tensor-parallel rank `rank` of `tp` keeps, for a model of width `C` with `n_head` heads:
# its heads' rows in q, then in k, then in v.

# %%
def qkv_rows(C, n_head, tp, rank):
    per_rank = 3 * C // tp
    return torch.arange(rank * per_rank, (rank + 1) * per_rank)  # your code: is a contiguous block right?


passed = check.qkv_rows(qkv_rows)

# %% [markdown]
# **Take-aways.** Column and row splits are exact identities; chained with `f` and `g` they
# make a block cost one all-reduce each way per sub-layer. The result equals one process
# within float rounding (checked at 1e-5, measured below 1e-6). Tensor parallelism trades memory per device for activation traffic, so it belongs
# on the fastest links. Next, notebook 04 splits the model the other way: by layers.
