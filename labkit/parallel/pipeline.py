"""Pipeline parallelism: LabGPT cut into stages on separate processes, fed with micro-batches.

Stage s holds a contiguous run of layers (the first also the embeddings, the last the
final norm, the head and the loss). A batch is cut into m micro-batches; stage s works on
micro-batch i once stage s−1 has sent it the activations, and its backward pass once stage
s+1 has sent back the gradient of those activations.

Two schedules:
- **GPipe**: every micro-batch forward, then every micro-batch backward. Simple; each
  stage keeps the activations of all m micro-batches until their backward.
- **1F1B** (PipeDream-flush, Megatron's default): p−s−1 forwards to fill the pipe, then
  one forward, one backward, alternating; at most p−s micro-batches are in flight, so
  activation memory no longer grows with m.

Both leave each stage idle for p−1 of the m+p−1 slots of a step -- the seed's bubble,
(p−1)/(m+p−1) -- when a forward and a backward take the same time on every stage.
``simulate_schedule`` replays a schedule as discrete events and reproduces it exactly;
``run_pipeline`` runs it on real processes, where the bubble comes out larger (stages are
not equal, send/recv takes time, and processes share this machine's cores).

Run as a script: ``python -m labkit.parallel.pipeline --stages 2 --micro-batches 4``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .._args import check_int

SCHEDULES = ("gpipe", "1f1b")


def bubble_fraction(p: int, m: int) -> float:
    """Idle fraction of a GPipe or 1F1B step with ``p`` stages and ``m`` micro-batches: (p-1)/(m+p-1)."""
    check_int("p (pipeline stages)", p)
    check_int("m (micro-batches)", m)
    return (p - 1) / (m + p - 1)


def schedule(kind: str, p: int, m: int, stage: int) -> list[tuple[str, int]]:
    """The ordered operations of one stage: ("F", i) or ("B", i) for micro-batch i."""
    bubble_fraction(p, m)  # validates p and m
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    check_int("stage", stage, 0, p - 1)
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(p - stage - 1, m)
    ops = [("F", i) for i in range(warm)]
    for i in range(m - warm):  # steady state: one forward, one backward
        ops += [("F", warm + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warm, m)]


@dataclass
class Event:
    stage: int
    op: str  # "F" or "B"
    micro_batch: int
    start: float
    end: float


def bubble_of(events: list[Event], p: int) -> float:
    """Idle fraction: 1 − (busy time of all stages) / (p × makespan)."""
    t0, t1 = min(e.start for e in events), max(e.end for e in events)
    busy = sum(e.end - e.start for e in events)
    return 1 - busy / (p * (t1 - t0))


def simulate_schedule(kind: str, p: int, m: int, t_forward: float = 1.0, t_backward: float = 2.0,
                      t_send: float = 0.0) -> dict:
    """Discrete-event replay of a schedule: each stage runs its operations in order, each as
    soon as the stage is free and its input has arrived.

    F(s, i) needs F(s−1, i) done (plus ``t_send``); B(s, i) needs B(s+1, i) done (plus
    ``t_send``). ``t_forward`` and ``t_backward`` may be numbers (every stage equal) or lists
    (one per stage). Returns the events, the makespan, the bubble and, per stage, the most
    micro-batches in flight (activations held between a forward and its backward).
    The arithmetic is exact (fractions), so the bubble of equal stages is exactly (p−1)/(m+p−1).
    """
    tf = list(t_forward) if isinstance(t_forward, (list, tuple)) else [t_forward] * p
    tb = list(t_backward) if isinstance(t_backward, (list, tuple)) else [t_backward] * p
    if len(tf) != p or len(tb) != p:
        raise ValueError(f"t_forward and t_backward lists must have one entry per stage ({p})")
    if any(t <= 0 for t in tf + tb) or t_send < 0:
        raise ValueError("t_forward and t_backward must be > 0 and t_send >= 0")
    tf, tb, t_send = [Fraction(t) for t in tf], [Fraction(t) for t in tb], Fraction(t_send)
    ops = [schedule(kind, p, m, s) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}
    free = [Fraction(0)] * p
    nxt = [0] * p
    events: list[Event] = []
    in_flight, peak = [0] * p, [0] * p
    while len(events) < 2 * p * m:
        progressed = False
        for s in range(p):
            if nxt[s] == len(ops[s]):
                continue
            op, i = ops[s][nxt[s]]
            dep = ("F", s - 1, i) if op == "F" and s > 0 else ("B", s + 1, i) if op == "B" and s < p - 1 else None
            if dep is not None and dep not in done:
                continue  # its input has not been produced yet
            ready = done[dep] + t_send if dep is not None else Fraction(0)
            start = max(free[s], ready)
            end = start + (tf[s] if op == "F" else tb[s])
            done[(op, s, i)] = free[s] = end
            events.append(Event(s, op, i, start, end))
            in_flight[s] += 1 if op == "F" else -1
            peak[s] = max(peak[s], in_flight[s])
            nxt[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocked")  # cannot happen for GPipe or 1F1B
    makespan, bubble = max(e.end for e in events), bubble_of(events, p)
    for e in events:  # floats from here on, for plotting
        e.start, e.end = float(e.start), float(e.end)
    return {"events": events, "makespan": float(makespan), "bubble": bubble, "peak_in_flight": peak}


def plot_timeline(events: list[Event], p: int, ax=None, title: str | None = None):
    """A Gantt chart: one row per stage, forward blue, backward green, micro-batch numbers inside."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.5 + 0.55 * p))
    t0 = min(e.start for e in events)
    for e in events:
        color = "tab:blue" if e.op == "F" else "tab:green"
        ax.broken_barh([(e.start - t0, e.end - e.start)], (e.stage - 0.4, 0.8), facecolors=color, edgecolor="white")
        ax.text(e.start - t0 + (e.end - e.start) / 2, e.stage, str(e.micro_batch), ha="center", va="center",
                color="white", fontsize=8)
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(title or f"bubble {bubble_of(events, p):.0%} (blue forward, green backward)")
    return ax


# -- LabGPT in stages ---------------------------------------------------------------


def stage_layers(n_layer: int, p: int) -> list[range]:
    """Contiguous layer ranges, as equal as possible (earlier stages get the extra layers)."""
    check_int("pipeline stages", p)
    if p > n_layer:
        raise ValueError(f"{p} pipeline stages is more than the model's {n_layer} layers (allowed 1..{n_layer})")
    base, extra = divmod(n_layer, p)
    bounds, start = [], 0
    for s in range(p):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


class PipelineStage(nn.Module):
    """Stage ``stage`` of ``p``: its blocks, plus the embeddings (first) or norm and head (last).

    The head shares its weight with the token embedding; when they sit on different stages
    each holds a copy and ``sync_tied_gradients`` sums the two gradients, as Megatron does.
    """

    def __init__(self, model: nn.Module, stage: int, p: int) -> None:
        super().__init__()
        self.stage, self.p = stage, p
        self.first, self.last = stage == 0, stage == p - 1
        layers = stage_layers(model.config.n_layer, p)[stage]
        self.layer_ids = list(layers)
        t = model.transformer
        self.wte = t.wte if self.first else None
        self.wpe = t.wpe if self.first else None
        self.h = nn.ModuleList(t.h[i] for i in layers)
        self.ln_f = t.ln_f if self.last else None
        if self.last:
            self.head_weight = t.wte.weight if self.first else nn.Parameter(t.wte.weight.detach().clone())

    def forward(self, x):
        if self.first:
            T = x.shape[1]
            x = self.wte(x) + self.wpe(torch.arange(T, device=x.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.head_weight) if self.last else x

    def full_name(self, name: str) -> str:
        """This stage's parameter name as it is in the whole LabGPT."""
        if name.startswith("h."):
            i, rest = name[2:].split(".", 1)
            return f"transformer.h.{self.layer_ids[int(i)]}.{rest}"
        if name == "head_weight":
            return "transformer.wte.weight"
        return "transformer." + name


def sync_tied_gradients(stage: PipelineStage, first_rank: int, last_rank: int) -> None:
    """Sum the embedding's gradient on the first stage with the head's on the last stage."""
    if stage.p == 1 or not (stage.first or stage.last):
        return
    mine = stage.wte.weight.grad if stage.first else stage.head_weight.grad
    peer = last_rank if stage.first else first_rank
    theirs = torch.empty_like(mine)
    req = dist.isend(mine.clone(), peer)
    dist.recv(theirs, peer)
    req.wait()
    mine.add_(theirs)


class _SavedBytes:
    """Counts the bytes autograd saves for backward (the activations a schedule must hold)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t):
        self.live += t.numel() * t.element_size()
        self.peak = max(self.peak, self.live)
        return (t, t.numel() * t.element_size())

    def unpack(self, packed):
        return packed[0]

    def release(self, nbytes: int) -> None:
        self.live -= nbytes


def run_pipeline(stage: PipelineStage, kind: str, inputs: list, targets: list, prev_rank: int | None,
                 next_rank: int | None, clock=time.perf_counter) -> dict:
    """Run one training step of the schedule ``kind`` on this stage.

    ``inputs`` / ``targets`` are the m micro-batches (only the first stage reads inputs,
    only the last reads targets). Activations go to ``next_rank`` and gradients back to
    ``prev_rank`` with point-to-point send/recv. Returns the summed loss (last stage),
    the events (busy intervals: waiting for a neighbour is idle time) and the peak bytes
    of activations held.
    """
    m = len(inputs)
    ops = schedule(kind, stage.p, m, stage.stage)
    held_in, held_out, held_bytes = {}, {}, {}
    sends, events = [], []
    loss_total = 0.0
    saved = _SavedBytes()
    B, T = inputs[0].shape
    C = stage.h[0].ln_1.normalized_shape[0]
    device = stage.h[0].ln_1.weight.device
    for op, i in ops:
        if op == "F":
            if stage.first:
                x = inputs[i]
            else:
                x = torch.empty(B, T, C, device=device)
                dist.recv(x, prev_rank, tag=i)
                x.requires_grad_(True)
            start = clock()
            before = saved.live
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                y = stage(x)
                if stage.last:
                    y = F.cross_entropy(y.flatten(0, 1), targets[i].flatten()) / m
            held_bytes[i] = saved.live - before
            held_in[i], held_out[i] = x, y
            if stage.last:
                loss_total += y.item()
            else:
                sends.append(dist.isend(y.detach(), next_rank, tag=i))
            events.append(Event(stage.stage, "F", i, start, clock()))
        else:
            if stage.last:
                grad = None
            else:
                grad = torch.empty(B, T, C, device=device)
                dist.recv(grad, next_rank, tag=10_000 + i)
            start = clock()
            held_out.pop(i).backward(grad)
            saved.release(held_bytes.pop(i))
            x = held_in.pop(i)
            if not stage.first:
                sends.append(dist.isend(x.grad, prev_rank, tag=10_000 + i))
            events.append(Event(stage.stage, "B", i, start, clock()))
    for req in sends:
        req.wait()
    return {"loss": loss_total if stage.last else None, "events": events, "peak_activation_bytes": saved.peak}


def _check_step(kind: str, p: int, micro_batches: int, config, batch_size: int) -> None:
    """The ValueErrors of a pipeline step that cannot run, each naming its argument."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    check_int("p (pipeline stages)", p)
    check_int("batch_size", batch_size)
    stage_layers(config.n_layer, p)
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or not 1 <= micro_batches <= batch_size \
            or batch_size % micro_batches:
        raise ValueError(f"micro_batches must divide batch_size={batch_size} (1..{batch_size}), got {micro_batches!r}")


def pipeline_step(rank: int, world_size: int, kind: str = "1f1b", micro_batches: int = 4, config: str = "nano",
                  batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> dict:
    """One training step of LabGPT on ``world_size`` stages vs the same step in one process.

    Every rank builds the same seeded model, runs the step whole (the oracle) and then its
    stage of the pipeline, and compares the loss (last stage) and its parameters' gradients.
    """
    from ..model import LabGPT, get_config
    from .data import global_batch
    from .launch import rank_device

    _check_step(kind, world_size, micro_batches, get_config(config), batch_size)
    p, device = world_size, rank_device()
    torch.manual_seed(seed)
    oracle = LabGPT(get_config(config)).to(device)
    model = LabGPT(get_config(config)).to(device)
    model.load_state_dict(oracle.state_dict())
    x, y = (t.to(device) for t in global_batch(0, batch_size, seq_len, oracle.config.vocab_size, seed))
    full_loss = oracle.loss(x, y)
    full_loss.backward()
    stage = PipelineStage(model, rank, p)
    args = (list(x.chunk(micro_batches)), list(y.chunk(micro_batches)),
            rank - 1 if rank > 0 else None, rank + 1 if rank < p - 1 else None)
    run_pipeline(stage, kind, *args)  # warm-up step: first calls pay for allocation
    stage.zero_grad(set_to_none=True)
    dist.barrier()
    out = run_pipeline(stage, kind, *args)
    sync_tied_gradients(stage, 0, p - 1)
    reference = dict(oracle.named_parameters())
    worst = max((p_.grad - reference[stage.full_name(n)].grad).abs().max().item()
                for n, p_ in stage.named_parameters())
    out.update(
        stage=rank,
        loss_diff=abs(out["loss"] - full_loss.item()) if out["loss"] is not None else None,
        max_grad_diff=worst,
        layers=stage.layer_ids,
    )
    return out


def measured_run(kind: str, p: int, micro_batches: int, config: str = "tiny", batch_size: int = 8,
                 seq_len: int = 64, seed: int = 0) -> dict:
    """Launch ``pipeline_step`` on ``p`` processes; gather events, bubble, memory and the checks."""
    from ..model import get_config
    from .launch import launch

    _check_step(kind, p, micro_batches, get_config(config), batch_size)  # here, not in p processes
    results = launch(pipeline_step, p, kind, micro_batches, config, batch_size, seq_len, seed)
    events = [e for r in results for e in r["events"]]
    t_f = [statistics.median(e.end - e.start for e in events if e.stage == s and e.op == "F") for s in range(p)]
    t_b = [statistics.median(e.end - e.start for e in events if e.stage == s and e.op == "B") for s in range(p)]
    return {
        "events": events,
        "bubble": bubble_of(events, p),
        "formula": bubble_fraction(p, micro_batches),
        # the simulator fed with each stage's measured times: unequal stages, but free sends
        "simulated_with_measured_times": float(simulate_schedule(kind, p, micro_batches, t_f, t_b)["bubble"]),
        "forward_s": t_f,
        "backward_s": t_b,
        "loss_diff": results[-1]["loss_diff"],
        "max_grad_diff": max(r["max_grad_diff"] for r in results),
        "peak_activation_bytes": [r["peak_activation_bytes"] for r in results],
        "layers": [r["layers"] for r in results],
    }


def _both_schedules(rank: int, world_size: int, micro_batches: int, config: str) -> list:
    return [(kind, pipeline_step(rank, world_size, kind, micro_batches, config)) for kind in SCHEDULES]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pipeline parallelism: GPipe and 1F1B on real processes.")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args(argv)
    from .launch import run, under_torchrun

    if under_torchrun():  # one process per stage, started by torchrun
        for kind, r in run(_both_schedules, 0, args.micro_batches, args.config)[0]:
            print(f"{kind}: stage {r['stage']} (layers {r['layers']}): loss diff {r['loss_diff']}, "
                  f"max gradient diff {r['max_grad_diff']:.1e}, peak activations {r['peak_activation_bytes']} bytes")
        return
    for kind in SCHEDULES:
        r = measured_run(kind, args.stages, args.micro_batches, args.config)
        print(f"{kind}: measured bubble {r['bubble']:.1%} vs (p-1)/(m+p-1) = {r['formula']:.1%}; "
              f"gradient diff {r['max_grad_diff']:.1e}; activation bytes per stage {r['peak_activation_bytes']}")


if __name__ == "__main__":
    main()
