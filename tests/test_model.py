import json

import pytest
import torch

import labkit
from labkit.model import (
    KVCache,
    LabGPT,
    get_config,
    load_checkpoint,
    manual_attention,
    replace_linears,
    sample,
    save_checkpoint,
    sdpa_attention,
)


def test_kv_cache_decoding_matches_full_forward(nano):
    idx = torch.randint(0, nano.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = nano(idx)
        cache = nano.new_cache(batch_size=2)
        pieces = [nano(idx[:, :25], cache=cache)]  # prefill 25 tokens
        pieces += [nano(idx[:, t : t + 1], cache=cache) for t in range(25, 33)]  # one token at a time
        pieces.append(nano(idx[:, 33:], cache=cache))  # a chunk of 7 after the cache (mask needed)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 40


def test_kv_cache_matches_full_forward_on_the_trained_teacher():
    model, tok = labkit.load_model("tiny")
    idx = tok.tensor("Translate each English word into French.\ncheese => fromage\nbread =>")
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        steps = [model(idx[:, :20], cache=cache)] + [
            model(idx[:, t : t + 1], cache=cache) for t in range(20, idx.size(1))
        ]
    # trained logits reach ~25; float32 rounding (sums in another order) is relative to that scale
    error = (torch.cat(steps, dim=1) - full).abs().max() / full.abs().max()
    assert error < 1e-5


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_generate_with_and_without_cache_agree(nano, attention):
    nano.set_attention(attention)
    idx = torch.randint(0, nano.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with_cache = nano.generate(idx, 30, temperature=0, use_cache=True)
    without = nano.generate(idx, 30, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (1, 37)


def test_manual_and_sdpa_attention_agree(nano):
    idx = torch.randint(0, nano.config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = nano.set_attention("manual")(idx)
        b = nano.set_attention("sdpa")(idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_greedy_is_argmax_of_logits(nano):
    idx = torch.randint(0, nano.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    out = nano.generate(idx, 1, temperature=0)
    with torch.no_grad():
        assert out[0, -1] == nano(idx)[0, -1].argmax()


def test_sampling_is_seeded_and_top_k_respected(nano):
    idx = torch.zeros((1, 1), dtype=torch.long)
    a = nano.generate(idx, 20, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = nano.generate(idx, 20, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # hot sampling from fixed logits: with top_k=3 only the three largest ever come out; without, many more
    logits = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    drawn = {int(sample(logits, 5.0, 3, g)) for _ in range(300)}
    assert drawn == set(torch.topk(logits, 3).indices[0].tolist())
    assert len({int(sample(logits, 5.0, None, g)) for _ in range(300)}) > 20


def test_sdpa_backend_keeps_the_causal_offset_for_one_query():
    # one query at position q_offset sees keys 0..q_offset only, even when more keys are passed (backend contract)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (1, 9, 9))
    for offset in (3, 8):
        torch.testing.assert_close(sdpa_attention(q, k, v, offset), manual_attention(q, k, v, offset))


def test_model_level_bad_input_found_by_a_review(nano, tmp_path):
    from labkit.early_exit import ExitHeads, load_exit_heads, save_exit_heads
    from labkit.tokenizer import CharTokenizer
    from labkit.train import Batches

    with pytest.raises(ValueError, match="GPTConfig.attention must be"):
        get_config("nano", attention=["sdpa"])
    for bad in ("\n", 128, True):
        with pytest.raises(ValueError, match="stop_token must be None or a token id"):
            nano.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0, stop_token=bad)
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="one sequence of integer ids"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        tok.decode([True])
    with pytest.raises(ValueError, match="shorter than one window"):
        Batches("hello", tok, 128, 0)
    ExitHeads(LabGPT(get_config("nano", bias=False)))  # a bias-free model gets bias-free exit norms
    save_exit_heads(ExitHeads(LabGPT(get_config("nano", n_layer=3))), tmp_path / "three.safetensors")
    with pytest.raises(ValueError, match="exit heads for another model"):
        load_exit_heads(nano, tmp_path / "three.safetensors")


def test_hidden_states_and_inputs_embeds(nano):
    idx = torch.randint(0, nano.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, hidden = nano(idx, return_hidden=True)
        assert len(hidden) == nano.config.n_layer and hidden[-1].shape == (2, 9, nano.config.n_embd)
        # the last hidden state through the final norm and head is the logits
        torch.testing.assert_close(nano.lm_head(nano.transformer.ln_f(hidden[-1])), logits)
        via_embeds = nano(inputs_embeds=nano.transformer.wte(idx))
    torch.testing.assert_close(via_embeds, logits)


def test_stop_token_ends_generation(nano):
    idx = torch.zeros((1, 3), dtype=torch.long)
    first = nano.generate(idx, 1, temperature=0)[0, -1].item()
    out = nano.generate(idx, 50, temperature=0, stop_token=first)
    assert out.shape[1] == 4


def test_prompt_longer_than_context_is_a_value_error(nano):
    too_long = torch.zeros((1, nano.config.block_size + 1), dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        nano(too_long)
    with pytest.raises(ValueError, match="block_size"):
        nano.generate(too_long[:, :-5], 10)


def test_bad_arguments_are_value_errors(nano):
    with pytest.raises(ValueError, match="temperature"):
        nano.generate(torch.zeros((1, 1), dtype=torch.long), 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        nano.generate(torch.zeros((1, 1), dtype=torch.long), 2, top_k=0)
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        get_config("nano", n_head=3)
    with pytest.raises(ValueError, match="unknown attention"):
        nano.set_attention("magic")


def test_replace_linears_swaps_every_linear_but_the_head(nano):
    class Doubled(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)

    names = []
    replace_linears(nano, lambda name, lin: names.append(name) or Doubled(lin))
    assert len(names) == 4 * nano.config.n_layer
    assert isinstance(nano.lm_head, torch.nn.Linear)
    nano(torch.zeros((1, 4), dtype=torch.long))


def test_checkpoint_round_trip(nano, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(nano, path, {"note": "hi"})
    loaded = load_checkpoint(path)
    idx = torch.randint(0, nano.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), nano(idx))
    assert loaded.config == nano.config


def test_truncated_or_malformed_checkpoint_is_a_value_error(nano, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(nano, path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_checkpoint(junk)
    with pytest.raises(ValueError, match="not a file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    from labkit.memory import save_safetensors

    foreign = tmp_path / "foreign.safetensors"
    save_safetensors({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a labkit checkpoint"):
        load_checkpoint(foreign)


def test_load_model_names():
    assert {"tiny", "student"} <= set(labkit.available_models())
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*allowed"):
        labkit.load_model("gpt5")
    model, tok = labkit.load_model("student")
    assert model.config.vocab_size >= tok.vocab_size and model.config.block_size == 512
    assert not model.training


def test_kv_cache_crop_and_size():
    cfg = get_config("nano")
    cache = KVCache(cfg, batch_size=2)
    assert cache.nbytes() == 2 * cfg.n_layer * 2 * cfg.block_size * cfg.n_embd * 4
    with pytest.raises(ValueError, match="crop length"):
        cache.crop(5)


def test_load_hf_gpt2_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from labkit.model import load_hf_gpt2

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["n_layer"] == 2
    ours = load_hf_gpt2(tmp_path)
    idx = torch.randint(0, 99, (2, 20))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="config.json"):
        load_hf_gpt2(tmp_path / "nowhere")
