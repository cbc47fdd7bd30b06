"""The plots every lab uses: the quality / latency / memory trade-off, and speedup bars.

Each function draws into ``ax`` if given (so widgets can redraw one figure) and returns it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt


def pareto_front(points: list[dict], x: str, y: str, higher_y_is_better: bool = True) -> list[dict]:
    """The points no other point beats on both axes (lower x and better y); equal points are all kept."""
    sign = 1 if higher_y_is_better else -1
    ordered = sorted(points, key=lambda p: (p[x], -sign * p[y]))
    front, best = [], float("-inf")
    for p in ordered:
        tie = bool(front) and (p[x], p[y]) == (front[-1][x], front[-1][y])  # the same point again: not beaten
        if sign * p[y] > best or tie:
            front.append(p)
            best = max(best, sign * p[y])
    return front


def tradeoff(
    points: list[dict],
    x: str = "latency_ms",
    y: str = "quality",
    size: str | None = "memory_mb",
    label: str = "name",
    ax=None,
    higher_y_is_better: bool = True,
    title: str | None = None,
):
    """Quality vs latency (marker area ~ memory), each point labelled, the Pareto front drawn.

    ``points`` are dicts with at least ``x``, ``y`` and ``label`` keys (and ``size``).
    """
    if not points:
        raise ValueError("points must hold at least one dict")
    for p in points:
        missing = [k for k in (x, y, label) if k not in p]
        if missing:
            raise ValueError(f"point {p} lacks {missing}")
    ax = ax or plt.gca()
    sizes = None
    if size and all(size in p for p in points):
        biggest = max(p[size] for p in points) or 1.0
        sizes = [40 + 400 * p[size] / biggest for p in points]
    ax.scatter([p[x] for p in points], [p[y] for p in points], s=sizes, alpha=0.6, edgecolor="k")
    for p in points:
        ax.annotate(str(p[label]), (p[x], p[y]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = pareto_front(points, x, y, higher_y_is_better)
    ax.plot([p[x] for p in front], [p[y] for p in front], "--", color="gray", lw=1, label="Pareto front")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    if sizes:
        ax.set_title(title or f"{y} vs {x} (marker area ~ {size.replace('_', ' ')})", fontsize=10)
    elif title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def speedup_bars(rows: list[dict], ax=None, title: str | None = None):
    """Horizontal bars of ``speedup`` per variant (rows from ``labkit.bench.compare``)."""
    if not rows:
        raise ValueError("rows must not be empty")
    ax = ax or plt.gca()
    names = [r["variant"] for r in rows]
    values = [r["speedup"] for r in rows]
    bars = ax.barh(names, values, color=["#999" if v == 1 else "#4a8" if v > 1 else "#c66" for v in values])
    ax.axvline(1.0, color="k", lw=0.8)
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_xlabel(f"speedup vs {rows[0]['baseline']} (higher is faster)")
    ax.set_title(title or f"measured on {rows[0]['device']}", fontsize=10)
    ax.invert_yaxis()
    return ax
