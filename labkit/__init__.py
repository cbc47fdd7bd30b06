"""labkit: the techniques that make large language models faster, implemented from scratch.

Start with ``labkit.doctor()``, then ``model, tokenizer = labkit.load_model("tiny")``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from . import data  # noqa: F401  (labkit.data.tasks())
from .device import doctor, get_device, seed_everything
from .evaluation import evaluate
from .tokenizer import CharTokenizer

__version__ = "0.1.0"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


_SUBMODULES = {
    "bench",
    "capstone",
    "check",
    "distill",
    "early_exit",
    "evaluation",
    "hardware",
    "kernels",
    "lowrank",
    "memory",
    "model",
    "parallel",
    "plots",
    "prompting",
    "prune",
    "quant",
    "serving",
    "sparse",
    "train",
    "widgets",
}


def __getattr__(name: str):
    """Import submodules on first use (``labkit.bench.measure``), keeping ``import labkit`` light."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def available_models() -> list[str]:
    """Names of the checkpoints shipped in ``data/`` (``<name>.safetensors``)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.safetensors"))


def load_model(name: str = "tiny", device=None):
    """Load a shipped checkpoint by name; returns ``(model, tokenizer)`` with the model in eval mode."""
    from .model import load_checkpoint

    names = available_models()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; allowed: {names}")
    loaded = load_checkpoint(DATA_DIR / f"{name}.safetensors", device=get_device(device) if device else None)
    return loaded, CharTokenizer()


def show_source(obj) -> None:
    """Print the source of a labkit function or class: the notebooks read the real code."""
    import inspect

    print(inspect.getsource(obj).rstrip())


__all__ = [
    "show_source",
    "available_models",
    "doctor",
    "evaluate",
    "get_device",
    "load_model",
    "seed_everything",
    "CharTokenizer",
]
