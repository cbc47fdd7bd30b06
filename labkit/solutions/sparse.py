"""Reference solutions for notebooks/06_sparse_attention.ipynb."""

import torch


def window_mask(T: int, window: int) -> torch.Tensor:
    i = torch.arange(T).unsqueeze(1)  # query positions down the rows
    j = torch.arange(T).unsqueeze(0)  # key positions along the columns
    return (j <= i) & (j > i - window)  # causal, and no more than window-1 steps back
