"""Pruning: set weights to zero, or remove whole units, and see what it buys.

The survey's rule is magnitude pruning: weights whose magnitude is below a threshold τ
are set to zero,

    W' = W · 1(|W| ≥ τ)

with τ chosen directly, or chosen so that a target fraction ``s`` of the weights is zero
(τ is then the magnitude of the smallest weight kept). Choosing τ per matrix is
*layer-wise* pruning; one τ for all matrices at once is *global* pruning, which lets
layers with many small weights lose more of them.

Zeros are not speed. A dense matmul multiplies a zero as fast as any other number, so
unstructured sparsity only saves storage (in a compressed format) and only saves time
with a sparse kernel at high sparsity. Three structures change that:

* ``"neurons"``: remove hidden neurons of each MLP (rows of c_fc, columns of c_proj). The
  matrices become physically smaller, so every matmul shrinks.
* ``"heads"``: remove attention heads (their q, k, v rows of c_attn and columns of c_proj).
  The attention module then runs with fewer heads (``PrunedSelfAttention``).
* ``"2:4"``: in every group of 4 consecutive weights of a row, 2 are zero. NVIDIA GPUs
  from Ampere on have a kernel for it (``torch.sparse.to_sparse_semi_structured``); on
  other hardware it is a masked dense weight.

Importance scores used here (the larger, the more a unit is kept):

* a weight: its magnitude |w|.
* an MLP neuron j: ||c_fc.weight[j, :]||₂ · ||c_proj.weight[:, j]||₂, the product of the
  norms of what it reads and what it writes (no data needed).
* an attention head h: the L2 norm of its contribution to the attention output,
  ||y_h · W_proj[:, h]ᵀ||, over a calibration batch of text (the head's share of c_proj's
  input, projected the way c_proj projects it).

``prune_model`` returns a pruned **copy** by default (``inplace=True`` changes the model
itself), so one loaded model can be pruned many ways.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._args import check_int
from .model import ATTENTION_BACKENDS, KVCache, LabGPT

STRUCTURES = ("unstructured", "neurons", "heads", "2:4")
SCOPES = ("layer", "global")
CALIBRATION_SEED = 31_337  # calibration text never shares a seed with training or validation text


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def _check_sparsity(sparsity) -> float:
    """A sparsity is a fraction of weights (or units) removed: a number in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1) (the fraction removed), got {sparsity!r}")
    return float(sparsity)


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def count_to_prune(n: int, sparsity: float) -> int:
    """How many of ``n`` items a sparsity removes: round(s·n), halves rounded up.

    The fraction is exact whenever s·n is an integer, and within 1/(2n) otherwise. ``s`` counts as the
    decimal it prints as (0.7 is 7/10, not the binary float just below it), in exact arithmetic:
    45 items at 0.7 are 31.5, rounded up to 32 (in floats 0.7 · 45 + 0.5 = 31.999…, floored to 31).
    """
    return min(n, math.floor(Fraction(str(_check_sparsity(sparsity))) * n + Fraction(1, 2)))


# ---------------------------------------------------------------------------------------
# Magnitude pruning of one tensor, and of many at once (global)
# ---------------------------------------------------------------------------------------
def _prune_mask(magnitudes: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask (True = kept) that removes exactly the ``n_prune`` smallest magnitudes.

    A stable sort breaks ties by position (the earlier weight goes first), so the result is
    the same on every run and the count is exact even when many weights are equal.
    """
    flat = magnitudes.flatten()
    order = torch.sort(flat, stable=True).indices  # ascending magnitude, ties in index order
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:n_prune]] = False
    return keep.view_as(magnitudes)


def threshold_for_sparsity(w: torch.Tensor, sparsity: float) -> float:
    """The τ at which 1(|W| ≥ τ) zeroes a fraction ``sparsity`` of W: the smallest magnitude kept.

    With ties at that magnitude no τ is exact (all equal weights fall on the same side);
    ``magnitude_prune(w, sparsity=...)`` ranks the weights instead and is always exact.
    """
    k = count_to_prune(w.numel(), sparsity)
    if k == w.numel():
        return math.inf
    return torch.sort(w.detach().abs().flatten()).values[k].item()


def magnitude_prune(
    w: torch.Tensor, sparsity: float | None = None, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W · 1(|W| ≥ τ); returns (pruned copy of w, boolean mask of the kept weights).

    Give exactly one of ``threshold`` (τ itself) or ``sparsity`` (the fraction to zero:
    exactly round(s·n) weights, the smallest magnitudes, ties broken by position).
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError("pass exactly one of sparsity (a fraction in [0, 1)) or threshold (a magnitude >= 0)")
    magnitudes = w.detach().abs()
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0 (a magnitude), got {threshold!r}")
        mask = magnitudes >= threshold
    else:
        mask = _prune_mask(magnitudes, count_to_prune(w.numel(), sparsity))
    return w.detach() * mask, mask


def global_magnitude_prune(
    weights: Sequence[torch.Tensor], sparsity: float | None = None, threshold: float | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Magnitude pruning with ONE ranking (or one τ) across all ``weights``; a (pruned, mask) per tensor.

    Exactly round(s · total) weights are zeroed in all; each tensor loses a different share.
    """
    if len(weights) == 0:
        raise ValueError("weights must hold at least one tensor")
    if (sparsity is None) == (threshold is None):
        raise ValueError("pass exactly one of sparsity (a fraction in [0, 1)) or threshold (a magnitude >= 0)")
    if threshold is not None:
        return [magnitude_prune(w, threshold=threshold) for w in weights]
    magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])  # one long vector
    mask = _prune_mask(magnitudes, count_to_prune(magnitudes.numel(), sparsity))
    out, start = [], 0
    for w in weights:
        m = mask[start : start + w.numel()].view_as(w)
        out.append((w.detach() * m, m))
        start += w.numel()
    return out


def semi_structured_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask keeping the ``n`` largest magnitudes in every group of ``m`` consecutive weights of a row.

    Groups run along the last (input) dimension, as NVIDIA's sparse tensor cores need; ties
    are broken by position (the earlier weight is kept).
    """
    check_int("m (group size)", m)
    check_int("n", n, 1, m)  # weights kept per group of m
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] % m:
        raise ValueError(f"w must be 2-D with a number of columns divisible by {m}, got shape "
                         f"{tuple(getattr(w, 'shape', ()))}")  # fmt: skip
    groups = w.detach().abs().reshape(-1, m)  # (rows * cols / m, m)
    order = torch.sort(-groups, dim=1, stable=True).indices  # largest first, ties in index order
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.view_as(w)


# ---------------------------------------------------------------------------------------
# Layers that hold pruned weights
# ---------------------------------------------------------------------------------------
class MaskedLinear(nn.Module):
    """A linear layer whose pruned weights are zero and stay zero while fine-tuning.

    In training the forward multiplies by the mask, so pruned weights get no gradient
    (and AdamW leaves an entry with zero gradient at zero). In eval the weight already
    holds its zeros: it is a plain dense matmul, exactly as fast as the unpruned layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach() * mask)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask if self.training else self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        sparsity = 1 - self.mask.float().mean().item()
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={sparsity:.3f}"


class SemiStructuredLinear(nn.Module):
    """A 2:4-sparse linear whose weight is a ``torch.sparse`` semi-structured tensor (NVIDIA Ampere+ GPUs).

    Stores half the values plus 2-bit positions, and runs on the sparse tensor cores.
    Inference only: fine-tune the masked dense version first.
    """

    def __init__(self, linear: MaskedLinear) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach().contiguous()), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def semi_structured_supported(weight: torch.Tensor) -> bool:
    """Can this weight use PyTorch's semi-structured kernels? CUDA sm80+, fp16/bf16, sides multiples of 64."""
    return (
        weight.is_cuda
        and torch.cuda.get_device_capability(weight.device) >= (8, 0)
        and weight.dtype in (torch.float16, torch.bfloat16)
        and weight.dim() == 2
        and weight.shape[0] % 64 == 0
        and weight.shape[1] % 64 == 0
    )


def to_semi_structured(model: nn.Module) -> int:
    """Swap every 2:4 MaskedLinear whose weight the GPU supports for a SemiStructuredLinear, in place.

    Each swap is checked against the masked dense layer on a probe input; a layer that
    cannot be converted (or disagrees) stays masked dense. Returns how many were swapped.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, MaskedLinear) or not semi_structured_supported(module.weight):
            continue
        groups = module.mask.reshape(-1, 4).sum(dim=1)
        if not bool((groups <= 2).all()):
            continue  # not a 2:4 pattern
        try:
            fast = SemiStructuredLinear(module)
            probe = torch.randn(64, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                ok = torch.allclose(
                    fast(probe).float(), F.linear(probe, module.weight, module.bias).float(), 1e-2, 1e-2
                )
        except (RuntimeError, NotImplementedError):
            ok = False
        if ok:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fast)
            swapped += 1
    return swapped


class PrunedSelfAttention(nn.Module):
    """Causal self-attention with fewer heads than the model's config: c_attn and c_proj physically smaller.

    c_attn maps C -> 3·H·hs (q, k and v of the H kept heads) and c_proj maps H·hs -> C.
    With a KV cache it uses the first H head slots of the cache, which is sized for all heads.
    """

    def __init__(self, n_embd: int, n_head: int, head_size: int, bias: bool, attention: str, dropout: float) -> None:
        super().__init__()
        self.n_head, self.head_size, self.n_embd = n_head, head_size, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_head * head_size, bias=bias)
        self.c_proj = nn.Linear(n_head * head_size, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.attention = attention

    @classmethod
    def from_attention(cls, attn: nn.Module, keep: torch.Tensor) -> PrunedSelfAttention:
        """Keep the heads ``keep`` (indices into ``attn``'s heads) of a CausalSelfAttention or PrunedSelfAttention."""
        n_head, hs = attn.n_head, _head_size(attn)
        width = n_head * hs
        keep = _kept_indices(keep, n_head, "head")  # in their order
        head_rows = (keep[:, None] * hs + torch.arange(hs)).flatten()  # rows of the kept heads within q (or k, v)
        qkv_rows = torch.cat([part * width + head_rows for part in range(3)])  # the same rows in q, k and v
        with warnings.catch_warnings():  # keeping no head at all makes empty linears, which PyTorch warns about
            warnings.simplefilter("ignore", UserWarning)
            new = cls(
                attn.c_proj.out_features, len(keep), hs, attn.c_proj.bias is not None, attn.attention, attn.dropout.p
            )
        w_attn, w_proj = _dense_weight(attn.c_attn), _dense_weight(attn.c_proj)
        new = new.to(device=w_attn.device, dtype=w_attn.dtype)
        with torch.no_grad():
            new.c_attn.weight.copy_(w_attn[qkv_rows])
            new.c_proj.weight.copy_(w_proj[:, head_rows])
            if attn.c_attn.bias is not None:
                new.c_attn.bias.copy_(attn.c_attn.bias[qkv_rows])
            if attn.c_proj.bias is not None:
                new.c_proj.bias.copy_(attn.c_proj.bias)
        return new

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        B, T, _ = x.size()
        H, hs = self.n_head, self.head_size
        if H == 0:  # every head removed: the attention branch adds only c_proj's bias
            return self.dropout(self.c_proj(x.new_zeros(B, T, 0)))
        q, k, v = self.c_attn(x).split(H * hs, dim=2)
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        v = v.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        if cache is not None:  # the cache has n_head slots per layer: use the first H
            end = start + T
            cache.k[layer][:, :H, start:end] = k
            cache.v[layer][:, :H, start:end] = v
            k, v = cache.k[layer][:, :H, :end], cache.v[layer][:, :H, :end]  # (B, H, start+T, hs)
        y = ATTENTION_BACKENDS[self.attention](q, k, v, start)  # (B, H, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, H * hs)  # kept heads side by side
        return self.dropout(self.c_proj(y))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, head_size={self.head_size}"


def _head_size(attn: nn.Module) -> int:
    return attn.head_size if isinstance(attn, PrunedSelfAttention) else attn.n_embd // attn.n_head


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear applies (a MaskedLinear's zeros included), detached."""
    return linear.weight.detach()


def _kept_indices(keep, n: int, what: str) -> torch.Tensor:
    """``keep`` as sorted unique indices in 0..n-1, or a ValueError (a bool mask or floats would index wrongly)."""
    t = torch.as_tensor(keep)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex() or t.dim() != 1:
        raise ValueError(f"keep must be a 1-D list or tensor of int {what} indices in 0..{n - 1}, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")  # fmt: skip
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"keep must be {what} indices in 0..{n - 1}, got values in {int(t.min())}..{int(t.max())}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"keep must not repeat a {what}: got {t.tolist()}")
    return t.sort().values


def remove_neurons(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the hidden neurons ``keep`` of an MLP: new, smaller c_fc (rows) and c_proj (columns)."""
    keep = _kept_indices(keep, _dense_weight(mlp.c_fc).shape[0], "neuron")
    fc, proj = mlp.c_fc, mlp.c_proj
    w_fc, w_proj = _dense_weight(fc), _dense_weight(proj)
    with warnings.catch_warnings():  # keeping no neuron at all makes empty linears, which PyTorch warns about
        warnings.simplefilter("ignore", UserWarning)
        new_fc = nn.Linear(w_fc.shape[1], len(keep), bias=fc.bias is not None, device=w_fc.device, dtype=w_fc.dtype)
        new_proj = nn.Linear(
            len(keep), w_proj.shape[0], bias=proj.bias is not None, device=w_fc.device, dtype=w_fc.dtype
        )
    with torch.no_grad():
        new_fc.weight.copy_(w_fc[keep])  # (H', C): the rows that compute the kept neurons
        new_proj.weight.copy_(w_proj[:, keep])  # (C, H'): the columns that read them
        if fc.bias is not None:
            new_fc.bias.copy_(fc.bias[keep])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
    mlp.c_fc, mlp.c_proj = new_fc, new_proj


# ---------------------------------------------------------------------------------------
# Importance of units
# ---------------------------------------------------------------------------------------
def neuron_importance(mlp: nn.Module) -> torch.Tensor:
    """Score of each hidden neuron j of an MLP: ||c_fc.weight[j, :]|| · ||c_proj.weight[:, j]||, shape (hidden,)."""
    return _dense_weight(mlp.c_fc).norm(dim=1) * _dense_weight(mlp.c_proj).norm(dim=0)


def head_output_norms(y: torch.Tensor, proj_weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Importance of each head: the L2 norm of its contribution to the attention output, over all tokens.

    ``y`` (..., n_head·hs) is c_proj's input (the heads side by side), ``proj_weight``
    (C, n_head·hs) is c_proj's weight. Head h contributes y_h · W_proj[:, h]ᵀ, where y_h and
    W_proj[:, h] are its hs-wide slices; its score is the Frobenius norm of that (tokens, C)
    matrix. Returns (n_head,).
    """
    if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head < 1 or proj_weight.shape[1] % n_head:
        raise ValueError(f"n_head must be a positive int dividing proj_weight's {proj_weight.shape[1]} columns, "
                         f"got {n_head!r}")  # fmt: skip
    if y.shape[-1] != proj_weight.shape[1]:
        raise ValueError(f"y's last dimension ({y.shape[-1]}) must equal proj_weight.shape[1] ({proj_weight.shape[1]})")
    hs = proj_weight.shape[1] // n_head
    y_heads = y.reshape(-1, n_head, hs)  # (tokens, nh, hs)
    w_heads = proj_weight.reshape(proj_weight.shape[0], n_head, hs)  # (C, nh, hs)
    contribution = torch.einsum("thd,chd->thc", y_heads, w_heads)  # (tokens, nh, C)
    return contribution.pow(2).sum(dim=(0, 2)).sqrt()


def calibration_batch(batch_size: int = 8, seq_len: int = 128, seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """(batch_size, seq_len) token ids of fresh corpus text: the data head importance is measured on."""
    from . import data
    from .tokenizer import CharTokenizer

    ids = CharTokenizer().encode(data.corpus(batch_size * seq_len + 1, seed=seed))
    return torch.tensor(ids[: batch_size * seq_len], dtype=torch.long).view(batch_size, seq_len)


@torch.no_grad()
def head_importance(model: LabGPT, idx: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, a (heads,) tensor of head scores (``head_output_norms``) on the token batch ``idx``."""
    idx = calibration_batch() if idx is None else idx
    captured = {}
    hooks = [
        block.attn.c_proj.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0]))
        for i, block in enumerate(model.transformer.h)
    ]
    was_training = model.training
    try:
        model.eval()
        model(idx.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [
        head_output_norms(captured[i], _dense_weight(block.attn.c_proj), block.attn.n_head)
        for i, block in enumerate(model.transformer.h)
    ]


def _select(scores: list[torch.Tensor], originals: list[int], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Indices of the units each layer keeps: the highest scores, round(s·n) units removed.

    ``originals`` are the layers' unit counts before any pruning (the config's), so pruning
    an already pruned model to a higher sparsity continues from it. Ties are broken by
    position (the earlier unit is removed first).
    """
    if scope == "layer":
        kept = []
        for s, n in zip(scores, originals):
            n_keep = min(len(s), n - count_to_prune(n, sparsity))
            kept.append(_prune_mask(s, len(s) - n_keep).nonzero().flatten())
        return kept
    flat = torch.cat([s.float() for s in scores])
    n_keep = min(len(flat), sum(originals) - count_to_prune(sum(originals), sparsity))
    mask = _prune_mask(flat, len(flat) - n_keep)
    return [m.nonzero().flatten() for m in mask.split([len(s) for s in scores])]


def select_neurons(model: LabGPT, sparsity: float, scope: str = "layer") -> list[torch.Tensor]:
    """Per layer, the indices of the MLP neurons that pruning to ``sparsity`` keeps (by ``neuron_importance``)."""
    _check_sparsity(sparsity)
    _check_choice("scope", scope, SCOPES)
    scores = [neuron_importance(block.mlp) for block in model.transformer.h]
    return _select(scores, [4 * model.config.n_embd] * model.config.n_layer, sparsity, scope)


def select_heads(
    model: LabGPT, sparsity: float, scope: str = "layer", calibration: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per layer, the indices of the attention heads that pruning to ``sparsity`` keeps (by ``head_importance``)."""
    _check_sparsity(sparsity)
    _check_choice("scope", scope, SCOPES)
    scores = head_importance(model, calibration)
    return _select(scores, [model.config.n_head] * model.config.n_layer, sparsity, scope)


# ---------------------------------------------------------------------------------------
# Masking units in place of removing them: the oracle structured pruning must equal
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def mask_neurons(model: LabGPT, keep: list[torch.Tensor]) -> LabGPT:
    """A copy of a dense model with every neuron not in ``keep`` zeroed: its c_fc row and bias, its c_proj column."""
    _check_one_per_layer(model, keep)
    masked = copy.deepcopy(model)
    for block, kept in zip(masked.transformer.h, keep):
        kept = _kept_indices(kept, block.mlp.c_fc.out_features, "neuron")
        removed = torch.ones(block.mlp.c_fc.out_features, dtype=torch.bool)
        removed[kept] = False
        block.mlp.c_fc.weight[removed] = 0
        if block.mlp.c_fc.bias is not None:
            block.mlp.c_fc.bias[removed] = 0  # GELU(0) = 0: the neuron outputs nothing
        block.mlp.c_proj.weight[:, removed] = 0
    return masked


def _check_one_per_layer(model: LabGPT, keep) -> None:
    if len(keep) != model.config.n_layer:
        raise ValueError(f"keep must hold one index list per layer (n_layer={model.config.n_layer}), got {len(keep)}")


@torch.no_grad()
def mask_heads(model: LabGPT, keep: list[torch.Tensor]) -> LabGPT:
    """A copy of a dense model with every head not in ``keep`` zeroed: its q, k, v rows (and biases), its c_proj columns."""
    _check_one_per_layer(model, keep)
    if any(getattr(block.attn, "n_head", None) != model.config.n_head for block in model.transformer.h):
        raise ValueError("mask_heads needs a model with all its heads: this one has had heads removed")
    masked = copy.deepcopy(model)
    C, n_head = model.config.n_embd, model.config.n_head
    hs = C // n_head
    for block, kept in zip(masked.transformer.h, keep):
        kept = _kept_indices(kept, n_head, "head")
        removed = torch.ones(n_head, dtype=torch.bool)
        removed[kept] = False
        rows = removed.repeat_interleave(hs)  # (C,): True on the removed heads' slices
        block.attn.c_proj.weight[:, rows] = 0
        qkv = rows.repeat(3)  # the same slices of q, k and v
        block.attn.c_attn.weight[qkv] = 0
        if block.attn.c_attn.bias is not None:
            block.attn.c_attn.bias[qkv] = 0
    return masked


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------
def _block_linears(model: LabGPT) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the four linears of every block (the tied head excluded)."""
    out = []
    for i, block in enumerate(model.transformer.h):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out.append((f"transformer.h.{i}.{name}", block.get_submodule(name)))
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def prune_model(
    model: LabGPT,
    sparsity: float,
    structure: str = "unstructured",
    scope: str = "layer",
    calibration: torch.Tensor | None = None,
    inplace: bool = False,
    semi_structured: bool = True,
) -> LabGPT:
    """Prune the linears of every block of ``model``; returns a pruned copy (or ``model`` itself if ``inplace``).

    ``structure``: ``"unstructured"`` (magnitude pruning of each weight; the linears become
    MaskedLinear), ``"neurons"`` (MLP neurons removed: smaller c_fc and c_proj),
    ``"heads"`` (attention heads removed: PrunedSelfAttention) or ``"2:4"`` (2 of every 4
    consecutive weights zero; ``sparsity`` must then be 0.5).

    ``sparsity`` is the fraction removed: of each matrix's weights (``scope="layer"``) or of
    all of them together (``"global"``) for unstructured pruning; of the MLP neurons or
    attention heads that the config gives each layer (or the model) for the structured
    kinds, so pruning a pruned model further continues from where it stands.
    ``calibration`` (token ids) is the batch head importance is measured on (default:
    ``calibration_batch()``). With ``semi_structured`` a 2:4 model on a GPU that supports it
    gets ``torch.sparse`` semi-structured weights (inference only); otherwise masked dense ones.
    """
    _check_sparsity(sparsity)
    _check_choice("structure", structure, STRUCTURES)
    _check_choice("scope", scope, SCOPES)
    if structure == "2:4" and sparsity != 0.5:
        raise ValueError(f"sparsity must be 0.5 for structure '2:4' (2 of every 4 weights are zero), got {sparsity!r}")
    if not isinstance(model, LabGPT):
        raise ValueError(f"model must be a LabGPT, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    linears = _block_linears(model)
    if structure == "unstructured":
        weights = [_dense_weight(module) for _, module in linears]
        if scope == "layer":
            pruned = [magnitude_prune(w, sparsity=sparsity) for w in weights]
        else:
            pruned = global_magnitude_prune(weights, sparsity=sparsity)
        for (name, module), (w, mask) in zip(linears, pruned):
            _set(model, name, MaskedLinear(w, module.bias, mask))
    elif structure == "2:4":
        for name, module in linears:
            w = _dense_weight(module)
            _set(model, name, MaskedLinear(w, module.bias, semi_structured_mask(w)))
        if semi_structured:
            to_semi_structured(model)
    elif structure == "neurons":
        for block, keep in zip(model.transformer.h, select_neurons(model, sparsity, scope)):
            remove_neurons(block.mlp, keep)
    else:
        for block, keep in zip(model.transformer.h, select_heads(model, sparsity, scope, calibration)):
            block.attn = PrunedSelfAttention.from_attention(block.attn, keep)
    return model


def iterative_prune(
    model: LabGPT,
    sparsity: float,
    structure: str = "unstructured",
    rounds: int = 3,
    steps_per_round: int = 20,
    scope: str = "layer",
    calibration: torch.Tensor | None = None,
    progress: bool = False,
    **finetune_kwargs,
) -> tuple[LabGPT, list[dict]]:
    """Prune gradually, fine-tuning after each round; returns (pruned copy, history of the rounds).

    Round r of R prunes to s·(1 − (1 − r/R)³) (the cubic schedule of Zhu & Gupta, 2017: big
    steps first, while the model has most capacity to recover), then runs
    ``labkit.train.finetune`` for ``steps_per_round`` steps (``finetune_kwargs`` go to it).
    2:4 has one possible sparsity, so it is one round of pruning and R rounds of fine-tuning.
    """
    from .train import finetune

    _check_sparsity(sparsity)
    _check_choice("structure", structure, STRUCTURES)
    check_int("rounds", rounds)
    check_int("steps_per_round", steps_per_round)
    model = copy.deepcopy(model)
    history = []
    for r in range(1, rounds + 1):
        target = sparsity if structure == "2:4" else sparsity * (1 - (1 - r / rounds) ** 3)
        if structure != "2:4" or r == 1:
            prune_model(model, target, structure, scope, calibration, inplace=True, semi_structured=False)
        losses = finetune(model, steps=steps_per_round, progress=progress, seed=r, **finetune_kwargs)
        history.append({"round": r, "sparsity": target, "loss_first": losses[0], "loss_last": losses[-1]})
    return model, history


# ---------------------------------------------------------------------------------------
# What pruning buys: weights left, bytes stored
# ---------------------------------------------------------------------------------------
def weight_sparsity(model: LabGPT) -> float:
    """Fraction of the dense model's block weights that are gone or zero (embeddings, norms, biases not counted)."""
    dense = 12 * model.config.n_embd**2 * model.config.n_layer  # qkv 3C², proj C², MLP 4C² + 4C² per layer
    nonzero = sum(int(torch.count_nonzero(_dense_weight(module))) for _, module in _block_linears(model))
    return 1 - nonzero / dense


def dense_bytes(w: torch.Tensor) -> int:
    """Bytes of w stored densely: every zero costs as much as any other number."""
    return w.numel() * w.element_size()


def csr_bytes(w: torch.Tensor) -> int:
    """Bytes of w in PyTorch's CSR format: values, column indices (int64) and row pointers (int64)."""
    with warnings.catch_warnings():  # PyTorch warns that CSR support is "beta" on first use
        warnings.simplefilter("ignore", UserWarning)
        csr = w.detach().to_sparse_csr()
    return sum(t.numel() * t.element_size() for t in (csr.values(), csr.col_indices(), csr.crow_indices()))


def bitmask_bytes(w: torch.Tensor) -> int:
    """Bytes of w as its nonzero values plus one bit per position saying which are nonzero."""
    return int(torch.count_nonzero(w)) * w.element_size() + math.ceil(w.numel() / 8)


def semi_structured_bytes(w: torch.Tensor) -> int:
    """Bytes of a 2:4 w in the compressed layout: half the values, plus 2 bits locating each kept value."""
    kept = w.numel() // 2
    return kept * w.element_size() + math.ceil(kept * 2 / 8)


class CSRLinear(nn.Module):
    """A linear layer whose weight is stored in CSR and multiplied by torch.sparse: sparse compute, not just zeros."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        with warnings.catch_warnings():  # PyTorch warns that CSR support is "beta" on first use
            warnings.simplefilter("ignore", UserWarning)
            self.weight = _dense_weight(linear).to_sparse_csr()  # (out, in), only the nonzeros
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.reshape(-1, x.shape[-1]).T).T  # (out, in) @ (in, tokens) -> (tokens, out)
        y = y.reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


def _register() -> None:
    from .bench import compare, register_suite

    @register_suite("prune")
    def prune_suite(quick: bool = False) -> list[dict]:
        """MLPs with 50% of their neurons removed vs dense; unstructured 50%/90% (CSR) vs dense."""
        from .model import MLP, GPTConfig

        rows = []
        repeat = 10 if quick else 30
        threads = torch.get_num_threads()
        # also on one thread: on a busy machine, threads that wait for each other swamp small matmuls
        settings = sorted({threads, 1}, reverse=True)
        try:
            with torch.no_grad():
                for width, tokens in ((192, 2048), (768, 512 if quick else 1024)):
                    torch.manual_seed(0)
                    dense = MLP(GPTConfig(n_embd=width, n_head=1)).eval()
                    half = copy.deepcopy(dense)
                    remove_neurons(half, neuron_importance(half).argsort(descending=True)[: 2 * width])
                    x = torch.randn(tokens, width)
                    for n in settings:
                        torch.set_num_threads(n)
                        variants = {
                            f"MLP {width}->{4 * width}, {tokens} tokens, {n} thread(s)": lambda: dense(x),
                            f"50% neurons, {n} thread(s)": lambda: half(x),
                        }
                        rows += compare(variants, warmup=5, repeat=repeat, suite="prune")
                torch.set_num_threads(threads)
                torch.manual_seed(0)
                linear = nn.Linear(768, 3072)
                x = torch.randn(256 if quick else 512, 768)
                variants = {"dense 768->3072": lambda: linear(x)}
                for s in (0.5, 0.9):
                    w, mask = magnitude_prune(linear.weight, sparsity=s)
                    zeros = MaskedLinear(w, linear.bias, mask).eval()
                    sparse = CSRLinear(zeros)
                    variants[f"{s:.0%} zeros, dense kernel"] = lambda zeros=zeros: zeros(x)
                    variants[f"{s:.0%} zeros, CSR kernel"] = lambda sparse=sparse: sparse(x)
                rows += compare(variants, warmup=3, repeat=repeat, suite="prune")
        finally:
            torch.set_num_threads(threads)
        return rows


_register()
