# %% [markdown]
# # 11 · Early exit
#
# **Goals.** Let each token leave the network as soon as an intermediate layer is confident:
# exit at layer `k` when `max(p_k) ≥ τ`. Build the exit heads, keep the KV cache consistent
# for the layers a token skipped, check that `τ = 1` is ordinary greedy decoding, and
# measure accuracy, layers used and latency as τ moves.
#
# **Expected run time.** About 1 minute on a 2-core laptop CPU. The exit heads were trained
# offline (`python tools/train_exit_heads.py --steps 1500`, about 3 minutes on this kind of
# CPU) and ship in `data/exit_heads/`.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import labkit
from labkit import check, data, early_exit

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
model, tokenizer = labkit.load_model("tiny")
heads = early_exit.load_exit_heads(model, labkit.DATA_DIR / "exit_heads" / "tiny.safetensors")

# %% [markdown]
# ## 1. Exit heads
#
# After every block the residual stream holds a guess at the next token; an exit head reads
# it. Ours: a LayerNorm and a small linear map per layer (initialised to the identity), then
# the model's own frozen LM head. They were trained by self-distillation: each exit learns to
# match the last layer's distribution on the frozen model.

# %%
labkit.show_source(early_exit.ExitHeads)

# %% [markdown]
# How often does each exit already agree with the final layer's greedy choice, on held-out
# text?

# %%
text = data.corpus(20_000, seed=99)
idx = torch.tensor([tokenizer.encode(text[:512 * 8])]).view(8, 512)
with torch.no_grad():
    final, hidden = model(idx, return_hidden=True)
    final_choice = final.argmax(-1)
    agreement, confidence = [], []
    for layer, h in enumerate(hidden):
        p = F.softmax(heads.logits(model, h, layer).float(), dim=-1)
        agreement.append((p.argmax(-1) == final_choice).float().mean().item())
        confidence.append(p.max(-1).values.mean().item())
for layer, (a, c) in enumerate(zip(agreement, confidence)):
    print(f"exit after layer {layer + 1}: agrees with the final layer on {100 * a:5.1f}% of tokens, mean max-probability {c:.3f}")
fig, ax = plt.subplots(figsize=(5.5, 3))
ax.bar([str(k + 1) for k in range(len(agreement))], [100 * a for a in agreement])
ax.set(xlabel="exit after layer", ylabel="agrees with final layer (%)", title="what the intermediate layers already know")
plt.show()

# %% [markdown]
# ## 2. Decoding with exits, and the KV cache
#
# A token that exits at layer `k` never computes layers `k+1 … L`, but *later* tokens will
# attend to its keys and values in those layers. We copy the exit state forward (as CALM
# does): the skipped layers' keys and values for this position are computed from the hidden
# state at the exit. `τ = 1` means "never exit early" (a float softmax can round to exactly
# 1.0, so 1.0 is a switch, not a comparison).

# %%
labkit.show_source(early_exit.generate)

# %% [markdown]
# **The oracle:** with `τ = 1`, early-exit decoding must reproduce ordinary greedy decoding
# token for token.

# %%
for prompt in ("Translate each English word into French.\ncheese =>", "One sunny day, Tom", "Compute each sum.\n12 + 30 =>"):
    ids = tokenizer.tensor(prompt)
    ours, layers = early_exit.generate(model, heads, ids, 30, threshold=1.0)
    print(f"{prompt!r:<55} identical to greedy: {torch.equal(ours, model.generate(ids, 30, temperature=0))}, "
          f"layers per token {set(layers)}")

# %% [markdown]
# ## 3. The τ sweep: accuracy, layers, latency
#
# Specific-prompt answers of all five tasks (30 each), generated token by token with exits:

# %%
# NBVAL_IGNORE_OUTPUT
results = [early_exit.evaluate_threshold(model, heads, tokenizer, tau, n=30) for tau in (1.0, 0.99, 0.95, 0.9, 0.8)]
for r in results:
    print(f"τ = {r['threshold']:.2f}: accuracy {100 * r['accuracy']:5.1f}%, mean layers {r['mean_layers']:.2f} of 6, "
          f"{1e3 * r['seconds_per_token']:.2f} ms per token")
fig, ax1 = plt.subplots(figsize=(6, 3.5))
taus = [r["threshold"] for r in results]
ax1.plot(taus, [100 * r["accuracy"] for r in results], "o-", color="tab:green", label="accuracy (%)")
ax1.set(xlabel="threshold τ", ylabel="accuracy (%)")
ax2 = ax1.twinx()
ax2.plot(taus, [r["mean_layers"] for r in results], "s--", color="tab:purple", label="mean layers")
ax2.set_ylabel("mean layers used")
ax1.set_title("lower τ: fewer layers, lower accuracy")
plt.show()

# %% [markdown]
# **What the measurement says, honestly.** Exits cut the layers per token by about a quarter
# at no accuracy cost (τ ≈ 0.99), but on a CPU at batch 1 the time per token barely moves:
# each exit check (a norm, a linear, the LM head and a softmax) and each skipped layer's
# key/value fill cost about as much as the small block they save, because at this size the
# cost is dominated by per-operation overhead, not arithmetic. Early exit pays when blocks are
# expensive relative to the check (wide models, GPUs with fused checks) and when exits fire
# early; even a free check at τ = 0.99 here would give at most `6 / mean layers` speedup.
#
# ## 4. The widget: τ, token by token
#
# Each generated character is coloured by the layer it exited at.

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def exits_view(fig, threshold, prompt):
    ids = tokenizer.tensor(prompt)
    out, layers = early_exit.generate(model, heads, ids, 60, threshold=threshold)
    text = tokenizer.decode(out[0, ids.size(1) :])
    ax = fig.add_subplot()
    ax.axis("off")
    cmap = plt.get_cmap("viridis", 6)
    x, y = 0.0, 0.9
    for ch, layer in zip(text, layers):
        if ch == "\n" or x > 0.95:
            x, y = 0.0, y - 0.12
            if ch == "\n":
                continue
        ax.text(x, y, ch, color=cmap(layer - 1), fontsize=12, family="monospace", transform=ax.transAxes)
        x += 0.022
    ax.set_title(f"τ = {threshold}: mean {sum(layers) / len(layers):.2f} layers (dark = early exit)", fontsize=10)
    return f"layers used per character: {layers}"


explore(exits_view, threshold=(0.5, 1.0, 0.01, 0.95),
        prompt=["One sunny day, Lena went to", "Translate each English word into French.\nwater =>"])

# %% [markdown]
# ## Your turn
#
# **Exercise.** Write the exit rule: given a token's probability vector at some layer and
# the threshold τ, return whether to exit there.

# %%
def exit_rule(probs, threshold):
    return probs.max().item() >= threshold  # your code: what about τ = 1?


passed = check.exit_rule(exit_rule)

# %%
from labkit.solutions import distill as solutions

passed = check.exit_rule(solutions.exit_rule)

# %% [markdown]
# ## Takeaways
#
# - Intermediate layers often already know the next token; confidence-based exits find
#   those tokens without a second model.
# - Skipped layers must still get keys and values, or later tokens attend to holes; copying
#   the exit state forward keeps the cache complete.
# - Fewer layers is not less time unless the work saved outweighs the checks: measure.
#
# ## References
#
# - T. Schuster et al., *Confident Adaptive Language Modeling* (CALM), NeurIPS 2022.
# - N. Belrose et al., *Eliciting Latent Predictions from Transformers with the Tuned Lens*, 2023.
# - S. Teerapittayanon et al., *BranchyNet*, 2016.
