import copy
import math
import time

import pytest
import torch
import torch.nn as nn

from labkit import check
from labkit.model import LabGPT, get_config
from labkit.prune import (
    MaskedLinear,
    PrunedSelfAttention,
    bitmask_bytes,
    calibration_batch,
    count_to_prune,
    csr_bytes,
    dense_bytes,
    global_magnitude_prune,
    head_importance,
    head_output_norms,
    iterative_prune,
    magnitude_prune,
    mask_heads,
    mask_neurons,
    prune_model,
    select_heads,
    select_neurons,
    semi_structured_bytes,
    semi_structured_mask,
    threshold_for_sparsity,
    to_semi_structured,
    weight_sparsity,
)


@pytest.fixture
def small():
    """A LabGPT with 4 heads of size 8 and 3 layers (nano has only 2 heads): room for head pruning."""
    torch.manual_seed(0)
    return LabGPT(get_config("nano", n_layer=3, n_head=4, n_embd=32)).eval()


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# Magnitude pruning of tensors
# ---------------------------------------------------------------------------------------
def test_count_to_prune_rounds_the_written_decimal_halves_up():
    # an oracle in integers: sparsity = thousandths / 1000, round(s n) with halves up = floor((2 t n + 1000) / 2000)
    for n in range(1, 300):
        for thousandths in range(0, 1000, 7):
            expected = min(n, (2 * thousandths * n + 1000) // 2000)
            assert count_to_prune(n, thousandths / 1000) == expected, (n, thousandths)
    assert count_to_prune(45, 0.7) == 32  # 31.5 up; floats make 0.7 * 45 + 0.5 = 31.999...
    assert count_to_prune(10, 0.25) == 3 and count_to_prune(10, 0.15) == 2  # 2.5 up; 1.5 up


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(1000,), (64, 48), (3, 5, 8)])
def test_magnitude_prune_reaches_the_sparsity_exactly(shape, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    pruned, mask = magnitude_prune(w, sparsity=sparsity)
    n = w.numel()
    assert int((~mask).sum()) == count_to_prune(n, sparsity)
    assert int((pruned == 0).sum()) == count_to_prune(n, sparsity)
    assert torch.equal(pruned, w * mask)
    if 0 < sparsity:
        assert w.abs()[~mask].max() <= w.abs()[mask].min()  # the smallest magnitudes went


def test_magnitude_prune_is_exact_and_deterministic_with_ties():
    w = torch.tensor([[1.0, -1.0, 1.0, 2.0], [-1.0, 1.0, 3.0, 1.0]])  # six weights share |w| = 1
    pruned, mask = magnitude_prune(w, sparsity=0.25)
    assert int((~mask).sum()) == 2
    assert mask.flatten()[:2].tolist() == [False, False]  # ties broken by position: the first two go
    assert torch.equal(magnitude_prune(w, sparsity=0.25)[1], mask)


def test_threshold_rule_and_the_threshold_for_a_sparsity():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    pruned, mask = magnitude_prune(w, threshold=0.5)
    assert torch.equal(mask, w.abs() >= 0.5) and torch.equal(pruned, w * (w.abs() >= 0.5))
    for sparsity in (0.0, 0.3, 0.75):
        tau = threshold_for_sparsity(w, sparsity)
        assert torch.equal(magnitude_prune(w, threshold=tau)[1], magnitude_prune(w, sparsity=sparsity)[1])
    assert threshold_for_sparsity(torch.ones(3), 0.9) == math.inf  # round(2.7) = 3: all of them


def test_global_pruning_uses_one_ranking_and_layer_wise_one_per_tensor():
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(50, 20, generator=g), 0.1 * torch.randn(30, 30, generator=g), torch.randn(7, generator=g)]
    total = sum(w.numel() for w in weights)
    results = global_magnitude_prune(weights, sparsity=0.6)
    assert sum(int((~m).sum()) for _, m in results) == count_to_prune(total, 0.6)
    largest_pruned = max(w.abs()[~m].max() for w, (_, m) in zip(weights, results) if (~m).any())
    smallest_kept = min(w.abs()[m].min() for w, (_, m) in zip(weights, results) if m.any())
    assert largest_pruned <= smallest_kept  # one threshold for all
    shares = [1 - m.float().mean().item() for _, m in results]
    assert shares[1] > 0.9 > shares[0]  # the small-scale tensor loses almost everything
    for w in weights:  # layer-wise: each tensor exactly
        assert int((~magnitude_prune(w, sparsity=0.6)[1]).sum()) == count_to_prune(w.numel(), 0.6)


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    mask = semi_structured_mask(w)
    groups, kept = w.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert torch.equal(kept.sum(dim=1), torch.full((groups.shape[0],), 2))
    top2 = groups.topk(2, dim=1).values
    assert torch.equal(groups[kept].view(-1, 2).sort(dim=1).values, top2.sort(dim=1).values)
    tie = semi_structured_mask(torch.ones(1, 8))
    assert tie.tolist() == [[True, True, False, False, True, True, False, False]]


# ---------------------------------------------------------------------------------------
# Pruning LabGPT
# ---------------------------------------------------------------------------------------
def block_linears(model):
    return [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]


def test_unstructured_model_pruning_layer_wise_and_global(small):
    layer = prune_model(small, 0.7)
    for dense, masked in zip(block_linears(small), block_linears(layer)):
        assert isinstance(masked, MaskedLinear)
        assert int((masked.weight == 0).sum()) == count_to_prune(dense.weight.numel(), 0.7)
    glob = prune_model(small, 0.7, scope="global")
    total = sum(m.weight.numel() for m in block_linears(small))
    assert sum(int((m.weight == 0).sum()) for m in block_linears(glob)) == count_to_prune(total, 0.7)
    assert abs(weight_sparsity(glob) - 0.7) < 1e-3
    shares = {round(1 - m.mask.float().mean().item(), 3) for m in block_linears(glob)}
    assert len(shares) > 1  # global: layers lose different shares
    assert not any(isinstance(m, MaskedLinear) for m in block_linears(small))  # a copy: the original is untouched
    x = tokens()
    with torch.no_grad():
        reference = copy.deepcopy(small)
        for dense, masked in zip(block_linears(reference), block_linears(layer)):
            dense.weight.mul_(masked.mask)
        torch.testing.assert_close(layer(x), reference(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_removing_neurons_equals_masking_them(small, scope):
    keep = select_neurons(small, 0.5, scope)
    pruned = prune_model(small, 0.5, "neurons", scope=scope)
    hidden = 4 * small.config.n_embd
    assert sum(len(k) for k in keep) == 3 * hidden - count_to_prune(3 * hidden, 0.5)
    for block, kept in zip(pruned.transformer.h, keep):
        assert block.mlp.c_fc.weight.shape == (len(kept), 32)  # physically smaller
        assert block.mlp.c_proj.weight.shape == (32, len(kept))
        if scope == "layer":
            assert len(kept) == hidden - count_to_prune(hidden, 0.5)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), mask_neurons(small, keep)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_removing_heads_equals_masking_them(small, scope):
    calibration = tokens(4, 32, seed=9)
    keep = select_heads(small, 0.5, scope, calibration)
    pruned = prune_model(small, 0.5, "heads", scope=scope, calibration=calibration)
    assert sum(len(k) for k in keep) == 6
    for block, kept in zip(pruned.transformer.h, keep):
        assert isinstance(block.attn, PrunedSelfAttention) and block.attn.n_head == len(kept)
        assert block.attn.c_attn.weight.shape == (3 * 8 * len(kept), 32)
        assert block.attn.c_proj.weight.shape == (32, 8 * len(kept))
        if scope == "layer":
            assert len(kept) == 2
    masked = mask_heads(small, keep)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)
        pruned.set_attention("manual")
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)
        with_cache = pruned.generate(x[:1, :5], 12, temperature=0, use_cache=True)
        assert torch.equal(with_cache, pruned.generate(x[:1, :5], 12, temperature=0, use_cache=False))
        assert torch.equal(with_cache, masked.generate(x[:1, :5], 12, temperature=0))


def test_head_scores_rank_the_head_that_matters(small):
    scores = head_importance(small, tokens(2, 16))
    assert [s.shape for s in scores] == [(4,)] * 3
    y = torch.randn(5, 16)
    w = torch.randn(6, 16)
    w[:, :8] *= 10  # head 0's projection is ten times larger
    assert head_output_norms(y, w, 2).argmax() == 0
    pruned = prune_model(small, 0.75, "heads", scope="global", calibration=tokens(4, 32, seed=9))
    assert sum(b.attn.n_head for b in pruned.transformer.h) == 3  # 9 of the 12 heads gone, across layers
    emptied = copy.deepcopy(small)  # a whole model with a layer of no heads at all: it still runs, with a cache too
    emptied.transformer.h[1].attn = PrunedSelfAttention.from_attention(emptied.transformer.h[1].attn,
                                                                       torch.tensor([], dtype=torch.long))  # fmt: skip
    assert [b.attn.n_head for b in emptied.transformer.h] == [4, 0, 4]
    with torch.no_grad():
        assert torch.isfinite(pruned(tokens())).all() and torch.isfinite(emptied(tokens())).all()
        x = tokens()[:1, :5]
        assert torch.equal(emptied.generate(x, 12, temperature=0), emptied.generate(x, 12, temperature=0, use_cache=False))


def test_heads_pruned_to_zero_leave_only_the_bias(small):
    from labkit.prune import PrunedSelfAttention as P

    attn = P.from_attention(small.transformer.h[0].attn, torch.tensor([], dtype=torch.long))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), small.transformer.h[0].attn.c_proj.bias.expand(2, 5, 32))


def test_two_four_model_pruning(small):
    pruned = prune_model(small, 0.5, "2:4")
    for m in block_linears(pruned):
        assert torch.equal(m.mask.reshape(-1, 4).sum(dim=1), torch.full((m.mask.numel() // 4,), 2))
        assert torch.equal((m.weight != 0).reshape(-1, 4).sum(dim=1) <= 2, torch.ones(m.mask.numel() // 4, dtype=bool))
    assert abs(weight_sparsity(pruned) - 0.5) < 1e-6
    assert to_semi_structured(pruned) == 0  # fp32 on a CPU: stays masked dense


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need a CUDA GPU")
def test_two_four_semi_structured_on_gpu():
    torch.manual_seed(0)
    model = LabGPT(get_config("nano", n_embd=128, n_head=2)).cuda().half().eval()
    pruned = prune_model(model, 0.5, "2:4")
    masked = prune_model(model, 0.5, "2:4", semi_structured=False)
    x = tokens().cuda()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).float(), masked(x).float(), atol=5e-2, rtol=5e-2)


def test_pruning_continues_from_a_pruned_model(small):
    quarter = prune_model(small, 0.25, "neurons")
    half = prune_model(quarter, 0.5, "neurons")
    assert [b.mlp.c_fc.out_features for b in half.transformer.h] == [64] * 3
    unstructured = prune_model(prune_model(small, 0.3), 0.6)
    assert abs(weight_sparsity(unstructured) - 0.6) < 1e-3


def test_iterative_pruning_keeps_pruned_weights_at_zero(small):
    kwargs = dict(batch_size=2, seq_len=32, corpus_chars=20_000)
    pruned, history = iterative_prune(small, 0.6, "unstructured", rounds=2, steps_per_round=2, **kwargs)
    assert [round(h["sparsity"], 4) for h in history] == [round(0.6 * 7 / 8, 4), 0.6]
    for m in block_linears(pruned):
        assert int((m.weight == 0).sum()) >= count_to_prune(m.weight.numel(), 0.6)
        assert torch.all(m.weight[~m.mask] == 0)  # fine-tuning did not revive a pruned weight
    neurons, _ = iterative_prune(small, 0.5, "neurons", rounds=2, steps_per_round=1, **kwargs)
    assert [b.mlp.c_fc.out_features for b in neurons.transformer.h] == [64] * 3


def test_storage_formats():
    w = magnitude_prune(torch.randn(64, 32, generator=torch.Generator().manual_seed(5)), sparsity=0.9)[0]
    nnz = int((w != 0).sum())
    assert dense_bytes(w) == 64 * 32 * 4
    assert csr_bytes(w) == nnz * 4 + nnz * 8 + 65 * 8  # values, int64 column indices, row pointers
    assert bitmask_bytes(w) == nnz * 4 + 64 * 32 // 8
    assert semi_structured_bytes(w) == 64 * 16 * 4 + 64 * 16 * 2 // 8
    dense_zeros = magnitude_prune(torch.randn(64, 32), sparsity=0.5)[0]
    assert csr_bytes(dense_zeros) > dense_bytes(dense_zeros)  # 50% zeros: CSR is larger than dense


def test_bad_input_is_a_value_error_that_names_it(small):
    w = torch.randn(10)
    for bad in (-0.1, 1.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            magnitude_prune(w, sparsity=bad)
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            prune_model(small, bad, "neurons")
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        magnitude_prune(w)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        magnitude_prune(w, sparsity=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        magnitude_prune(w, threshold=-1)
    with pytest.raises(ValueError, match=r"structure must be one of \['unstructured', 'neurons', 'heads', '2:4'\]"):
        prune_model(small, 0.5, "rows")
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_model(small, 0.5, scope="model")
    with pytest.raises(ValueError, match="sparsity must be 0.5 for structure '2:4'"):
        prune_model(small, 0.3, "2:4")
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        iterative_prune(small, 0.5, rounds=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        semi_structured_mask(torch.randn(3, 6))


def test_calibration_batch_is_deterministic():
    assert torch.equal(calibration_batch(2, 16), calibration_batch(2, 16))
    assert calibration_batch(2, 16).shape == (2, 16)


# ---------------------------------------------------------------------------------------
# Checkers and the bench suite
# ---------------------------------------------------------------------------------------
def test_pruning_checkers(capsys):
    from labkit.solutions import prune as solutions

    assert check.threshold_for_sparsity(solutions.threshold_for_sparsity)
    assert not check.threshold_for_sparsity(lambda w, s: s * w.abs().max())  # magnitudes are not uniform
    assert check.head_importance(solutions.head_importance)
    hs = lambda W, n: W.shape[1] // n
    assert not check.head_importance(lambda y, W, n: y.reshape(-1, n, hs(W, n)).norm(dim=(0, 2)))  # ignores c_proj
    assert "NOT YET" in capsys.readouterr().out


def test_prune_bench_suite_quick():
    from labkit.bench import SUITES

    start = time.perf_counter()
    rows = SUITES["prune"](quick=True)
    assert time.perf_counter() - start < 20
    assert {"50% neurons, 1 thread(s)", "50% zeros, CSR kernel", "90% zeros, CSR kernel"} <= {r["variant"] for r in rows}
    assert all(r["suite"] == "prune" and r["variant_s"] > 0 for r in rows)


def test_masked_linear_is_a_plain_dense_layer_in_eval():
    linear = nn.Linear(8, 4)
    w, mask = magnitude_prune(linear.weight, sparsity=0.5)
    masked = MaskedLinear(w, linear.bias, mask).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), nn.functional.linear(x, w, linear.bias))
