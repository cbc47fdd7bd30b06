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

    best = None
    tp = 1
    while tp <= min(8, num_gpus):  # tensor parallelism inside one node of 8 GPUs
        for pp in range(1, num_gpus // tp + 1):
            if num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            if global_batch % dp:
                continue  # every data-parallel rank needs whole micro-batches
            try:
                p = planner.plan(model, gpu, planner.Layout(dp, tp, pp, 1, global_batch, "full"))
            except ValueError:  # e.g. pp does not divide the layers, or tp the heads
                continue
            if p.total_bytes <= memory_limit and (best is None or p.step_s < best.step_s):
                best = p
        tp *= 2
    return best.layout.dp, best.layout.tp, best.layout.pp
