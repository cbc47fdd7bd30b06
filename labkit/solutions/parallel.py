"""Reference solutions for notebooks 02-05 (parallelism)."""

import math

import torch


def reduce_scatter_step(buffers, step):
    n = len(buffers)
    new = [[c.clone() for c in b] for b in buffers]
    for r in range(n):
        c = (r - step) % n  # the chunk rank r passes on at this step
        new[(r + 1) % n][c] += buffers[r][c]  # its right neighbour adds it to its own copy
    return new


def qkv_rows(C, n_head, tp, rank):
    hs, local = C // n_head, n_head // tp
    mine = torch.arange(rank * local * hs, (rank + 1) * local * hs)  # this rank's heads, side by side
    return torch.cat([mine, C + mine, 2 * C + mine])  # in q, then k, then v


def min_micro_batches(p, target):
    if p == 1:
        return 1
    # (p-1)/(m+p-1) <= b  <=>  m >= (p-1)(1-b)/b ; a small epsilon guards float round-off
    return max(1, math.ceil((p - 1) * (1 - target) / target - 1e-9))


def layout_that_fits(model, gpu, num_gpus, global_batch, memory_limit):
    from labkit.parallel import planner

    fitting = planner.search_layouts(model, gpu, num_gpus, global_batch, micro_batch=1, recompute="full",
                                     memory_limit=memory_limit)
    best = fitting[0].layout  # fastest first
    return best.dp, best.tp, best.pp
