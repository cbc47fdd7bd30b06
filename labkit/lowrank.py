"""Low-rank factorization: replace a weight matrix, or a weight tensor, by a few thin factors.

A linear layer's weight W (d_out x d_in) is approximated by its truncated singular value
decomposition (SVD), keeping the k largest singular values:

    W ≈ U_k Σ_k V_kᵀ        U_k (d_out x k), Σ_k (k x k) diagonal, V_k (d_in x k)

Eckart-Young: no rank-k matrix is closer to W in Frobenius norm, and the error is
sqrt(σ_{k+1}² + σ_{k+2}² + ...). Stored as two linears (x -> V_kᵀ x -> U_k Σ_k (V_kᵀ x)),
the dense matrix's d_out * d_in parameters (and 2 * d_out * d_in FLOPs per token) become
k * (d_in + d_out) parameters (and 2 * k * (d_in + d_out) FLOPs). That pays only when

    k < d_in * d_out / (d_in + d_out)          (d_in / 2 for a square matrix)

so a 768 x 3072 MLP matrix (2.36M parameters) needs rank 614 or less before the factors are any smaller.

The same idea for tensors with more than two indices (a convolution kernel, a stack of
attention heads, an embedding table reshaped into a cube) comes in two flavours, both here:

* CP (CANDECOMP/PARAFAC): X ≈ sum_r w_r a_r ⊗ b_r ⊗ c_r, fitted by alternating least squares.
* Tucker: X ≈ G ×_0 U_0 ×_1 U_1 ×_2 U_2, a small core G and one orthonormal basis per mode,
  fitted by the higher-order SVD (HOSVD) and refined by higher-order orthogonal iteration (HOOI).

Modes are counted from 0, as PyTorch counts dimensions (papers usually count from 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn as nn

from ._args import check_int
from .model import replace_linears


# ---------------------------------------------------------------------------------------
# Matrices: truncated SVD of a linear layer.
# ---------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """A linear layer stored as two thin ones: x -> up(down(x)), with weight up.weight @ down.weight."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        """Randomly initialised like nn.Linear; svd_linear overwrites both factors."""
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            _check_positive_int(name, value)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # sqrt(Σ_k) V_kᵀ
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # U_k sqrt(Σ_k)

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix the factors stand for, (out_features, in_features): for inspection only."""
        return self.up.weight @ self.down.weight  # (out, rank) @ (rank, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two thin matmuls instead of one wide one: 2 k (d_in + d_out) FLOPs per token."""
        return self.up(self.down(x))  # (..., in) -> (..., rank) -> (..., out)

    def extra_repr(self) -> str:
        """Shown by print(model), so the rank of each swapped layer is visible."""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy (on the CPU for Apple's MPS, which has no float64)."""
    t = t.detach()
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def _float64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy for the factorizations; NaN or inf in it would make every factor NaN (or the SVD
    fail deep inside LAPACK), so that is a ValueError here."""
    t = _as_float64(t)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"the weight or tensor to factorize holds {bad} NaN or inf values (of {t.numel()}): "
                         "a decomposition of it means nothing; find where they came from first")  # fmt: skip
    return t


def _check_energy(energy: float) -> None:
    """Reject an energy outside (0, 1]: it is a fraction of Σσ²."""
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a number in (0, 1] (fraction of Σσ² kept), got {energy!r}")


def _check_keep(keep: float) -> None:
    """Reject a keep outside (0, 1]: it is a fraction of the dense parameters."""
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a number in (0, 1] (fraction of the dense parameters kept), got {keep!r}")


_check_positive_int = check_int


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k whose singular values keep ``energy`` of the total: sum(σ_i², i<k) / sum(σ²) >= energy."""
    _check_energy(energy)
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        raise ValueError(f"singular_values must be a non-empty 1-D tensor, got shape {tuple(singular_values.shape)}")
    squares = _float64(singular_values) ** 2
    cumulative = torch.cumsum(squares, dim=0)
    total = cumulative[-1]  # the same sum as the last cumulative entry, so energy=1 gives ratio exactly 1
    if total == 0:
        return 1  # a zero matrix: any rank keeps all of nothing
    short = int((cumulative / total < energy).sum())  # how many leading prefixes fall short
    return min(short + 1, singular_values.numel())


def rank_for_compression(d_out: int, d_in: int, keep: float) -> int:
    """Largest rank k whose factors k * (d_in + d_out) fit in ``keep`` x the dense d_out * d_in parameters."""
    _check_positive_int("d_out", d_out)
    _check_positive_int("d_in", d_in)
    _check_keep(keep)
    budget = Fraction(str(float(keep))) * d_out * d_in  # keep as the decimal it prints as (0.7 = 7/10), exactly
    rank = min(math.floor(budget / (d_in + d_out)), d_out, d_in)
    if rank < 1:
        raise ValueError(
            f"keep={keep} leaves {float(budget):.4g} parameters for a {d_out}x{d_in} matrix, but even rank 1 "
            f"needs d_in + d_out = {d_in + d_out}: use keep >= {(d_in + d_out) / (d_out * d_in):.4g}"
        )
    return rank


def svd_linear(linear: nn.Linear, rank: int | None = None, energy: float | None = None) -> LowRankLinear:
    """Replace ``linear`` by its best rank-k approximation (Eckart-Young), k given or chosen by ``energy``.

    Σ_k is split evenly, up = U_k sqrt(Σ_k) and down = sqrt(Σ_k) V_kᵀ, so both factors have
    the same scale: neither is tiny while the other is huge, which keeps fine-tuning stable.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank (an int) or energy (a fraction in (0, 1])")
    weight = linear.weight
    d_out, d_in = weight.shape
    largest = min(d_out, d_in)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= largest):
        raise ValueError(
            f"rank must be an int in 1..{largest} (1..min(d_out, d_in) for a {d_out}x{d_in} weight), got {rank!r}"
        )
    if energy is not None:
        _check_energy(energy)
    U, S, Vh = torch.linalg.svd(_float64(weight), full_matrices=False)  # (out, m), (m,), (m, in); m = min side
    if energy is not None:
        rank = rank_for_energy(S, energy)
    root = S[:rank].sqrt()  # (k,)
    up = U[:, :rank] * root  # (out, k): scales column i by sqrt(σ_i)
    down = root[:, None] * Vh[:rank]  # (k, in): scales row i by sqrt(σ_i)
    low = LowRankLinear(d_in, d_out, rank, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        low.up.weight.copy_(up)
        low.down.weight.copy_(down)
        if linear.bias is not None:
            low.up.bias.copy_(linear.bias)
    return low


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, a tied weight (LabGPT's head) counted once: the memory the model needs."""
    return sum(p.numel() for p in model.parameters())


def compress_model(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    keep: float | None = None,
    only: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Swap every linear of ``model`` (but the tied head) for a truncated SVD, in place; returns ``model``.

    Give exactly one rule for the rank of each matrix: ``rank`` (clipped to the matrix's
    smaller side), ``energy`` (fraction of Σσ² kept) or ``keep`` (fraction of its parameters
    kept). ``only(name) -> bool`` restricts the swap to some layers, as in ``replace_linears``.
    """
    if sum(rule is not None for rule in (rank, energy, keep)) != 1:
        raise ValueError("pass exactly one of rank, energy or keep")
    if rank is not None:
        _check_positive_int("rank", rank)
    if energy is not None:
        _check_energy(energy)
    if keep is not None:
        _check_keep(keep)

    def factory(name: str, linear: nn.Linear) -> LowRankLinear:
        """The rank this layer gets under the chosen rule, then its truncated SVD."""
        d_out, d_in = linear.weight.shape
        if rank is not None:
            return svd_linear(linear, rank=min(rank, d_out, d_in))
        if energy is not None:
            return svd_linear(linear, energy=energy)
        try:
            k = rank_for_compression(d_out, d_in, keep)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        return svd_linear(linear, rank=k)

    return replace_linears(model, factory, only=only)


# ---------------------------------------------------------------------------------------
# Tensors: unfolding, mode products, Khatri-Rao products.
# Convention: the mode-n unfolding X_(n) (I_n, prod of the other sizes) puts mode n first and
# keeps the other modes in their order, the LAST one varying fastest (PyTorch's row-major
# order). khatri_rao lets its LAST matrix's row index vary fastest to match, so that for a
# CP tensor X_(n) = A_n diag(w) khatri_rao([A_m for m != n])ᵀ with the A_m in mode order.
# (Kolda & Bader's paper uses column-major order, the FIRST index fastest, and lists the
# Khatri-Rao factors in reverse: the same identity, read in the other direction.)
# ---------------------------------------------------------------------------------------
def _check_mode(tensor: torch.Tensor, mode: int) -> None:
    """Reject a mode that is not one of the tensor's axes 0..N-1."""
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode < tensor.dim():
        raise ValueError(
            f"mode must be an int in 0..{tensor.dim() - 1} for a tensor of order {tensor.dim()}, got {mode!r}"
        )


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-n unfolding X_(n): the mode-n fibres as columns, (I_n, product of the other sizes)."""
    _check_mode(tensor, mode)
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)  # (I_n, I_0 ... I_N-1 without I_n)


def fold(unfolded: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``unfold``: the tensor of ``shape`` whose mode-n unfolding is ``unfolded``."""
    shape = tuple(shape)
    if not 0 <= mode < len(shape):
        raise ValueError(f"mode must be an int in 0..{len(shape) - 1} for shape {shape}, got {mode!r}")
    others = shape[:mode] + shape[mode + 1 :]
    if unfolded.shape != (shape[mode], math.prod(others)):
        raise ValueError(
            f"unfolded has shape {tuple(unfolded.shape)}, the mode-{mode} unfolding of {shape} needs "
            f"{(shape[mode], math.prod(others))}"
        )
    return unfolded.reshape(shape[mode], *others).movedim(0, mode)  # (I_n, others...) -> shape


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """X ×_n M: multiply every mode-n fibre by M (J x I_n); defined by (X ×_n M)_(n) = M X_(n)."""
    _check_mode(tensor, mode)
    if matrix.dim() != 2 or matrix.shape[1] != tensor.shape[mode]:
        raise ValueError(
            f"matrix must be (J, {tensor.shape[mode]}) to multiply mode {mode} of a tensor of shape "
            f"{tuple(tensor.shape)}, got {tuple(matrix.shape)}"
        )
    shape = list(tensor.shape)
    shape[mode] = matrix.shape[0]
    return fold(matrix @ unfold(tensor, mode), mode, shape)  # (J, I_n) @ (I_n, rest) -> (J, rest)


def khatri_rao(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product of (I_k, R) matrices: (I_0 I_1 ... , R), the last row index fastest.

    Column r is a_r ⊗ b_r ⊗ ...: the unfolded outer products of the CP components.
    """
    if len(matrices) == 0:
        raise ValueError("matrices must hold at least one matrix")
    if any(m.dim() != 2 for m in matrices) or len({m.shape[1] for m in matrices}) != 1:
        raise ValueError(
            f"matrices must all be 2-D with the same number of columns, got {[tuple(m.shape) for m in matrices]}"
        )
    product = matrices[0]
    for matrix in matrices[1:]:
        rank = matrix.shape[1]
        product = (product[:, None, :] * matrix[None, :, :]).reshape(-1, rank)  # (P, 1, R) * (1, I, R) -> (P I, R)
    return product


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F: the share of the tensor an approximation misses."""
    if approx.shape != exact.shape:
        raise ValueError(f"approx {tuple(approx.shape)} and exact {tuple(exact.shape)} must have the same shape")
    exact64 = _as_float64(exact)
    norm = torch.linalg.vector_norm(exact64)
    if norm == 0:
        raise ValueError("exact is all zeros: the relative error is undefined")
    return (torch.linalg.vector_norm(_as_float64(approx).to(exact64.device) - exact64) / norm).item()


def _leading_left_singular_vectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading left singular vectors of ``matrix`` (I, M), for any k <= I (even when M < k)."""
    # full_matrices only when M < I: then U completes the basis to I columns and Vh is a small (M, M)
    U, _, _ = torch.linalg.svd(matrix, full_matrices=matrix.shape[1] < matrix.shape[0])
    return U[:, :k]  # (I, k)


def _output_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype results come back in: the input's if it is floating point, else the default float."""
    return tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()


# ---------------------------------------------------------------------------------------
# CP: a sum of R rank-one tensors, fitted by alternating least squares.
# ---------------------------------------------------------------------------------------
class ConvergenceWarning(UserWarning):
    """An iterative fit stopped at its iteration budget before its stopping rule was met."""


@dataclass
class CPDecomposition:
    """X ≈ sum_r weights[r] * factors[0][:, r] ⊗ factors[1][:, r] ⊗ ... (unit-norm factor columns).

    ``errors`` records the relative error after each ALS sweep (empty if built by hand).
    """

    weights: torch.Tensor  # (R,)
    factors: list[torch.Tensor]  # N matrices (I_n, R)
    errors: list[float] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """R, the number of rank-one terms."""
        return self.weights.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor the decomposition stands for."""
        return tuple(f.shape[0] for f in self.factors)

    @property
    def n_params(self) -> int:
        """Numbers stored: R weights plus R * (I_0 + I_1 + ...) factor entries."""
        return self.weights.numel() + sum(f.numel() for f in self.factors)

    def reconstruct(self) -> torch.Tensor:
        """The full tensor, built through its mode-0 unfolding: X_(0) = A_0 diag(w) khatri_rao(A_1, ...)ᵀ."""
        first = self.factors[0] * self.weights  # (I_0, R): weights folded into the first factor
        unfolded = first @ khatri_rao(self.factors[1:]).T  # (I_0, R) @ (R, I_1 ... I_N-1)
        return fold(unfolded, 0, self.shape)


def cp_als(
    tensor: torch.Tensor, rank: int, n_iter_max: int = 500, tol: float = 1e-10, seed: int = 0
) -> CPDecomposition:
    """CANDECOMP/PARAFAC of ``tensor`` into ``rank`` rank-one terms, by alternating least squares.

    Each sweep fixes all factors but one and solves that one exactly (a linear least-squares
    problem): A_n = X_(n) · khatri_rao(others) · pinv(Hadamard product of the others' Gram
    matrices AᵀA), then moves the column norms into ``weights``. It stops when the relative
    error ||X - X̂|| / ||X|| changes by less than ``tol`` between sweeps, and warns
    (``ConvergenceWarning``) if ``n_iter_max`` sweeps run out first.

    Initialisation: the leading left singular vectors of each unfolding (the HOSVD basis),
    padded with seeded random columns where ``rank`` exceeds that mode's size. It starts
    every factor inside the subspace the data occupies, so ALS needs fewer sweeps and
    gives the same answer on every run; random starts more often stall in "swamps" of slow
    progress. ``seed`` only matters for the padding columns. Computed in float64; the
    factors come back in the tensor's dtype.
    """
    _check_positive_int("rank", rank)
    _check_positive_int("n_iter_max", n_iter_max)
    if tensor.dim() < 2:
        raise ValueError(f"tensor must have order >= 2 (a matrix or more), got order {tensor.dim()}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    X = _float64(tensor)
    norm = torch.linalg.vector_norm(X)
    if norm == 0:
        raise ValueError("tensor is all zeros: it has no CP decomposition to fit")
    order = X.dim()
    generator = torch.Generator(device=X.device).manual_seed(seed)
    factors = []
    for n in range(order):
        basis = _leading_left_singular_vectors(unfold(X, n), min(rank, X.shape[n]))  # (I_n, min(R, I_n))
        extra = torch.randn(X.shape[n], rank - basis.shape[1], generator=generator, device=X.device, dtype=X.dtype)
        factors.append(torch.cat([basis, extra / extra.norm(dim=0).clamp_min(1e-12)], dim=1))  # (I_n, R)
    weights = torch.ones(rank, dtype=X.dtype, device=X.device)
    unfoldings = [unfold(X, n) for n in range(order)]  # reused every sweep

    def error(weights, factors) -> float:
        """||X - X̂|| / ||X|| for the current factors: the quantity ALS drives down."""
        return (torch.linalg.vector_norm(X - CPDecomposition(weights, factors).reconstruct()) / norm).item()

    previous, errors, change = error(weights, factors), [], float("inf")
    for _ in range(n_iter_max):
        for n in range(order):
            others = [factors[m] for m in range(order) if m != n]
            gram = torch.ones(rank, rank, dtype=X.dtype, device=X.device)
            for other in others:
                gram = gram * (other.T @ other)  # (R, R) Hadamard product of Gram matrices
            solved = unfoldings[n] @ khatri_rao(others) @ torch.linalg.pinv(gram, hermitian=True)  # (I_n, R)
            weights = solved.norm(dim=0)  # (R,)
            factors[n] = solved / torch.where(weights > 0, weights, torch.ones_like(weights))
        errors.append(error(weights, factors))
        change, previous = abs(previous - errors[-1]), errors[-1]
        if change < tol:
            break
    else:
        warnings.warn(
            f"cp_als did not converge within its budget of n_iter_max={n_iter_max} iterations: the relative error "
            f"was still changing by {change:.3g} (tol={tol}); final relative error "
            f"{errors[-1]:.6g}. Raise n_iter_max or tol, or try another rank.",
            ConvergenceWarning,
            stacklevel=2,
        )
    dtype, device = _output_dtype(tensor), tensor.device
    return CPDecomposition(weights.to(device, dtype), [f.to(device, dtype) for f in factors], errors)


# ---------------------------------------------------------------------------------------
# Tucker: a small core and one orthonormal basis per mode (HOSVD, then HOOI).
# ---------------------------------------------------------------------------------------
@dataclass
class TuckerDecomposition:
    """X ≈ core ×_0 factors[0] ×_1 factors[1] ...; core (R_0, ..., R_N-1), factors (I_n, R_n) orthonormal."""

    core: torch.Tensor
    factors: list[torch.Tensor]

    @property
    def ranks(self) -> tuple[int, ...]:
        """The multilinear rank (R_0, ..., R_N-1): the core's shape."""
        return tuple(self.core.shape)

    @property
    def n_params(self) -> int:
        """Numbers stored: R_0 R_1 ... core entries plus I_n R_n per factor."""
        return self.core.numel() + sum(f.numel() for f in self.factors)

    def reconstruct(self) -> torch.Tensor:
        """The full tensor: expand each mode of the core by its basis, (..., R_n, ...) -> (..., I_n, ...)."""
        full = self.core
        for mode, factor in enumerate(self.factors):
            full = mode_product(full, factor, mode)
        return full


def _project_all_but(X: torch.Tensor, factors: list[torch.Tensor], skip: int | None) -> torch.Tensor:
    """X ×_m U_mᵀ for every mode m except ``skip``: the data expressed in the other modes' bases."""
    for mode, factor in enumerate(factors):
        if mode != skip:
            X = mode_product(X, factor.T, mode)  # mode size I_m -> R_m
    return X


def tucker(tensor: torch.Tensor, ranks: Sequence[int], n_iter: int = 0) -> TuckerDecomposition:
    """Tucker decomposition with multilinear ``ranks`` (R_0, ..., R_N-1): HOSVD, then ``n_iter`` HOOI sweeps.

    HOSVD takes each factor as the leading R_n left singular vectors of the mode-n unfolding
    and the core as X ×_n U_nᵀ for all n: quasi-optimal (within sqrt(N) of the best error).
    Each HOOI sweep re-solves one basis at a time against the data already projected on
    the others' bases, which can only lower the error. Computed in float64.
    """
    if tensor.dim() < 2:
        raise ValueError(f"tensor must have order >= 2 (a matrix or more), got order {tensor.dim()}")
    ranks = tuple(ranks)
    if len(ranks) != tensor.dim():
        raise ValueError(
            f"ranks must give one rank per mode: the tensor has order {tensor.dim()}, got {len(ranks)} ranks"
        )
    for mode, (rank, size) in enumerate(zip(ranks, tensor.shape)):
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= size:
            raise ValueError(f"rank for mode {mode} must be an int in 1..{size} (that mode's size), got {rank!r}")
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0 (HOOI sweeps after the HOSVD), got {n_iter!r}")
    X = _float64(tensor)
    factors = [_leading_left_singular_vectors(unfold(X, n), ranks[n]) for n in range(X.dim())]  # (I_n, R_n)
    for _ in range(n_iter):
        for n in range(X.dim()):
            projected = _project_all_but(X, factors, skip=n)  # (R_0, ..., I_n, ..., R_N-1)
            factors[n] = _leading_left_singular_vectors(unfold(projected, n), ranks[n])
    core = _project_all_but(X, factors, skip=None)  # (R_0, ..., R_N-1)
    dtype, device = _output_dtype(tensor), tensor.device
    return TuckerDecomposition(core.to(device, dtype), [f.to(device, dtype) for f in factors])


def _register() -> None:
    from .bench import compare, register_suite

    @register_suite("lowrank")
    def lowrank_suite(quick: bool = False) -> list[dict]:
        """An SVD linear of rank d/4 vs the dense d x d linear at batch 256, for several widths d."""
        rows = []
        for d in (192, 768) if quick else (192, 384, 768, 1024):
            torch.manual_seed(0)
            dense = nn.Linear(d, d)
            thin = svd_linear(dense, rank=d // 4)
            x = torch.randn(256, d)
            with torch.no_grad():
                variants = {f"dense {d}x{d}": lambda: dense(x), f"rank {d // 4}": lambda: thin(x)}
                rows += compare(variants, warmup=5, repeat=10 if quick else 20, suite="lowrank")
        return rows


_register()
