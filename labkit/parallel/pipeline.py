"""Pipeline parallelism: LabGPT cut into stages on separate processes, fed with micro-batches.

The seed's bubble: with p stages and m micro-batches, every stage idles for p-1 of the
m+p-1 slots of a step, so the idle fraction is (p-1)/(m+p-1).
"""

from __future__ import annotations


def bubble_fraction(p: int, m: int) -> float:
    """Idle fraction of a GPipe or 1F1B step with ``p`` stages and ``m`` micro-batches: (p-1)/(m+p-1)."""
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"p (pipeline stages) must be an int >= 1, got {p!r}")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m (micro-batches) must be an int >= 1, got {m!r}")
    return (p - 1) / (m + p - 1)
