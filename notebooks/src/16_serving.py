# %% [markdown]
# # 16 · Serving: the KV cache, continuous batching, speculative decoding, energy
#
# **Goals.** Measure what the KV cache saves as answers get longer; serve a stream of
# requests with static and with continuous batching on the real model and compare
# throughput and tail latency; make greedy decoding faster with a draft model without
# changing a single output token; and count joules per token.
#
# **Expected run time.** About 2 minutes on the kit's 2-core test CPU (a laptop may take twice as long).
#
# The survey stops at the model; this lab is what serving it takes. Everything runs LabGPT
# `tiny` (the target) and `student-distilled` (the draft, notebook 10), then `student-draft`,
# the same student distilled again for drafting, and `student-draft-2layer`, a shallower cut of it.

# %%
import matplotlib.pyplot as plt
import torch

import labkit
from labkit import bench, check, distill, hardware, serving, widgets

labkit.seed_everything(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
model, tok = labkit.load_model("tiny")
draft, _ = labkit.load_model("student-distilled")

# %% [markdown]
# ## 1. The KV cache: O(n) instead of O(n²)
#
# Without a cache, token `n` re-runs the model on all `n` tokens before it: generating `n`
# tokens costs `1 + 2 + … + n ≈ n²/2` positions. With the cache, each layer keeps its keys
# and values and token `n` costs one position (plus reading `n` cached keys, cheap at this
# size): `n` positions in all. On log-log axes the first tends to a line of slope 2, the
# second to slope 1. At short lengths both are flatter: a fixed cost per call (the prompt,
# Python, the first step) weighs more there, so the slope fitted over the two longest runs
# is closer to the asymptote than the one fitted over all four (both are printed).

# %%
# NBVAL_IGNORE_OUTPUT
rows = serving.decode_scaling(model, lengths=(32, 64, 128, 496), prompt_len=16, repeat=1)
for r in rows:
    print(f"{r['tokens']:>4} tokens: cached {1e3 * r['cached_s']:7.1f} ms, uncached {1e3 * r['uncached_s']:8.1f} ms, "
          f"{r['speedup']:5.1f}x")
ns = [r["tokens"] for r in rows]
slope_c = serving.fit_power(ns, [r["cached_s"] for r in rows])
slope_u = serving.fit_power(ns, [r["uncached_s"] for r in rows])
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.loglog(ns, [r["uncached_s"] for r in rows], "o-", label=f"no cache (slope {slope_u:.2f})")
ax.loglog(ns, [r["cached_s"] for r in rows], "o-", label=f"KV cache (slope {slope_c:.2f})")
ax.set(xlabel="tokens generated", ylabel="seconds", title="LabGPT tiny, greedy, this CPU")
ax.set_xticks(ns, [str(n) for n in ns])
ax.xaxis.set_minor_formatter(plt.NullFormatter())
ax.legend()
plt.show()
print(f"slopes over all four lengths: no cache {slope_u:.2f}, cache {slope_c:.2f}; over the two longest: no cache "
      f"{serving.fit_power(ns[-2:], [r['uncached_s'] for r in rows[-2:]]):.2f}, cache "
      f"{serving.fit_power(ns[-2:], [r['cached_s'] for r in rows[-2:]]):.2f}")
print(f"512-token context (16 prompt + 496 new): the cache is {rows[-1]['speedup']:.1f}x faster "
      f"(the bar: at least 5x): {rows[-1]['speedup'] >= 5}")

# %% [markdown]
# ### On a GPU, the cached step is bound by how many kernels it launches
#
# At batch 1 a step reads every weight once and does 2 FLOPs with each, so a GPU should
# decode at its memory bandwidth: GPT-2-small in bf16 reads about 255 MB a token, 85 µs at an
# H100's 3 TB/s. The kit measured 11.8% of that bound with the step replayed from a CUDA graph,
# and 16.2% with it compiled by `torch.compile` first (the recorded run printed below).
# Count what one step runs:

# %%
prompt = tok.encode("Q: 12 + 30 = ")
cache = serving.SlotCache(model, 1)
cache.admit(model, 0, prompt)
with torch.no_grad():
    ops = serving.count_ops(lambda: serving.decode_step(model, cache, slice(None), torch.tensor([5])))
n_layer, total = model.config.n_layer, sum(ops.values())
print(f"one decode step of tiny ({n_layer} layers): {total} operators, about {total / n_layer:.0f} a layer")
print(", ".join(f"{name} {calls}" for name, calls in ops.items()))

# %% [markdown]
# Counting is not timing. `bench.kernel_profile` runs a function under `torch.profiler` and
# says, per call, how long its operators (on a GPU: its kernels) were busy, how long nothing
# ran (launch gaps, Python), and which took longest. On a CPU it lists every top-level
# operator, views and reshapes included, which `count_ops` leaves out because they launch no
# kernel: so it counts more. And the profiler costs time at every operator: its wall time is
# longer than the step's own (printed beside it), and much of "between them" is the profiler.

# %%
# NBVAL_IGNORE_OUTPUT
with torch.no_grad():
    step = lambda: serving.decode_step(model, cache, slice(None), torch.tensor([5]))  # noqa: E731
    profile = bench.kernel_profile(step, steps=20)
    unprofiled = bench.measure(step, warmup=3, repeat=20).median_s
print(f"one step, profiled: {profile['wall_s'] * 1e3:.2f} ms (unprofiled {unprofiled * 1e3:.2f} ms), operators busy "
      f"{profile['busy_s'] * 1e3:.2f} ms, between them {profile['idle_s'] * 1e3:.2f} ms, "
      f"{profile['launches']:.0f} top-level operators")
for k in profile["kernels"][:6]:
    print(f"  {k['seconds'] * 1e6:7.1f} us  x{k['calls']:.0f}  {k['name']}")

# %% [markdown]
# `benchmarks/gpu_check_serving.py` prints the same profile for each way of decoding on a
# GPU, where the gaps between kernels are what the fused step exists to close.

# %% [markdown]
# On a GPU each operator is at least one kernel, and a kernel costs a few microseconds even
# replayed from a graph, while the bytes of most of these take well under one. The fix this
# points to is fewer, fatter kernels. `serving.fused_decode_step` runs a layer in three Triton kernels
# (`labkit/kernels/decode_kernels.py`): LayerNorm computed inside the qkv GEMV, whose epilogue
# also writes the new key and value into the cache; each head's attention over its cache
# times that head's slice of the output projection, added into the residual stream; and
# the whole MLP, each program taking a block of hidden units through both linears. Even the
# greedy choice happens inside: with `next_tokens=`, the last GEMV folds each block's largest
# logit (packed with its index into one int64) into the row's best by atomic max, and one
# small kernel writes the winner into the next step's token, so the step feeds itself. On this
# CPU the same chain runs each kernel's PyTorch reference, and gives the same tokens:

# %%
backend = None if torch.cuda.is_available() else "reference"  # the Triton interpreter would take minutes here
cache = serving.SlotCache(model, 1)
token = cache.admit(model, 0, prompt).argmax().view(1)
fused = [int(token)]
for _ in range(23):
    serving.fused_decode_step(model, cache, token, backend=backend, next_tokens=token)  # token: overwritten in place
    fused.append(int(token))
with torch.no_grad():
    alone = model.generate(torch.tensor([prompt]), 24, temperature=0)[0, len(prompt) :].tolist()
path = "Triton kernels" if torch.cuda.is_available() else "the kernels' PyTorch references"
print(f"fused step ({path}): the same 24 tokens as model.generate: {fused == alone}")
print(f"launches a token: {3 * n_layer + 3} fused (3 a layer, embedding, head, greedy choice) against {total} "
      "operators eager")  # fmt: skip

# %% [markdown]
# Fewer kernels is half of it; each kernel also needs its launch configuration (outputs per
# program, warps, positions per step). The first GPU run tuned each kernel alone, launched
# again and again from Python, and the choice was noise: at a few microseconds a kernel, such
# a loop measures the launch, not the GPU. `serving.tune_fused_decode_step` tunes on what
# decoding runs: whole steps, captured in a CUDA graph and replayed (`bench.graph_seconds`),
# at the context length decoding will average, one kernel's candidates at a time. The runs
# recorded in the repository (an H100; `benchmarks/RESULTS.md` tells the story of each):

# %%
first, tuned = (bench.recorded_results(f"gpu_results_serving_h100_1127_run{n}.json") for n in (1, 4))
if first is not None and tuned is not None:
    print(f"{first['device']}: roofline {first['roofline_tokens_per_s']:.0f} tokens/s (bandwidth / bytes a token)")
    rows = [("CUDA graph of the eager step", first["cuda_graph"]),
            ("torch.compile step, CUDA graph", first["compiled_cuda_graph"]),
            ("fused, each kernel tuned alone", first["fused_cuda_graph"]),
            ("fused, tuned on whole steps, greedy inside", tuned["fused_tuned_greedy_cuda_graph"])]  # fmt: skip
    for name, r in rows:
        print(f"  {name:42s} {r['tokens_per_s']:6.0f} tokens/s = {100 * r['fraction_of_roofline']:4.1f}% of the "
              f"roofline; same tokens as generate: {r['agreement_with_generate'] == 1.0}")  # fmt: skip
    best = tuned["fused_tuned_greedy_cuda_graph"]["fraction_of_roofline"]
    print(f"the bar (40% of the roofline) {'met' if best >= 0.4 else 'not met'}: {100 * best:.1f}%")
    profile = tuned["fused_tuned_greedy_cuda_graph"]["profile"]
    print(f"a token of the last, profiled: kernels busy {profile['busy_s'] * 1e6:.0f} us; by kernel (overlapping):")
    for k in profile["kernels"][:5]:
        print(f"  {k['seconds'] * 1e6:6.1f} us  x{k['calls']:.0f}  {k['name']}")
else:
    print("the recorded GPU runs are not beside this install (benchmarks/ of the repository)")

# %% [markdown]
# Still short of the bar. The profile says where the time goes (with programmatic dependent
# launch each kernel starts while the one before it finishes, so their times overlap and add
# up to more than the token): the MLP kernel, whose programs all add into one row of 768
# outputs; the GEMVs; and the attention, which looped over the positions one block after
# another once its wait was over. Since that run (not yet measured on a GPU), each kernel
# loads more before it waits for the one before it: what no kernel of the step writes, i.e. the
# LayerNorm's weight and bias, and the keys and values of the earlier positions. After the
# wait it makes fewer round trips to memory: the row to normalize, once, not three times;
# the new key and value (and positions past the first tile, in a loop as before).
# Compiled here for an H100 (Triton carries NVIDIA's assembler), `ptx.loads_around_wait`
# counts the load instructions on each side of the wait (instructions in the code, not
# loads executed), and `ptx.grid_dependency_order` checks that each kernel lets the next one
# launch only after its own wait:

# %%
# NBVAL_IGNORE_OUTPUT
try:
    from labkit.kernels import decode_kernels as dk
    from labkit.kernels.ptx import kernel_report

    qkv = dict(C=768, HS=64, SPLITS=8, HAS_BIAS=True, GELU=False, ACCUMULATE=False, KV_WRITE=True, ZERO=True, BLOCK_N=8,
               BLOCK_K=1024, SPLIT_K=1, USE_PDL=True, PREFETCH=True, ARGMAX=False)  # GPT-2-small's, one tile a row
    heads = dict(H=12, HS=64, BLOCK_D=64, BLOCK_N=128, HAS_BIAS=True, USE_PDL=True)
    compiled = {
        "qkv GEMV without a LayerNorm": dk.gpu_spec("linear_kernel", PROLOGUE=0, **qkv),
        "qkv GEMV with its LayerNorm": dk.gpu_spec("linear_kernel", PROLOGUE=1, **qkv),
        "attention+projection, first tile 64 positions": dk.gpu_spec("attention_proj_kernel", 4, BLOCK_T=64, **heads),
        "attention+projection, first tile 256 positions": dk.gpu_spec("attention_proj_kernel", 8, BLOCK_T=256, **heads),
        "the whole MLP, 32 hidden units a program": dk.mlp_spec(dk.MLPConfig(32, 1024, 8)),
        "the MLP, rows as 512 + 256 columns": dk.mlp_spec(dk.MLPConfig(32, 1024, 8, tail=True)),
        "the MLP, 24 units a program (128 programs)": dk.mlp_spec(dk.MLPConfig(32, 1024, 8, tail=True, per_sm=1)),
    }  # fmt: skip
    print(f"{'kernel (sm_90)':<48} {'loads before':>12} {'after the wait':>15} {'registers':>10}  order")
    for name, r in zip(compiled, kernel_report("labkit.kernels.decode_triton", list(compiled.values()))):
        print(f"{name:<48} {r['loads']['before']:>12} {r['loads']['after']:>15} {r['registers']:>10}  {r['pdl']}")
except (ImportError, RuntimeError, OSError) as err:  # no triton, or a wheel without NVIDIA's tools
    print(f"cannot compile for a GPU here ({type(err).__name__}): see benchmarks/RESULTS.md")

# %% [markdown]
# With its LayerNorm, the qkv GEMV loads as often after the wait as without one: the
# LayerNorm's weight and bias come before it, the row once after. A longer first tile puts
# more of the attention's loads before the wait. Its count after the wait grows too, but
# those loads sit in the loop over positions past the first tile, which does not run at all
# while a row has fewer positions than the tile. These are instructions in the code; what
# they are worth in time is for `benchmarks/gpu_check_serving.py` to measure on your GPU.
#
# The MLP's rows are 768 columns wide, held in a tile of 1024 (Triton's tiles are powers of
# two): a quarter of the tile is masked, loads nothing, and still takes registers. An SM has
# 65,536 of them, and they decide how many programs share it: a program of 256 threads at
# 255 registers (the most a thread may have) takes them all, so no program of the next
# kernel can start beside it and load its weights early. Held as two tiles of 512 + 256
# columns, the same bytes need fewer registers (the table's last two rows; the counts depend
# on the Triton version too, and `tools/compile_sweep.py` lists them for every config). The
# last row also deals the 3,072 hidden units evenly over an H100's 132 SMs: 24 a program,
# 128 programs, where 32 a program make 96 and leave 36 SMs without work. Whether that wins
# is for the GPU's own tuner to say: these configs are among the ones it times (not yet
# measured on a GPU).

# %% [markdown]
# The cache costs memory: `2 × layers × heads × head size × tokens` numbers per sequence
# (notebook 00 counted it). The next two sections are about spending that memory well.
#
# ## 2. Batching: static vs continuous
#
# A server gets requests at random times, with prompts and answers of very different
# lengths. Decoding one token for 8 sequences at once costs little more than for one (the
# weights are read once per step), so servers batch. Two policies:
#
# * **static**: take up to 8 waiting requests, decode them as one fixed batch until the
#   *longest* is done, then take the next 8. A request that finished early holds its row
#   (padding) and the requests that arrived meanwhile wait.
# * **continuous** (iteration-level, Orca / vLLM): after every step, a finished request's
#   slot is given to a waiting one. Each sequence has its own position and its own cache
#   row; one batched step serves them all.
#
# The workload: Poisson arrivals; 85% short answers (4–16 tokens), 15% long ones
# (96–192): the high variance of real chat traffic.

# %%
labkit.show_source(serving.decode_step)

# %% [markdown]
# First, correctness: every request must come back exactly once, with exactly the tokens
# `model.generate` gives it alone.

# %%
small = serving.make_workload(12, rate=100.0, seed=1)
reference = serving.reference_outputs(model, small)
for policy in ("static", "continuous"):
    out = serving.serve(model, small, policy, max_batch=4)
    same = all(r.output == reference[r.rid] for r in out["requests"])
    print(f"{policy:>10}: {len(out['requests'])} requests served once each: "
          f"{sorted(r.rid for r in out['requests']) == list(range(12))}; outputs equal to decoding alone: {same}")

# %% [markdown]
# Now the measurement: throughput (generated tokens per second) and p50 / p95 latency
# (arrival to last token) as the offered load grows. The server's clock advances by the
# real time of each model step on this machine; arrivals are placed on that clock.

# %%
# NBVAL_IGNORE_OUTPUT
loads = [4.0, 64.0]
results = {p: [] for p in ("static", "continuous")}
for rate in loads:
    work = serving.make_workload(48, rate=rate, long=(96, 192), seed=0)
    for policy in results:
        results[policy].append(serving.serve(model, work, policy, max_batch=8))
for i, rate in enumerate(loads):
    s, c = results["static"][i], results["continuous"][i]
    print(f"load {rate:>4.0f} req/s: static {s['throughput']:6.1f} tok/s p95 {s['p95_latency']:5.2f} s | "
          f"continuous {c['throughput']:6.1f} tok/s p95 {c['p95_latency']:5.2f} s | "
          f"throughput x{c['throughput'] / s['throughput']:.2f}")
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
for policy, rs in results.items():
    a1.plot(loads, [r["throughput"] for r in rs], "o-", label=policy)
    a2.plot(loads, [r["p95_latency"] for r in rs], "o-", label=f"{policy} p95")
    a2.plot(loads, [r["p50_latency"] for r in rs], "o--", label=f"{policy} p50", alpha=0.6)
a1.set(xscale="log", xlabel="offered load (requests/s)", ylabel="tokens/s", title="throughput")
a2.set(xscale="log", xlabel="offered load (requests/s)", ylabel="seconds", title="latency")
a1.legend()
a2.legend(fontsize=7)
plt.tight_layout()
plt.show()
hi_s, hi_c = results["static"][-1], results["continuous"][-1]
print(f"at the highest load: continuous/static throughput = {hi_c['throughput'] / hi_s['throughput']:.2f} "
      f"(bar: >= 2), p95 {hi_c['p95_latency']:.2f} s vs {hi_s['p95_latency']:.2f} s (bar: equal or better); "
      f"slots busy: {hi_c['slot_utilisation']:.0%} vs {hi_s['slot_utilisation']:.0%}")

# %% [markdown]
# At low load both policies idle between requests and look alike. Under load, static
# batching's slots sit idle behind each batch's longest answer (low slot utilisation),
# and queued requests wait for the whole batch: at high load its throughput falls far
# behind and its latency climbs. Continuous batching keeps the slots full. (Two loads keep
# this cell short; the widget in section 5 sets others.)
#
# ## 3. Speculative decoding: faster, and the same tokens
#
# Each round the draft proposes `k` tokens (`k` cheap steps); the target runs **once** on
# all of them and gives its own greedy choice after every prefix. The agreeing prefix is
# kept, plus the target's token at the first disagreement (or a bonus token after `k`
# hits), so every kept token is exactly what the target alone would have chosen. With
# acceptance rate α and a draft step costing `c` target steps, a round yields
# `(1 − α^(k+1)) / (1 − α)` tokens for `k·c + 1` steps of work (Leviathan et al., 2023).

# %%
labkit.show_source(serving.speculative_generate)

# %%
prompt = torch.tensor([tok.encode("Once upon a time")])
with torch.no_grad():
    plain = model.generate(prompt, 120, temperature=0)
    stats = {}
    fast = serving.speculative_generate(model, draft, prompt, 120, k=4, stats=stats)
print("identical to the target alone:", torch.equal(plain, fast))
print(f"acceptance at k=4: {stats['acceptance']:.2f} ({stats['accepted']} of {stats['proposed']} guesses)")
print(tok.decode(fast[0].tolist())[:200])

# %% [markdown]
# ### The draft's acceptance rate, and a draft distilled for it
#
# Speed hangs on α, and α on the text. We measure on the kind of text LabGPT serves:
# openings of held-out documents of its task mixture (`serving.held_out_prompts`), each continued
# for 128 tokens. A proposal is accepted exactly when it is the target's greedy choice, so
# α is the draft's top-1 agreement with the target *on the target's own output*:
# `serving.greedy_agreement` counts it directly.
#
# `student-distilled` learned from the teacher on corpus text (notebook 10). A draft is
# better served by learning on what it will be asked to predict: the target's own
# continuations (on-policy data, as in DistillSpec, Zhou et al., 2023). `student-draft` is
# `student-distilled` tuned that way for 500 steps (`tools/train_draft.py`, 8 minutes on
# the kit's 2-core CPU): cross-entropy against the target's greedy tokens plus KL from its
# distribution, on 2,048 of its continuations of training-mixture prompts.
#
# The other lever is the draft's cost `c`. A draft step runs every block of the draft once,
# so a shallower draft is cheaper. `student-draft-2layer` is `student-draft` with its middle
# block cut out (`distill.keep_layers(tuned, [0, 2])`: blocks 0 and 2, embeddings and head
# as they were), tuned the same way again for 2,000 steps (`tools/train_draft.py --draft
# student-draft --layers 0,2 --steps 2000 --out data/student-draft-2layer.safetensors`,
# 9 minutes on the kit's 2-core CPU). Cutting a block costs agreement (α falls to
# 0.35 on the held-out prompts before tuning, in `data/student-draft-2layer.history.json`),
# and tuning wins most of it back.

# %%
labkit.show_source(distill.distill_draft)

# %%
from labkit.evaluation import perplexity  # noqa: E402
from labkit.train import validation_text  # noqa: E402

workload = serving.held_out_prompts(6)  # openings of 6 held-out documents, 24 to 44 characters
tuned, _ = labkit.load_model("student-draft")
shallow, _ = labkit.load_model("student-draft-2layer")
drafts = {"student-distilled": draft, "student-draft": tuned, "student-draft-2layer": shallow}
print({name: f"{d.config.n_layer} blocks" for name, d in drafts.items()}, "target:", model.config.n_layer, "blocks")
alpha = {name: serving.greedy_agreement(model, d, workload, 128) for name, d in drafts.items()}
text = validation_text(20_000)
for name, a in alpha.items():
    print(f"{name:18s} alpha = {a:.3f}: it misses one target token in {1 / (1 - a):.0f}; "
          f"perplexity on held-out corpus text {perplexity(drafts[name], tok, text):.3f}")  # fmt: skip

free_form = [tok.tensor(s).view(1, -1) for s in ("Once upon a time", "The weather today", "My favourite food is")]
print("on free-form prompts unlike the training mixture: " + ", ".join(
    f"{name} alpha = {serving.greedy_agreement(model, d, free_form, 128):.3f}" for name, d in drafts.items()))

# %% [markdown]
# `student-draft` predicts the target far better than `student-distilled` and the corpus a
# little worse: it traded modelling text for modelling the target's choices, which is all a
# draft is for. It learned them on the kind of text it serves; on text unlike it, α falls for
# every draft (the 2-block one's to about `student-distilled`'s), and by the formula so does
# the gain. The 2-block draft goes further: it agrees with the target almost as often,
# yet as a model of the corpus it is far worse (its perplexity, printed above). Whether the
# cut or the tuning cost it that, these numbers do not say; for a draft it does not matter.
#
# A draft also knows when it is unsure. With `stop_below`, a round ends as soon as the
# draft's top probability drops below the threshold (a doubtful guess is likely wrong, and
# every guess after it is wasted), so `k` becomes a ceiling: long rounds where the text is
# predictable, short ones where it is not.

# %% [markdown]
# Speed against the target decoding alone, for several `k`, all three drafts, side by side: three
# interleaved rounds over the whole workload, medians (a burst of other work on the machine
# slows every variant alike). The estimate is Leviathan's formula with the measured α and
# `c` (a draft step's cost in target steps, from whole `generate` calls).

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.bench import compare_rounds, measure  # noqa: E402

ks, n_new = (2, 4, 8, 16), 128
variants = {"target alone": lambda: [model.generate(p, n_new, temperature=0) for p in workload]}
for name, d in drafts.items():
    for k in ks:
        variants[f"{name}, k={k}"] = lambda d=d, k=k: [serving.speculative_generate(model, d, p, n_new, k) for p in workload]
for name in ("student-draft", "student-draft-2layer"):
    variants[f"{name}, k<=32, stop below 0.5"] = lambda d=drafts[name]: [
        serving.speculative_generate(model, d, p, n_new, 32, stop_below=0.5) for p in workload]  # fmt: skip
with torch.no_grad():
    t_target = measure(lambda: model.generate(workload[0], 64, temperature=0), warmup=1, repeat=3).median_s
    cost = {name: measure(lambda: d.generate(workload[0], 64, temperature=0), warmup=1, repeat=3).median_s / t_target
            for name, d in drafts.items()}  # fmt: skip
    rows = compare_rounds(variants, rounds=3, repeat=1, warmup=0, suite="serving")
    cache = model.new_cache(1)
    model(workload[0], cache=cache)

    def verify(n_tokens):  # the target on n_tokens new tokens after a cached prompt
        cache.crop(workload[0].size(1))
        model(workload[1][:, :n_tokens], cache=cache)

    step_s = measure(lambda: verify(1), warmup=3, repeat=15).median_s
    verify_cost = {k: measure(lambda k=k: verify(k + 1), warmup=3, repeat=15).median_s / step_s for k in ks}
print("a verify pass of k+1 tokens costs, in target steps: " + ", ".join(f"k={k} {v:.2f}" for k, v in verify_cost.items()))
by_variant = {row["variant"]: row["speedup"] for row in rows}
speedup = {(name, k): by_variant[f"{name}, k={k}"] for name in drafts for k in ks}
print(f"target alone: {1e3 * rows[0]['variant_s'] / (n_new * len(workload)):.2f} ms/token")
for name in drafts:
    print(f"{name} (c = {cost[name]:.2f}): " + ", ".join(
        f"k={k} {speedup[name, k]:.2f}x (estimate {serving.expected_speedup(alpha[name], k, cost[name]):.2f}x, "
        f"{serving.expected_speedup(alpha[name], k, cost[name], verify_cost[k]):.2f}x with v measured)" for k in ks))
for name in ("student-draft", "student-draft-2layer"):
    print(f"{name}, k up to 32, stopping below p = 0.5: {by_variant[f'{name}, k<=32, stop below 0.5']:.2f}x")
best = max(by_variant, key=by_variant.get)
print(f"best: {best}, {by_variant[best]:.2f}x faster than the target alone (the bar: 1.5x): {by_variant[best] >= 1.5}")
fig, ax = plt.subplots(figsize=(5, 3))
for name in drafts:
    ax.plot(ks, [speedup[name, k] for k in ks], "o-", label=f"{name} (alpha {alpha[name]:.3f})")
ax.axhline(1, color="k", lw=0.8)
ax.set(xlabel="draft length k", ylabel="speedup vs the target alone", title="speculative decoding, tiny as target")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Four things show. **α decides**: at α ≈ 0.96 about one guess in 24 is wrong and a long
# draft is often cut short; at α ≈ 0.997 a round of 16 guesses usually survives whole, so
# the tuned drafts gain most at large `k`. **So does `c`**: the 2-block draft misses a little
# more often than `student-draft` (compare their printed α), but each of its guesses is cheaper. `c` falls almost in
# proportion to the blocks (compare the printed `c` with 2/6 and 3/6): what does not shrink
# with them (embedding, final norm, head, Python) is a small part of a step. The formula
# weighs `c` against α, and the measurement says which draft wins on your machine. **The estimate is only as good as its inputs**:
# Leviathan's formula needs the draft's cost `c` and assumes a verification pass costs one
# target step, but the verify pass pushes `k+1` tokens through matrix-matrix kernels, which
# cost more than the matrix-vector kernels of one token (`v`, printed above in target
# steps; the second estimate uses it). On a shared 2-core machine all three inputs move
# from run to run, so estimate and measurement agree only roughly; and the formula leaves out
# each round's own work (comparing the guesses, cropping both caches), which makes it
# optimistic. **The gain is real and exact**: every token is still the target's own greedy
# choice (checked above for `student-distilled`; `tests/test_serving.py` checks the other two). On a GPU at batch 1 both models are memory-bound, `k+1` tokens cost what one
# does, and speculation pays more.
#
# ## 4. Energy per token
#
# Joules need a power meter: Linux exposes the CPU package's energy counters (RAPL) in
# `/sys/class/powercap`, NVIDIA GPUs through NVML. Where neither is readable (containers,
# most laptops without root, macOS) we say so and estimate: the measured time per token
# times a power figure from the datasheet (`data/hardware_datasheet.csv`).

# %%
source = serving.power_source()
print("power counters on this machine:", source if source != "estimate" else "none readable: estimating")

# %%
# NBVAL_IGNORE_OUTPUT
laptop = next(r for r in hardware.datasheet() if r["kind"] == "CPU")
cores = min(2, torch.get_num_threads())
watts = float(laptop["power_w"]) * cores / 8  # the cores this lab uses, of the chip's 8
int8_model = labkit.quant.quantize_model(labkit.load_model("tiny")[0], "w8a8")  # notebook 08's W8A8
variants = {"fp32 tiny": model, "int8 tiny (W8A8)": int8_model, "distilled student": draft}
n_tokens = 100
print(f"estimate: {laptop['name']}, {laptop['power_w']} W for 8 cores -> {watts:.1f} W for {cores}")
for name, m in variants.items():
    with torch.no_grad():
        e = serving.measure_energy(lambda: m.generate(prompt, n_tokens, temperature=0), repeat=3)
    joules = e["joules"] if e["joules"] is not None else e["seconds"] * watts
    flops = sum(hardware.decode_step_flops(m.config, 1, prompt.size(1) + i) for i in range(n_tokens)) / n_tokens
    at_peak = flops / (float(laptop["fp32_tflops"]) * 1e12) * float(laptop["power_w"])
    print(f"{name:>20}: {1e3 * e['seconds'] / n_tokens:5.2f} ms/token, {1e3 * joules / n_tokens:6.2f} mJ/token "
          f"({'measured' if e['joules'] is not None else 'estimated'}); {flops / 1e6:.1f} MFLOP/token "
          f"-> {1e6 * at_peak:.0f} µJ at the chip's peak efficiency ({joules / n_tokens / at_peak:.0f}x less)")

# %% [markdown]
# The last column is the energy if every FLOP ran at the datasheet's peak efficiency: far
# below what decoding a small model one token at a time really costs (the factor is printed).
# At batch 1 the time goes to reading weights and to per-operation overheads, not to
# arithmetic. Compare W8A8 with fp32 above: at batch 1 the int8 model saves little or
# nothing, because quantizing every activation and the int8 kernels' fixed costs eat most
# of what the smaller weights save (notebook 08 shows where it wins: prefill and large
# batches); batching (section 2) and smaller models (notebook 10) are what move joules per
# token.
#
# ## 5. Explore
#
# Offered load and scheduler; the draft, its length `k` and the early stop `stop_below` (0: off).

# %%
# NBVAL_IGNORE_OUTPUT
def experiment(fig, what, load, draft_model, k, stop_below):
    ax = fig.add_subplot()
    if what == "batching":
        work = serving.make_workload(16, rate=load, long=(96, 192), seed=0)
        res = {p: serving.serve(model, work, p, 8) for p in ("static", "continuous")}
        ax.bar(list(res), [r["throughput"] for r in res.values()])
        ax.set(ylabel="tokens/s", title=f"load {load} req/s")
        return " | ".join(f"{p}: p95 {r['p95_latency']:.2f} s" for p, r in res.items())
    st = {}
    with torch.no_grad():
        sb = stop_below if stop_below > 0 else None  # 0: never stop early
        t_spec = measure(lambda: serving.speculative_generate(model, drafts[draft_model], workload[0], 100, k, st, sb), 1, 2).median_s
        t_base = measure(lambda: model.generate(workload[0], 100, temperature=0), 1, 2).median_s
    ax.bar(["target alone", f"speculative k={k}"], [1e3 * t_base, 1e3 * t_spec])
    ax.set(ylabel="ms for 100 tokens")
    return f"acceptance {st['acceptance']:.2f}, speedup {t_base / t_spec:.2f}x"


widgets.explore(experiment, what=["speculative", "batching"], load=(1.0, 64.0, 1.0, 16.0),
                draft_model=["student-draft-2layer", "student-draft", "student-distilled"], k=(1, 32, 1, 8),
                stop_below=(0.0, 0.9, 0.1, 0.0))

# %% [markdown]
# ## 6. Exercises
#
# **Exercise 1.** Speculative decoding's rule. `guesses` are the draft's `k` tokens,
# `target` the target's `k+1` greedy choices (its choice after the prompt, after guess 1,
# …, after guess k). Return the tokens this round keeps.

# %%
def accept_draft(guesses, target):
    return [g for g, t in zip(guesses, target) if g == t]  # your code: what about the target's own token?


passed = check.accept_draft(accept_draft)

# %% [markdown]
# **Exercise 2.** Tail latency: the `q`-th percentile of a list of latencies, interpolated
# linearly between neighbours (the rule of `numpy.percentile` and `torch.quantile`).

# %%
def percentile(values, q):
    values = sorted(values)
    return values[int(len(values) * q / 100) - 1]  # your code: right at q=50 with 5 values? with 1 value?


passed = check.percentile(percentile)

# %% [markdown]
# **Take-aways.** The cache turns O(n²) decoding into O(n). Continuous batching keeps a
# server's slots busy when answers differ in length, which is where throughput and tail
# latency are won. Speculative decoding trades cheap guesses for fewer target steps with
# bit-identical greedy output; its gain hangs on the acceptance rate and on how cheap the
# draft really is on your hardware, and a draft distilled on the target's own output
# accepts far more. Notebook 17 stacks every technique of the kit.
