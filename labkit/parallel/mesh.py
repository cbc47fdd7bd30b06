"""Mixed (3D) parallelism: data × tensor × pipeline on one grid of processes.

The world's ranks are laid out as a dp × tp × pp mesh, tensor-parallel ranks adjacent
(they talk most, so on real clusters they share a node's NVLink), pipeline stages
outermost (they only pass activations to a neighbour)::

    rank = pp_index · (dp · tp) + dp_index · tp + tp_index

Each rank belongs to three groups: its tensor-parallel group (splits every block of its
stage), its pipeline (the stages holding the same data shard and tensor slice) and its
data-parallel group (the replicas of the same slice of the model, whose gradients are
averaged). One training step: the dp replicas each run the pipeline schedule on their
share of the batch, with tensor parallelism inside every stage; the tied embedding's
gradient is summed between the first and last stage; then gradients are averaged over dp
and every rank takes its AdamW step on its own slice.

``python -m labkit.parallel.mesh --dp 2 --tp 2 --pp 2`` runs it on 8 CPU processes;
``torchrun --nproc-per-node 8 -m labkit.parallel.mesh --dp 2 --tp 2 --pp 2`` on 8 GPUs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._args import check_int, check_number
from .data import global_batch, shard
from .launch import rank_device
from .pipeline import PipelineStage, run_pipeline, stage_layers, sync_tied_gradients
from .tensor import check_tensor_parallel_size, tensor_parallel


@dataclass(frozen=True)
class Coord:
    dp: int
    tp: int
    pp: int


class ProcessMesh:
    """The dp × tp × pp layout of ``dp·tp·pp`` ranks, and (inside a process group) its groups."""

    def __init__(self, dp: int, tp: int, pp: int) -> None:
        for name, v in (("dp", dp), ("tp", tp), ("pp", pp)):
            check_int(name, v)
        self.dp, self.tp, self.pp = dp, tp, pp
        self.size = dp * tp * pp
        self.groups: dict[str, object] = {}

    def rank_of(self, dp: int, tp: int, pp: int) -> int:
        return pp * (self.dp * self.tp) + dp * self.tp + tp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank must be in 0..{self.size - 1}, got {rank!r}")
        pp, rest = divmod(rank, self.dp * self.tp)
        dp, tp = divmod(rest, self.tp)
        return Coord(dp, tp, pp)

    def layout(self) -> dict[str, list[list[int]]]:
        """Every group of each kind, as lists of ranks."""
        r = self.rank_of
        return {
            "tp": [[r(d, t, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)],
            "dp": [[r(d, t, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)],
            "pp": [[r(d, t, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)],
        }

    def init_groups(self) -> dict[str, object]:
        """Create this rank's three process groups. Every rank must call it (``new_group`` is collective)."""
        if dist.get_world_size() != self.size:
            raise ValueError(f"mesh dp*tp*pp = {self.size} but the world has {dist.get_world_size()} processes")
        me = dist.get_rank()
        for kind, groups in self.layout().items():
            for ranks in groups:
                g = dist.new_group(ranks)  # every rank creates every group, in the same order
                if me in ranks:
                    self.groups[kind] = g
        return self.groups


def check_mesh(config, dp: int, tp: int, pp: int, batch_size: int, micro_batches: int) -> None:
    """The ValueErrors of an impossible layout, each naming what is wrong."""
    ProcessMesh(dp, tp, pp)
    check_int("batch_size", batch_size)
    check_int("micro_batches", micro_batches)
    check_tensor_parallel_size(config, tp)
    stage_layers(config.n_layer, pp)
    if batch_size % (dp * micro_batches):
        raise ValueError(
            f"batch_size {batch_size} must be divisible by dp × micro_batches = {dp} × {micro_batches}"
        )


OPTIMIZERS = ("adamw", "sgd")


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """AdamW, as LLMs train; or plain SGD, whose step is proportional to the gradient: a gradient off by a
    constant factor (a missing data-parallel average) shows in its losses, while AdamW's step hides it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def train_3d(rank: int, world_size: int, dp: int, tp: int, pp: int, steps: int = 3, config: str = "nano",
             batch_size: int = 8, seq_len: int = 32, micro_batches: int = 2, lr: float = 1e-2,
             seed: int = 0, optimizer: str = "adamw") -> dict:
    """Train LabGPT ``steps`` steps on the dp × tp × pp mesh; every rank also trains the
    same model alone on the whole batch (the oracle) and the last stage compares losses."""
    from ..model import LabGPT, get_config

    cfg = get_config(config)
    check_mesh(cfg, dp, tp, pp, batch_size, micro_batches)
    mesh = ProcessMesh(dp, tp, pp)
    groups = mesh.init_groups()
    me = mesh.coord(rank)
    device = rank_device()
    torch.manual_seed(seed)
    oracle = LabGPT(cfg).to(device)
    model = LabGPT(get_config(config)).to(device)
    model.load_state_dict(oracle.state_dict())
    tensor_parallel(model, groups["tp"])
    stage = PipelineStage(model, me.pp, pp)
    prev_rank = mesh.rank_of(me.dp, me.tp, me.pp - 1) if me.pp > 0 else None
    next_rank = mesh.rank_of(me.dp, me.tp, me.pp + 1) if me.pp < pp - 1 else None
    opt, opt_oracle = _optimizer(optimizer, stage.parameters(), lr), _optimizer(optimizer, oracle.parameters(), lr)
    losses, oracle_losses = [], []
    for step in range(steps):
        x, y = (t.to(device) for t in global_batch(step, batch_size, seq_len, cfg.vocab_size, seed))
        loss = oracle.loss(x, y)  # the oracle: one process, the whole batch
        loss.backward()
        opt_oracle.step()
        opt_oracle.zero_grad(set_to_none=True)
        oracle_losses.append(loss.item())

        xs, ys = shard(x, me.dp, dp), shard(y, me.dp, dp)
        out = run_pipeline(stage, "1f1b", list(xs.chunk(micro_batches)), list(ys.chunk(micro_batches)),
                           prev_rank, next_rank)
        sync_tied_gradients(stage, mesh.rank_of(me.dp, me.tp, 0), mesh.rank_of(me.dp, me.tp, pp - 1))
        for p in stage.parameters():  # average over the data-parallel replicas
            dist.all_reduce(p.grad, group=groups["dp"])
            p.grad.div_(dp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if out["loss"] is not None:
            step_loss = torch.tensor([out["loss"]], device=device)
            dist.all_reduce(step_loss, group=groups["dp"])
            losses.append(step_loss.item() / dp)
    return {
        "coord": (me.dp, me.tp, me.pp),
        "losses": losses,
        "oracle_losses": oracle_losses,
        "params_here": sum(p.numel() for p in stage.parameters()),
        "params_full": sum(p.numel() for p in oracle.parameters()),
    }


def run_mesh(dp: int = 2, tp: int = 2, pp: int = 2, steps: int = 3, config: str = "nano", batch_size: int = 8,
             seq_len: int = 32, micro_batches: int = 2, timeout: float = 300.0, optimizer: str = "adamw",
             lr: float = 1e-2) -> dict:
    """Launch ``train_3d`` on dp·tp·pp processes; return the mesh's losses next to one process's."""
    from ..model import get_config
    from .launch import launch

    check_mesh(get_config(config), dp, tp, pp, batch_size, micro_batches)
    _optimizer(optimizer, [torch.zeros(1, requires_grad=True)], 1.0)  # a bad name fails here, not in 8 processes
    check_number("lr", lr)
    results = launch(train_3d, dp * tp * pp, dp, tp, pp, steps, config, batch_size, seq_len, micro_batches, lr, 0,
                     optimizer, timeout=timeout)
    last = [r for r in results if r["coord"][2] == pp - 1]
    losses, oracle = last[0]["losses"], last[0]["oracle_losses"]
    return {
        "losses": losses,
        "oracle_losses": oracle,
        "max_loss_diff": max(abs(a - b) for r in last for a, b in zip(r["losses"], r["oracle_losses"])),
        "params_per_rank": {r["coord"]: r["params_here"] for r in results},
        "params_full": results[0]["params_full"],
    }


def main(argv=None) -> None:
    from .launch import under_torchrun

    parser = argparse.ArgumentParser(description="3D parallelism: LabGPT trained on a dp x tp x pp mesh.")
    for name in ("dp", "tp", "pp"):
        parser.add_argument(f"--{name}", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--config", default="nano")
    args = parser.parse_args(argv)
    if under_torchrun():
        from .launch import run

        out = run(train_3d, 0, args.dp, args.tp, args.pp, args.steps, args.config)[0]
        if out["losses"]:  # the last stage's ranks know the loss
            print(f"rank at (dp, tp, pp) = {out['coord']}: mesh losses {[round(x, 6) for x in out['losses']]}, "
                  f"one process {[round(x, 6) for x in out['oracle_losses']]}")
        return
    out = run_mesh(args.dp, args.tp, args.pp, args.steps, args.config)
    for step, (a, b) in enumerate(zip(out["losses"], out["oracle_losses"])):
        print(f"step {step}: mesh loss {a:.6f}   one process {b:.6f}")


if __name__ == "__main__":
    main()
