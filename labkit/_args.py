"""Argument checks shared across the kit: bad input is a ValueError that names the argument and what is allowed."""

from __future__ import annotations


def check_int(name: str, value, low: int = 1) -> int:
    """``value`` if it is an int >= ``low``; else a ValueError naming ``name``. A bool is not an int here
    (``True`` would pass Python's ``isinstance(True, int)`` and mean 1 by accident)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value
