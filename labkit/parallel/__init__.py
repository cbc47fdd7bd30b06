"""Parallelism on real processes: data, tensor, pipeline and 3D, plus a planner for thousands of GPUs.

Everything runs on ``torch.distributed``: gloo between CPU processes on a laptop, NCCL
between GPUs. ``launch(fn, world_size)`` starts the processes from a notebook or a script;
under ``torchrun`` the same lab functions run one process per GPU or node.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "launch": "launch",
    "run": "launch",
    "LaunchError": "launch",
    "ring_all_reduce": "data",
    "BucketedDataParallel": "data",
    "ColumnParallelLinear": "tensor",
    "RowParallelLinear": "tensor",
    "bubble_fraction": "pipeline",
    "simulate_schedule": "pipeline",
    "ProcessMesh": "mesh",
    "plan": "planner",
}
_SUBMODULES = {"launch", "data", "tensor", "pipeline", "mesh", "planner"}


def __getattr__(name: str):
    """Import on first use, so that ``import labkit.parallel`` stays light."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'labkit.parallel' has no attribute {name!r}")
