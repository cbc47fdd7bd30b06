import json
import time

import pytest
import torch

from labkit import bench


def test_measure_reports_median_and_spread():
    calls = []
    m = bench.measure(lambda: calls.append(time.sleep(0.002)), warmup=2, repeat=5, device="cpu")
    assert len(calls) == 7 and m.repeat == 5 and len(m.times_s) == 5
    assert m.min_s <= m.median_s <= m.max_s and m.median_s >= 0.002
    assert m.iqr_s >= 0 and m.peak_memory_bytes > 0 and m.device.startswith("cpu")
    assert m.iqr_s <= m.max_s - m.min_s  # the middle half lies inside the range


def test_the_spread_ignores_a_one_off_outlier(monkeypatch):
    times = iter([0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 14.0])  # perf_counter pairs: 1, 1, 1, 1, 10 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(times))
    m = bench.measure(lambda: None, warmup=0, repeat=5, device="cpu")
    assert m.times_s == [1.0, 1.0, 1.0, 1.0, 10.0] and m.median_s == 1.0 and m.iqr_s == 0.0


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="repeat"):
        bench.measure(lambda: None, repeat=0)
    with pytest.raises(ValueError, match="warmup"):
        bench.measure(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="callable"):
        bench.measure(3)
    with pytest.raises(ValueError, match="baseline"):
        bench.compare({"a": lambda: None}, baseline="b")


def test_compare_prints_a_table_with_ratios(capsys):
    rows = bench.compare(
        {"slow": lambda: time.sleep(0.004), "fast": lambda: None}, warmup=1, repeat=3, suite="t", device="cpu"
    )
    out = capsys.readouterr().out
    assert "vs slow" in out and "1.00x" in out
    assert [r["variant"] for r in rows] == ["slow", "fast"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1.0
    for key in ("suite", "name", "baseline", "variant", "baseline_s", "variant_s", "speedup", "device"):
        assert key in rows[1]


def test_compare_rounds_keeps_each_variants_median_round(capsys):
    calls = []
    rows = bench.compare_rounds({"slow": lambda: time.sleep(0.004), "fast": lambda: calls.append(1)}, rounds=3,
                                repeat=2, warmup=1, suite="t")  # fmt: skip
    assert len(calls) == 3 * (1 + 2)  # every round times every variant
    assert [r["variant"] for r in rows] == ["slow", "fast"] and rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1
    assert rows[1]["baseline_s"] == rows[0]["variant_s"] and "vs slow" in capsys.readouterr().out
    slow = rows[0]["rounds_s"]  # the spread is the rounds' range over the kept (median) round
    assert len(slow) == 3 and slow[1] == rows[0]["variant_s"]
    assert rows[0]["spread"] == pytest.approx((slow[2] - slow[0]) / slow[1])
    with pytest.raises(ValueError, match="rounds"):
        bench.compare_rounds({"a": lambda: None}, rounds=0)


def test_command_line_writes_json_rows(tmp_path, capsys):
    @bench.register_suite("unit-test")
    def suite(quick=False):
        """A suite for the test."""
        return bench.compare(
            {"a": lambda: None, "b": lambda: None}, repeat=2, warmup=0, suite="unit-test", device="cpu"
        )

    out = tmp_path / "rows.json"
    assert bench.main(["unit-test", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    assert {"suite", "name", "baseline", "variant", "baseline_s", "variant_s", "speedup", "device"} <= set(rows[0])
    assert "spread" in rows[0] and "peak_memory_bytes" in rows[0]  # what else the table measured is kept
    assert rows[0]["suite"] == "unit-test"
    bench.main(["--list"])
    assert "labgpt" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["no-such-suite"])


@pytest.mark.parametrize("suite", ["labgpt", "kernels", "hardware", "lowrank", "prompting", "parallel", "sparse", "flash", "prune", "quant", "serving"])
def test_every_registered_suite_runs_and_returns_rows(suite, tmp_path, capsys):
    assert suite in bench.load_suites()
    out = tmp_path / f"{suite}.json"
    assert bench.main([suite, "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["suite"] == suite and r["variant_s"] > 0 for r in rows)
    assert any(r["speedup"] == 1.0 for r in rows)  # each table carries its baseline


def test_busy_seconds_counts_overlaps_once():
    assert bench.busy_seconds([]) == 0.0
    assert bench.busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.5, 3.7)]) == 3.0  # [0, 2] and [3, 4]
    assert bench.busy_seconds([(2.0, 3.0), (0.0, 1.0), (1.0, 2.0)]) == 3.0  # touching, out of order
    assert bench.busy_seconds([(0.0, 5.0), (1.0, 2.0)]) == 5.0  # one inside another
    assert bench.busy_seconds([(1.0, 1.0), (2.0, 1.5)]) == 0.0  # empty and reversed intervals count nothing


def test_kernel_profile_names_what_a_call_runs():
    a = torch.randn(64, 64)
    profile = bench.kernel_profile(lambda: torch.relu(a @ a) + 1, steps=4, device="cpu")
    names = [k["name"] for k in profile["kernels"]]
    assert {"aten::matmul", "aten::relu", "aten::add"} <= set(names)
    assert all(k["calls"] == 1.0 for k in profile["kernels"])  # per call of fn, top-level operators only
    assert profile["launches"] == 3
    assert 0 < profile["busy_s"] <= profile["wall_s"]  # the operators ran inside the calls that were timed
    with pytest.raises(ValueError, match="steps"):
        bench.kernel_profile(lambda: None, steps=0, device="cpu")
