"""Serving: cached decoding, schedulers, speculative decoding, energy bookkeeping."""

import pytest
import torch

from labkit import serving
from labkit.model import LabGPT, get_config


def _pair():
    torch.manual_seed(0)
    target = LabGPT(get_config("nano")).eval()
    torch.manual_seed(1)
    draft = LabGPT(get_config("nano", n_layer=1)).eval()
    return target, draft


def test_cached_and_uncached_decoding_give_identical_tokens(nano):
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = nano.generate(idx, 40, temperature=0, use_cache=True)
        b = nano.generate(idx, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 9, 40])
@pytest.mark.parametrize("stop_below", [None, 0.0116])  # the random draft: top probabilities 0.010-0.013
def test_speculative_greedy_output_equals_the_target_alone(k, n, stop_below):
    target, draft = _pair()  # two random models: they disagree often, every branch runs
    idx = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(k * 100 + n))
    stats = {}
    out = serving.speculative_generate(target, draft, idx, n, k, stats, stop_below)
    with torch.no_grad():
        ref = target.generate(idx, n, temperature=0)
    assert torch.equal(out, ref)
    if n > 1:
        assert 0 <= stats["accepted"] <= stats["proposed"]


def test_speculative_with_the_target_as_its_own_draft_accepts_everything():
    target, _ = _pair()
    idx = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(3))
    stats = {}
    out = serving.speculative_generate(target, target, idx, 30, 4, stats)
    assert torch.equal(out, target.generate(idx, 30, temperature=0))
    assert stats["acceptance"] == 1.0


def test_speculative_bad_input():
    target, draft = _pair()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="k"):
        serving.speculative_generate(target, draft, idx, 5, 0)
    other = LabGPT(get_config("nano", vocab_size=64))
    with pytest.raises(ValueError, match="vocabulary"):
        serving.speculative_generate(target, other, idx, 5, 2)
    with pytest.raises(ValueError, match="context"):
        serving.speculative_generate(target, draft, idx, 200, 2)
    with pytest.raises(ValueError, match="stop_below"):
        serving.speculative_generate(target, draft, idx, 5, 2, stop_below=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        serving.speculative_generate(target, draft, idx, 2.5, 2)
    with pytest.raises(ValueError, match="idx must be one sequence"):
        serving.speculative_generate(target, draft, [[0, 1, 2]], 5, 2)


@pytest.mark.parametrize("prompt_len", [1, 100, 127])
@pytest.mark.parametrize("k", [1, 8, 200])
def test_speculative_fills_the_context_exactly_as_the_target_does(prompt_len, k):
    # prompt + new tokens = the whole context (128): the target alone can, so speculation must too,
    # whatever k (a round never guesses past the tokens still to make)
    target, draft = _pair()
    idx = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    n = target.config.block_size - prompt_len
    with torch.no_grad():
        ref = target.generate(idx, n, temperature=0)
    assert torch.equal(serving.speculative_generate(target, draft, idx, n, k), ref)
    assert torch.equal(serving.speculative_generate(target, target, idx, n, k), ref)
    with pytest.raises(ValueError, match="context"):
        serving.speculative_generate(target, draft, idx, n + 1, k)


def test_held_out_prompts_are_document_openings_of_growing_length():
    prompts = serving.held_out_prompts(3)
    assert [tuple(p.shape) for p in prompts] == [(1, 24), (1, 28), (1, 32)]
    assert all(p.dtype == torch.long for p in prompts)
    with pytest.raises(ValueError, match="n must"):
        serving.held_out_prompts(0)


def test_greedy_agreement_counts_the_drafts_greedy_hits():
    target, draft = _pair()
    prompts = [torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 7)]
    assert serving.greedy_agreement(target, target, prompts, 20) == 1.0  # a model agrees with itself
    hits = total = 0
    with torch.no_grad():  # the same count, one token at a time
        for idx in prompts:
            seq = target.generate(idx, 20, temperature=0)
            for t in range(idx.size(1), seq.size(1)):
                hits += int(draft(seq[:, :t])[0, -1].argmax() == seq[0, t])
                total += 1
    assert serving.greedy_agreement(target, draft, prompts, 20) == pytest.approx(hits / total)
    with pytest.raises(ValueError, match="prompts"):
        serving.greedy_agreement(target, draft, [], 20)
    with pytest.raises(ValueError, match="vocabulary"):
        serving.greedy_agreement(target, LabGPT(get_config("nano", vocab_size=64)), prompts, 20)


def test_distilling_the_draft_on_the_targets_text_raises_its_acceptance():
    """DistillSpec in miniature: a random 1-layer draft learns the shipped tiny's greedy choices."""
    import labkit
    from labkit import data, distill

    target, tokenizer = labkit.load_model("tiny")
    torch.manual_seed(0)
    draft = LabGPT(get_config("tiny", n_layer=1)).eval()
    train = distill.target_continuations(target, data.corpus(20_000, seed=3), 48, prompt_lengths=(8, 16),
                                         new_tokens=24, batch_size=16, progress=False)  # fmt: skip
    assert [(length, tuple(ids.shape)) for length, ids in train] == [(8, (16, 32)), (16, (16, 40)), (8, (16, 32))]
    with torch.no_grad():  # the continuations are the target's greedy output
        length, ids = train[1]
        assert torch.equal(ids, target.generate(ids[:, :length], 24, temperature=0))
    held_out = [tokenizer.tensor(s).view(1, -1) for s in ("Once upon a time", "Translate to French: cat", "The dog")]
    before = serving.greedy_agreement(target, draft, held_out, 24)
    losses = distill.distill_draft(draft, target, train, steps=80, batch_size=16, lr=3e-3, progress=False)
    after = serving.greedy_agreement(target, draft, held_out, 24)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert after > before + 0.1, (before, after)
    assert not draft.training


def test_the_shipped_drafts_agree_with_tiny_and_speculate_exactly():
    """The shipped drafts are what notebook 16 says: 3 and 2 blocks, agreeing with tiny on its own text."""
    import labkit

    target, _ = labkit.load_model("tiny")
    prompts = serving.held_out_prompts(2)
    for name, blocks in (("student-draft", 3), ("student-draft-2layer", 2)):
        draft, _ = labkit.load_model(name)
        assert draft.config.n_layer == blocks
        assert serving.greedy_agreement(target, draft, prompts, 64) > 0.95, name
        with torch.no_grad():
            out = serving.speculative_generate(target, draft, prompts[1], 64, k=8)
            assert torch.equal(out, target.generate(prompts[1], 64, temperature=0)), name


def test_draft_distillation_bad_input():
    from labkit import distill

    target, draft = _pair()
    with pytest.raises(ValueError, match="n must"):
        distill.target_continuations(target, "some text\n\nmore text", 0)
    with pytest.raises(ValueError, match="context"):
        distill.target_continuations(target, "some text", 4, prompt_lengths=(100,), new_tokens=100)
    with pytest.raises(ValueError, match="data"):
        distill.distill_draft(draft, target, [], steps=1)
    with pytest.raises(ValueError, match="steps"):
        distill.distill_draft(draft, target, [(2, torch.zeros(1, 5, dtype=torch.long))], steps=0)
    with pytest.raises(ValueError, match="vocabulary"):
        other = LabGPT(get_config("nano", vocab_size=64))
        distill.distill_draft(other, target, [(2, torch.zeros(1, 5, dtype=torch.long))], steps=1)


def test_expected_speedup_formula():
    assert serving.expected_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert serving.expected_speedup(0.0, 4, 0.25) == pytest.approx(1 / 2)
    a, k = 0.8, 3
    assert serving.expected_speedup(a, k, 0.5, 1.0) == pytest.approx((1 + a + a**2 + a**3) / (k * 0.5 + 1))


@pytest.mark.parametrize("policy", ["static", "continuous"])
def test_schedulers_serve_every_request_once_with_its_full_output(nano, policy):
    reqs = serving.make_workload(10, rate=500.0, prompt_len=(3, 12), short=(1, 4), long=(20, 40), seed=1)
    ref = serving.reference_outputs(nano, reqs)
    out = serving.serve(nano, reqs, policy, max_batch=3)
    served = out["requests"]
    assert sorted(r.rid for r in served) == list(range(10))
    for r in served:
        assert r.output == ref[r.rid]
        assert len(r.output) == r.max_new_tokens
        assert r.arrival <= r.first_token_at <= r.finished_at
    assert out["tokens"] == sum(r.max_new_tokens for r in reqs)


def test_continuous_batching_needs_fewer_steps_than_static(nano):
    reqs = serving.make_workload(12, rate=1e4, prompt_len=(3, 8), short=(1, 3), long=(30, 40), long_fraction=0.25)
    static = serving.serve(nano, reqs, "static", 4)
    cont = serving.serve(nano, reqs, "continuous", 4)
    assert cont["decode_steps"] < static["decode_steps"]
    assert cont["slot_utilisation"] > static["slot_utilisation"]


def test_workload_and_serve_bad_input(nano):
    with pytest.raises(ValueError, match="rate"):
        serving.make_workload(4, rate=0)
    with pytest.raises(ValueError, match="policy"):
        serving.serve(nano, serving.make_workload(2), "fifo")
    too_long = [serving.Request(0, 0.0, [1] * 120, 20)]
    with pytest.raises(ValueError, match="context"):
        serving.serve(nano, too_long, "continuous")


@pytest.mark.parametrize("call, match", [
    (lambda m: serving.make_workload(vocab_size=1), "vocab_size"),
    (lambda m: serving.make_workload(prompt_len=(5, 3)), "prompt_len must be a"),
    (lambda m: serving.make_workload(short=(0, 0)), "short must be a"),
    (lambda m: serving.generation_time(m, -1, 5, True), "prompt_len"),
    (lambda m: serving.generation_time(m, 4, 2.5, True), "new_tokens"),
    (lambda m: serving.expected_speedup(0.5, 0, 0.3), "k"),
    (lambda m: serving.expected_speedup(0.5, 4, -1.0), "cost_ratio"),
    (lambda m: serving.expected_speedup(0.5, 4, 0.0, 0.0), "both 0"),
    (lambda m: serving.measure_energy(lambda: None, repeat=0), "repeat"),
    (lambda m: serving.held_out_prompts(51), r"1\.\.50"),
    (lambda m: m(torch.zeros(1, 3, dtype=torch.long), cache=LabGPT(get_config("nano", n_head=4)).new_cache(1)), "heads"),
    (lambda m: m(torch.zeros(1, 3, dtype=torch.long), cache=LabGPT(get_config("nano", block_size=64)).new_cache(1)),
     "positions"),
])
def test_serving_bad_input_names_the_argument(nano, call, match):
    with pytest.raises(ValueError, match=match):
        call(nano)


def test_held_out_prompts_gives_as_many_as_asked_up_to_its_limit():
    assert len(serving.held_out_prompts(50)) == 50


def test_percentile_matches_torch_quantile():
    values = sorted(torch.rand(37, generator=torch.Generator().manual_seed(0)).tolist())
    for q in (50, 95, 99):
        assert serving._percentile(values, q) == pytest.approx(torch.quantile(torch.tensor(values), q / 100).item())


def test_energy_reports_its_source():
    out = serving.measure_energy(lambda: sum(range(1000)), repeat=2)
    assert out["source"] in ("nvml", "rapl", "estimate") and out["seconds"] > 0
    assert (out["joules"] is None) == (out["source"] == "estimate")
    assert serving.estimated_joules(1e12, 1e12, 100.0, 0.5) == pytest.approx(200.0)
    with pytest.raises(ValueError):
        serving.estimated_joules(1e12, 0, 100.0, 0.5)


def test_power_law_fit():
    xs = [8, 16, 32, 64]
    assert serving.fit_power(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)


def test_whole_cache_decode_step_equals_the_trimmed_one(nano):
    """The CUDA-graph-friendly step (fixed shapes, masked) computes the same logits."""
    caches = [serving.SlotCache(nano, 3) for _ in range(2)]
    for c in caches:
        for slot, prompt in enumerate(([1, 2, 3], [4, 5, 6, 7, 8], [9])):
            c.admit(nano, slot, prompt)
    tokens = torch.tensor([11, 12, 13])
    for _ in range(4):
        a = serving.decode_step(nano, caches[0], torch.arange(3), tokens)
        b = serving.decode_step(nano, caches[1], slice(None), tokens, whole_cache=True)
        assert torch.allclose(a, b, atol=1e-5)
        tokens = a.argmax(-1)
    assert torch.equal(caches[0].length, caches[1].length)


def test_count_ops_counts_computing_operators_not_views():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    counts = serving.count_ops(lambda: (a + b).relu().view(12).t().sum())
    assert counts == {"add": 1, "relu": 1, "sum": 1}


def test_decode_step_runs_about_17_operators_a_layer(nano):
    cache = serving.SlotCache(nano, 1)
    cache.admit(nano, 0, [1, 2, 3])
    with torch.no_grad():
        counts = serving.count_ops(lambda: serving.decode_step(nano, cache, slice(None), torch.tensor([4])))
    assert counts["addmm"] == 4 * nano.config.n_layer  # qkv, attention projection and the MLP's two
    assert counts["native_layer_norm"] == 2 * nano.config.n_layer + 1
    assert 15 * nano.config.n_layer < sum(counts.values()) < 20 * nano.config.n_layer + 10
