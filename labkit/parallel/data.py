"""Data parallelism: every rank holds the whole model, sees its own slice of the batch, and
the ranks average their gradients before the step (the seed's update):

    θ ← θ − η · (1/n) · Σ_i g_i

Three ways to do the averaging, side by side with PyTorch's ``DistributedDataParallel``:

1. **naive** -- one ``all_reduce`` per parameter after the backward pass: many small
   messages, each paying the network's latency, and none of them overlapping compute;
2. **ring** -- every gradient flattened into one buffer and summed by ``ring_all_reduce``,
   written here from point-to-point send/recv: a reduce-scatter (n−1 steps, each rank
   passes one chunk to its right neighbour and adds the one it receives) then an
   all-gather (n−1 more steps passing the finished chunks on). Each rank sends
   2(n−1)/n of the buffer, whatever n is: that is why the ring is bandwidth-optimal;
3. **bucketed** -- ``BucketedDataParallel``: gradients grouped into buckets of about
   ``bucket_mb`` in the order the backward pass produces them; a hook fires as each
   gradient is ready and a full bucket starts its all-reduce at once, in the background,
   while the backward pass goes on computing earlier layers' gradients. This is what DDP does.

Run as a script (one process per GPU, or CPU processes)::

    python -m labkit.parallel.data --world-size 2
    torchrun --nproc-per-node 4 -m labkit.parallel.data
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .._args import check_int

METHODS = ("naive", "ring", "bucketed", "ddp")


# -- the batches every lab here trains on ---------------------------------------------


def global_batch(step: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0):
    """The same (inputs, targets) on every rank for a given step: random token ids, seeded.

    Data parallelism then gives rank r the rows ``shard(x, r, n)``; a single process that
    trains on the whole batch is the oracle.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the batch dimension (batch must divide evenly)."""
    check_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1} (world_size {world_size}), got {rank!r}")
    if x.shape[0] % world_size:
        raise ValueError(f"batch size {x.shape[0]} must be divisible by the data-parallel size {world_size}")
    per = x.shape[0] // world_size
    return x[rank * per : (rank + 1) * per]


# -- 1. naive: one all-reduce per parameter -------------------------------------------


def unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once (LabGPT ties its embedding and head)."""
    return [p for p in module.parameters() if p.requires_grad]


def naive_all_reduce_gradients(module: nn.Module, group=None) -> int:
    """Average every gradient across the group, one blocking all-reduce per parameter.

    Returns the number of all-reduce calls (one per parameter: the latency bill)."""
    n = dist.get_world_size(group)
    params = [p for p in unique_parameters(module) if p.grad is not None]
    for p in params:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(n)
    return len(params)


# -- 2. a ring all-reduce from send and recv ----------------------------------------


def ring_all_reduce(tensor: torch.Tensor, group=None, stats: dict | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place across the ranks of ``group``, like ``dist.all_reduce``, with a ring.

    Ranks form a ring r → r+1. The flat tensor is cut into n chunks. Reduce-scatter: at
    step s, rank r sends chunk (r − s) mod n to its right and adds the chunk (r − s − 1)
    mod n it receives from its left; after n−1 steps rank r owns the full sum of chunk
    (r + 1) mod n. All-gather: n−1 more steps pass the finished chunks around the ring.
    If ``stats`` is a dict, the bytes this rank sent and received are added to it.
    """
    if not tensor.is_contiguous():
        raise ValueError("ring_all_reduce needs a contiguous tensor (call .contiguous() first)")
    n = dist.get_world_size(group)
    if n == 1:
        return tensor
    r = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(n))
    right, left = ranks[(r + 1) % n], ranks[(r - 1) % n]
    flat = tensor.view(-1)
    work = flat if flat.numel() >= n else torch.cat([flat, flat.new_zeros(n - flat.numel())])
    chunks = list(work.tensor_split(n))  # views: adding into a chunk writes the buffer
    inbox = torch.empty_like(chunks[0])
    sent = 0
    for s in range(n - 1):  # reduce-scatter
        out, into = chunks[(r - s) % n], chunks[(r - s - 1) % n]
        req = dist.isend(out, right, group=group if group is not None else None)
        buf = inbox[: into.numel()]
        dist.recv(buf, left, group=group if group is not None else None)
        req.wait()
        into.add_(buf)
        sent += out.numel()
    for s in range(n - 1):  # all-gather
        out, into = chunks[(r + 1 - s) % n], chunks[(r - s) % n]
        req = dist.isend(out, right, group=group if group is not None else None)
        dist.recv(into, left, group=group if group is not None else None)
        req.wait()
        sent += out.numel()
    if work is not flat:
        flat.copy_(work[: flat.numel()])
    if stats is not None:
        stats["bytes_sent"] = stats.get("bytes_sent", 0) + sent * tensor.element_size()
        stats["bytes_received"] = stats.get("bytes_received", 0) + sent * tensor.element_size()
    return tensor


def ring_all_reduce_gradients(module: nn.Module, group=None, stats: dict | None = None) -> None:
    """Average every gradient with one ring all-reduce over a flat copy of all of them."""
    params = [p for p in unique_parameters(module) if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    ring_all_reduce(flat, group, stats)
    flat.div_(dist.get_world_size(group))
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


# -- 3. buckets, all-reduced while the backward pass runs --------------------------


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.ready = 0
        self.work = None


class BucketedDataParallel(nn.Module):
    """Data parallelism with gradient buckets all-reduced during the backward pass.

    ``bucket_mb`` sets the bucket size: one bucket is the whole model (one big message,
    no overlap: it can only start when the last gradient is ready); tiny buckets overlap
    early but pay latency per message. DDP's default is 25 MB.
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, group=None) -> None:
        super().__init__()
        if not isinstance(bucket_mb, (int, float)) or bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be a positive number of megabytes, got {bucket_mb!r}")
        self.module, self.group = module, group
        self.world_size = dist.get_world_size(group)
        params = unique_parameters(module)
        src = dist.get_process_group_ranks(group)[0] if group is not None else 0
        with torch.no_grad():  # start from identical weights, as DDP does
            for p in params:
                dist.broadcast(p.data, src, group=group)
        # Backward produces gradients roughly in reverse order of definition: fill buckets that way.
        cap = bucket_mb * 2**20
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= cap:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.where = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self.where[p] = (b, i)
                p.register_post_accumulate_grad_hook(self._on_gradient)
        self._queued = False
        self.messages = 0  # all-reduce calls so far

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self._queued:  # after the whole backward pass, wait for the last buckets
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        bucket, i = self.where[p]
        bucket.buffer[bucket.offsets[i] : bucket.offsets[i] + p.numel()].copy_(p.grad.reshape(-1))
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        self.messages += 1

    def _finish(self) -> None:
        for bucket in self.buckets:
            if bucket.work is None:  # a parameter the loss did not touch: its gradient counts as zero
                self._start(bucket)
            bucket.work.wait()
            bucket.buffer.div_(self.world_size)
            for p, offset in zip(bucket.params, bucket.offsets):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(bucket.buffer[offset : offset + p.numel()].view_as(p))
            bucket.buffer.zero_()
            bucket.ready, bucket.work = 0, None
        self._queued = False


# -- workers: the lab's experiments, one function per process ----------------------


def _model(config: str, seed: int = 0):
    from ..model import LabGPT, get_config
    from .launch import rank_device

    torch.manual_seed(seed)
    return LabGPT(get_config(config)).to(rank_device() if dist.is_initialized() else "cpu")


def _wrap(method: str, model: nn.Module, bucket_mb: float):
    if method == "ddp":
        return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    if method == "bucketed":
        return BucketedDataParallel(model, bucket_mb=bucket_mb)
    if method in ("naive", "ring"):
        with torch.no_grad():
            for p in unique_parameters(model):
                dist.broadcast(p.data, 0)
        return model
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _sync_after_backward(method: str, model: nn.Module, stats: dict) -> None:
    if method == "naive":
        stats["messages"] = stats.get("messages", 0) + naive_all_reduce_gradients(model)
    elif method == "ring":
        ring_all_reduce_gradients(model, stats=stats)
        stats["messages"] = stats.get("messages", 0) + 1


def _inner(wrapped: nn.Module) -> nn.Module:
    return wrapped.module if hasattr(wrapped, "module") else wrapped


def gradients_vs_ddp(rank: int, world_size: int, config: str = "nano", batch_size: int = 8, seq_len: int = 32,
                     bucket_mb: float = 0.05) -> dict:
    """Each method's averaged gradients, against DDP's and against one process on the whole batch.

    Returns per method the largest absolute difference to DDP, the bytes the ring sent,
    and the number of all-reduce messages.
    """
    from .launch import rank_device

    x, y = (t.to(rank_device()) for t in global_batch(0, batch_size, seq_len, _model(config).config.vocab_size))
    xs, ys = shard(x, rank, world_size), shard(y, rank, world_size)
    grads, info = {}, {}
    for method in METHODS:
        wrapped = _wrap(method, _model(config), bucket_mb)
        stats: dict = {}
        wrapped(xs)  # a forward outside the loss, as a learner might; must not disturb anything
        logits = wrapped(xs)
        nn.functional.cross_entropy(logits.flatten(0, 1), ys.flatten()).backward()
        _sync_after_backward(method, _inner(wrapped), stats)
        if method == "bucketed":
            stats["messages"] = wrapped.messages
        grads[method] = torch.cat([p.grad.reshape(-1) for p in unique_parameters(_inner(wrapped))])
        info[method] = stats
    single = _model(config)  # the oracle of the oracle: one process, the whole batch
    nn.functional.cross_entropy(single(x).flatten(0, 1), y.flatten()).backward()
    reference = torch.cat([p.grad.reshape(-1) for p in unique_parameters(single)])
    return {
        "gradient_bytes": grads["ddp"].numel() * grads["ddp"].element_size(),
        "max_diff_vs_ddp": {m: (grads[m] - grads["ddp"]).abs().max().item() for m in METHODS},
        "ddp_vs_single_process": (grads["ddp"] - reference).abs().max().item(),
        "ring_bytes_sent": info["ring"].get("bytes_sent", 0),
        "messages": {m: info[m].get("messages") for m in ("naive", "ring", "bucketed")},
        "bucket_mb": bucket_mb,
    }


def step_times(rank: int, world_size: int, methods=METHODS, config: str = "tiny", batch_size: int = 8,
               seq_len: int = 128, bucket_mb: float = 25.0, repeat: int = 5, warmup: int = 2) -> dict:
    """Median seconds per training step (forward, backward, gradient sync, SGD step) per method.

    All methods run in the same processes, interleaved repeat by repeat, so that they
    share the machine's state; only rank 0's clock is reported (the ranks wait on each other).
    """
    vocab = _model(config).config.vocab_size
    runs = {}
    for m in methods:
        wrapped = _wrap(m, _model(config), bucket_mb)
        runs[m] = (wrapped, torch.optim.SGD(wrapped.parameters(), lr=1e-3))
    times = {m: [] for m in methods}
    from .launch import rank_device

    for step in range(warmup + repeat):
        x, y = (t.to(rank_device()) for t in global_batch(step, batch_size, seq_len, vocab))
        xs, ys = shard(x, rank, world_size), shard(y, rank, world_size)
        for m in methods:
            wrapped, opt = runs[m]
            dist.barrier()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(wrapped(xs).flatten(0, 1), ys.flatten())
            loss.backward()
            _sync_after_backward(m, _inner(wrapped), {})
            opt.step()
            opt.zero_grad(set_to_none=True)
            if x.is_cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def all_reduce_bytes(rank: int, world_size: int, numel: int = 1 << 16) -> dict:
    """Bytes one ring all-reduce of ``numel`` floats sends from this rank, and whether it summed right."""
    from .launch import rank_device

    t = torch.full((numel,), float(rank + 1), device=rank_device())
    stats: dict = {}
    ring_all_reduce(t, stats=stats)
    expected = world_size * (world_size + 1) / 2
    return {"bytes_sent": stats.get("bytes_sent", 0), "tensor_bytes": numel * 4, "correct": bool((t == expected).all())}


def main(argv=None) -> None:
    from .launch import run

    parser = argparse.ArgumentParser(description="Data parallelism: naive, ring and bucketed vs DDP.")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    results = run(_script, args.world_size, args.config, args.batch_size, args.seq_len)
    if results[0] is None:
        return  # under torchrun, rank 0 prints
    check, times = results[0]
    print("largest gradient difference to DDP:", check["max_diff_vs_ddp"])
    for m, t in times.items():
        print(f"{m:>9}: {t * 1e3:8.1f} ms/step  ({t / times['ddp']:.2f}x DDP)")


def _script(rank: int, world_size: int, config: str, batch_size: int, seq_len: int):
    """Both experiments in one process-group lifetime (torchrun starts each process once)."""
    check = gradients_vs_ddp(rank, world_size)
    times = step_times(rank, world_size, METHODS, config, batch_size, seq_len)
    return (check, times) if rank == 0 else None


if __name__ == "__main__":
    main()


def _register() -> None:
    from ..bench import register_suite

    @register_suite("parallel")
    def parallel_suite(quick: bool = False) -> list[dict]:
        """Data-parallel training step of LabGPT tiny on 2 processes: naive, ring, bucketed vs DDP."""
        from .launch import launch

        repeat = 3 if quick else 7
        times = launch(step_times, 2, METHODS, "tiny", 8, 64 if quick else 128, 25.0, repeat, 2)[0]
        device = "cpu (gloo, 2 processes)"  # the workers train on the CPU whatever the machine has
        rows = []
        for m in METHODS:
            rows.append({
                "suite": "parallel", "name": f"{m} (2 procs)", "baseline": "ddp (2 procs)", "variant": f"{m} (2 procs)",
                "baseline_s": times["ddp"], "variant_s": times[m], "speedup": times["ddp"] / times[m],
                "device": device, "spread": None, "peak_memory_bytes": None,
            })
            print(f"{m:>9} {times[m] * 1e3:8.1f} ms/step  {times['ddp'] / times[m]:5.2f}x vs DDP")
        return rows


_register()
