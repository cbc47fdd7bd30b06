"""Argument checks shared across the kit: bad input is a ValueError that names the argument and what is allowed."""

from __future__ import annotations

import math


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` if it is an int >= ``low`` (and <= ``high`` if given); else a ValueError naming ``name``. A bool
    is not an int here (``True`` would pass Python's ``isinstance(True, int)`` and mean 1 by accident)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return value


def check_number(name: str, value, low: float = 0.0, strict: bool = True, note: str = "") -> float:
    """``value`` if it is a finite int or float > ``low`` (>= with ``strict=False``); else a ValueError naming
    ``name`` (``note`` says what the number means, e.g. " (seconds)"). A bool is not a number here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > low if strict else value >= low):  # fmt: skip
        allowed = "a positive, finite number" if strict and low == 0 else f"a finite number {'>' if strict else '>='} {low}"
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")
    return value
