"""Tensor parallelism: one layer's matrices split across ranks (Megatron-LM, Shoeybi et al. 2019).

A linear ``y = x Wᵀ`` can be cut two ways:

- **column-parallel**: rank i holds rows W_i of W (output features), computes ``y_i = x W_iᵀ``;
  the outputs are the pieces of y side by side (concatenate to get y);
- **row-parallel**: rank i holds columns of W (input features) and the matching piece
  x_i of the input; ``y = Σ_i x_i W_iᵀ`` needs one all-reduce.

Megatron's MLP puts a column-parallel linear first and a row-parallel one second: the
GELU between them is elementwise, so it runs on each rank's piece and the whole MLP costs
one all-reduce forward and one backward. Attention splits the same way by heads: each
rank computes its heads (qkv column-parallel), then the output projection is row-parallel.

Two conjugate functions make autograd right:

- ``f`` (``copy_to_parallel``): identity forward, all-reduce of the gradient backward
  (every rank used the same x, so x's gradient is the sum of their contributions);
- ``g`` (``reduce_from_parallel``): all-reduce forward, identity backward.

Run as a script: ``python -m labkit.parallel.tensor --world-size 2`` or under ``torchrun``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .._args import check_int
from ..model import ATTENTION_BACKENDS

# all-reduce calls and bytes the conjugate functions moved (this process), for the lab's tables
TRAFFIC = {"all_reduces": 0, "bytes": 0, "seconds": 0.0}


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    start = time.perf_counter()
    dist.all_reduce(x, group=group)
    TRAFFIC["seconds"] += time.perf_counter() - start
    TRAFFIC["all_reduces"] += 1
    TRAFFIC["bytes"] += x.numel() * x.element_size()
    return x


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward; all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    """g: all-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    """All-gather along the last dimension forward; each rank keeps its own slice backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n, r = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.width = r, x.shape[-1]
        pieces = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def copy_to_parallel(x, group=None):
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x, group=None):
    return _ReduceFromParallel.apply(x, group)


def gather_from_parallel(x, group=None):
    return _GatherFromParallel.apply(x, group)


def _split(size: int, world_size: int, what: str) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) must be divisible by the tensor-parallel size ({world_size})")
    return size // world_size


class ColumnParallelLinear(nn.Module):
    """This rank's rows of a linear's weight: output features ``rows`` of the full layer.

    With ``gather_output`` the pieces are all-gathered into the full output; otherwise each
    rank keeps its piece (the next layer is row-parallel and wants exactly that).
    """

    def __init__(self, full: nn.Linear, rows: torch.Tensor, group=None, gather_output: bool = False) -> None:
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.weight = nn.Parameter(full.weight.detach()[rows].clone())
        self.bias = nn.Parameter(full.bias.detach()[rows].clone()) if full.bias is not None else None

    @classmethod
    def split(cls, full: nn.Linear, group=None, gather_output: bool = False) -> ColumnParallelLinear:
        n, r = dist.get_world_size(group), dist.get_rank(group)
        per = _split(full.out_features, n, "out_features")
        return cls(full, torch.arange(r * per, (r + 1) * per), group, gather_output)

    def forward(self, x):
        y = F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)
        return gather_from_parallel(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """This rank's columns of a linear's weight; the partial outputs are summed by one all-reduce.

    The input is this rank's piece of the features (what a column-parallel layer produced).
    The bias is added once, after the sum.
    """

    def __init__(self, full: nn.Linear, cols: torch.Tensor, group=None) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach()[:, cols].clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    @classmethod
    def split(cls, full: nn.Linear, group=None) -> RowParallelLinear:
        n, r = dist.get_world_size(group), dist.get_rank(group)
        per = _split(full.in_features, n, "in_features")
        return cls(full, torch.arange(r * per, (r + 1) * per), group)

    def forward(self, x_piece):
        y = reduce_from_parallel(F.linear(x_piece, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class ParallelMLP(nn.Module):
    """Megatron's MLP: column-parallel c_fc, GELU on each piece, row-parallel c_proj."""

    def __init__(self, mlp: nn.Module, group=None) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear.split(mlp.c_fc, group)
        self.gelu = mlp.gelu
        self.c_proj = RowParallelLinear.split(mlp.c_proj, group)
        self.dropout = mlp.dropout

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class ParallelSelfAttention(nn.Module):
    """Attention with this rank's heads: q, k and v rows of those heads, and their c_proj columns."""

    def __init__(self, attn: nn.Module, group=None) -> None:
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        local = _split(attn.n_head, n, "n_head (attention heads)")
        C, hs = attn.n_embd, attn.n_embd // attn.n_head
        self.n_head, self.width, self.attention = local, local * hs, attn.attention
        mine = torch.arange(r * local * hs, (r + 1) * local * hs)  # this rank's head features
        rows = torch.cat([mine, C + mine, 2 * C + mine])  # its q, k and v rows in the fused weight
        self.c_attn = ColumnParallelLinear(attn.c_attn, rows, group)
        self.c_proj = RowParallelLinear(attn.c_proj, mine, group)
        self.dropout = attn.dropout

    def forward(self, x, cache=None, layer: int = 0, start: int = 0):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        y = ATTENTION_BACKENDS[self.attention](q, k, v, start)
        return self.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.width)))


def check_tensor_parallel_size(config, tp: int) -> None:
    """A ValueError unless ``tp`` splits the heads and the MLP evenly."""
    check_int("tensor-parallel size", tp)
    if config.n_head % tp:
        allowed = [d for d in range(1, config.n_head + 1) if config.n_head % d == 0]
        raise ValueError(f"tensor-parallel size {tp} does not divide n_head={config.n_head}; allowed: {allowed}")


def tensor_parallel(model: nn.Module, group=None) -> nn.Module:
    """Split every block of a LabGPT across the ranks of ``group``, in place; returns the model.

    Embeddings, layer norms and the head stay replicated (small here; Megatron also splits
    the vocabulary). A KV cache made by ``model.new_cache`` would be full width: decode with
    a cache built for the local heads instead.
    """
    check_tensor_parallel_size(model.config, dist.get_world_size(group))
    for block in model.transformer.h:
        block.attn = ParallelSelfAttention(block.attn, group)
        block.mlp = ParallelMLP(block.mlp, group)
    return model


# -- workers -----------------------------------------------------------------------


def logits_and_gradients(rank: int, world_size: int, config: str = "nano", batch_size: int = 2,
                         seq_len: int = 32, seed: int = 0) -> dict:
    """A LabGPT split ``world_size`` ways vs the same model in one process: logits and gradients.

    Every sharded parameter's gradient is compared with the matching slice of the full
    model's gradient (taken by running the full model on this rank too).
    """
    from ..model import LabGPT, get_config
    from .data import global_batch
    from .launch import rank_device

    torch.manual_seed(seed)
    full = LabGPT(get_config(config)).to(rank_device())
    tp = LabGPT(get_config(config)).to(rank_device())
    tp.load_state_dict(full.state_dict())
    tensor_parallel(tp)
    x, y = (t.to(rank_device()) for t in global_batch(0, batch_size, seq_len, full.config.vocab_size, seed))
    TRAFFIC.update(all_reduces=0, bytes=0, seconds=0.0)
    logits_tp = tp(x)
    forward_traffic = dict(TRAFFIC)
    logits = full(x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(logits_tp.flatten(0, 1), y.flatten()).backward()
    worst = 0.0
    full_params = dict(full.named_parameters())
    n, r = world_size, rank
    for name, p in tp.named_parameters():
        g_full = full_params[name].grad
        if p.shape != g_full.shape:  # a shard: find its slice of the full gradient
            g_full = _matching_slice(name, g_full, full.config, n, r)
        worst = max(worst, (p.grad - g_full).abs().max().item())
    return {
        "max_logit_diff": (logits_tp - logits).abs().max().item(),
        "max_grad_diff": worst,
        "forward_all_reduces": forward_traffic["all_reduces"],
        "forward_bytes": forward_traffic["bytes"],
        "params_here": sum(p.numel() for p in tp.parameters()),
        "params_full": sum(p.numel() for p in full.parameters()),
    }


def _matching_slice(name: str, g: torch.Tensor, config, n: int, r: int) -> torch.Tensor:
    C = config.n_embd
    piece = C // n
    mine = torch.arange(r * piece, (r + 1) * piece)
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        return g[torch.cat([mine, C + mine, 2 * C + mine])]
    if name.endswith("attn.c_proj.weight"):
        return g[:, mine]
    hidden = g.shape[0] if name.endswith("mlp.c_fc.weight") or name.endswith("mlp.c_fc.bias") else g.shape[1]
    per = hidden // n
    rows = torch.arange(r * per, (r + 1) * per)
    if name.endswith("mlp.c_fc.weight") or name.endswith("mlp.c_fc.bias"):
        return g[rows]
    if name.endswith("mlp.c_proj.weight"):
        return g[:, rows]
    raise ValueError(f"no tensor-parallel slice rule for {name}")


def forward_times(rank: int, world_size: int, config: str = "tiny", batch_size: int = 4, seq_len: int = 128,
                  repeat: int = 5) -> dict:
    """Median forward time of LabGPT split ``world_size`` ways, and the share spent in all-reduces."""
    from ..model import LabGPT, get_config
    from .data import global_batch
    from .launch import rank_device

    torch.manual_seed(0)
    model = LabGPT(get_config(config)).to(rank_device())
    if world_size > 1:
        tensor_parallel(model)
    x = global_batch(0, batch_size, seq_len, model.config.vocab_size)[0].to(rank_device())
    times, comm = [], []
    with torch.no_grad():
        for i in range(repeat + 2):
            TRAFFIC.update(all_reduces=0, bytes=0, seconds=0.0)
            dist.barrier()
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up calls
                times.append(time.perf_counter() - start)
                comm.append(TRAFFIC["seconds"])
    return {
        "forward_s": statistics.median(times),
        "all_reduce_s": statistics.median(comm),
        "all_reduce_bytes": TRAFFIC["bytes"],
        "params_here": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> None:
    from .launch import run

    parser = argparse.ArgumentParser(description="Tensor parallelism: LabGPT split across ranks vs one process.")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args(argv)
    out = run(logits_and_gradients, args.world_size, args.config)[0]
    print(out)


if __name__ == "__main__":
    main()
