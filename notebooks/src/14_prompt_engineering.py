# %% [markdown]
# # 14 · Prompt engineering: design, zero-shot and few-shot, measured
#
# **Goals.** Test the survey's prompt-design claims on LabGPT: vague vs clear and specific
# vs contextual prompts, zero-shot vs few-shot, each with its accuracy (and a confidence
# interval) *and* its cost in tokens and time to the first answer token; then reuse the
# work of a shared few-shot prefix across queries (prefix caching).
#
# **Expected run time.** About 30 seconds on the kit's 2-core test CPU (a laptop may take twice as long).
#
# **The survey's claims, tested here.**
# 1. "Clear and specific prompts ... yield better results", "reducing the need for multiple
#    iterations and, consequently, inference time".
# 2. "Contextual prompts ... improve response relevance and reduce computational overhead."
# 3. "Providing a few examples within the prompt allows the model to generalize"; a
#    zero-shot prompt must let the model "infer the task without any prior examples".

# %%
import matplotlib.pyplot as plt
import torch

import labkit
from labkit import bench, check, data, prompting
from labkit.evaluation import generate_answer

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
model, tokenizer = labkit.load_model("tiny")

# %% [markdown]
# ## 1. Three ways to ask
#
# Every task of the suite comes in three formats. A **vague** prompt is only `input ->`;
# a **specific** one states the task; a **contextual** one sets a scene that implies it.
# (The vague format is truly ambiguous: in training, `cat ->` was followed by French, by
# `CAT`, by `tac` or by `c-a-t`, and reviews by positive/negative or good/bad. The model
# still has defaults: it answers a lone English word in French and a country with its
# capital, so those vague prompts happen to work; for reviews and string operations there is
# no default, and the vague prompt fails.)

# %%
for fmt in data.FORMATS:
    example = data.examples("translate", fmt, shots=2, n=1, seed=3)[0]
    print(f"--- {fmt} ---\n{example.prompt} {example.answer}\n")

# %% [markdown]
# The survey's own few-shot example, carried into LabGPT's world (its vocabulary has
# *hello* and *goodbye*):

# %%
seed_prompt = "Translate each English word into French.\nhello => bonjour\ngoodbye => au revoir\ncat =>"
print(seed_prompt, generate_answer(model, tokenizer, seed_prompt))
for prompt in ("cat ->", "hello -> bonjour\ngoodbye -> au revoir\ncat ->", "dog -> d-o-g\nsun -> s-u-n\ncat ->"):
    print(repr(prompt), "->", repr(generate_answer(model, tokenizer, prompt)))

# %% [markdown]
# ## 2. Vague vs specific vs contextual, per task
#
# Accuracy on 200 seeded prompts per cell, with its 95% interval (Wilson), the mean prompt
# length in tokens, all zero-shot.

# %%
scores = {(task, fmt): prompting.score(model, tokenizer, task, fmt, 0, n=200) for task in data.tasks() for fmt in data.FORMATS}
for s in scores.values():
    print(s)
mean = {fmt: sum(scores[(t, fmt)].accuracy for t in data.tasks()) / len(data.tasks()) for fmt in data.FORMATS}
print({fmt: f"{100 * a:.1f}%" for fmt, a in mean.items()})
print(f"specific beats vague by {100 * (mean['specific'] - mean['vague']):.1f} points on average over the tasks")

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
width = 0.27
for i, fmt in enumerate(data.FORMATS):
    accs = [100 * scores[(t, fmt)].accuracy for t in data.tasks()]
    errs = [[100 * (scores[(t, fmt)].accuracy - scores[(t, fmt)].low) for t in data.tasks()],
            [100 * (scores[(t, fmt)].high - scores[(t, fmt)].accuracy) for t in data.tasks()]]
    ax.bar([j + (i - 1) * width for j in range(len(data.tasks()))], accs, width, yerr=errs, capsize=2, label=fmt)
ax.set_xticks(range(len(data.tasks())), data.tasks())
ax.set(ylabel="accuracy (%)", title="zero-shot accuracy by prompt format (95% intervals)")
ax.legend()
plt.show()

# %% [markdown]
# What each costs. Every prompt token is processed before the first answer token appears
# (the *prefill*); we measure that time (median over 5 prompts, 3 runs each):

# %%
# NBVAL_IGNORE_OUTPUT
costs = {fmt: prompting.score(model, tokenizer, "capital", fmt, 0, n=20, latency_prompts=5) for fmt in data.FORMATS}
for fmt, s in costs.items():
    print(f"capital, {fmt:<10}: {s.tokens:5.1f} tokens, {1e3 * s.ttft_s:5.2f} ms to the first answer token, "
          f"accuracy {100 * scores[('capital', fmt)].accuracy:.0f}%")

# %% [markdown]
# **Claim 1, checked.** Specific prompts are far more accurate on the ambiguous tasks, but
# they are *longer*, so each call costs more, not less. The survey's "reduces inference time"
# holds only counting retries: if a wrong answer means asking again, the expected number of
# prompt tokens until a right answer is `tokens / accuracy`. (That assumes each retry
# succeeds independently, as with sampling or a rephrased question: a greedy model asked the
# same prompt again gives the same wrong answer.)

# %%
for task in data.tasks():
    cells = []
    for fmt in data.FORMATS:
        s = scores[(task, fmt)]
        cells.append(f"{fmt} {s.tokens / s.accuracy:6.0f}" if s.accuracy > 0 else f"{fmt}    inf")
    print(f"{task:<11} expected prompt tokens per correct answer: " + ", ".join(cells))

# %% [markdown]
# Where the vague prompt fails often (sentiment, string), the specific prompt wins even on
# cost; where it mostly works (translate and capital by the model's defaults, arithmetic at
# about four in five), the extra instruction tokens are pure overhead.
#
# **Claim 2, checked.** Contextual prompts, which imply the task through a scene, do as well
# as explicit instructions for LabGPT, but they are the *longest* prompts: relevance yes,
# reduced overhead no.
#
# ## 3. Zero-shot vs few-shot
#
# In the vague format the model must infer the task from demonstrations alone:

# %%
shot_counts = [0, 1, 2, 4, 8]
few = {(task, k): prompting.score(model, tokenizer, task, "vague", k, n=100) for task in data.tasks() for k in shot_counts}
fig, ax = plt.subplots(figsize=(6, 3.5))
for task in data.tasks():
    ax.plot(shot_counts, [100 * few[(task, k)].accuracy for k in shot_counts], "o-", label=task)
ax.set(xlabel="demonstrations in the prompt", ylabel="accuracy (%)", title="vague prompts: accuracy vs shots")
ax.legend(fontsize=8)
plt.show()
gain = sum(few[(t, 4)].accuracy - few[(t, 0)].accuracy for t in data.tasks()) / len(data.tasks())
print(f"4-shot beats zero-shot on vague prompts by {100 * gain:.1f} points on average")
for k in shot_counts:
    print(f"{k} shots: {sum(few[(t, k)].tokens for t in data.tasks()) / 5:6.1f} tokens per prompt on average")

# %% [markdown]
# One demonstration resolves almost all the ambiguity; the rest cost tokens. The price of
# each demonstration in time to first token, and the accuracy-vs-latency trade-off:

# %%
# NBVAL_IGNORE_OUTPUT
latency = {k: prompting.time_to_first_token(model, tokenizer, [e.prompt for e in data.examples("sentiment", "vague", k, n=4)])
           for k in shot_counts}
fig, ax = plt.subplots(figsize=(5.5, 3.5))
accs = [100 * few[("sentiment", k)].accuracy for k in shot_counts]
ax.plot([1e3 * latency[k] for k in shot_counts], accs, "o-")
for k, acc in zip(shot_counts, accs):
    ax.annotate(f"{k}-shot", (1e3 * latency[k], acc), textcoords="offset points", xytext=(5, -10), fontsize=8)
ax.set(xlabel="time to first answer token (ms)", ylabel="accuracy (%)", title="sentiment, vague: accuracy vs latency")
plt.show()
for k in shot_counts:
    print(f"{k}-shot: {1e3 * latency[k]:.2f} ms")

# %% [markdown]
# ## 4. Prefix caching: pay for the demonstrations once
#
# When many queries share the same instructions and demonstrations, their keys and values
# are the same for every query. Compute them once, keep the KV cache, and run only each
# query's own tokens. **The oracle:** logits equal one full pass over `prefix + query`.

# %%
labkit.show_source(prompting.PrefixCache)

# %%
shared = data.examples("capital", "specific", 8, n=1, seed=11)[0].prompt.rsplit("\n", 1)[0] + "\n"
queries = [f"{country} =>" for country, _ in data.words()["countries"][:20]]
cache = prompting.PrefixCache(model, tokenizer, shared)
with torch.no_grad():
    full = model(tokenizer.tensor(shared + queries[0]))[:, -len(queries[0]) :]
error = ((cache.logits(queries[0]) - full).abs().max() / full.abs().max()).item()
print(f"shared prefix: {cache.length} tokens; queries: {len(queries[0])} tokens or so")
print("cached logits equal the full pass within 1e-5 of their scale:", error < 1e-5)

# %%
# NBVAL_IGNORE_OUTPUT
with torch.no_grad():
    rows = bench.compare(
        {
            "full prompt every time": lambda: [model(tokenizer.tensor(shared + q)) for q in queries],
            "cached prefix": lambda: [cache.logits(q) for q in queries],
        },
        warmup=1,
        repeat=3,
    )
print(f"{len(queries)} queries: prefix caching saves {100 * (1 - 1 / rows[1]['speedup']):.0f}% of the time")

# %% [markdown]
# ## 5. The widget: task, format, demonstrations

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def prompt_view(fig, task, fmt, shots):
    s = prompting.score(model, tokenizer, task, fmt, shots, n=60, latency_prompts=3)
    example = data.examples(task, fmt, shots, n=1)[0]
    ax = fig.add_subplot()
    ax.bar(["accuracy (%)", "prompt tokens", "ms to 1st token x 10"], [100 * s.accuracy, s.tokens, 1e4 * s.ttft_s],
           color=["tab:green", "tab:blue", "tab:orange"])
    ax.set_title(f"{task}, {fmt}, {shots}-shot")
    return f"{s}\nexample prompt:\n{example.prompt} {example.answer}"


explore(prompt_view, task=data.tasks(), fmt=list(data.FORMATS), shots=(0, 8, 1, 0))

# %% [markdown]
# ## Your turn
#
# **Exercise.** Write a *zero-shot* prompt for the string task's reversal that reaches at
# least 90% accuracy. Your template gets the input word and the operation's name (always
# `"reverse"` here) and returns the prompt; the model's answer follows after a space.
# Zero-shot means no demonstrations: only the last line, the query, may hold an arrow.

# %%
def my_prompt(word, operation):
    return f"{word} ->"  # your prompt: vague prompts are ambiguous...


passed = check.reversal_prompt(my_prompt)

# %%
from labkit.solutions import prompting as solutions

passed = check.reversal_prompt(solutions.reversal_prompt)

# %% [markdown]
# ## Takeaways
#
# - State the task: on LabGPT a specific prompt beats a vague one by tens of points where
#   the vague one is ambiguous, at several times the prompt tokens (section 2's table).
# - Instructions and demonstrations are not free: each token adds prefill time. One
#   demonstration buys most of the accuracy; prefix caching makes shared demonstrations
#   nearly free after the first query.
# - Measure both sides (accuracy with its interval, and tokens/latency) before claiming a
#   prompt is "better".
#
# ## References
#
# - T. Brown et al., *Language Models are Few-Shot Learners*, NeurIPS 2020.
# - P. Liu et al., *Pre-train, Prompt, and Predict: A Systematic Survey of Prompting Methods*, 2021.
# - W. Kwon et al., *Efficient Memory Management for LLM Serving with PagedAttention* (prefix sharing), SOSP 2023.
