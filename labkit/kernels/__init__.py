"""Triton GPU kernels, each beside its PyTorch reference.

Triton is imported lazily (only when a kernel is first built), so a CPU-only install imports
and runs everything. Which path a call takes:

- CUDA tensors and Triton installed: the Triton kernel, compiled for the GPU;
- CPU tensors with ``TRITON_INTERPRET=1`` set: the same Triton kernel, run by Triton's
  interpreter on the CPU (slow, but it executes the kernel's own code: tests and teaching);
- otherwise: the PyTorch reference, which is also the test oracle.

``backend="triton"`` or ``backend="reference"`` forces a path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")


# The oldest Triton each feature was checked with (the kit's tests, run under each release's
# interpreter with torch 2.5.1): the kernels from 3.2 (3.1's interpreter cannot see `tl` in a
# kernel built inside a function, and with numpy 2 it computes garbage); tensor descriptors
# (TMA) from 3.4 on a GPU, and in the interpreter from 3.6 (3.4 and 3.5 check a descriptor's
# strides in elements instead of bytes); programmatic dependent launch from 3.5.
MIN_TRITON = (3, 2)
MIN_TRITON_TMA = (3, 4)
MIN_TRITON_TMA_INTERPRETER = (3, 6)
MIN_TRITON_PDL = (3, 5)


@functools.cache  # asked on every kernel call: find_spec alone costs tens of microseconds
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, read from its package metadata (no import), or None."""
    if not triton_installed():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("triton")
    except PackageNotFoundError:  # installed without metadata (a source tree on the path): trust it
        return (99, 0)
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def triton_at_least(minimum: tuple[int, int]) -> bool:
    """Is the installed Triton this version or newer? False without Triton."""
    found = triton_version()
    return found is not None and found >= minimum


@functools.cache
def triton_usable() -> bool:
    """Triton is installed and new enough for the kit's kernels; an older one is left unused, with a warning."""
    if not triton_installed():
        return False
    if triton_at_least(MIN_TRITON):
        return True
    warnings.warn(f"Triton {'.'.join(map(str, triton_version()))} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the "
                  "oldest the kit's kernels work with: the PyTorch references run instead", stacklevel=3)  # fmt: skip
    return False


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tma_supported(t: torch.Tensor) -> bool:
    """Can kernels use the Tensor Memory Accelerator for this tensor's device? CUDA compute
    capability 9.0+ (Hopper and later), or the CPU interpreter, which emulates it; either with a
    Triton that has tensor descriptors (``MIN_TRITON_TMA``, ``MIN_TRITON_TMA_INTERPRETER``)."""
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device)[0] >= 9 and triton_at_least(MIN_TRITON_TMA)
    return interpreting() and triton_at_least(MIN_TRITON_TMA_INTERPRETER)


def choose_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` ("auto", "triton", "reference") for these tensors."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    placed = on_cuda or (interpreting() and not any(t.is_cuda for t in tensors))
    can_run = placed and triton_usable()
    if backend == "auto":
        return "triton" if can_run else "reference"
    if backend == "triton" and not can_run:
        raise ValueError(
            "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the first "
            f"kernel call, and the triton package installed, version {MIN_TRITON[0]}.{MIN_TRITON[1]} or newer "
            f"(found: {'.'.join(map(str, triton_version())) if triton_installed() else 'none'})"
        )
    return backend


def fastest(configs, run, device, check=None) -> tuple[object, list[tuple[object, float | None]]]:
    """Autotuning is nothing more than measuring: time ``run(config)`` for each config (median
    of repeats) and return the fastest with every timing (None where a config could not run,
    e.g. its tiles need more shared memory than this GPU has).

    ``check(output)``, if given, vets each config before it is timed: ``run`` returns its output
    tensor, which is first filled with NaN and then written again by a fresh run (so a kernel
    that leaves part of it unwritten cannot pass on an earlier config's numbers); a config whose
    output ``check`` rejects is left out with a warning (timing None): a fast wrong kernel is
    never chosen."""
    from ..bench import measure

    timings, rejected = [], 0
    for cfg in configs:
        try:
            if check is not None:
                out = run(cfg)
                if out.is_floating_point():
                    out.fill_(float("nan"))
                if not check(run(cfg)):
                    warnings.warn(f"autotune: {cfg!r} gives a wrong output; left out", stacklevel=2)
                    timings.append((cfg, None))
                    rejected += 1
                    continue
            seconds = measure(lambda: run(cfg), warmup=2, repeat=10, device=device).median_s
        except Exception:  # a config this GPU cannot run is skipped, not fatal
            seconds = None
        timings.append((cfg, seconds))
    ran = sorted((seconds, i) for i, (_, seconds) in enumerate(timings) if seconds is not None)
    if not ran:
        raise ValueError(f"none of the {len(timings)} launch configurations could run"
                         + (f" ({rejected} gave wrong outputs)" if rejected else ""))  # fmt: skip
    # one median of 10 can mislead when clocks move: time the three leaders twice more,
    # alternating between them, and rank them by the median of their three medians
    finalists = [i for _, i in ran[:3]]
    rounds = {i: [timings[i][1]] for i in finalists}
    if len(finalists) > 1:
        for _ in range(2):
            for i in finalists:
                rounds[i].append(measure(lambda: run(timings[i][0]), warmup=1, repeat=10, device=device).median_s)
    for i in finalists:
        timings[i] = (timings[i][0], sorted(rounds[i])[len(rounds[i]) // 2])
    best = min(finalists, key=lambda i: timings[i][1])
    return timings[best][0], timings


from .flash_attention import (  # noqa: E402
    flash_attention,
    flash_attention_blockwise,
    flash_attention_reference,
    flash_attention_triton,
)
from .matmul_kernel import matmul, matmul_reference, matmul_triton  # noqa: E402

__all__ = [
    "choose_backend",
    "fastest",
    "flash_attention",
    "flash_attention_blockwise",
    "flash_attention_reference",
    "flash_attention_triton",
    "interpreting",
    "matmul",
    "matmul_reference",
    "matmul_triton",
    "triton_installed",
    "int8_weight_only_linear",
    "int4_weight_only_linear",
    "int8_linear",
]
from .quant_kernels import int4_weight_only_linear, int8_linear, int8_weight_only_linear  # noqa: E402, F401
