"""One place that decides where tensors live, seeds every RNG, and tells the learner what to expect.

Device order: CUDA, then Apple MPS, then CPU. ``LABKIT_DEVICE=cpu`` (or ``cuda``,
``cuda:1``, ``mps``) overrides it, for example to time the CPU path on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import sys

import numpy as np
import torch

ENV_VAR = "LABKIT_DEVICE"
ALLOWED = ("cpu", "cuda", "cuda:N", "mps")


def _validate(name: str) -> torch.device:
    """Parse a device string, or raise a ValueError naming the allowed values."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device string; allowed: {', '.join(ALLOWED)}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported; allowed: {', '.join(ALLOWED)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; allowed: cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} asked for, but Apple MPS is not available here; allowed: cpu")
    return device


def get_device(name: str | None = None) -> torch.device:
    """The device to use: ``name`` if given, else $LABKIT_DEVICE, else the best available."""
    name = name or os.environ.get(ENV_VAR)
    if name:
        return _validate(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) so a notebook reruns identically."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work: without it a timer measures only the kernel launch."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def triton_available() -> bool:
    """True when Triton can run kernels: a Triton new enough for them (``kernels.MIN_TRITON``), and a
    CUDA GPU or the interpreter (TRITON_INTERPRET=1)."""
    from .kernels import triton_usable

    if not triton_usable():
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def memory_gib() -> float | None:
    """Total RAM in GiB (Linux and macOS), or None if it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def doctor() -> dict:
    """Print (and return) what this machine is and what the learner can expect from it."""
    device = get_device()
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib(), 1) if memory_gib() else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_installed": importlib.util.find_spec("triton") is not None,
        "triton_runs_kernels": triton_available(),
    }
    if info["triton_installed"]:
        import triton  # noqa: F401  (imported only to read its version)

        info["triton"] = triton.__version__
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if device.type == "cuda":
        expect = "GPU labs run at full size; Triton kernels run natively and speedups are real GPU speedups."
    elif device.type == "mps":
        expect = "Apple GPU: PyTorch runs on MPS; Triton kernels fall back to their PyTorch reference."
    else:
        expect = (
            "CPU only: every notebook runs with its default (small) sizes in about two minutes; "
            "Triton kernels run their PyTorch reference (or the slow interpreter with TRITON_INTERPRET=1)."
        )
    print(f"{'expect':<{width}}  {expect}")
    info["expect"] = expect
    return info
