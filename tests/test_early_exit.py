import pytest
import torch

import labkit
from labkit import early_exit
from labkit.model import LabGPT, get_config

PROMPTS = ["Translate each English word into French.\ncheese =>", "One sunny day, Tom", "12 + 7 =>"]


def test_threshold_one_reproduces_greedy_decoding_exactly():
    model, tok = labkit.load_model("student")
    heads = early_exit.ExitHeads(model)
    for prompt in PROMPTS:
        idx = tok.tensor(prompt)
        tokens, layers = early_exit.generate(model, heads, idx, 25, threshold=1.0)
        assert torch.equal(tokens, model.generate(idx, 25, temperature=0))
        assert layers == [model.config.n_layer] * 25


def test_exits_never_use_more_layers_than_the_model_has_and_fill_the_cache():
    torch.manual_seed(0)
    model = LabGPT(get_config("nano", n_layer=4)).eval()
    heads = early_exit.ExitHeads(model)
    idx = torch.randint(0, 100, (1, 6))
    for threshold in (1e-9, 0.02, 0.5, 1.0):
        tokens, layers = early_exit.generate(model, heads, idx, 12, threshold=threshold)
        assert tokens.shape == (1, 18) and all(1 <= n <= 4 for n in layers)
    _, layers = early_exit.generate(model, heads, idx, 12, threshold=1e-9)
    assert layers == [1] * 12  # any confidence clears a tiny threshold: exit after the first layer


def test_skipped_layers_get_keys_and_values_from_the_exit_state():
    torch.manual_seed(0)
    model = LabGPT(get_config("nano", n_layer=3)).eval()
    cache = model.new_cache(1)
    hidden = torch.randn(1, 1, model.config.n_embd)
    early_exit._fill_skipped(model, cache, hidden, first=1, start=5)
    block = model.transformer.h[2]
    _, k, _ = block.attn.c_attn(block.ln_1(hidden)).split(model.config.n_embd, dim=2)
    expected = k.view(1, 1, model.config.n_head, -1).transpose(1, 2)
    torch.testing.assert_close(cache.k[2][:, :, 5:6], expected)
    assert torch.count_nonzero(cache.k[0]) == 0  # layer 0 ran for real: not filled here


def test_cached_exits_equal_recomputing_the_sequence_without_a_cache(monkeypatch):
    """The oracle for the cache fill: a cacheless recomputation in which exited tokens carry their state
    upward gives the same tokens and exit layers, plain and folded; with the fill broken it does not."""
    model, tok = labkit.load_model("tiny")
    heads = early_exit.load_exit_heads(model, labkit.DATA_DIR / "exit_heads" / "tiny.safetensors")
    for prompt in PROMPTS[:2]:
        idx = tok.tensor(prompt)
        for threshold in (0.6, 0.9):
            expected = early_exit.generate_recomputed(model, heads, idx, 16, threshold)
            assert min(expected[1]) < model.config.n_layer  # some tokens do exit early: the fill is exercised
            for folded in (False, True):
                tokens, layers = early_exit.generate(model, heads, idx, 16, threshold, folded=folded)
                assert torch.equal(tokens, expected[0]) and layers == expected[1]
    monkeypatch.setattr(early_exit, "_fill_skipped", lambda *args: None)  # skipped layers keep zeros
    idx = tok.tensor(PROMPTS[1])
    broken = early_exit.generate(model, heads, idx, 16, 0.6, folded=False)
    expected = early_exit.generate_recomputed(model, heads, idx, 16, 0.6)
    assert not (torch.equal(broken[0], expected[0]) and broken[1] == expected[1])
    with pytest.raises(ValueError, match="threshold"):
        early_exit.generate_recomputed(model, heads, idx, 4, 0.0)


def test_bad_thresholds_and_heads_round_trip(tmp_path):
    model, tok = labkit.load_model("student")
    heads = early_exit.ExitHeads(model)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            early_exit.generate(model, heads, tok.tensor("hi"), 3, threshold=bad)
    with torch.no_grad():
        heads.maps[0].bias.add_(1.0)
    early_exit.save_exit_heads(heads, tmp_path / "h.safetensors")
    loaded = early_exit.load_exit_heads(model, tmp_path / "h.safetensors")
    assert torch.equal(loaded.maps[0].bias, heads.maps[0].bias)
    with pytest.raises(ValueError, match="exit-heads"):
        early_exit.load_exit_heads(model, labkit.DATA_DIR / "student.safetensors")


def test_folded_exits_equal_the_heads_and_the_fill():
    """FoldedExits is algebra: its exit logits and filled keys/values equal the unfolded ones (float rounding)."""
    torch.manual_seed(0)
    model = LabGPT(get_config("nano", n_layer=4)).eval()
    heads = early_exit.ExitHeads(model)
    with torch.no_grad():  # move the heads and norms off their identity start, so the folding is exercised
        for module in list(heads.modules()) + [b.ln_1 for b in model.transformer.h]:
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    folded = early_exit.FoldedExits(model, heads)
    assert early_exit.FoldedExits.applies(model, heads)
    hidden = torch.randn(1, 1, model.config.n_embd)
    n = folded.normalise(hidden[:, -1])
    for layer in range(model.config.n_layer - 1):
        torch.testing.assert_close(folded.exit_logits(n, layer), heads.logits(model, hidden[:, -1], layer),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    ours, theirs = model.new_cache(1), model.new_cache(1)
    folded.fill(ours, n, first=1, start=3)
    early_exit._fill_skipped(model, theirs, hidden, first=1, start=3)
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(ours.k[layer], theirs.k[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.v[layer], theirs.v[layer], rtol=1e-5, atol=1e-5)


def test_folded_and_plain_exits_decode_the_same_tokens():
    model, tok = labkit.load_model("tiny")
    heads = early_exit.load_exit_heads(model, labkit.DATA_DIR / "exit_heads" / "tiny.safetensors")
    folded = early_exit.FoldedExits(model, heads)
    for prompt in PROMPTS:
        for threshold in (0.8, 0.95, 0.99):
            plain = early_exit.generate(model, heads, tok.tensor(prompt), 20, threshold, folded=False)
            fast = early_exit.generate(model, heads, tok.tensor(prompt), 20, threshold, folded=folded)
            assert torch.equal(plain[0], fast[0]) and plain[1] == fast[1]
    pruned = labkit.prune.prune_model(model, 0.5, "heads")  # fewer heads in a block: the plain path is used
    assert not early_exit.FoldedExits.applies(pruned, heads)


def test_tune_for_exits_trains_a_copy_and_round_trips(tmp_path):
    model, _ = labkit.load_model("student")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, heads, losses = early_exit.tune_for_exits(model, steps=8, batch_size=2, seq_len=64, lr=3e-4,
                                                     heads_lr=3e-3, progress=False)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]  # the exits learn (2.78 -> 1.98 when written)
    early_exit.save_tuned(tuned, heads, tmp_path / "t.safetensors")
    again, again_heads = early_exit.load_tuned(tmp_path / "t.safetensors")
    idx = torch.randint(0, 100, (1, 8))
    assert torch.equal(again(idx), tuned(idx))
    assert torch.equal(again_heads.maps[1].weight, heads.maps[1].weight)
    with pytest.raises(ValueError, match="tuned exit model"):
        early_exit.load_tuned(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="steps"):
        early_exit.tune_for_exits(model, steps=0)


def test_compare_thresholds_interleaves_and_keeps_the_deterministic_fields():
    model, tok = labkit.load_model("student")
    heads = early_exit.ExitHeads(model)
    tasks = labkit.data.tasks()[:1]
    rows = early_exit.compare_thresholds([("a", model, heads, 1.0), ("b", model, heads, 0.5)], tok, n=2, rounds=2,
                                         tasks=tasks)  # fmt: skip
    single = early_exit.evaluate_threshold(model, heads, tok, 0.5, tasks=tasks, n=2)
    assert [r["label"] for r in rows] == ["a", "b"] and rows[0]["mean_layers"] == model.config.n_layer
    assert rows[1]["accuracy"] == single["accuracy"] and rows[1]["mean_layers"] == single["mean_layers"]
    assert all(r["seconds_per_token"] > 0 for r in rows)
    with pytest.raises(ValueError, match="rounds"):
        early_exit.compare_thresholds([], tok, rounds=0)


def test_shipped_tuned_model_exits_earlier_and_keeps_the_answers():
    teacher, tok = labkit.load_model("tiny")
    frozen = early_exit.load_exit_heads(teacher, labkit.DATA_DIR / "exit_heads" / "tiny.safetensors")
    tuned, heads = early_exit.load_tuned(labkit.DATA_DIR / "exit_heads" / "tiny-tuned.safetensors")
    tasks = labkit.data.tasks()[:2]
    before = early_exit.evaluate_threshold(teacher, frozen, tok, 0.99, tasks=tasks, n=6)
    after = early_exit.evaluate_threshold(tuned, heads, tok, 0.99, tasks=tasks, n=6)
    assert after["mean_layers"] < before["mean_layers"] - 0.5  # 2.7 vs 4.5 layers over all tasks when shipped
    assert after["accuracy"] >= before["accuracy"] - 1 / 12  # at most one of these 12 answers lost
