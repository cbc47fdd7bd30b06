import pytest
import torch

import labkit
from labkit import data, prompting
from labkit.model import LabGPT, get_config
from labkit.tokenizer import CharTokenizer


class FutureCopier(torch.nn.Module):
    """A fake model that 'predicts' the token that really comes next (perfect), or repeats the current one."""

    def __init__(self, perfect: bool):
        super().__init__()
        self.config = get_config("tiny")
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.perfect = perfect

    def forward(self, idx):
        newline = torch.full_like(idx[:, :1], CharTokenizer().newline_id)  # every answer ends with a newline
        target = torch.cat([idx[:, 1:], newline], dim=1) if self.perfect else idx
        return torch.nn.functional.one_hot(target, self.config.vocab_size).float()


def test_harness_scores_perfect_and_wrong_answer_sets():
    tok = CharTokenizer()
    assert prompting.score(FutureCopier(True), tok, "translate", "specific", 2, n=30).accuracy == 1.0
    assert prompting.score(FutureCopier(False), tok, "translate", "specific", 2, n=30).accuracy == 0.0


def test_templates_render_deterministically():
    assert data.examples("sentiment", "contextual", 3, n=10) == data.examples("sentiment", "contextual", 3, n=10)
    assert prompting.query_pairs("arithmetic", 5) == prompting.query_pairs("arithmetic", 5)


def test_score_on_the_teacher_and_its_interval():
    model, tok = labkit.load_model("tiny")
    s = prompting.score(model, tok, "capital", "specific", 0, n=40, latency_prompts=2)
    assert s.accuracy >= 0.9 and s.low <= s.accuracy <= s.high and s.tokens > 10 and s.ttft_s > 0
    vague = prompting.score(model, tok, "capital", "vague", 0, n=40)
    assert vague.tokens < s.tokens / 2  # the vague prompt is a bare question (about 10 tokens against 46)


def test_too_many_demonstrations_say_how_many_fit():
    small = LabGPT(get_config("nano"))  # context of 128
    fit = prompting.max_shots_that_fit(small, "sentiment", "specific")
    assert 0 <= fit < 8
    with pytest.raises(ValueError, match=f"at most {fit} demonstrations fit"):
        prompting.score(small, CharTokenizer(), "sentiment", "specific", 8, n=5)
    with pytest.raises(ValueError, match="unknown task"):
        prompting.query_pairs("poetry")


def test_prefix_cache_equals_one_full_pass():
    model, tok = labkit.load_model("student")
    prefix = "Give the capital city of each country.\nFrance => Paris\nItaly => Rome\n"
    cache = prompting.PrefixCache(model, tok, prefix)
    for query in ("Spain =>", "Japan =>"):
        with torch.no_grad():
            full = model(tok.tensor(prefix + query))[:, -len(query) :]
        cached = cache.logits(query)
        assert ((cached - full).abs().max() / full.abs().max()).item() < 1e-5


def test_template_accuracy_of_a_written_prompt():
    model, tok = labkit.load_model("tiny")
    good = prompting.template_accuracy(
        model, tok, "capital", lambda x, op: f"Give the capital city of each country.\n{x} =>", n=40
    )
    bad = prompting.template_accuracy(model, tok, "capital", lambda x, op: f"{x} is spelled", n=40)
    assert good >= 0.9 > bad
    with pytest.raises(ValueError, match="template"):
        prompting.template_accuracy(model, tok, "capital", lambda x, op: "", n=3)


def test_zero_length_soft_prompt_leaves_the_output_unchanged():
    model, tok = labkit.load_model("student")
    idx = tok.tensor("Give the capital city of each country.\nPeru =>")
    with torch.no_grad():
        assert torch.equal(prompting.SoftPrompt(model, 0)(idx), model(idx))


def test_prompt_tuning_keeps_the_model_bit_identical_and_trains_under_one_percent():
    model, tok = labkit.load_model("student")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    soft = prompting.SoftPrompt(model, 8)
    start = soft.prompt.detach().clone()
    losses = prompting.train_on_answers(soft, prompting.new_label_sentiment(32, seed=1), steps=5, lr=1e-2, batch_size=8)
    assert len(losses) == 5 and not torch.equal(soft.prompt.detach(), start)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert soft.trainable_parameters() == 8 * model.config.n_embd
    assert soft.trainable_parameters() < 0.01 * sum(p.numel() for p in model.parameters())
    assert soft.config.block_size == model.config.block_size - 8
    with pytest.raises(ValueError, match="n_tokens"):
        prompting.SoftPrompt(model, -1)


def test_soft_prompt_initialised_from_text_acts_like_that_text():
    model, tok = labkit.load_model("tiny")
    header = "Give the capital city of each country.\n"
    soft = prompting.SoftPrompt(model, init_text=header)
    with torch.no_grad():
        via_soft = soft(tok.tensor("Peru =>"))
        via_text = model(tok.tensor(header + "Peru =>"))[:, len(header) :]
    torch.testing.assert_close(via_soft, via_text, atol=1e-4, rtol=1e-4)


def test_pet_classifies_with_a_pattern_and_a_verbalizer():
    model, tok = labkit.load_model("tiny")
    exs = data.examples("sentiment", "specific", 0, n=40, seed=5)
    texts = [e.prompt.split("\n")[-1].removesuffix(" =>") for e in exs]
    gold = ["pos" if e.answer == "positive" else "neg" for e in exs]
    verbalizer = {"pos": "positive", "neg": "negative"}
    pred = prompting.pet_classify(
        model, tok, texts, lambda x: f"Is each review positive or negative?\n{x} =>", verbalizer
    )
    assert sum(p == g for p, g in zip(pred, gold)) >= 38
    with pytest.raises(ValueError, match="verbalizer"):
        prompting.pet_classify(model, tok, texts, lambda x: x, {})
    with pytest.raises(ValueError, match="verbalizer"):
        prompting.pet_classify(model, tok, texts, lambda x: x, {"pos": ""})
