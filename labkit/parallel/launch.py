"""Start ``world_size`` processes that talk through ``torch.distributed``, from a notebook or a script.

``launch(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in every process
with the default process group already set up (gloo on CPUs, NCCL when there is a GPU per
rank), and returns the list of what each rank returned, in rank order.

What it guarantees, because a hung collective is the usual way a distributed lab goes wrong:
- a free port is picked for the rendezvous, so two launches never collide;
- if any rank raises, every other rank is ended and the failing rank's traceback is
  raised here as a ``LaunchError``;
- a ``timeout`` bounds the whole run (a deadlock becomes an error, not a frozen kernel);
- on Ctrl-C (or the notebook's interrupt button) every child is ended;
- each child watches its parent and exits if the parent dies: no orphan processes.

Processes are started with the ``forkserver`` method where the platform has it: a server
process that has imported torch once forks each child, so a launch costs a fraction of a
second instead of a fresh interpreter per rank. Like every start method but ``fork``, it
sends ``fn`` by name, so ``fn`` must live in an importable module (the kit's labs do);
a function typed into a notebook cell cannot be sent to another process.

Under ``torchrun`` there is nothing to start: ``run(fn, world_size, *args)`` notices the
variables torchrun sets and calls ``fn`` in this process, with this process's rank::

    torchrun --nproc-per-node 4 -m labkit.parallel.data                    # one node, 4 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m labkit.parallel.mesh   # on each node
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

from .._args import check_number

# A laptop can hold many more gloo processes than cores, but each costs ~150 MB and they
# share the cores; beyond this, a "world" is more likely a typo than an experiment.
MAX_LOCAL_PROCESSES = 64


class LaunchError(RuntimeError):
    """A rank failed (its traceback is the message), or the run exceeded its timeout."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    """NCCL when CUDA offers one GPU per rank, gloo otherwise."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def check_world_size(world_size, limit: int = MAX_LOCAL_PROCESSES) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= limit:
        raise ValueError(
            f"world_size must be an int in 1..{limit} (processes on this machine, which has "
            f"{os.cpu_count()} cores), got {world_size!r}"
        )


def rank_device():
    """Where this rank computes: its own GPU when the process group runs on NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def under_torchrun() -> bool:
    """True inside a process that ``torchrun`` started (it sets RANK, WORLD_SIZE and friends)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _watch_parent(parent_pid: int) -> None:
    """Exit this child as soon as the launching process is gone (killed, crashed, closed)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except OSError:
            os._exit(1)


def _setup(rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:  # share the cores: world_size processes each using every core would thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def _child(fn, rank, world_size, args, backend, port, timeout_s, parent_pid, results) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        import torch.distributed as dist

        _setup(rank, world_size, backend, timeout_s)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle copies tensors by value (no shared-memory handles that die with this process)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the launcher, with its traceback
        results.put((rank, "error", (type(e).__name__, traceback.format_exc())))


def _context():
    if sys.platform != "win32" and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "labkit.parallel.launch"])
        return ctx
    return mp.get_context("spawn")


def _check_picklable(fn: Callable) -> None:
    """Before any process starts: children import ``fn`` by name, so it must be a module-level function of
    an importable module, and its pickle must load back as the same function."""
    if not callable(fn):
        raise ValueError(f"fn must be a function fn(rank, world_size, *args), got {type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    if module == "__main__" and not hasattr(sys.modules["__main__"], "__file__"):
        raise ValueError(
            f"fn ({getattr(fn, '__qualname__', fn)!r}) was defined in a notebook cell; child processes "
            "import fn by name, so put it in a .py file next to the notebook and import it from there"
        )
    if "<locals>" in getattr(fn, "__qualname__", "") or getattr(fn, "__name__", "") == "<lambda>":
        raise ValueError("fn must be a module-level function (not a lambda or a nested function)")
    try:
        same = pickle.loads(pickle.dumps(fn)) is fn  # noqa: S301 - our own bytes, just made
    except Exception as err:  # noqa: BLE001 - whatever pickling raises, the message names fn
        raise ValueError(f"fn ({getattr(fn, '__qualname__', fn)!r}) cannot be sent to the child processes: "
                         f"{type(err).__name__}: {err}") from None  # fmt: skip
    if not same and inspect.isfunction(fn):
        raise ValueError(f"fn ({getattr(fn, '__qualname__', fn)!r}) does not come back as itself from a pickle; "
                         "pass a module-level function")  # fmt: skip


def _stop(procs) -> None:
    procs = [p for p in procs if p.pid is not None]  # started ones only
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _is_echo(kind: str, text: str) -> bool:
    """An error that only says a peer went away: a consequence of another rank's failure."""
    return kind == "DistBackendError" or "Connection closed by peer" in text or "Connection reset" in text


def _first_cause(rank: int, payload, results, world_size: int, procs=(), grace: float = 1.0) -> LaunchError:
    """When one rank fails the others soon fail too, in whatever collective they were waiting on.
    Gather the errors that arrive within ``grace`` seconds and report the one that is not an echo;
    if all are echoes, the cause may be a rank killed from outside (out of memory, a signal), which
    reports nothing: the one whose process died with a non-zero exit code."""
    errors = {rank: payload}
    deadline = time.monotonic() + grace
    while len(errors) < world_size and time.monotonic() < deadline:
        try:
            r, status, p = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue_module.Empty:
            break
        if status == "error":
            errors[r] = p
    causes = [r for r, (kind, text) in sorted(errors.items()) if not _is_echo(kind, text)]
    if not causes:
        for p in procs:
            p.join(0.2)  # a killed process takes a moment to be reaped
        killed = [r for r, p in enumerate(procs) if r not in errors and p.exitcode not in (None, 0)]
        if killed:
            note = f"\n(ranks {sorted(errors)} then failed too, waiting on rank {killed[0]})"
            return LaunchError(f"rank {killed[0]} died with exit code {procs[killed[0]].exitcode}{note}", killed[0])
    cause = causes[0] if causes else min(errors)
    echoes = sorted(set(errors) - {cause})
    note = f"\n(ranks {echoes} then failed too, waiting on rank {cause})" if echoes else ""
    return LaunchError(f"rank {cause} of {world_size} failed:\n{errors[cause][1]}{note}", cause)


def launch(fn: Callable, world_size: int, *args, backend: str | None = None, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return their results by rank.

    ``backend`` is "gloo" or "nccl" (default: NCCL with a GPU per rank, else gloo). Raises
    ``LaunchError`` with the first failing rank's traceback, or after ``timeout`` seconds;
    either way no child outlives the call.
    """
    check_world_size(world_size)
    backend = backend or default_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    check_number("timeout", timeout, note=" of seconds")
    _check_picklable(fn)
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, args, backend, port, timeout, os.getpid(), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    values: dict[int, object] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise LaunchError(f"timed out after {timeout} s; ranks {missing} had not finished", None)
            try:
                rank, status, payload = results.get(timeout=min(left, 0.5))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                if dead:  # killed from outside (out of memory, a signal): nothing will come back
                    raise LaunchError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}", dead[0]) from None
                continue
            if status == "error":
                raise _first_cause(rank, payload, results, world_size, procs)
            values[rank] = pickle.loads(payload)  # noqa: S301 - bytes our own child pickled
        for p in procs:
            p.join(5.0)
    finally:  # errors, timeouts and KeyboardInterrupt all end here: no orphans
        _stop(procs)
        results.close()
    return [values[r] for r in range(world_size)]


def run(fn: Callable, world_size: int, *args, backend: str | None = None, timeout: float = 300.0) -> list:
    """``launch`` from a notebook or ``python script.py``; under ``torchrun``, run ``fn`` for this rank.

    Under torchrun the world size is torchrun's (``world_size`` is ignored) and the
    return value is a one-item list: this rank's result.
    """
    if not under_torchrun():
        return launch(fn, world_size, *args, backend=backend, timeout=timeout)
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _setup(rank, size, backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", size))), timeout)
    try:
        return [fn(rank, size, *args)]
    finally:
        dist.destroy_process_group()


# -- small workers used by the tests and notebook 02 to show the launcher's behaviour ------


def hello(rank: int, world_size: int) -> dict:
    """Each rank reports who it is and the sum of all ranks (one all-reduce)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "pid": os.getpid(), "sum_of_ranks": int(t.item())}


def fail_on(rank: int, world_size: int, bad_rank: int) -> int:
    """Rank ``bad_rank`` raises while the others wait in a collective that can never complete."""
    import torch
    import torch.distributed as dist

    if rank == bad_rank:
        raise ZeroDivisionError(f"rank {rank} divided by zero on purpose")
    dist.all_reduce(torch.ones(1))  # hangs: bad_rank never joins; the launcher must end us
    return rank


def killed_on(rank: int, world_size: int, bad_rank: int) -> int:
    """Rank ``bad_rank`` is killed (SIGKILL, as the out-of-memory killer does) after a barrier, while the
    others wait for it in an all-reduce: their errors only echo its death, and it reports nothing."""
    import signal

    import torch
    import torch.distributed as dist

    dist.barrier()
    if rank == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    return rank


def sleep_for(rank: int, world_size: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank
