import math

import pytest
import torch
import torch.nn as nn

from labkit.lowrank import (
    ConvergenceWarning,
    CPDecomposition,
    LowRankLinear,
    TuckerDecomposition,
    compress_model,
    cp_als,
    fold,
    khatri_rao,
    mode_product,
    parameter_count,
    rank_for_compression,
    rank_for_energy,
    relative_error,
    svd_linear,
    tucker,
    unfold,
)
from labkit.model import LabGPT, get_config


def seeded_linear(d_in: int = 24, d_out: int = 40, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q  # (rows, cols), orthonormal columns


def cp_tensor(shape, rank: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """An exact rank-``rank`` CP tensor from random factors, built independently of the module (einsum)."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(size, rank, generator=g, dtype=torch.float64) for size in shape]
    weights = torch.rand(rank, generator=g, dtype=torch.float64) + 0.5
    letters = "abcdefgh"[: len(shape)]
    equation = "r," + ",".join(f"{letter}r" for letter in letters) + "->" + letters
    return torch.einsum(equation, weights, *factors), factors, weights


# ---------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------
def test_svd_linear_at_full_rank_reproduces_the_layer():
    linear = seeded_linear()
    low = svd_linear(linear, rank=24)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    assert isinstance(low, LowRankLinear)
    assert (low.in_features, low.out_features, low.rank) == (24, 40, 24)
    assert low.weight.shape == (40, 24) and low.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=0)


def test_svd_linear_keeps_no_bias_when_the_layer_has_none():
    low = svd_linear(seeded_linear(bias=False), rank=3)
    assert low.up.bias is None and low.down.bias is None


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_svd_linear_is_the_eckart_young_optimum(rank):
    linear = seeded_linear()
    W = linear.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    low = svd_linear(linear, rank=rank)
    approx = low.weight.detach().double()
    expected_error = (S[rank:] ** 2).sum().sqrt() / W.norm()
    assert abs(relative_error(approx, W) - expected_error.item()) < 1e-6
    truncated = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    assert relative_error(approx, truncated) < 1e-6
    # the square root of Σ is split evenly: both factors have the same norm
    assert abs(low.up.weight.norm().item() - low.down.weight.norm().item()) < 1e-4


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.9, 0.99, 1.0])
def test_energy_picks_the_smallest_rank_that_meets_it(energy):
    linear = seeded_linear()
    S = torch.linalg.svdvals(linear.weight.detach().double())
    kept = torch.cumsum(S**2, 0) / (S**2).sum()  # kept[k-1]: energy of the first k values
    k = rank_for_energy(S, energy)
    assert kept[k - 1] >= energy - 1e-12
    if k > 1:
        assert kept[k - 2] < energy
    assert svd_linear(linear, energy=energy).rank == k


@pytest.mark.parametrize("d_out, d_in, keep", [(40, 24, 0.5), (128, 32, 0.25), (96, 96, 1.0), (7, 5, 0.9)])
def test_rank_for_compression_is_the_largest_rank_that_fits(d_out, d_in, keep):
    k = rank_for_compression(d_out, d_in, keep)
    assert k >= 1
    assert k * (d_in + d_out) <= keep * d_out * d_in
    assert (k + 1) * (d_in + d_out) > keep * d_out * d_in


@pytest.mark.parametrize("d_out, d_in, keep, rank", [(20, 20, 0.7, 7), (10, 10, 0.6, 3), (40, 24, 0.3, 4)])
def test_rank_for_compression_fits_a_budget_met_exactly(d_out, d_in, keep, rank):
    # 7 * 40 = 280 = 0.7 * 400: the factors fill the budget exactly; the float 0.7 (just below 7/10) would cut to 6
    assert rank_for_compression(d_out, d_in, keep) == rank
    assert rank * (d_in + d_out) * 10 <= round(keep * 10) * d_out * d_in  # in integers: tenths


def test_compress_model_replaces_every_linear_but_the_head():
    torch.manual_seed(0)
    model = LabGPT(get_config("nano")).eval()
    before = parameter_count(model)
    dense = {
        name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"
    }
    keep = 0.5
    # expectation computed here, not by the module: largest k with k (d_in + d_out) <= keep d_out d_in
    saved = 0
    for d_out, d_in in dense.values():
        k = max(k for k in range(1, min(d_out, d_in) + 1) if k * (d_in + d_out) <= keep * d_out * d_in)
        saved += d_out * d_in - k * (d_in + d_out)
    assert compress_model(model, keep=keep) is model
    for name, module in model.named_modules():
        if name in dense:
            assert isinstance(module, LowRankLinear), name
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert parameter_count(model) == before - saved
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(model(idx)).all()


def test_compress_model_at_full_rank_keeps_the_logits():
    torch.manual_seed(0)
    model = LabGPT(get_config("nano")).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(idx)
        compress_model(model, rank=10_000)  # clipped to each matrix's smaller side: exact
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=0)


def test_compress_model_only_filters_by_name():
    torch.manual_seed(0)
    model = LabGPT(get_config("nano")).eval()
    compress_model(model, energy=0.9, only=lambda name: name.endswith("mlp.c_fc"))
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, LowRankLinear))}
    for name, kind in kinds.items():
        # the swapped layers' own down and up projections are plain linears too
        assert kind is (LowRankLinear if name.endswith("mlp.c_fc") else nn.Linear), name
    assert sum(kind is LowRankLinear for kind in kinds.values()) == model.config.n_layer


# ---------------------------------------------------------------------------------------
# Tensor helpers
# ---------------------------------------------------------------------------------------
def test_unfold_and_khatri_rao_agree_on_an_exact_cp_tensor():
    X, factors, weights = cp_tensor((4, 5, 6, 3), rank=3, seed=0)
    for n in range(4):
        others = [factors[m] for m in range(4) if m != n]
        expected = (factors[n] * weights) @ khatri_rao(others).T  # X_(n) = A_n diag(w) KR(others)ᵀ
        torch.testing.assert_close(unfold(X, n), expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(fold(unfold(X, n), n, X.shape), X, atol=0, rtol=0)


def test_khatri_rao_columns_are_kronecker_products():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 2, generator=g)
    product = khatri_rao([a, b, c])
    assert product.shape == (24, 2)
    for r in range(2):
        torch.testing.assert_close(product[:, r], torch.kron(torch.kron(a[:, r], b[:, r]), c[:, r]))


def test_mode_product_matches_einsum():
    g = torch.Generator().manual_seed(0)
    X, M = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mode_product(X, M, 1), torch.einsum("ajc,bj->abc", X, M))


# ---------------------------------------------------------------------------------------
# CP
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, rank", [((10, 12, 14), 3), ((5, 6, 4, 7), 2)])
def test_cp_als_recovers_a_tensor_of_known_rank(shape, rank):
    X, _, _ = cp_tensor(shape, rank, seed=1)
    cp = cp_als(X.float(), rank)
    assert isinstance(cp, CPDecomposition)
    assert cp.weights.shape == (rank,) and [f.shape for f in cp.factors] == [(s, rank) for s in shape]
    assert cp.factors[0].dtype == torch.float32
    assert relative_error(cp.reconstruct(), X) < 1e-5
    assert cp.n_params == rank + rank * sum(shape)


def test_cp_als_rank_above_a_mode_size_still_fits():
    X, _, _ = cp_tensor((3, 8, 9), rank=4, seed=3)  # rank 4 > size 3 of mode 0: a seeded random column pads it
    assert relative_error(cp_als(X, 4).reconstruct(), X) < 1e-5


def test_cp_als_warns_when_the_budget_runs_out():
    noise = torch.randn(6, 7, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(ConvergenceWarning, match="cp_als.*n_iter_max=1"):
        cp_als(noise, rank=4, n_iter_max=1)


# ---------------------------------------------------------------------------------------
# Tucker
# ---------------------------------------------------------------------------------------
def test_tucker_recovers_an_exact_multilinear_rank():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    bases = [random_orthonormal(size, rank, g) for size, rank in ((8, 2), (9, 3), (10, 4))]
    X = torch.einsum("abc,ia,jb,kc->ijk", core, *bases)
    decomposition = tucker(X, (2, 3, 4))
    assert isinstance(decomposition, TuckerDecomposition)
    assert decomposition.ranks == (2, 3, 4)
    assert decomposition.n_params == 24 + 8 * 2 + 9 * 3 + 10 * 4
    assert relative_error(decomposition.reconstruct(), X) < 1e-5


def test_tucker_of_a_matrix_is_the_truncated_svd():
    M = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    truncated = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    assert relative_error(tucker(M, (4, 4)).reconstruct(), truncated) < 1e-6


def test_tucker_factors_are_orthonormal_and_hooi_does_not_hurt():
    X = torch.randn(7, 8, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hosvd = tucker(X, (3, 4, 2))
    hooi = tucker(X, (3, 4, 2), n_iter=5)
    for factor in hosvd.factors + hooi.factors:
        torch.testing.assert_close(factor.T @ factor, torch.eye(factor.shape[1], dtype=factor.dtype), atol=1e-6, rtol=0)
    assert relative_error(hooi.reconstruct(), X) <= relative_error(hosvd.reconstruct(), X) + 1e-12


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(rank=0), "rank.*1..24"),
        (dict(rank=25), "rank.*1..24"),
        (dict(energy=0.0), "energy"),
        (dict(energy=1.5), "energy"),
        (dict(rank=3, energy=0.5), "exactly one"),
        (dict(), "exactly one"),
    ],
)
def test_svd_linear_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        svd_linear(seeded_linear(), **kwargs)


def test_svd_linear_rejects_a_non_linear():
    with pytest.raises(ValueError, match="nn.Linear"):
        svd_linear(nn.Conv1d(3, 3, 1), rank=1)


def test_rank_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="even rank 1"):
        rank_for_compression(4, 4, 0.1)  # rank 1 costs 8 > 1.6
    for keep in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep"):
            rank_for_compression(40, 24, keep)
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(torch.ones(3), 0.0)


def test_compress_model_rejects_bad_arguments():
    model = LabGPT(get_config("nano"))
    with pytest.raises(ValueError, match="exactly one"):
        compress_model(model, rank=2, keep=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        compress_model(model)
    with pytest.raises(ValueError, match="rank"):
        compress_model(model, rank=0)
    with pytest.raises(ValueError, match="keep"):
        compress_model(model, keep=2.0)


def test_cp_als_rejects_bad_arguments():
    X = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rank"):
        cp_als(X, 0)
    with pytest.raises(ValueError, match="order"):
        cp_als(torch.randn(5), 1)
    with pytest.raises(ValueError, match="n_iter_max"):
        cp_als(X, 2, n_iter_max=0)


def test_tucker_rejects_bad_arguments():
    X = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one rank per mode"):
        tucker(X, (2, 2))
    with pytest.raises(ValueError, match=r"mode 1 .*1\.\.4"):
        tucker(X, (2, 5, 2))
    with pytest.raises(ValueError, match="mode 2"):
        tucker(X, (2, 2, 0))


def test_helpers_reject_bad_arguments():
    X = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mode"):
        unfold(X, 3)
    with pytest.raises(ValueError, match="matrix"):
        mode_product(X, torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="same number of columns"):
        khatri_rao([torch.randn(3, 2), torch.randn(3, 3)])
    with pytest.raises(ValueError, match="same shape"):
        relative_error(torch.zeros(2, 3), torch.ones(3, 2))
    assert math.isclose(relative_error(torch.zeros(2), torch.ones(2)), 1.0)
