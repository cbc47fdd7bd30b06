"""Reference solutions for notebooks/07_pruning.ipynb."""

import math

import torch


def threshold_for_sparsity(w: torch.Tensor, sparsity: float) -> float:
    k = math.floor(sparsity * w.numel() + 0.5)  # weights to zero: round(s * n)
    magnitudes = w.abs().flatten().sort().values  # ascending
    return magnitudes[k].item() if k < w.numel() else math.inf  # the smallest magnitude kept


def head_importance(y: torch.Tensor, proj_weight: torch.Tensor, n_head: int) -> torch.Tensor:
    hs = proj_weight.shape[1] // n_head
    scores = []
    for h in range(n_head):
        part = slice(h * hs, (h + 1) * hs)
        contribution = y[..., part] @ proj_weight[:, part].T  # (..., C): what c_proj makes of head h
        scores.append(contribution.norm())
    return torch.stack(scores)
