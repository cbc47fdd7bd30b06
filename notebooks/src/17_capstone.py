# %% [markdown]
# # 17 · Capstone: stack the techniques, and measure what each step buys
#
# **Goals.** Stack the kit's techniques on LabGPT — the distilled student, pruned,
# quantized, with early exits, then as the draft of speculative decoding — and measure, in
# one run on this machine, what each step does to latency, throughput, memory and quality.
# Find the Pareto front; profile where the time goes; search for a better architecture under
# a latency budget measured here; export the compressed model with `torch.export` and run it
# without the Python model code.
#
# **Expected run time.** About 1 minute on the kit's 2-core test CPU (a laptop may take twice as long). Two things ran offline
# and ship in `data/`: the student's exit heads (`python tools/train_exit_heads.py --model
# student-distilled`, about 2 minutes) and the long architecture search (`python
# tools/nas_search.py`, about 11 minutes); the notebook runs a short live version of the search.

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import labkit
from labkit import capstone, check, plots, widgets

labkit.seed_everything(0)
tokenizer = labkit.CharTokenizer()

# %% [markdown]
# ## 1. The stack
#
# Five steps, each applied to what the one before left:
#
# | step | what it does | notebook |
# | --- | --- | --- |
# | distill | serve `student-distilled` (3 layers) instead of the `tiny` teacher (6) | 10 |
# | prune | remove 25% of every MLP's neurons, then fine-tune 30 steps to recover | 07 |
# | quantize | int8 weights, one scale per output channel | 08 |
# | early exit | a token leaves at the first layer whose exit head is confident: `max(p_k) ≥ τ = 0.95` | 11 |
# | speculate | the **teacher** serves every token; the compressed model drafts `k = 4` tokens per round | 16 |
#
# The last step turns the stack around. Steps 1–4 make a cheaper model that writes its own,
# slightly worse, tokens. Speculation keeps that model only as a *draft*: the teacher checks
# every guess, so the output is the teacher's greedy output token for token, and quality
# returns to the teacher's. What speculation can buy is speed, if the draft is cheap and
# usually right; what it costs is memory, since both models must be held.
#
# **How gains combine.** If step `i` makes a token `s_i` times faster, the stack is
# `s_1 · s_2 · … · s_n` times faster than the teacher: the per-step ratios multiply (the table
# below shows both). They multiply as *measured*, not as advertised: a step that halves the
# matrix multiplications buys little when the multiplications are a small share `f` of the
# time. Amdahl's law: latency falls to `(1 − f) + f/s` of what it was. Section 4 measures `f`.

# %%
labkit.show_source(capstone.build_stack)

# %%
stacks = capstone.build_stack(progress=False)
for stack in stacks:
    print(f"{stack.name:<15} steps {', '.join(stack.steps) or '-':<48} {stack.record}")

# %% [markdown]
# `Stack.generate` serves each one the way it would be served: `model.generate` with the KV
# cache, `early_exit.generate`, or `serving.speculative_generate` with the compressed model
# (exits included) as the draft. For that, early exit is wrapped as a model,
# `capstone.EarlyExitLM`: it runs each position through the blocks and leaves at the first
# confident exit, with the skipped layers' keys and values filled from the exit state, as in
# notebook 11. It also gives the exit policy a perplexity: the logits of position `t` come
# from the layer where `t` exited.
#
# The oracle for the last step: the speculating stack must write exactly the teacher's tokens.

# %%
prompt = tokenizer.tensor("Once upon a time")
teacher_tokens = stacks[0].generate(prompt, 80)
print(
    "speculating stack writes the teacher's greedy tokens:",
    torch.equal(stacks[-1].generate(prompt, 80), teacher_tokens),
)
print("the compressed model alone writes the same tokens:", torch.equal(stacks[3].generate(prompt, 80), teacher_tokens))
print(repr(tokenizer.decode(teacher_tokens[0].tolist())))

# %% [markdown]
# ## 2. What each step buys, measured
#
# For every stack, in one run: **latency** (milliseconds per generated token, batch 1, KV
# cache, 64 tokens after the prompt, median of 3); **throughput** (tokens per second with 8
# sequences decoded together; early exit and speculation decide per sequence, so they serve
# one at a time and their throughput is their batch-1 rate); **weight memory** (every weight
# the stack must hold: exit heads and, when speculating, the teacher too); **quality**
# (per-character perplexity on 2,048 held-out characters, and exact-match accuracy on 20
# specific prompts of each of the five tasks, greedy answers written the way the stack writes).

# %%
# NBVAL_IGNORE_OUTPUT
rows = capstone.measure_stack(stacks, tokenizer, n_per_task=20, new_tokens=64, batch_size=8, repeat=3)
capstone.print_table(rows)
print(f"(measured on {labkit.bench.device_label()}; vs prev: the step's own speedup, vs teacher: the product so far)")

# %% [markdown]
# Memory and quality do not depend on the clock; they are the same on every machine:

# %%
for r in rows:
    print(
        f"{r['name']:<15} weights {r['weight_mb']:6.2f} MB   perplexity {r['perplexity']:.3f}   accuracy {r['accuracy']:.0%}"
    )

# %% [markdown]
# And what each step did here, read from the measured figures:

# %%
# NBVAL_IGNORE_OUTPUT
for before, r in zip(rows, rows[1:]):
    s = r["step_speedup"]
    speed = "faster than" if s > 1.05 else "slower than" if s < 0.95 else "about as fast as"
    memory = r["weight_mb"] / before["weight_mb"]
    print(
        f"{r['name']:<13} {speed:>16} the step before ({s:.2f}x); weights x{memory:.2f}; "
        f"perplexity {before['perplexity']:.3f} -> {r['perplexity']:.3f}; throughput "
        f"{before['tokens_per_s']:.0f} -> {r['tokens_per_s']:.0f} tokens/s"
    )
fastest = max(rows, key=lambda r: r["speedup"])
print(
    f"fastest at batch 1: {fastest['name']} ({fastest['speedup']:.2f}x the teacher); "
    f"smallest: {min(rows, key=lambda r: r['weight_mb'])['name']}; "
    f"best perplexity: {min(rows, key=lambda r: r['perplexity'])['name']}"
)

# %% [markdown]
# How to read it (the figures above are this machine's; the notebook was written on a 2-core
# CPU and yours may differ):
#
# * **Distillation** halves the layers, and at batch 1 on a CPU the time per token is close to
#   proportional to the number of layers: it is the step that pays most. The distilled student
#   also matches the teacher's perplexity here (the quality list above; the model card, on
#   other text, agrees).
# * **Pruning** 25% of the MLP neurons shrinks two of each block's four matrices; a short
#   recovery fine-tune (30 steps here; `recover_steps` sets it) wins back part of the
#   perplexity it costs. Its speedup is small when matrix multiplications are a small share
#   of the time (section 4).
# * **Quantization** divides the linears' bytes by four. Whether it is faster depends on the
#   kernel: on a CPU at batch 1, the int8 weights are turned back into floats at every call
#   (notebook 08), which can cost more than reading fewer bytes saves. On a GPU, where
#   decoding is limited by memory bandwidth, fewer bytes is the point.
# * **Early exit** skips layers for confident tokens, but each exit test runs an extra head
#   (a norm, a 192×192 map and the 192×128 output layer) at every layer it passes, and a
#   3-layer model has little to skip. The exit heads were trained on the uncompressed
#   student, and the pruned, quantized model drifts from them: perplexity pays.
# * **Speculation** restores the teacher's quality exactly and holds both models. Its speed
#   depends on how often the teacher accepts the draft's guesses and on what a draft step
#   costs compared with a teacher step. Notebook 16 measured it on its own: drafts distilled
#   on the teacher's own output (`student-draft`, 3 blocks, and `student-draft-2layer`, 2)
#   agree with the teacher on 99.7% and 99.6% of tokens and make speculation pay on a CPU,
#   the cheaper 2-block draft most. The compressed draft here drifts from the teacher, and
#   in the table above (on the machine that built this notebook) speculating with it made
#   the teacher slower, not faster.
#
# ## 3. The Pareto front
#
# A stack *dominates* another if it is at least as good on every objective and strictly
# better on one. The Pareto front is the set no other stack dominates: the only stacks worth
# choosing, whatever weight you give to latency, memory and quality. Here: latency, weight
# memory and perplexity, all to be minimised.

# %%
labkit.show_source(capstone.dominates)
labkit.show_source(capstone.pareto_front)

# %%
# NBVAL_IGNORE_OUTPUT
objectives = {"latency_ms": "min", "weight_mb": "min", "perplexity": "min"}
front = capstone.pareto_front(rows, objectives)
print("on the front (latency, memory, perplexity):", ", ".join(r["name"] for r in front))
print("dominated:", ", ".join(r["name"] for r in rows if r not in front) or "none")
points = [{**r, "label": r["name"].removeprefix("+ ")} for r in rows]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, (x, size) in zip(axes, [("latency_ms", "weight_mb"), ("weight_mb", "latency_ms")]):
    title = f"perplexity vs {x.split('_')[0]} (area ~ {size.split('_')[0]})"
    plots.tradeoff(points, x, "perplexity", size, label="label", ax=ax, higher_y_is_better=False, title=title)
plt.tight_layout()
plt.show()

# %% [markdown]
# Each panel's dashed line is the front of that panel's two objectives alone; the
# three-objective front printed above can hold a point that no single panel favours (the
# smallest model, say, even if it is not the fastest).
#
# ## 4. Where the time goes
#
# `torch.profiler` records every operator PyTorch runs, with its *self* time (its own,
# without the operators it calls, so nothing is counted twice). `capstone.profile` groups
# them, and adds what the profiler does not see: time spent outside any operator — the
# Python interpreter walking the modules, argument checks, building the cache views. The
# profiler costs time of its own at every operator, so a profiled run is slower than the
# timings above and part of the "outside" share is the profiler itself: compare shares
# between stacks, not the profiled milliseconds with section 2's.

# %%
# NBVAL_IGNORE_OUTPUT
profiles = {}
for stack in (stacks[0], stacks[1], stacks[3]):
    profiles[stack.name] = capstone.profile(lambda stack=stack: stack.generate(prompt, 32))
for name, p in profiles.items():
    print(f"{name}: {p['wall_ms']:.1f} ms for 32 tokens")
    for g in p["groups"]:
        print(f"   {g['group']:<46} {g['self_ms']:7.2f} ms  {g['share']:6.1%}")
print("\ntop operators of the compressed model (+ quantize):")
for op in profiles["+ quantize"]["ops"][:6]:
    print(f"   {op['op']:<50} {op['calls']:5d} calls {op['self_ms']:7.2f} ms  {op['share']:6.1%}")
groups = [g["group"] for g in profiles["tiny (teacher)"]["groups"]]
fig, ax = plt.subplots(figsize=(10, 2.8))
left = [0.0] * len(profiles)
for group in groups:
    widths = [next((g["self_ms"] for g in p["groups"] if g["group"] == group), 0.0) for p in profiles.values()]
    ax.barh(list(profiles), widths, left=left, label=group)
    left = [a + b for a, b in zip(left, widths)]
ax.set(xlabel="ms for 32 tokens (profiled)", title="where decoding time goes")
ax.invert_yaxis()
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
plt.show()
teacher_profile = profiles["tiny (teacher)"]
f = next(g["share"] for g in teacher_profile["groups"] if g["group"] == "matmul")
print(
    f"matmuls are f = {f:.0%} of the teacher's time here: removing ALL of them would make it at most "
    f"{1 / (1 - f):.2f}x faster (Amdahl)"
)

# %% [markdown]
# At batch 1, a model this small spends a large share of its time outside the arithmetic (the
# shares printed above): in operators that move or reshape data, and outside operators
# altogether. Techniques that
# shrink the matrices can only act on the matmul share; fewer layers (distillation) removes
# every kind of cost at once. On a GPU, or with a model a hundred times larger, the matmul
# share grows and pruning and quantization matter more.
#
# ## 5. Searching for an architecture under a latency budget
#
# Distillation chose the student's shape by hand (half the teacher's layers). A small
# *neural-architecture search* chooses it by measurement: over LabGPT shapes (layers, heads,
# width), find the lowest perplexity among those whose decoding latency fits a **budget
# measured on this machine** — here, the student's own latency. A candidate over budget is
# rejected *before* any training (measuring latency takes a fraction of a second; training
# takes the rest). The search is evolutionary (as in Real et al., 2019, much reduced): a
# random first generation, then each generation mutates the better half of the accepted
# candidates, one field at a time.

# %%
labkit.show_source(capstone.search)

# %% [markdown]
# A live search, deliberately short: 4 candidates per generation, 2 generations, 40
# training steps each, a 128-character context.

# %%
# NBVAL_IGNORE_OUTPUT
budget = capstone.decode_latency(capstone.candidate_config({"n_layer": 3}))  # the student's shape
print(f"budget: {1e3 * budget:.3f} ms/token (the student's shape, measured now)")
live = capstone.search(budget, population=4, generations=2, seed=0)
for r in live["history"]:
    ppl = f"{r['perplexity']:6.2f}" if r["accepted"] else "  (rejected: over budget, not trained)"
    print(
        f"gen {r['generation']}: {r['n_layer']} layers, {r['n_head']} heads, width {r['n_embd']:>3}: "
        f"{r['latency_ms']:.3f} ms/token, perplexity {ppl}"
    )
best = live["best"]
print(f"best: {best['n_layer']} layers, {best['n_head']} heads, width {best['n_embd']}" if best else "nothing fits")

# %% [markdown]
# Forty steps is a poor *proxy* for a full training run: it rewards the shapes that learn
# fastest at first, which need not be the shapes that end up best. The long run
# (`tools/nas_search.py`: 250 steps of 16 × 256 characters for each candidate, 6 per
# generation, 3 generations; every shape's latency measured first, the fastest of three
# passes) was made offline on the kit's 2-core test machine:

# %%
nas = json.loads((labkit.DATA_DIR / "nas_results.json").read_text())
print(
    f"{nas['command']}\n{nas['machine']}, torch {nas['torch']}, {nas['wall_time_s'] / 60:.0f} minutes; "
    f"budget {nas['budget_ms']:.3f} ms/token"
)
accepted = [r for r in nas["history"] if r["accepted"]]
print(
    f"{len(nas['history'])} candidates, {len(accepted)} within budget, "
    f"{len(nas['history']) - len(accepted)} rejected without training"
)
print(
    f"the shipped student-distilled (3 layers, 6 heads, width 192) on the same text: "
    f"perplexity {nas['student_distilled_perplexity']:.3f}"
)
for r in sorted(accepted, key=lambda r: r["perplexity"])[:5]:
    print(
        f"  {r['n_layer']} layers, {r['n_head']} heads, width {r['n_embd']:>3}: perplexity {r['perplexity']:.3f}, "
        f"{r['latency_ms']:.3f} ms/token (generation {r['generation']})"
    )
fig, ax = plt.subplots(figsize=(6, 3.5))
for gen in sorted({r["generation"] for r in nas["history"]}):
    mine = [r for r in accepted if r["generation"] == gen]
    ax.scatter([r["latency_ms"] for r in mine], [r["perplexity"] for r in mine], label=f"generation {gen}")
rejected = [r for r in nas["history"] if not r["accepted"]]
ax.scatter(
    [r["latency_ms"] for r in rejected],
    [min(r["perplexity"] for r in accepted)] * len(rejected),
    marker="x",
    color="gray",
    label="rejected (not trained)",
)
ax.axvline(nas["budget_ms"], color="k", lw=0.8, ls="--", label="budget")
ax.set(xlabel="ms/token (batch 1)", ylabel="perplexity after 250 steps", title="evolutionary search, offline")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# Read the latencies first: on this CPU at batch 1, depth costs far more than width (each
# layer adds a fixed cost of many small operations), so the budget is mostly a budget on
# depth. Then the
# perplexities: each candidate saw about one million characters, the shipped student 360
# million tokens, and even this "long" run is a proxy that favours shapes that learn fast
# (compare the winner's depth with the student's). The search ranks shapes cheaply and rules
# out the slow ones without training them; the winner still needs a full training run before
# it can be compared with the student. Better proxies (longer runs, shared weights, learning
# curves extrapolated) are most of what the NAS literature is about.
#
# ## 6. Deployment: `torch.export`
#
# To run on a device without this repository, export the compressed model: `torch.export`
# traces the forward into a graph of ATen operators with the weights attached, checks it for
# Python-only behaviour, and `torch.export.save` writes it to one file. The sequence length is
# left dynamic (1 … 512), so one program serves every prompt.

# %%
compressed = stacks[3].model  # distilled, pruned, int8 weights
program = capstone.export_decoder(compressed)
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "labgpt_compressed.pt2"
    torch.export.save(program, path)
    size_mb = path.stat().st_size / 1e6
    loaded = torch.export.load(path)
idx = tokenizer.tensor("Compute each sum.\n12 + 30 =>")
exported = loaded.module()  # an nn.Module that runs the graph; no LabGPT code involved
with torch.no_grad():
    difference = (exported(idx) - compressed(idx)).abs().max().item()
print(f"exported logits equal the eager model's (max |difference| {difference:.1e} <= 1e-5): {difference <= 1e-5}")
exported_tokens = capstone.generate_exported(loaded, idx, 6)
print(
    "greedy answer from the exported program:",
    repr(tokenizer.decode(exported_tokens[0, idx.size(1) :].tolist())),
    "| same as eager:",
    torch.equal(exported_tokens, compressed.generate(idx, 6, temperature=0)),
)

# %%
# NBVAL_IGNORE_OUTPUT
calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
kinds = sorted({c.split(".")[1] for c in calls if c.startswith("aten.")})
print(f"the graph: {len(calls)} operator calls of {len(kinds)} kinds ({', '.join(kinds[:10])}, ...)")
print(
    f"the file: {size_mb:.2f} MB (the fp32 student's weights alone: {labkit.quant.weight_bytes(stacks[1].model) / 1e6:.2f} MB)"
)
with torch.no_grad():
    timing = labkit.bench.compare(
        {"eager model": lambda: compressed(idx), "exported program": lambda: exported(idx)}, warmup=2, repeat=10
    )

# %% [markdown]
# The exported program runs the same operators as the eager model: with no compiler behind
# it there is no reason for it to be faster (the ratio above is this machine's). What export
# buys is a self-contained artefact. It is a pure function of the tokens: the KV cache is
# state, which an exported forward would have to take and return as tensors, so
# `generate_exported` re-runs the whole sequence for every token (the O(n²) loop of
# notebook 16). A deployment would
# export a prefill and a one-token decode step that take and return the cache, and hand the
# program to a runtime for the device (ExecuTorch on phones, AOTInductor on servers).
#
# ## 7. Explore: your own stack
#
# Tick the steps you want; the stack is built and measured against the teacher. (With the
# default ticks it is the stack above without early exit and speculation. The prune step
# fine-tunes 30 steps, a few seconds.)


# %%
# NBVAL_IGNORE_OUTPUT
def experiment(fig, distill, prune, sparsity, quantize, early_exit, speculate, threshold):
    chosen = [s for s, on in zip(capstone.STEPS, (distill, prune, quantize != "none", early_exit, speculate)) if on]
    scheme = quantize if quantize != "none" else "int8_weight_only"
    built = capstone.build_stack(chosen, sparsity=sparsity, scheme=scheme, threshold=threshold, progress=False)
    pair = [built[0], built[-1]] if chosen else built
    measured = capstone.measure_stack(pair, tokenizer, n_per_task=10, new_tokens=48, repeat=3, progress=False)
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(
        axes, ("latency_ms", "weight_mb", "perplexity"), ("ms/token", "weights MB", "perplexity")
    ):
        ax.bar(["teacher", "your stack"][: len(measured)], [r[key] for r in measured], color=["#999", "#4a8"])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    r = measured[-1]
    return (
        f"steps: {' -> '.join(chosen) or 'none'} | {r['speedup']:.2f}x the teacher's speed, "
        f"{r['weight_mb']:.2f} MB, perplexity {r['perplexity']:.3f}, accuracy {r['accuracy']:.0%}"
    )


widgets.explore(
    experiment,
    figsize=(9, 2.8),
    distill=True,
    prune=True,
    sparsity=(0.0, 0.75, 0.125, 0.25),
    quantize=["int8_weight_only", "w8a8", "int4_weight_only", "none"],
    early_exit=False,
    speculate=False,
    threshold=(0.5, 1.0, 0.05, 0.95),
)

# %% [markdown]
# ## 8. Exercise
#
# **Pareto dominance.** `a` and `b` are tuples of objectives to *minimise* (say latency,
# memory, perplexity). Return whether `a` dominates `b`. Then the front is every point that
# no other point dominates.


# %%
def dominates(a, b):
    return all(x <= y for x, y in zip(a, b))  # your code: what if a and b are equal?


passed = check.dominates(dominates)

# %%
# the measured stacks, plus a copy of the first: two stacks that measure the same (a tie) must both stay
tied_rows = rows + [dict(rows[0])]
measured_points = [(r["latency_ms"], r["weight_mb"], r["perplexity"]) for r in tied_rows]
my_front = [p for i, p in enumerate(measured_points) if not any(dominates(q, p) for j, q in enumerate(measured_points) if j != i)]
kit_front = capstone.pareto_front(tied_rows, objectives)
same = sorted(my_front) == sorted((r["latency_ms"], r["weight_mb"], r["perplexity"]) for r in kit_front)
print("your front equals capstone.pareto_front's (the tie included):", same)  # the front's size depends on timings

# %% [markdown]
# **Take-aways.** Techniques stack, but their gains multiply only as measured on the
# machine that serves: at batch 1 on a CPU, fewer layers beat fewer or smaller weights,
# because most of the time is not spent multiplying. Each step trades something (quality
# for pruning and exits, speed on some hardware for quantization, memory for speculation),
# and the Pareto front is the honest summary of which combinations are worth having. A
# search under a measured budget ranks shapes cheaply and rules out the slow ones before
# any full training run (its winner still needs one); exporting makes the result runnable
# without the code that made it.
#
# **References.** Hinton, Vinyals & Dean (2015), *Distilling the knowledge in a neural
# network*. Han, Mao & Dally (2016), *Deep compression*. Schuster et al. (2022), *Confident
# adaptive language modeling* (CALM). Leviathan, Kalman & Matias (2023), *Fast inference from
# transformers via speculative decoding*. Real et al. (2019), *Regularized evolution for image
# classifier architecture search*. Elsken, Metzen & Hutter (2019), *Neural architecture
# search: a survey*. PyTorch documentation: `torch.profiler`, `torch.export`.
