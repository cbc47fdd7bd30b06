# %% [markdown]
# # 15 · Prompt tuning and pattern-exploiting training
#
# **Goals.** Teach a frozen model a new format by learning only a few prompt vectors
# (`Prompt(x) = x + P`), and compare with fine-tuning every weight and with few-shot
# prompting; then classify with the language model itself, `Verbalizer(Pattern(x))`, zero-shot
# and with 16 or 32 labelled examples, against a classifier head trained on the same data.
#
# **Expected run time.** About 2 minutes on the kit's 2-core test CPU (a laptop may take twice as long; the training runs are short
# and live).
#
# **The survey's claims, tested here.** Prompt tuning "learns soft prompts that are added to
# the input embeddings"; PET "uses hand-crafted patterns and verbalizers to convert tasks into
# a form that LLMs can solve directly"; and a case study where prompt tuning *beat* fine-tuning
# by 10% on GPT-3.

# %%
import matplotlib.pyplot as plt
import torch

import labkit
from labkit import check, data, prompting
from labkit.evaluation import answer_correct

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
model, tokenizer = labkit.load_model("tiny")


def accuracy(m, examples):
    return sum(answer_correct(m, tokenizer, examples)) / len(examples)


# %% [markdown]
# ## 1. A format LabGPT never saw
#
# The specific sentiment prompt, but answered with new label words: `yay` for positive,
# `nay` for negative. (A new label vocabulary; the instruction line is unchanged.)

# %%
train_set = prompting.new_label_sentiment(200, seed=1)
test_set = prompting.new_label_sentiment(200, seed=2)
print(train_set[0].prompt, train_set[0].answer)
print(f"\nthe frozen model, zero-shot: {100 * accuracy(model, test_set):.1f}%")
for shots in (1, 4, 8):
    print(f"few-shot with {shots} demonstrations of the new labels: "
          f"{100 * accuracy(model, prompting.new_label_sentiment(200, seed=2, shots=shots)):.1f}%")
print(repr(labkit.evaluation.generate_answer(model, tokenizer, prompting.new_label_sentiment(1, seed=2, shots=4)[0].prompt)))

# %% [markdown]
# Demonstrations do not help: LabGPT's training made `positive`/`negative` so likely after
# this instruction that in-context examples of other words cannot override it. Large models
# copy new labels from demonstrations much more readily; small ones, as here, often don't.
#
# ## 2. Prompt tuning: `Prompt(x) = x + P`
#
# The survey's "+" joins, it does not add: prepend `n` learned vectors `P` to the input's
# token embeddings (the sequence becomes `[P; x]`) and train only `P` (every model weight
# frozen), on the answers' tokens.

# %%
labkit.show_source(prompting.SoftPrompt)

# %% [markdown]
# **Two identities first.** A soft prompt of length zero leaves the model unchanged; and a
# soft prompt initialised with a real prompt's embeddings acts like that text (the same
# logits, up to float rounding: the two take different paths through the position
# embeddings' addition).

# %%
probe = tokenizer.tensor("Give the capital city of each country.\nPeru =>")
with torch.no_grad():
    print("zero-length soft prompt == the model:", torch.equal(prompting.SoftPrompt(model, 0)(probe), model(probe)))
    header = "Give the capital city of each country.\n"
    soft = prompting.SoftPrompt(model, init_text=header)
    gap = (soft(tokenizer.tensor("Peru =>")) - model(tokenizer.tensor(header + "Peru =>"))[:, len(header):]).abs().max()
    print(f"soft prompt initialised from text == that text (max |logit difference| <= 1e-4): {gap.item() <= 1e-4}")

# %% [markdown]
# Now train 20 prompt vectors (200 steps of 16 examples), and, for comparison, fine-tune a
# copy of the whole model on the same data (100 steps).

# %%
frozen, _ = labkit.load_model("tiny")
before = {k: v.clone() for k, v in frozen.state_dict().items()}
soft = prompting.SoftPrompt(frozen, 20)
soft_losses = prompting.train_on_answers(soft, train_set, steps=200, lr=3e-2, batch_size=16)
full, _ = labkit.load_model("tiny")
full_losses = prompting.train_on_answers(full, train_set, steps=100, lr=3e-4, batch_size=16)

soft_acc, full_acc = accuracy(soft, test_set), accuracy(full, test_set)
n_model = sum(p.numel() for p in full.parameters())
print(f"prompt tuning: {100 * soft_acc:.1f}% with {soft.trainable_parameters():,} trainable parameters "
      f"({100 * soft.trainable_parameters() / n_model:.2f}% of the model)")
print(f"full fine-tuning: {100 * full_acc:.1f}% with {n_model:,} trainable parameters")
print(f"prompt tuning reaches {100 * soft_acc / full_acc:.0f}% of full fine-tuning's accuracy")
print("frozen weights bit-identical after prompt tuning:",
      all(torch.equal(before[k], v) for k, v in frozen.state_dict().items()))

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(soft_losses, label="prompt tuning (20 vectors)")
ax.plot(full_losses, label="full fine-tuning")
ax.set(xlabel="step", ylabel="loss on the answer tokens", yscale="log", title="training curves")
ax.legend()
plt.show()

# %% [markdown]
# **The survey's case study, checked.** On LabGPT prompt tuning gets close to full
# fine-tuning with a fraction of a percent of the trainable parameters (printed above), but
# it does not beat it. Lester et al.
# (2021) found that prompt tuning matches fine-tuning only as models grow to billions of
# parameters; at our scale, close is what to expect.
#
# The widget: prompt length and training steps (each move trains a new prompt: ~5–30 s).

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def soft_prompt_view(fig, n_tokens, steps):
    m, _ = labkit.load_model("tiny")
    sp = prompting.SoftPrompt(m, n_tokens)
    losses = prompting.train_on_answers(sp, train_set, steps=steps, lr=3e-2, batch_size=16)
    acc = accuracy(sp, test_set[:100])
    ax = fig.add_subplot()
    ax.plot(losses)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{n_tokens} prompt vectors: {100 * acc:.0f}% on the test set")
    return f"{n_tokens} vectors x {steps} steps: accuracy {100 * acc:.0f}% ({sp.trainable_parameters()} parameters)"


explore(soft_prompt_view, n_tokens=(1, 40, 1, 10), steps=(20, 300, 20, 60))

# %% [markdown]
# ## 3. Pattern-exploiting training: `Verbalizer(Pattern(x))`
#
# Classification without a classifier: a **pattern** turns the input into a prompt, and a
# **verbalizer** maps each label to a word; the predicted label is the one whose word the
# language model finds most likely after the prompt (its log-probability, summed over the
# word's characters).

# %%
labkit.show_source(prompting.verbalizer_scores)

# %%
reviews = data.examples("sentiment", "specific", 0, n=300, seed=5)
texts = [e.prompt.split("\n")[-1].removesuffix(" =>") for e in reviews]
gold = ["pos" if e.answer == "positive" else "neg" for e in reviews]
test_texts, test_gold = texts[100:], gold[100:]


def pet_accuracy(m, pattern, verbalizer):
    predictions = prompting.pet_classify(m, tokenizer, test_texts, pattern, verbalizer)
    return sum(p == g for p, g in zip(predictions, test_gold)) / len(test_gold)


patterns = {
    "instruction": lambda x: f"Label each review as positive or negative.\n{x} =>",
    "bare arrow": lambda x: f"{x} ->",
    "story": lambda x: f"Lena said {x} and",
}
verbalizers = {
    "positive/negative": {"pos": "positive", "neg": "negative"},
    "good/bad": {"pos": "good", "neg": "bad"},
    "great/awful": {"pos": "great", "neg": "awful"},
    "yes/no": {"pos": "yes", "neg": "no"},
}
zero_shot = {(p, v): pet_accuracy(model, patterns[p], verbalizers[v]) for p in patterns for v in verbalizers}
print(f"{'pattern':<12}" + "".join(f"{v:>19}" for v in verbalizers))
for p in patterns:
    print(f"{p:<12}" + "".join(f"{100 * zero_shot[(p, v)]:>18.1f}%" for v in verbalizers))

# %% [markdown]
# Zero-shot PET works exactly when pattern and verbalizer match what the model learned: the
# words the corpus used after reviews, in a context where reviews were labelled. A story
# context is chance (50%) whatever the words; `yes/no` is at chance after a bare arrow and
# only a little better after an instruction.
#
# ### PET with a few labelled examples, vs a classifier head
#
# Take a poor zero-shot combination (bare arrow, `yes/no`) and 16 or 32 labelled examples.
# **PET** fine-tunes the model so the verbalizer words' scores classify correctly; the
# **baseline** trains a linear classifier head on the frozen model's last hidden state, with
# the same examples. The two differ in two ways at once: PET reuses the language-model head
# *and* updates every weight, while the baseline learns a new head on frozen features
# (Schick & Schütze's baseline fine-tuned the whole model with its new head).

# %%
pattern, verbalizer = patterns["bare arrow"], verbalizers["yes/no"]
labels = list(verbalizer)
few_results = {}
for k in (16, 32):
    pet_model, _ = labkit.load_model("tiny")
    prompting.pet_finetune(pet_model, tokenizer, texts[:k], gold[:k], pattern, verbalizer, steps=20, lr=1e-4)
    features = prompting.last_token_features(model, tokenizer, [pattern(t) for t in texts[:k]])
    head = prompting.train_classifier_head(features, gold[:k], labels)
    with torch.no_grad():
        test_features = prompting.last_token_features(model, tokenizer, [pattern(t) for t in test_texts])
        head_pred = [labels[i] for i in head(test_features).argmax(dim=1).tolist()]
    few_results[k] = {"pet": pet_accuracy(pet_model, pattern, verbalizer),
                      "head": sum(p == g for p, g in zip(head_pred, test_gold)) / len(test_gold)}
print(f"zero-shot PET (bare arrow, yes/no): {100 * zero_shot[('bare arrow', 'yes/no')]:.1f}%")
for k, r in few_results.items():
    print(f"{k} labelled examples: PET {100 * r['pet']:.1f}%, classifier head {100 * r['head']:.1f}%")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ks = list(few_results)
ax.plot([0] + ks, [100 * zero_shot[("bare arrow", "yes/no")]] + [100 * few_results[k]["pet"] for k in ks], "o-", label="PET")
ax.plot(ks, [100 * few_results[k]["head"] for k in ks], "s-", label="classifier head")
ax.set(xlabel="labelled examples", ylabel="accuracy (%)", title="few labels: PET vs a classifier head", ylim=(40, 102))
ax.legend()
plt.show()

# %% [markdown]
# PET turns a handful of labels into a near-perfect classifier because it reuses what the
# language model already does (predicting words); a fresh head on frozen features has to
# learn the task from 16 points in 192 dimensions. Part of the gap is the fine-tuning itself
# (PET moves every weight, the head none of the model's); Schick & Schütze (2021) found PET
# ahead of a fully fine-tuned classifier too, on real benchmarks.
#
# ## Your turn
#
# **Exercise.** Choose a verbalizer (a word for `pos` and for `neg`) that makes *zero-shot*
# PET with the bare-arrow pattern `x ->` reach 90%. (Hint: which labels did LabGPT see after
# reviews in that format? `data/MODEL_CARD.md` and `labkit/data.py` tell.)

# %%
my_verbalizer = {"pos": "great", "neg": "awful"}  # your choice
passed = check.verbalizer(my_verbalizer)

# %%
from labkit.solutions import prompting as solutions

passed = check.verbalizer(solutions.VERBALIZER)

# %% [markdown]
# ## Takeaways
#
# - A soft prompt of a few thousand numbers can teach a frozen model a new output format
#   that demonstrations cannot; full fine-tuning still does a little better at this scale.
# - PET's accuracy hinges on the pattern and the verbalizer speaking the model's language;
#   with the right ones, a few labels suffice, where a new head on frozen features needs far
#   more.
#
# ## References
#
# - B. Lester, R. Al-Rfou, N. Constant, *The Power of Scale for Parameter-Efficient Prompt Tuning*, EMNLP 2021.
# - T. Schick, H. Schütze, *Exploiting Cloze Questions for Few Shot Text Classification and Natural
#   Language Inference*, EACL 2021.
# - X. L. Li, P. Liang, *Prefix-Tuning: Optimizing Continuous Prompts for Generation*, ACL 2021.
