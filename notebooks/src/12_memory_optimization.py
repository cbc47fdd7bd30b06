# %% [markdown]
# # 12 · Memory: mmap'd weights, activation checkpointing, gradient accumulation
#
# **Goals.** Write the safetensors format from scratch and load weights with `mmap`
# (`W_mapped = mmap(file, offset, length)`); trade compute for memory with activation
# checkpointing; get a big batch's gradient from small micro-batches (`g_acc = Σ g_i`),
# alone and under data parallelism; count the page faults the allocator costs.
#
# **Expected run time.** About 35 seconds on the kit's 2-core test CPU (a laptop may take twice as long; it writes a 256 MB file
# to a temporary folder and deletes it); under a minute on a GPU machine.
#
# The survey lists memory optimisation and these formulas; each one is implemented below
# from scratch, checked against PyTorch's own implementation, and measured.

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import labkit
from labkit import bench, check, memory
from labkit.model import LabGPT, get_config

labkit.seed_everything(0)
workdir = Path(tempfile.mkdtemp(prefix="labkit12-"))
device = labkit.get_device()

# %% [markdown]
# ## 1. The safetensors format, from scratch
#
# A safetensors file is three things back to back: 8 bytes holding the header's length `N`
# (little-endian), `N` bytes of JSON saying where each tensor lives, then the raw bytes of
# every tensor. No pickle: loading a stranger's file can fail, but it cannot run code. The
# kit's checkpoints (`data/*.safetensors`) are written by this code.

# %%
labkit.show_source(memory.save_safetensors)

# %%
path = workdir / "tiny_example.safetensors"
memory.save_safetensors({"embedding": torch.arange(6.0).view(2, 3), "scale": torch.tensor([0.5], dtype=torch.float16)},
                        path, metadata={"made_in": "notebook 12"})
raw = path.read_bytes()
n = int.from_bytes(raw[:8], "little")
print("first 8 bytes:", raw[:8].hex(" "), "-> header length", n)
print("header:", raw[8 : 8 + n].decode().rstrip())
print("data:", len(raw) - 8 - n, "bytes")

# %% [markdown]
# **The oracle:** the `safetensors` package (Hugging Face's reference implementation) must
# read our files, and we must read its files, with equal tensors.

# %%
try:
    import safetensors.torch as reference
except ImportError:
    reference = None
    print("the safetensors package is not installed: skipping the cross-check (kit.py installs it)")
if reference is not None:
    tensors = {"w": torch.randn(4, 5), "b": torch.randn(5).bfloat16(), "i": torch.arange(3, dtype=torch.int8)}
    memory.save_safetensors(tensors, workdir / "ours.safetensors")
    reference.save_file(tensors, workdir / "theirs.safetensors")
    theirs_reads_ours = reference.load_file(workdir / "ours.safetensors")
    ours_reads_theirs = memory.load_safetensors(workdir / "theirs.safetensors")
    print("safetensors reads ours:", all(torch.equal(theirs_reads_ours[k], v) for k, v in tensors.items()))
    print("we read safetensors':  ", all(torch.equal(ours_reads_theirs[k], v) for k, v in tensors.items()))

# %% [markdown]
# A file can lie: be cut short, claim a header longer than the file, or give offsets past
# its end. Each is a clear `ValueError` before anything is allocated:

# %%
for name, bad_bytes in {
    "truncated.safetensors": raw[:-3],
    "absurd_header.safetensors": (2**60).to_bytes(8, "little") + raw[8:],
    "lying_shape.safetensors": raw.replace(b'"shape":[2,3]', b'"shape":[3,3]'),
}.items():
    (workdir / name).write_bytes(bad_bytes)
    try:
        memory.load_safetensors(workdir / name)
    except ValueError as err:
        print(f"ValueError: {err}")

# %% [markdown]
# ## 2. Loading with mmap: `W_mapped = mmap(file, offset, length)`
#
# An eager load reads the whole file into memory before the first tensor can be used.
# A memory map instead asks the operating system to make the file *look like* memory; a page
# is read from disk only when something touches it. Our loader returns tensors that are
# views into the mapping (`torch.frombuffer(mapping, offset=...)`): no copy at all.

# %%
labkit.show_source(memory.load_safetensors)

# %% [markdown]
# The measurement, on a generated 256 MB file of 16 weight matrices. Each load runs in a
# **fresh Python process** so that nothing this notebook holds muddies the numbers; we
# record the time to the first use and the process's resident memory (RSS) as tensors are
# touched one by one. (The file was just written, so it sits in the OS page cache: this
# measures the loading work, not the disk.)

# %%
big = workdir / "weights_256mb.safetensors"
sizes = memory.make_weight_file(big, total_mb=256, n_tensors=16)
print(f"{big.name}: {big.stat().st_size / 2**20:.0f} MiB, {len(sizes)} tensors of {next(iter(sizes.values())) / 2**20:.0f} MiB")

# %%
# NBVAL_IGNORE_OUTPUT
profiles = {"eager": memory.load_profile(big, mmap=False, touch=16), "mmap": memory.load_profile(big, mmap=True, touch=16)}
for name, p in profiles.items():
    first = p["trace"][0]
    print(f"{name:>5}: load() returned after {1e3 * p['load_s']:7.1f} ms holding {p['rss_after_load'] / 2**20:6.1f} MiB; "
          f"first tensor used after {1e3 * first['seconds']:7.1f} ms")
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, p in profiles.items():
    ax.plot([0] + [t["touched"] for t in p["trace"]], [p["rss_after_load"] / 2**20] + [t["rss"] / 2**20 for t in p["trace"]],
            "o-", label=name)
ax.set(xlabel="tensors touched", ylabel="RSS growth (MiB)", title="memory grows only with what you touch (mmap)")
ax.legend()
plt.show()

# %% [markdown]
# With mmap, `load()` returns at once and memory grows tensor by tensor, only for what is
# used: this is how large models open instantly and how several processes share one copy of
# the weights (the pages belong to the OS page cache).
#
# ## 3. Activation checkpointing
#
# Backpropagation needs the activations of the forward pass, so training holds every layer's
# intermediate tensors at once: memory grows with depth × batch × sequence. Checkpointing
# keeps only the *input* of each segment and, during backward, re-runs the segment's forward
# to get its activations back. With `n` layers in `s` segments, memory holds `s` segment
# inputs plus one segment's activations, about `s·a + (n/s)·A` (a: a layer's input, A: its
# activations); time grows by about one extra forward pass (+33% of a training step, if a
# backward costs two forwards; measured below, on a noisy 2-core machine, it varies). The
# classic analysis (Chen et al., 2016) takes `a ≈ A` and finds the optimum at `s = √n`.
#
# The whole mechanism is one autograd Function:

# %%
labkit.show_source(memory.CheckpointFunction)

# %% [markdown]
# **The oracle:** gradients must equal plain backpropagation and `torch.utils.checkpoint`
# (dropout on, so the recomputation must replay the same random masks).

# %%
import torch.utils.checkpoint as torch_checkpoint


def grads(model, idx, mode, segments=2):
    torch.manual_seed(1)
    model.zero_grad()
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
    blocks = list(model.transformer.h)
    if mode == "plain":
        for block in blocks:
            x = block(x)
    elif mode == "labkit":
        x = memory.checkpoint_sequential(blocks, segments, x)
    else:
        for block in blocks:
            x = torch_checkpoint.checkpoint(block, x, use_reentrant=False)
    loss = torch.nn.functional.cross_entropy(model.lm_head(model.transformer.ln_f(x)).flatten(0, 1), idx.flatten())
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


small = LabGPT(get_config("nano", n_layer=4, dropout=0.1)).train()
idx = torch.randint(0, 100, (2, 32))
plain, ours, theirs = grads(small, idx, "plain"), grads(small, idx, "labkit"), grads(small, idx, "torch")
print("equal to plain backprop (1e-6):       ", all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ours)))
print("equal to torch.utils.checkpoint (1e-6):", all(torch.allclose(a, b, atol=1e-6) for a, b in zip(theirs, ours)))

# %% [markdown]
# Now the trade-off on LabGPT `tiny` (6 layers), batch 8 × 256 tokens. Memory is counted
# exactly: `memory.peak_activation_bytes` follows every tensor autograd saves for backward
# (via `saved_tensors_hooks`) and records the peak, so the figures are the same on every
# machine. Time is measured (median of 3).

# %%
model = LabGPT(get_config("tiny")).to(device).train()
batch = torch.randint(0, 100, (8, 256), device=device)
segment_counts = [0, 1, 2, 3, 6]  # 0 = no checkpointing
peak_mb = {}
for s in segment_counts:
    peak_mb[s] = memory.peak_activation_bytes(lambda: grads(model, batch, "plain" if s == 0 else "labkit", s),
                                              exclude=model.parameters()) / 2**20
    print(f"segments {s}: peak activation memory {peak_mb[s]:6.1f} MiB")

# %%
# NBVAL_IGNORE_OUTPUT
step_s = {s: bench.measure(lambda: grads(model, batch, "plain" if s == 0 else "labkit", s), warmup=1, repeat=3).median_s
          for s in segment_counts}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
labels = ["none" if s == 0 else str(s) for s in segment_counts]
ax1.bar(labels, [peak_mb[s] for s in segment_counts], color="tab:purple")
ax1.set(xlabel="checkpointed segments", ylabel="peak activation memory (MiB)")
ax2.bar(labels, [step_s[s] / step_s[0] for s in segment_counts], color="tab:gray")
ax2.set(xlabel="checkpointed segments", ylabel="step time / no checkpointing")
fig.tight_layout()
plt.show()
for s in segment_counts:
    print(f"segments {labels[segment_counts.index(s)]:>4}: {1e3 * step_s[s]:7.1f} ms per step ({step_s[s] / step_s[0]:.2f}x)")

# %% [markdown]
# What the numbers say, honestly: memory keeps falling all the way to one layer per segment,
# instead of bottoming out at `√6 ≈ 2.4` segments. The `√n` rule assumes a layer's saved
# activations `A` are about as big as its input `a`; in a transformer layer they are ~15–20×
# bigger (the LayerNorm outputs, q, k and v, the attention output, the 4× wider MLP before
# and after its GELU; the fused SDPA kernel keeps no T×T attention weights, the `manual`
# backend would add them), so the optimum `s = √(n·A/a)` is past `n` and "checkpoint every
# layer" wins, which is what large-model training does. In principle the time cost is one
# extra forward pass whatever `s` is; the measured ratios above scatter around that (other
# work on the machine, allocator effects), so read them as "about a third more", not as a
# trend in `s`.
#
# Move the slider to see one configuration's memory against the no-checkpointing baseline:

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def segments_view(fig, segments):
    ax = fig.add_subplot()
    mem = memory.peak_activation_bytes(lambda: grads(model, batch, "labkit", segments), exclude=model.parameters()) / 2**20
    ax.bar(["no checkpointing", f"{segments} segment(s)"], [peak_mb[0], mem], color=["tab:gray", "tab:purple"])
    ax.set_ylabel("peak activation memory (MiB)")
    return f"{segments} segment(s): {mem:.1f} MiB, {100 * mem / peak_mb[0]:.0f}% of the baseline"


explore(segments_view, segments=(1, 6, 1, 2))

# %% [markdown]
# ## 4. Gradient accumulation: `g_acc = Σ g_i`
#
# A batch too big for memory can be split into micro-batches whose gradients are summed in
# `.grad` before one optimizer step. One subtlety: the loss is a *mean*, so each
# micro-batch's loss must be weighted by its share of the batch (`len(x_i) / len(x)`), or the
# pieces of unequal size get the wrong weight.

# %%
labkit.show_source(memory.accumulate_gradients)

# %%
loss_fn = lambda logits, targets: torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
x = torch.randint(0, 100, (6, 128), device=device)
y = torch.randint(0, 100, (6, 128), device=device)
model.zero_grad()
loss_fn(model(x), y).backward()
full = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
memory.accumulate_gradients(model, loss_fn, x, y, micro_batches=4)  # pieces of 2, 2, 1, 1
worst = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), full))
print("accumulated gradient equals the full batch's (1e-6):", worst < 1e-6)

# %% [markdown]
# Memory vs micro-batch size, for a batch of 16 sequences of 256 tokens (exact counts again):

# %%
x16 = torch.randint(0, 100, (16, 256), device=device)
y16 = torch.randint(0, 100, (16, 256), device=device)
accumulation_mb = {}
for pieces in (1, 2, 4, 8, 16):
    def step():
        model.zero_grad()
        memory.accumulate_gradients(model, loss_fn, x16, y16, pieces)

    accumulation_mb[pieces] = memory.peak_activation_bytes(step, exclude=model.parameters()) / 2**20
    print(f"{pieces:>2} micro-batches of {16 // pieces:>2}: peak activation memory {accumulation_mb[pieces]:7.1f} MiB")

# %% [markdown]
# Memory falls in proportion to the micro-batch size. Time is the other side: each
# micro-batch pays the per-call overheads again, which on a CPU at these sizes costs
# little, while on a GPU very small micro-batches leave the chip idle.
#
# **With data parallelism**, each of `n` processes accumulates its micro-batches, and the
# gradients must be averaged across processes once, after the last one. PyTorch's
# `DistributedDataParallel` all-reduces during *every* backward unless told otherwise with
# `no_sync()`. Below, 2 CPU processes (gloo), 4 micro-batches each, counting all-reduces
# with a communication hook; the oracle is one process on the whole batch.

# %%
for use_no_sync in (False, True):
    result = memory.ddp_accumulation(world_size=2, micro_batches=4, no_sync=use_no_sync)
    print(f"no_sync={use_no_sync!s:<5}: all-reduces per rank {result['allreduce_calls']}, "
          f"equals the full-batch gradient: {result['equals_full_batch']}")

# %% [markdown]
# Same gradients, a quarter of the communication. (Lab 02 builds the all-reduce itself.)
#
# ## 5. The allocator: freed memory comes back as page faults
#
# A forward pass allocates its activations, uses them, frees them, and allocates them again
# at the next call. Where that memory comes from matters. The first touch of a page the
# kernel has not mapped yet is a *minor page fault*: the kernel zeroes 4 KiB and maps it,
# about a microsecond each. glibc's `malloc` (Linux) serves big blocks with `mmap` and hands
# them back on `free`, and trims freed memory at the top of its heap; the threshold for
# "big" starts at 128 KiB and adapts to what the process freed before. So a model's
# activations can be faulted in afresh at every call.
#
# `memory.keep_freed_memory()` raises glibc's two thresholds (`mallopt`: what the
# environment variables `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set at start-up)
# so that freed blocks stay in the process for the next call. Allocators built for this,
# jemalloc and tcmalloc, do the same by design. The price: the process keeps memory it has
# freed (its RSS no longer shrinks), for the rest of its life. So the experiment runs in a
# fresh Python process (this notebook's own has freed a 256 MB file's worth of blocks
# already, which moved glibc's threshold): one forward pass of LabGPT `tiny`, before and after.

# %%
# NBVAL_IGNORE_OUTPUT
run = memory.allocator_experiment("tiny", batch=4, length=256)
if run["faults_before"] is None:
    print("this OS does not report page faults (getrusage)")
elif not run["kept"]:
    print(f"{run['faults_before']:.0f} page faults a forward pass; not glibc: the thresholds cannot be set here")
else:
    print(f"tiny, 4 x 256 tokens, default malloc: {run['faults_before']:.0f} minor page faults a forward pass "
          f"({4 * run['faults_before'] / 1024:.1f} MiB faulted in), {1e3 * run['seconds_before']:.1f} ms")
    print(f"after keep_freed_memory():          {run['faults_after']:.0f} page faults, "
          f"{1e3 * run['seconds_after']:.1f} ms ({run['seconds_before'] / run['seconds_after']:.2f}x)")

# %% [markdown]
# What the faults cost in time depends on how many there were, and that depends on where
# glibc's adaptive threshold happened to land in that process: on the kit's 2-core test
# machine the same experiment gave 1,400 to 5,000 faults a forward pass with the default and
# 0 to 150 after, and from no measurable gain to 1.15× in speed. Count before you tune.

# %% [markdown]
# ## Your turn
#
# **Exercise 1.** Read a safetensors header by hand: return `(header_dict, data_start)`,
# where `header_dict` is the parsed JSON (with `__metadata__` if present) and `data_start`
# the byte offset where tensor data begins.

# %%
def read_safetensors_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "big")  # your code: is this right?
        header = {}
    return header, n


passed = check.read_safetensors_header(read_safetensors_header)

# %% [markdown]
# **Exercise 2.** Write gradient accumulation: after your function, every parameter's
# `.grad` must equal the full batch's gradient, and the model must never see more than one
# micro-batch at a time (the checker watches; two of its batches do not split evenly).

# %%
def accumulate(model, loss_fn, x, y, micro_batches):
    for xb, yb in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)):
        (loss_fn(model(xb), yb) / micro_batches).backward()  # your code: right for unequal pieces?


passed = check.accumulate(accumulate)

# %% [markdown]
# Reference solutions: `labkit/solutions/memory.py`.

# %%
from labkit.solutions import memory as solutions

passed = check.read_safetensors_header(solutions.read_safetensors_header) and check.accumulate(solutions.accumulate)

# %%
import shutil

shutil.rmtree(workdir)  # the 256 MB file goes away

# %% [markdown]
# ## Takeaways
#
# - A weight file with a plain layout can be mapped, not read: load time and memory then
#   scale with what is used, not with the file.
# - Activation checkpointing trades one extra forward pass for most of the activation
#   memory; for transformer layers, checkpoint every layer.
# - Gradient accumulation gives the big batch's exact gradient (weight each piece by its
#   size), and with data parallelism it should communicate once per step, not per piece.
# - Memory that is freed and allocated again can cost page faults at every call; an
#   allocator that keeps it (glibc's thresholds raised, jemalloc, tcmalloc) removes them, at
#   the price of memory the process no longer gives back.
#
# ## References
#
# - T. Chen, B. Xu, C. Zhang, C. Guestrin, *Training Deep Nets with Sublinear Memory Cost*, 2016.
# - Hugging Face, *safetensors* format specification.
# - PyTorch documentation: `torch.utils.checkpoint`, `DistributedDataParallel.no_sync`.
