import pytest
import torch
import torch.nn.functional as F

import labkit
from labkit import data
from labkit.distill import distillation_loss
from labkit.evaluation import confidence_interval, evaluate, perplexity
from labkit.train import TrainConfig, train


def test_training_lowers_the_loss():
    model, history = train(
        TrainConfig(config="nano", steps=40, batch_size=8, warmup=5, corpus_chars=100_000, log_every=39), progress=False
    )
    assert history["loss"][-1] < history["loss"][0] - 1.0
    assert set(history["task_accuracy"]) == set(data.tasks())
    assert history["tokens_seen"] == 40 * 8 * 128 and history["val_perplexity"] < 60  # a random model scores ~128


def test_distillation_loss_equals_the_hand_written_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 11, generator=g), torch.randn(4, 6, 11, generator=g)
    y = torch.randint(0, 11, (4, 6), generator=g)
    alpha, T = 0.3, 2.5
    hard = F.cross_entropy(s.view(-1, 11), y.view(-1))
    soft = F.kl_div(F.log_softmax(s / T, -1).view(-1, 11), F.softmax(t / T, -1).view(-1, 11), reduction="batchmean")
    torch.testing.assert_close(
        distillation_loss(s, t, y, alpha, T), alpha * hard + (1 - alpha) * T * T * soft, atol=1e-6, rtol=1e-6
    )


def test_distillation_loss_rejects_bad_arguments_by_name():
    s, t, y = torch.zeros(2, 3, 11), torch.zeros(2, 3, 11), torch.zeros(2, 3, dtype=torch.long)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            distillation_loss(s, t, y, alpha, 2.0)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            distillation_loss(s, t, y, 0.5, temperature)
    with pytest.raises(ValueError, match="vocabularies differ"):
        distillation_loss(s, torch.zeros(2, 3, 12), y, 0.5, 2.0)


def test_keep_layers_is_the_same_model_without_the_other_blocks():
    from labkit.distill import keep_layers
    from labkit.model import LabGPT, get_config

    torch.manual_seed(0)
    model = LabGPT(get_config("nano", n_layer=3)).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(keep_layers(model, range(3))(idx), model(idx), rtol=0, atol=0)
        shallow = keep_layers(model, [2, 0])
        assert shallow.config.n_layer == 2 and shallow.lm_head.weight is shallow.transformer.wte.weight
        t = model.transformer  # the oracle: the original's own modules, blocks 2 then 0
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1)))
        expected = model.lm_head(t.ln_f(t.h[0](t.h[2](x))))
        torch.testing.assert_close(shallow(idx), expected, rtol=0, atol=0)
    shallow.transformer.h[0].ln_1.weight.data.add_(1.0)  # a copy: tuning it leaves the original alone
    assert not torch.equal(shallow.transformer.h[0].ln_1.weight, model.transformer.h[2].ln_1.weight)
    half = keep_layers(model.to(torch.bfloat16).train(), [1])  # dtype and training mode carry over
    assert half.training and half.transformer.wte.weight.dtype == torch.bfloat16 and half.config.n_layer == 1
    assert model.config.n_layer == 3  # the original's config is not touched
    for bad in ([], [3], [0, 0], [-1], "0,2", [True], [0.0], 1, None):
        with pytest.raises(ValueError, match="layers must list distinct block indices in 0..2"):
            keep_layers(model, bad)


def test_forced_scoring_equals_real_greedy_generation():
    model, tok = labkit.load_model("student")
    for task, fmt, shots in (("string", "vague", 0), ("arithmetic", "vague", 0), ("translate", "specific", 2)):
        forced = evaluate(model, tok, task, fmt, shots, n=25, method="forced")
        generated = evaluate(model, tok, task, fmt, shots, n=25, method="generate")
        assert forced == generated, (task, fmt, shots)


def test_shipped_teacher_meets_the_foundation_bars():
    """The labs rely on these effects: specific prompts work, demonstrations resolve vague ones."""
    model, tok = labkit.load_model("tiny")
    specific = {t: evaluate(model, tok, t, "specific", 0, n=100) for t in data.tasks()}
    assert sum(a >= 0.9 for a in specific.values()) >= 3, specific
    gain = [
        evaluate(model, tok, t, "vague", 4, n=100) - evaluate(model, tok, t, "vague", 0, n=100) for t in data.tasks()
    ]
    assert sum(gain) / len(gain) >= 0.20, gain


def test_perplexity_and_interval():
    model, tok = labkit.load_model("student")
    assert 1.0 < perplexity(model, tok, data.corpus(3000, seed=11)) < 3.0
    lo, hi = confidence_interval(0.9, 100)
    assert lo < 0.9 < hi and 0.8 < lo and hi < 0.96


def test_finetune_lowers_the_loss_of_a_damaged_model():
    from labkit.train import finetune

    model, _ = labkit.load_model("student")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # damage it
    losses = finetune(model, steps=12, batch_size=4, seq_len=128, lr=1e-3, progress=False)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert not model.training
