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


@functools.cache  # asked on every kernel call: find_spec alone costs tens of microseconds
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tma_supported(t: torch.Tensor) -> bool:
    """Can kernels use the Tensor Memory Accelerator for this tensor's device? CUDA compute
    capability 9.0+ (Hopper and later), or the CPU interpreter, which emulates it."""
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device)[0] >= 9
    return interpreting()


def choose_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` ("auto", "triton", "reference") for these tensors."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    can_run = triton_installed() and (on_cuda or (interpreting() and not any(t.is_cuda for t in tensors)))
    if backend == "auto":
        return "triton" if can_run else "reference"
    if backend == "triton" and not can_run:
        raise ValueError(
            "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the first "
            "kernel call, and the triton package installed"
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
