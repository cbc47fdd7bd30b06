"""Reference solutions for notebooks/13_low_rank.ipynb."""

import math


def rank_for_compression(d_out: int, d_in: int, keep: float) -> int:
    k = math.floor(keep * d_out * d_in / (d_in + d_out) + 1e-9)  # k (d_in + d_out) <= keep d_out d_in
    return min(k, d_out, d_in)
