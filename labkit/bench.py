"""Measuring honestly: warm-up, synchronisation, medians and side-by-side ratios.

Three rules every number in the kit follows:
1. Warm up first (the first calls pay for allocation, caches and lazy initialisation).
2. On a GPU, synchronise before reading the clock (kernel launches return at once) --
   here CUDA events bracket each call, read after one synchronise at the end.
3. Report the median of repeats and the spread, and compare variants *in the same run*
   as a ratio to a baseline: machines drift, ratios measured together do not.

``python -m labkit.bench SUITE [--json PATH]`` runs a named suite; labs register theirs
with ``@register_suite("name")``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._args import check_int
from .device import get_device, synchronize


@dataclass
class Measurement:
    """What ``measure`` found: seconds per call (median and spread) and peak memory."""

    median_s: float
    min_s: float
    max_s: float
    iqr_s: float  # interquartile range: the spread that ignores one-off outliers
    repeat: int
    peak_memory_bytes: int | None  # CUDA max allocated, or the process's peak RSS on CPU
    device: str
    times_s: list[float] = field(repr=False, default_factory=list)

    @property
    def spread(self) -> float:
        """IQR relative to the median (0.05 = the middle half of runs lie within 5%)."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (a high-water mark: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure(fn: Callable[[], object], warmup: int = 3, repeat: int = 10, device=None) -> Measurement:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    On CUDA each call is bracketed by events (GPU time, no host noise); elsewhere by
    ``time.perf_counter`` after a synchronise.
    """
    if not callable(fn):
        raise ValueError("fn must be a callable taking no arguments (wrap it in a lambda)")
    check_int("warmup", warmup, 0)
    check_int("repeat", repeat)
    device = torch.device(device) if device is not None else get_device()
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        # Record every pair of events first and synchronise once at the end: the host runs
        # ahead and keeps the GPU's queue full, so each pair times the GPU work of one call
        # rather than the Python and launch overhead in front of it (as triton's do_bench).
        # A call whose host side is slower than its GPU work still shows the host time.
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        peak = peak_rss_bytes()
    # "inclusive": quartiles within the measured times (the default "exclusive" method extrapolates past them
    # at few repeats: at 3 the IQR was the whole range, at 2 more than it)
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return Measurement(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        iqr_s=quartiles[2] - quartiles[0],
        repeat=repeat,
        peak_memory_bytes=peak,
        device=device_label(device),
        times_s=times,
    )


def warm_up(fn: Callable[[], object], device, calls: int = 3) -> None:
    """Call ``fn`` outside any graph before capturing it (compilation, allocations, kernel selection): on a
    side stream on CUDA, as graph capture asks; plainly elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        for _ in range(calls):
            fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(fn: Callable[[], object], device) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn()`` captured in a CUDA graph (warm it up first: ``warm_up``); returns the graph and the captured
    output, which each ``graph.replay()`` rewrites."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception:
        torch.cuda.set_stream(stream)  # a failed capture can leave its own stream current
        raise
    return graph, out


def graph_seconds(fn: Callable[[], object], replays: int = 20, rounds: int = 3, device=None) -> tuple[float, object]:
    """Seconds per call of ``fn()`` replayed from a CUDA graph, and a copy of its output.

    Work of a few microseconds a kernel, launched from Python, is timed as the launch
    overhead in front of it (``measure`` says so); captured once in a CUDA graph and replayed
    it runs as a server would run it. One warm-up call (outside the graph, on a side stream:
    compilation, allocations), the capture, then ``rounds`` rounds of ``replays`` replays
    between two events; the median round over ``replays``. The output returned comes from
    one more replay after the captured output was filled with NaN, so a kernel that leaves
    part of it unwritten shows. Elsewhere than CUDA there are no graphs: ``fn()`` is timed by
    ``measure`` (one warm-up, ``rounds`` calls) and its last output returned.
    """
    if not callable(fn):
        raise ValueError("fn must be a callable taking no arguments (wrap it in a lambda)")
    check_int("replays", replays)
    check_int("rounds", rounds)
    device = torch.device(device) if device is not None else get_device()
    if device.type != "cuda":
        outputs = []
        m = measure(lambda: outputs.append(fn()), warmup=1, repeat=rounds, device=device)
        return m.median_s, outputs[-1]
    warm_up(fn, device, calls=1)
    graph, out = capture_graph(fn, device)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3 / replays)
    if isinstance(out, torch.Tensor):
        if out.is_floating_point():
            out.fill_(float("nan"))
        graph.replay()
        out = out.clone()  # the graph's memory goes with the graph
    torch.cuda.synchronize(device)
    return statistics.median(times), out


@contextlib.contextmanager
def native_stderr_silenced():
    """Send the C++ side's stderr to /dev/null for a moment: the profiler's backend (Kineto) prints
    a line when it starts and stops, whatever its log level. Python exceptions still propagate."""
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()  # what Python already wrote goes where it was going
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: how long something was running, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if a > end:
            total, end = total + b - a, b
        elif b > end:
            total, end = total + b - end, b
    return total


def kernel_profile(fn: Callable[[], object], steps: int = 10, device=None, top: int = 12) -> dict:
    """Where one call of ``fn`` spends its time, from ``torch.profiler``: the kernels it runs on a GPU
    (or its top-level operators on a CPU), per call.

    Returns ``wall_s`` (per call), ``kernel_s`` (every kernel's duration summed), ``busy_s`` (time with at
    least one kernel running: overlapping kernels, as under programmatic dependent launch, count once),
    ``idle_s`` (wall minus busy: launch gaps and host work), ``launches`` (kernels a call), and ``kernels``:
    the ``top`` names by time, each with ``calls`` and ``seconds`` per call of ``fn``. On a GPU, copies and
    fills (Memcpy, Memset) count as kernels; wall and idle times include the profiler's own overhead.
    """
    from torch.profiler import ProfilerActivity, profile

    check_int("steps", steps)
    device = torch.device(device) if device is not None else get_device()
    on_gpu = device.type == "cuda"
    fn()  # outside the profile: first-call work (compilation, allocation) is not the steady state
    synchronize(device)
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with native_stderr_silenced(), profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - t0) / steps
    if on_gpu:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [e for e in prof.events() if e.cpu_parent is None]  # top level: nested operators counted once
    intervals = [(e.time_range.start * 1e-6, e.time_range.end * 1e-6) for e in events]
    by_name: dict[str, list[float]] = {}
    for e, (a, b) in zip(events, intervals):
        by_name.setdefault(e.name, []).append(b - a)
    kernels = sorted(({"name": n, "calls": len(t) / steps, "seconds": sum(t) / steps} for n, t in by_name.items()),
                     key=lambda k: -k["seconds"])  # fmt: skip
    busy = busy_seconds(intervals) / steps
    return {"wall_s": wall, "kernel_s": sum(b - a for a, b in intervals) / steps, "busy_s": busy,
            "idle_s": max(0.0, wall - busy), "launches": len(events) / steps, "kernels": kernels[:top]}  # fmt: skip


def device_label(device=None) -> str:
    """A short name for the hardware a number was measured on."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def compare(
    variants: dict[str, Callable[[], object]],
    baseline: str | None = None,
    warmup: int = 3,
    repeat: int = 10,
    suite: str = "adhoc",
    device=None,
    show: bool = True,
) -> list[dict]:
    """Time several callables side by side; print a table of medians and ratios to the baseline.

    Returns rows ``{suite, name, baseline, variant, baseline_s, variant_s, speedup, device,
    spread, peak_memory_bytes}``; ``speedup`` > 1 means the variant is faster.
    """
    if not variants:
        raise ValueError("variants must name at least one callable")
    baseline = baseline or next(iter(variants))
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not among the variants {list(variants)}")
    results = {name: measure(fn, warmup, repeat, device) for name, fn in variants.items()}
    base = results[baseline]
    rows = [
        {
            "suite": suite,
            "name": name,
            "baseline": baseline,
            "variant": name,
            "baseline_s": base.median_s,
            "variant_s": m.median_s,
            "speedup": base.median_s / m.median_s if m.median_s > 0 else float("inf"),
            "device": m.device,
            "spread": m.spread,
            "peak_memory_bytes": m.peak_memory_bytes,
        }
        for name, m in results.items()
    ]
    if show:
        print_table(rows)
    return rows


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def print_table(rows: list[dict]) -> None:
    """Print rows of ``compare`` as an aligned table."""
    if not rows:
        return
    width = max(len(r["variant"]) for r in rows)
    print(f"{'variant':<{width}}  {'median':>10}  {'spread':>7}  {'vs ' + rows[0]['baseline']:>12}")
    for r in rows:
        print(
            f"{r['variant']:<{width}}  {format_seconds(r['variant_s']):>10}  {r['spread']:>6.1%}  {r['speedup']:>11.2f}x"
        )
    print(f"(median of repeats on {rows[0]['device']}; speedup > 1 means faster than {rows[0]['baseline']})")


# ---------------------------------------------------------------------------------------
# Suites: labs register a function returning rows; the command line runs them by name.
# ---------------------------------------------------------------------------------------
SUITES: dict[str, Callable[..., list[dict]]] = {}
SUITE_MODULES = [  # modules that register suites
    "labkit.bench",
    "labkit.kernels.matmul_kernel",
    "labkit.hardware",
    "labkit.lowrank",
    "labkit.prompting",
    "labkit.parallel.data",
    "labkit.sparse",
    "labkit.kernels.flash_attention",
    "labkit.prune",
    "labkit.quant",
    "labkit.serving",
]


def recorded_results(filename: str) -> dict | None:
    """A GPU run recorded in the repository's ``benchmarks/`` folder (JSON written by its
    ``gpu_check*.py`` scripts), or None where that folder is not beside this install."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / filename
    return json.loads(path.read_text()) if path.is_file() else None


def compare_rounds(variants: dict, rounds: int = 3, repeat: int = 5, warmup: int = 2, suite: str = "adhoc") -> list[dict]:
    """``compare`` in ``rounds`` interleaved rounds, keeping each variant's median round.

    On a shared machine another program's burst of work slows whichever variant is being
    timed during it; interleaving spreads such a burst over all of them (as the GPU scripts do).
    Each row's ``spread`` is then the range of its rounds' medians over the kept one (how far the
    rounds disagree), and ``rounds_s`` lists those medians.
    """
    check_int("rounds", rounds)
    runs = [compare(variants, warmup=warmup, repeat=repeat, suite=suite, show=False) for _ in range(rounds)]
    rows = []
    for i in range(len(variants)):
        medians = sorted(run[i]["variant_s"] for run in runs)
        kept = dict(next(run[i] for run in runs if run[i]["variant_s"] == medians[rounds // 2]))
        if rounds > 1:
            kept["spread"] = (medians[-1] - medians[0]) / kept["variant_s"] if kept["variant_s"] > 0 else 0.0
        kept["rounds_s"] = medians
        rows.append(kept)
    base = rows[0]["variant_s"]
    for row in rows:
        row.update(baseline_s=base, speedup=base / row["variant_s"])
    print_table(rows)
    if rounds > 1:
        print(f"(each variant's median round of {rounds}; spread: the range of the rounds' medians)")
    return rows


def register_suite(name: str):
    """Decorator: ``@register_suite("quant")`` on a function ``(quick: bool) -> rows``."""

    def wrap(fn):
        SUITES[name] = fn
        return fn

    return wrap


def load_suites() -> dict:
    for module in SUITE_MODULES:
        importlib.import_module(module)
    return SUITES


@register_suite("labgpt")
def labgpt_suite(quick: bool = False) -> list[dict]:
    """LabGPT `tiny`: attention backends in a forward pass, and decoding with vs without the KV cache."""
    from .model import LabGPT, get_config

    device = get_device()
    torch.manual_seed(0)
    model = LabGPT(get_config("tiny")).to(device).eval()
    T = 128 if quick else 256
    idx = torch.randint(0, model.config.vocab_size, (4, T), device=device)
    rows = []
    with torch.no_grad():

        def forward(name):
            def run():
                model.set_attention(name)
                return model(idx)

            return run

        rows += compare({"manual attention": forward("manual"), "sdpa attention": forward("sdpa")}, suite="labgpt")
        prompt = idx[:1, :16]
        n_new = 32 if quick else 128
        rows += compare(
            {
                "decode, no cache": lambda: model.generate(prompt, n_new, temperature=0, use_cache=False),
                "decode, KV cache": lambda: model.generate(prompt, n_new, temperature=0, use_cache=True),
            },
            warmup=1,
            repeat=3 if quick else 5,
            suite="labgpt",
        )
    return rows


def _plain(value) -> bool:
    """A value JSON writes as it is: a number, a string, a bool, None, or a list/dict of those."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a benchmark suite; print a table, optionally write JSON.")
    parser.add_argument("suite", nargs="?", help="suite name (see --list)")
    parser.add_argument("--json", dest="json_path", help="write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--list", action="store_true", help="list the suites")
    args = parser.parse_args(argv)
    suites = load_suites()
    if args.list or not args.suite:
        for name, fn in sorted(suites.items()):
            print(f"{name:<12} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    if args.suite not in suites:
        parser.error(f"unknown suite {args.suite!r}; allowed: {sorted(suites)}")
    rows = suites[args.suite](quick=args.quick)
    keys = ("suite", "name", "baseline", "variant", "baseline_s", "variant_s", "speedup", "device")
    # the keys every table has first, then whatever else a suite measured (spread, TFLOP/s, GB/s, sizes, errors)
    rows = [{**{k: r[k] for k in keys}, **{k: v for k, v in r.items() if k not in keys and _plain(v)}} for r in rows]
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json_path}")
    return 0


if __name__ == "__main__":
    # run the imported module's main, so suites that labs register land in one registry
    from labkit.bench import main as _main

    sys.exit(_main())
