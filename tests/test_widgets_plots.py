import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from labkit import plots, widgets  # noqa: E402


def test_explore_runs_once_with_defaults_in_static_mode(capsys):
    seen = []

    def experiment(fig, n, mode, flag, scale):
        seen.append((n, mode, flag, scale))
        fig.add_subplot().plot([1, 2], [n, n])
        return f"n={n}"

    widgets.explore(experiment, n=(4, 64, 4), mode=["a", "b"], flag=True, scale=(0.5, 2.0, 0.1, 1.0))
    assert seen == [(4, "a", True, 1.0)]
    assert "static run with defaults" in capsys.readouterr().out
    with pytest.raises(ValueError):
        widgets.explore(experiment)


def test_pareto_front_and_tradeoff_plot():
    points = [
        {"name": "fp32", "latency_ms": 10, "quality": 0.9, "memory_mb": 10},
        {"name": "int8", "latency_ms": 5, "quality": 0.88, "memory_mb": 3},
        {"name": "bad", "latency_ms": 12, "quality": 0.5, "memory_mb": 5},
    ]
    assert [p["name"] for p in plots.pareto_front(points, "latency_ms", "quality")] == ["int8", "fp32"]
    ax = plots.tradeoff(points)
    assert len(ax.texts) == 3
    rows = [
        {"variant": "a", "speedup": 1.0, "baseline": "a", "device": "cpu"},
        {"variant": "b", "speedup": 2.0, "baseline": "a", "device": "cpu"},
    ]
    assert len(plots.speedup_bars(rows).patches) == 2
