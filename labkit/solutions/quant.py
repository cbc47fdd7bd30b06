"""Reference solutions for notebooks/08_quantization.ipynb and 09_qat_and_mixed_precision.ipynb."""

import torch


def quantize(x, scale, zero_point, bits):
    q = torch.round(x / scale) + zero_point  # the seed's round(W/s + z): z is an integer
    return torch.clamp(q, 0, 2**bits - 1)  # values beyond the grid are clipped to its ends


def dequantize(q, scale, zero_point):
    return (q - zero_point) * scale


def pick_scale(x, bits):
    lo = min(x.min().item(), 0.0)  # the range must contain 0, so that 0.0 is stored exactly
    hi = max(x.max().item(), 0.0)
    scale = max((hi - lo) / (2**bits - 1), torch.finfo(torch.float32).eps)  # 2^bits levels, 2^bits - 1 steps
    zero_point = int(round(-lo / scale))  # the integer that lo rounds to is 0
    return scale, zero_point


def straight_through(w, scale, zero_point, qmin, qmax):
    q = torch.round(w / scale) + zero_point
    inside = (q >= qmin) & (q <= qmax)
    w_hat = (torch.clamp(q, qmin, qmax) - zero_point) * scale
    # forward: w_hat; backward: the identity where w was inside the grid, 0 where it was clipped
    return torch.where(inside, w + (w_hat - w).detach(), w_hat.detach())
