"""Tensors derived from a module's weights (a transposed copy, a packed one), made once and kept on the module."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _state(t: torch.Tensor) -> tuple:
    # an inference tensor (made under torch.inference_mode) keeps no version counter: an in-place change made to
    # it inside inference mode goes unseen, as PyTorch's own autograd cannot see it either
    return t.data_ptr(), t.dtype, t.device, None if t.is_inference() else t._version


def derived(owner: object, name: str, sources: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, kept in ``owner.__dict__[name]`` and made again when one of ``sources`` is replaced by
    another tensor, moved, converted or changed in place (its version counter moves).

    The entry holds the source tensors themselves and compares them by identity, so a new tensor
    that lands at a freed one's address is not mistaken for it. What the version counter cannot
    see goes unseen here too: an in-place change through ``.data``.
    """
    state = tuple(_state(t) for t in sources)
    entry = owner.__dict__.get(name)
    if entry is None or len(entry[0]) != len(sources) or any(a is not b for a, b in zip(entry[0], sources)) \
            or entry[1] != state:  # fmt: skip
        entry = (tuple(sources), state, make())
        owner.__dict__[name] = entry
    return entry[2]
