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
    twin = {**points[1], "name": "int8 again"}  # an equal point is not beaten: both stay (as capstone.pareto_front)
    assert [p["name"] for p in plots.pareto_front(points + [twin], "latency_ms", "quality")] == ["int8", "int8 again",
                                                                                              "fp32"]  # fmt: skip
    assert [p["name"] for p in plots.pareto_front(points, "latency_ms", "memory_mb", higher_y_is_better=False)] == [
        "int8"]  # fmt: skip
    ax = plots.tradeoff(points)
    assert len(ax.texts) == 3
    rows = [
        {"variant": "a", "speedup": 1.0, "baseline": "a", "device": "cpu"},
        {"variant": "b", "speedup": 2.0, "baseline": "a", "device": "cpu"},
    ]
    assert len(plots.speedup_bars(rows).patches) == 2


def test_float_sliders_show_every_step():
    from labkit import widgets

    assert widgets._widget("threshold", (0.9, 1.0, 0.005)).readout_format == ".3f"  # 0.995, not 0.99
    assert widgets._widget("sparsity", (0.0, 1.0, 0.125)).readout_format == ".3f"
    assert widgets._widget("lr", (0.1, 1.0, 0.1)).readout_format == ".2f"
