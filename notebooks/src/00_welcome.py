# %% [markdown]
# # 00 · Welcome to labkit
#
# **Goals.** Meet the kit and the model every lab studies, LabGPT; learn to measure speed
# honestly; try the first slider; solve three warm-up exercises.
#
# **Expected run time.** About 15 seconds on the kit's 2-core test CPU (a laptop may take twice as long); under 10 seconds on a GPU.
#
# ## The map
#
# | # | notebook | technique | the knob you turn |
# |---|---|---|---|
# | 00 | welcome | LabGPT, honest measurement | sequence length, batch size |
# | 01 | hardware acceleration | FLOPs, bytes, roofline, a Triton matmul | matrix size, number format |
# | 02 | data parallelism | all-reduce, ring all-reduce, bucketing | world size, bucket size |
# | 03 | tensor parallelism | column/row-parallel linears, Megatron MLP and attention | tensor-parallel size |
# | 04 | pipeline parallelism | GPipe and 1F1B, the bubble | stages, micro-batches |
# | 05 | 3D parallelism | a dp × tp × pp mesh, a planner for thousands of GPUs | the mesh shape |
# | 06 | sparse attention | local, strided, block-sparse attention; a FlashAttention kernel | window size |
# | 07 | pruning | magnitude, structured, 2:4 | sparsity |
# | 08 | quantization | int8/int4, calibration, W8A8, weight-only kernels | bits, group size |
# | 09 | mixed precision and QAT | fp16/bf16, loss scaling, fake quantization | format, loss scale |
# | 10 | distillation | soft targets and temperature | α, T |
# | 11 | early exit | confidence-based exits | threshold τ |
# | 12 | memory | mmap'd safetensors, activation checkpointing, gradient accumulation | segments, micro-batch |
# | 13 | low rank | truncated SVD, CP, Tucker | rank |
# | 14 | prompt design, zero/few-shot | vague vs specific vs contextual, demonstrations | number of shots |
# | 15 | prompt tuning and PET | soft prompts, patterns and verbalizers | prompt length |
# | 16 | serving | KV cache, continuous batching, speculative decoding, energy | load, draft length |
# | 17 | capstone | stack everything, the Pareto front | which techniques |
#
# Each lab is a notebook here and a module in `labkit/` you can read in one sitting.
# Every lab notebook follows one template, written down at the end of this notebook.

# %%
import torch

import labkit
from labkit import bench, check, data
from labkit.model import LabGPT

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))  # steadier timings on shared machines

# %% [markdown]
# ## What machine is this?
#
# `labkit.doctor()` prints what you are running on and what to expect. Every timing in the
# kit is *yours*: measured on this machine, in this run.

# %%
# NBVAL_IGNORE_OUTPUT
info = labkit.doctor()

# %% [markdown]
# ## Meet LabGPT
#
# LabGPT is GPT-2's architecture, small: token and position embeddings, a stack of
# transformer blocks (attention, then an MLP, each with a residual connection and a
# LayerNorm before it), a final norm and a head that scores every character of the
# alphabet as the next one. The kit trains it on a world it generates itself (simple
# stories and five tasks), so nothing is downloaded and every answer can be checked.
#
# The shipped checkpoints: `tiny` (the teacher every lab studies), `student` (half the
# layers), `student-distilled` (distilled from `tiny`, notebook 10), `student-draft` (that
# student tuned to guess `tiny`'s next token, for speculative decoding in notebook 16) and
# `student-draft-2layer` (a cheaper draft: `student-draft` with one block cut out, tuned
# again). Their training commands and measured accuracy are in `data/MODEL_CARD.md`.

# %%
model, tokenizer = labkit.load_model("tiny")
print(labkit.available_models())
print(model.config)
print(f"{model.num_params(non_embedding=False):,} parameters, vocabulary of {tokenizer.vocab_size} characters")

# %% [markdown]
# The whole attention layer is a dozen lines. This is the real code the model runs
# (every lab shows its code this way, straight from `labkit`):

# %%
labkit.show_source(labkit.model.CausalSelfAttention.forward)

# %% [markdown]
# ### It writes stories...
#
# `temperature=0` means greedy decoding: always the most likely next character.

# %%
prompt = "One sunny day, Lena went to"
out = model.generate(tokenizer.tensor(prompt), max_new_tokens=120, temperature=0)
print(tokenizer.decode(out[0]))

# %% [markdown]
# ### ... and solves tasks
#
# The task suite has five tasks, each in three prompt formats. A *specific* prompt states
# the task; a *vague* one is only `input ->`, which is truly ambiguous (French?
# backwards? capitals?) until a few demonstrations show what is wanted. The model has its
# defaults, though: a lone English word usually gets French and a country its capital, so
# it is the reviews and the string operations whose vague prompts fail without
# demonstrations (the table below).

# %%
from labkit.evaluation import generate_answer

print(data.tasks())
for task in data.tasks():
    example = data.examples(task, "specific", shots=0, n=1, seed=7)[0]
    answer = generate_answer(model, tokenizer, example.prompt)
    print(f"{example.prompt!r:>80}  ->  {answer!r} (expected {example.answer!r})")

# %%
vague = "cat ->"
few_shot = "dog -> DOG\nhouse -> HOUSE\ncat ->"
print(repr(vague), "->", repr(generate_answer(model, tokenizer, vague)))
print(repr(few_shot), "->", repr(generate_answer(model, tokenizer, few_shot)))

# %% [markdown]
# `labkit.evaluate` scores a task: the fraction of seeded prompts whose greedy answer is
# exactly right. (It scores a whole batch in one forward pass: greedy decoding writes the
# answer if and only if the answer's every character is the argmax at its position.)

# %%
print(f"{'task':<11} {'specific':>9} {'vague 0-shot':>13} {'vague 4-shot':>13}")
for task in data.tasks():
    accs = [labkit.evaluate(model, tokenizer, task, fmt, shots, n=50) for fmt, shots in
            (("specific", 0), ("vague", 0), ("vague", 4))]
    print(f"{task:<11} " + " ".join(f"{100 * a:>12.0f}%" for a in accs))

# %% [markdown]
# ## Checking against an oracle
#
# Every technique in the kit is checked against a trusted reference. A first example:
# the **KV cache**. Generating token by token, the model keeps each layer's keys and values
# so that a new token costs one position instead of re-running the whole prefix. The
# oracle: the logits must equal those of one plain forward pass over the same tokens.

# %%
idx = tokenizer.tensor("Translate each English word into French.\ncheese =>")
with torch.no_grad():
    full = model(idx)  # the oracle: the whole sequence at once
    cache = model.new_cache()
    prefill = model(idx[:, :30], cache=cache)  # the first 30 tokens in one go...
    steps = [model(idx[:, t : t + 1], cache=cache) for t in range(30, idx.size(1))]  # ...then one at a time
incremental = torch.cat([prefill, *steps], dim=1)
# float32 sums taken in another order differ in the last bits, so compare relative to the logits' scale (~20)
error = ((incremental - full).abs().max() / full.abs().max()).item()
print("KV-cache logits equal the full forward pass within 1e-5 of their scale:", error < 1e-5)

# %% [markdown]
# ## Measuring honestly
#
# A speedup is only as good as its measurement. Four rules:
#
# 1. **Warm up.** The first calls pay for memory allocation, caches and lazy set-up.
# 2. **Synchronise** on a GPU: a kernel launch returns before the kernel runs, so a timer
#    around it measures nothing. `labkit.bench.measure` uses CUDA events there.
# 3. **Repeat and take the median**, and look at the spread: one slow run (another
#    program, a page fault) should not decide.
# 4. **Compare side by side, in one run, as a ratio.** Machines drift, ratios measured
#    together do not.
#
# Watch rule 1 happen (the numbers vary from run to run; that is the point):

# %%
# NBVAL_IGNORE_OUTPUT
import time

fresh = LabGPT(labkit.model.get_config("tiny")).eval()
batch = torch.randint(0, 100, (4, 256))
times = []
with torch.no_grad():
    for _ in range(6):
        t0 = time.perf_counter()
        fresh(batch)
        times.append(1e3 * (time.perf_counter() - t0))
print("each call, ms:", [f"{t:.1f}" for t in times])
m = bench.measure(lambda: fresh(batch), warmup=2, repeat=7)
print(f"measure(): median {1e3 * m.median_s:.1f} ms, spread (IQR/median) {m.spread:.0%}")

# %% [markdown]
# Rule 4, on the KV cache: decoding 128 tokens with the cache vs re-running the prefix
# every step. `bench.compare` prints medians and the ratio to the baseline.

# %%
# NBVAL_IGNORE_OUTPUT
start = tokenizer.tensor("One sunny day,")
with torch.no_grad():
    rows = bench.compare(
        {
            "no cache": lambda: model.generate(start, 128, temperature=0, use_cache=False),
            "KV cache": lambda: model.generate(start, 128, temperature=0, use_cache=True),
        },
        warmup=1,
        repeat=3,
    )

# %% [markdown]
# ## The first widget: sequence length and batch size vs latency and tokens/s
#
# Move the sliders. Longer sequences cost more per forward pass, but each token costs
# less, until attention's O(T²) work starts to show; a bigger batch raises throughput
# (tokens/s) at the price of latency. (Under the test runner the panel runs once with
# its defaults.)

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def latency_vs_length(fig, max_len, batch):
    lengths = list(range(32, max_len + 1, max(32, max_len // 8)))
    latency, throughput = [], []
    with torch.no_grad():
        for T in lengths:
            x = torch.randint(0, 100, (batch, T))
            m = bench.measure(lambda: model(x), warmup=1, repeat=3)
            latency.append(1e3 * m.median_s)
            throughput.append(batch * T / m.median_s)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(lengths, latency, "o-")
    ax1.set(xlabel="sequence length (tokens)", ylabel="forward latency (ms)", title=f"batch {batch}")
    ax2.plot(lengths, throughput, "o-", color="tab:green")
    ax2.set(xlabel="sequence length (tokens)", ylabel="tokens / s", title="throughput")
    fig.tight_layout()
    return f"at {lengths[-1]} tokens x batch {batch}: {latency[-1]:.1f} ms, {throughput[-1]:,.0f} tokens/s"


explore(latency_vs_length, max_len=(64, 512, 64, 256), batch=[1, 4, 16])

# %% [markdown]
# ## Your turn
#
# Each exercise ends with a checker that tells you at once whether your code is right,
# and what to look at if not. Reference solutions are in `labkit/solutions/welcome.py`:
# try first.
#
# **Exercise 1.** Count LabGPT's parameters from its config alone. Read
# `labkit/model.py` (`Block`, `CausalSelfAttention`, `MLP`): every `nn.Linear(a, b)` has
# `a*b` weights plus `b` biases, every `LayerNorm(C)` has `2C`, and the head shares its
# weights with the token embedding. With `config.bias=False` there are no biases at all:
# each linear has only its `a*b` weights and each LayerNorm only its `C` weights.

# %%
def count_parameters(config):
    C = config.n_embd
    embeddings = config.vocab_size * C + config.block_size * C
    # your code: add the blocks and the final LayerNorm
    return embeddings


passed = check.count_parameters(count_parameters)

# %% [markdown]
# **Exercise 2.** How many bytes does a KV cache need for `batch_size` sequences of
# `seq_len` tokens, at `bytes_per_element` bytes per number? (This is why long contexts
# are expensive to serve: lab 16.)

# %%
def kv_cache_bytes(config, batch_size, seq_len, bytes_per_element=4):
    # your code
    return config.n_layer * batch_size * seq_len * config.n_embd * bytes_per_element


passed = check.kv_cache_bytes(kv_cache_bytes)

# %% [markdown]
# **Exercise 3.** Write greedy decoding by hand, without a cache: run the model on the
# whole sequence, take the most likely next token, append it, repeat. It must match
# `model.generate(idx, n_new, temperature=0)` token for token.

# %%
@torch.no_grad()
def greedy_decode(model, idx, n_new):
    # your code
    return idx


passed = check.greedy_decode(greedy_decode)

# %% [markdown]
# Stuck after trying? The reference solutions pass the same checkers:

# %%
from labkit.solutions import welcome

for exercise in ("count_parameters", "kv_cache_bytes", "greedy_decode"):
    getattr(check, exercise)(getattr(welcome, exercise))

# %% [markdown]
# ## Takeaways
#
# - LabGPT is small enough to run anywhere and real enough to show every technique: it
#   writes stories, translates, computes, and where its vague prompts are truly ambiguous
#   (reviews, string operations) they need demonstrations.
# - Every technique is checked against an oracle before it is timed.
# - Time with warm-up, synchronisation, medians and side-by-side ratios, on your machine.
#
# ## The template every lab notebook follows
#
# 1. **Goals and expected run time** (CPU and GPU), at the top.
# 2. **The idea and its math**: the formula from the survey the kit teaches from, and what
#    it means.
# 3. **The from-scratch code**, shown straight from `labkit`'s source (`labkit.show_source`).
# 4. **The check against an oracle**: PyTorch's own implementation where one exists, an
#    exact identity otherwise, with the tolerance stated.
# 5. **The measurement on this machine**: `labkit.bench.compare`, medians and ratios.
# 6. **The widget**: one knob, one figure, the trade-off moving as you turn it.
# 7. **Your turn**: exercises, each with a `labkit.check` checker and a reference solution.
# 8. **Takeaways and references.**
#
# Cells whose output changes from run to run (timings, widgets, `doctor`) are marked
# `# NBVAL_IGNORE_OUTPUT`; every other output is seeded and rounded, and the test suite
# checks it is reproduced exactly.
#
# ## References
#
# - A. Karpathy, *nanoGPT* (the shape of `labkit/model.py`).
# - A. Radford et al., *Language Models are Unsupervised Multitask Learners* (GPT-2), 2019.
# - T. Brown et al., *Language Models are Few-Shot Learners*, NeurIPS 2020.
# - V. Gangasani, *Boosting the Performance of Large Language Models* (the survey this kit
#   teaches from).
