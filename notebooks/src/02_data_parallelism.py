# %% [markdown]
# # 02 · Data parallelism: naive, ring and bucketed all-reduce, against DDP
#
# **Goals.** Run real processes that talk through `torch.distributed`; average gradients
# across them three ways (one all-reduce per parameter, a ring all-reduce written from
# send/recv, buckets all-reduced while the backward pass runs); check each against
# PyTorch's `DistributedDataParallel`; measure bytes moved and step time.
#
# **Expected run time.** About 25 seconds on the kit's 2-core test CPU (a laptop may take twice as long). The processes use gloo on
# CPUs; on a machine with a GPU per process the same code uses NCCL.
#
# The survey's update rule: each of `n` processors computes the gradient `g_i` of its
# share of the batch, and
#
# $$\theta \leftarrow \theta - \eta \cdot \frac{1}{n}\sum_{i=1}^{n} g_i .$$
#
# With equal shares, the mean of the shards' mean-loss gradients *is* the gradient of the
# whole batch's mean loss, so data parallelism changes where the work happens, not the
# result. Everything below checks that to 1e-6.

# %%
import matplotlib.pyplot as plt

import labkit
from labkit import check, plots, widgets
from labkit.parallel import data, launch

labkit.seed_everything(0)

# %% [markdown]
# ## 1. Starting processes: `labkit.parallel.launch`
#
# `launch(fn, world_size, *args)` starts `world_size` processes, sets up the process group
# (rank `r` of `n`), runs `fn(rank, world_size, *args)` in each and returns their results
# in rank order. `hello` has each rank add its rank number into one all-reduce:

# %%
out = launch.launch(launch.hello, 4)
for r in out:
    print(f"rank {r['rank']} of {r['world_size']}: the sum of all ranks is {r['sum_of_ranks']}")

# %% [markdown]
# A distributed program usually fails by *hanging*: one rank raises, the others wait forever
# in a collective it will never join. The launcher turns that into an error that names the
# rank that failed first (the others only failed because it was gone), ends every child
# process, and bounds the whole run with a timeout. Rank 1 divides by zero here:

# %%
try:
    launch.launch(launch.fail_on, 3, 1)
except launch.LaunchError as err:
    print("LaunchError from rank", err.rank)
    print(next(line for line in str(err).splitlines() if line.startswith("ZeroDivisionError")))

# %% [markdown]
# Functions sent to other processes travel by name, so they must live in a `.py` module
# (the kit's workers do; put your own in a file next to the notebook). The same workers run
# under `torchrun` on real clusters: `torchrun --nproc-per-node 4 -m labkit.parallel.data`.
#
# ## 2. Naive: one all-reduce per parameter
#
# The simplest averaging: after `loss.backward()`, sum every gradient across ranks with
# `all_reduce`, then divide by `n`.

# %%
labkit.show_source(data.naive_all_reduce_gradients)

# %% [markdown]
# Correct, and slow: a model with P parameter tensors pays P messages, each with its fixed
# latency, and none starts before the whole backward pass is over.
#
# ## 3. The ring all-reduce, from send and recv
#
# Arrange the `n` ranks in a ring and cut the buffer into `n` chunks.
#
# * **Reduce-scatter**, `n−1` steps: at step `s`, rank `r` sends chunk `(r−s) mod n` to its
#   right neighbour and adds the chunk it receives from its left. After `n−1` steps rank `r`
#   holds the complete sum of chunk `(r+1) mod n`.
# * **All-gather**, `n−1` more steps: the finished chunks travel once around the ring.
#
# Each rank sends one chunk (`1/n` of the buffer) per step, `2(n−1)` steps:
# **`2(n−1)/n` of the buffer, whatever `n`** -- never more than twice the data, which is
# why every large-scale framework uses rings (or trees of rings) for gradients.

# %%
labkit.show_source(data.ring_all_reduce)

# %% [markdown]
# Measured: each rank fills its tensor with `rank + 1`, ring-all-reduces it, and checks the
# result is `1 + 2 + … + n`; it also counts the bytes it sent. The formula is the line.
# (Where `n` does not divide the tensor, the chunks are uneven and the busiest rank sends a
# few bytes more than the formula: at `n = 3`, 16,384 numbers split 5,462 + 5,461 + 5,461.)

# %%
numel = 1 << 14
rows = []
for n in (2, 3, 4):
    res = launch.launch(data.all_reduce_bytes, n, numel)
    rows.append((n, max(r["bytes_sent"] for r in res), all(r["correct"] for r in res)))
    print(f"n={n}: sums correct on every rank: {rows[-1][2]}; sent {rows[-1][1]} bytes per rank, "
          f"formula 2(n-1)/n x {numel * 4} = {2 * (n - 1) / n * numel * 4:.0f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r[0] for r in rows], [r[1] / (numel * 4) for r in rows], "o", label="measured (bytes sent / tensor bytes)")
ns = [1 + i / 10 for i in range(10, 41)]
ax.plot(ns, [2 * (k - 1) / k for k in ns], "-", label="2(n-1)/n")
ax.axhline(2, color="grey", ls=":", label="the limit: 2")
ax.set(xlabel="ranks n", ylabel="sent / tensor size", title="ring all-reduce traffic per rank")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Buckets, all-reduced while the backward pass runs
#
# The backward pass produces gradients from the last layer to the first. `BucketedDataParallel`
# groups parameters into buckets of about `bucket_mb` in that order and hooks every parameter
# (`register_post_accumulate_grad_hook`): when a bucket's last gradient lands, the bucket's
# all-reduce starts *at once, asynchronously*, while autograd goes on computing earlier
# layers. A callback queued on the autograd engine waits for the last buckets and writes
# the averages back. This is DDP's design (Li et al., 2020).

# %%
labkit.show_source(data.BucketedDataParallel)

# %% [markdown]
# ## 5. The oracle: equal to `DistributedDataParallel`
#
# Two ranks, LabGPT `nano`, each rank its half of a batch. Each method's averaged gradients
# against DDP's on the same data, and DDP's against one process on the whole batch:

# %%
res = launch.launch(data.gradients_vs_ddp, 2)[0]
for method, diff in res["max_diff_vs_ddp"].items():
    print(f"{method:>9}: max |grad - DDP grad| = {diff:.1e}   (<= 1e-6: {diff <= 1e-6})")
print(f"DDP vs one process, whole batch: {res['ddp_vs_single_process']:.1e}   (<= 1e-6: {res['ddp_vs_single_process'] <= 1e-6})")
print(f"all-reduce messages per step: {res['messages']} (buckets of {res['bucket_mb']} MB here, so that "
      "nano's small gradients fill more than one)")
print(f"gradient size {res['gradient_bytes']} bytes; the ring sent {res['ring_bytes_sent']} bytes "
      f"= 2(n-1)/n x gradient for n=2")

# %% [markdown]
# ## 6. Speed, side by side
#
# One training step (forward, backward, gradient averaging, SGD step) of LabGPT `tiny`,
# batch 8 × 128 tokens split over 2 processes, each method in the same processes and
# interleaved repeat by repeat; the median of 5, and the ratio to DDP.

# %%
# NBVAL_IGNORE_OUTPUT
times = launch.launch(data.step_times, 2)[0]
for m, t in times.items():
    print(f"{m:>9}: {t * 1e3:7.1f} ms/step   {t / times['ddp']:.2f}x DDP's time")
print(f"\nbucketed within 1.25x of DDP: {times['bucketed'] <= 1.25 * times['ddp']}")
rows = [{"variant": m, "speedup": times["ddp"] / t, "baseline": "ddp", "device": "cpu"} for m, t in times.items()]
plots.speedup_bars(rows, title="2 gloo processes on this CPU, LabGPT tiny")
plt.show()

# %% [markdown]
# The naive method sends one message per parameter tensor (dozens per step for LabGPT), each
# a separate synchronous round trip through gloo after the whole backward pass. The ring
# method sends one flattened buffer, but copies every gradient into it and out again and
# runs `2(n−1)` Python-level send/recv steps; DDP and the bucketed version send one message
# per bucket from a background thread.
#
# **Scaling on this machine.** Two processes on two cores each run with one thread, where
# one process runs with two: data parallelism cannot beat one process here -- it adds the
# communication. It pays off when each rank has its *own* processor (a GPU, a node), which
# is what the survey means by "scales well": throughput grows with n as long as the
# all-reduce (fixed `2(n−1)/n` of the gradient per rank) stays smaller than the compute.
#
# The scaling measurement itself: the same global batch (8 × 128 tokens of `tiny`) split
# over 1 to 4 processes with DDP, step time and the ideal `1/n` line.

# %%
# NBVAL_IGNORE_OUTPUT
scaling = {n: launch.launch(data.step_times, n, ("ddp",), "tiny", 8, 128, 25.0, 3, 1)[0]["ddp"] for n in (1, 2, 4)}
for n, t in scaling.items():
    print(f"{n} process(es): {1e3 * t:6.1f} ms/step, speedup {scaling[1] / t:.2f}x (ideal {n}x with {n} processors)")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(list(scaling), [1e3 * t for t in scaling.values()], "o-", label="measured (DDP, this CPU)")
ax.plot(list(scaling), [1e3 * scaling[1] / n for n in scaling], "--", label="ideal: 1/n")
ax.set(xlabel="processes", ylabel="ms per step", title="strong scaling on a 2-core machine", xticks=list(scaling))
ax.legend()
plt.show()

# %% [markdown]
# ## 7. Explore: world size and bucket size
#
# Step time of the bucketed method vs DDP as you change the number of processes and the
# bucket size (one bucket of 25 MB holds all of `tiny`'s 11 MB of gradients: no overlap;
# tiny buckets overlap more but pay a latency each).

# %%
# NBVAL_IGNORE_OUTPUT
def experiment(fig, world_size, bucket_mb):
    t = launch.launch(data.step_times, world_size, ("bucketed", "ddp"), "tiny", 8, 128, bucket_mb, 3, 1)[0]
    ax = fig.add_subplot()
    ax.bar(["bucketed", "DDP"], [1e3 * t["bucketed"], 1e3 * t["ddp"]], color=["tab:orange", "tab:blue"])
    ax.set(ylabel="ms per step", title=f"{world_size} processes, buckets of {bucket_mb} MB")
    return f"bucketed / DDP = {t['bucketed'] / t['ddp']:.2f}"


widgets.explore(experiment, world_size=[2, 1, 4], bucket_mb=[25.0, 1.0, 0.25, 0.05])

# %% [markdown]
# ## 8. Exercise: one step of the ring's reduce-scatter
#
# Simulate the ring on lists: `buffers[r][c]` is rank `r`'s copy of chunk `c` (a tensor).
# Return the buffers after reduce-scatter step `step`: every rank `r` sends its chunk
# `(r − step) mod n` to rank `(r + 1) mod n`, which adds it to its own copy. All ranks send
# at the same time, so use the values from before the step.

# %%
def reduce_scatter_step(buffers, step):
    n = len(buffers)
    new = [[c.clone() for c in b] for b in buffers]
    for r in range(n):
        c = (r + step) % n  # your code: which chunk does rank r send at this step?
        new[r][c] += buffers[r][c]  # ... and who receives it?
    return new


passed = check.reduce_scatter_step(reduce_scatter_step)

# %% [markdown]
# **Take-aways.** Data parallelism gives the same gradients as one big batch (checked to
# 1e-6 against DDP). Its cost is the all-reduce, `2(n−1)/n` of the gradient per rank with a
# ring, and the engineering is in hiding it: bucket the gradients and overlap their
# all-reduce with the backward pass. Next, notebook 03 splits a model that no longer fits
# on one device.
