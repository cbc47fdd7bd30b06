"""Parallelism on real CPU processes (gloo): every split equals one process."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction

import pytest

from labkit.model import get_config
from labkit.parallel import data, launch, mesh, pipeline, tensor
from labkit.parallel.launch import LaunchError

# -- launch ------------------------------------------------------------------------


def test_launch_gathers_results_in_rank_order():
    out = launch.launch(launch.hello, 3)
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(r["sum_of_ranks"] == 3 for r in out)
    assert len({r["pid"] for r in out}) == 3


def test_launch_reports_the_failing_rank_not_its_echoes():
    with pytest.raises(LaunchError, match="rank 1 of 3 failed") as info:
        launch.launch(launch.fail_on, 3, 1)
    assert info.value.rank == 1
    assert "ZeroDivisionError" in str(info.value)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_launch_blames_a_killed_rank_not_the_peers_that_lost_it():
    with pytest.raises(LaunchError, match="rank 0 died with exit code -9") as info:
        launch.launch(launch.killed_on, 3, 0, timeout=60)
    assert info.value.rank == 0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_launch_rejects_a_bad_timeout(bad):
    with pytest.raises(ValueError, match="timeout must be a positive, finite number"):
        launch.launch(launch.hello, 2, timeout=bad)


def test_launch_timeout_ends_every_child():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="timed out"):
        launch.launch(launch.sleep_for, 2, 60, timeout=1.5)
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("bad", [0, -1, 1000, 2.0, "2"])
def test_launch_rejects_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size"):
        launch.launch(launch.hello, bad)


def test_launch_rejects_unpicklable_functions():
    with pytest.raises(ValueError, match="module-level"):
        launch.launch(lambda r, n: r, 2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_no_orphans_when_the_parent_is_killed_or_interrupted(tmp_path, sig):
    """SIGKILL: the launcher dies with no cleanup, the children's watchdogs must end them.
    SIGINT (Ctrl-C, a notebook's interrupt): the launcher's cleanup must end them."""
    pids = tmp_path / "pids"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        # a shell's background job inherits SIGINT ignored; a notebook or terminal has Python's handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(tmp_path)!r})
        from labkit.parallel.launch import launch
        from child_fn import write_pid_and_sleep
        if __name__ == "__main__":
            launch(write_pid_and_sleep, 2, {str(pids)!r})
    """))
    (tmp_path / "child_fn.py").write_text(textwrap.dedent("""
        import os, time
        def write_pid_and_sleep(rank, world_size, path):
            with open(f"{path}.{rank}", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd())
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{pids}.{r}") for r in range(2)):
        assert time.monotonic() < deadline, "children never started"
        time.sleep(0.2)
    time.sleep(0.2)
    children = [int(open(f"{pids}.{r}").read()) for r in range(2)]
    parent.send_signal(sig)
    parent.wait(timeout=30)  # the children sleep 120 s: only the launcher's cleanup ends this early
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children)


# -- data parallelism ----------------------------------------------------------------


def test_data_parallel_gradients_equal_ddp():
    out = launch.launch(data.gradients_vs_ddp, 2)[0]
    for method, diff in out["max_diff_vs_ddp"].items():
        assert diff <= 1e-6, method
    assert out["ddp_vs_single_process"] <= 1e-6
    assert out["messages"]["ring"] == 1 and out["messages"]["naive"] > out["messages"]["bucketed"] > 1


@pytest.mark.parametrize("n, numel", [(2, 1000), (3, 1000), (4, 3)])
def test_ring_all_reduce_sums_and_moves_2_n_minus_1_over_n(n, numel):
    out = launch.launch(data.all_reduce_bytes, n, numel)
    assert all(r["correct"] for r in out)
    per_rank = 2 * (n - 1) / n * max(numel, n) * 4  # padded to n elements when smaller
    for r in out:  # chunks differ by at most one element when n does not divide numel
        assert abs(r["bytes_sent"] - per_rank) <= 2 * (n - 1) * 4


def test_global_batch_and_shard():
    x1, y1 = data.global_batch(3, 4, 8, 128)
    x2, _ = data.global_batch(3, 4, 8, 128)
    assert (x1 == x2).all() and (x1[:, 1:] == y1[:, :-1]).all()
    assert data.shard(x1, 1, 2).shape == (2, 8)
    with pytest.raises(ValueError, match="divisible"):
        data.shard(x1, 0, 3)


# -- tensor parallelism --------------------------------------------------------------


def test_tensor_parallel_equals_one_process():
    out = launch.launch(tensor.logits_and_gradients, 2, "nano")
    for r in out:
        assert r["max_logit_diff"] <= 1e-5
        assert r["max_grad_diff"] <= 1e-5
        assert r["forward_all_reduces"] == 2 * get_config("nano").n_layer  # one per attention, one per MLP


def test_tensor_parallel_size_must_divide_heads():
    with pytest.raises(ValueError, match="n_head"):
        tensor.check_tensor_parallel_size(get_config("tiny"), 4)
    tensor.check_tensor_parallel_size(get_config("tiny"), 3)


# -- pipeline parallelism ------------------------------------------------------------


@pytest.mark.parametrize("kind", pipeline.SCHEDULES)
@pytest.mark.parametrize("p, m", [(1, 1), (2, 4), (4, 8), (3, 5), (5, 2)])
def test_simulator_reproduces_the_bubble_formula_exactly(kind, p, m):
    sim = pipeline.simulate_schedule(kind, p, m, t_forward=1, t_backward=2)
    assert sim["bubble"] == Fraction(p - 1, m + p - 1)
    assert float(sim["bubble"]) == pytest.approx(pipeline.bubble_fraction(p, m), abs=1e-15)
    assert sim["makespan"] == (m + p - 1) * 3


def test_1f1b_holds_fewer_micro_batches_than_gpipe():
    p, m = 4, 8
    assert pipeline.simulate_schedule("gpipe", p, m)["peak_in_flight"] == [m] * p
    assert pipeline.simulate_schedule("1f1b", p, m)["peak_in_flight"] == [p - s for s in range(p)]


def test_schedules_run_every_micro_batch_once():
    for kind in pipeline.SCHEDULES:
        for s in range(3):
            ops = pipeline.schedule(kind, 3, 5, s)
            assert sorted(ops) == sorted([("F", i) for i in range(5)] + [("B", i) for i in range(5)])
            for i in range(5):
                assert ops.index(("F", i)) < ops.index(("B", i))


@pytest.mark.parametrize("kind", pipeline.SCHEDULES)
def test_pipeline_loss_and_gradients_equal_one_process(kind):
    out = pipeline.measured_run(kind, 2, 4, config="nano", batch_size=8, seq_len=16)
    assert out["loss_diff"] <= 1e-5
    assert out["max_grad_diff"] <= 1e-6
    assert 0.0 <= out["bubble"] < 1.0


def test_pipeline_bad_input():
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        pipeline.stage_layers(2, 3)
    with pytest.raises(ValueError, match="m \\(micro-batches\\)"):
        pipeline.bubble_fraction(2, 0)
    with pytest.raises(ValueError, match="p \\(pipeline stages\\)"):
        pipeline.bubble_fraction(0, 4)
    with pytest.raises(ValueError, match="schedule"):
        pipeline.schedule("zigzag", 2, 2, 0)
    for stage in (1.0, True, 2):
        with pytest.raises(ValueError, match="stage must be an int in 0..1"):
            pipeline.schedule("1f1b", 2, 4, stage)
    assert [len(r) for r in pipeline.stage_layers(6, 4)] == [2, 2, 1, 1]
    # measured_run checks before it starts any process (a LaunchError would hide which argument is wrong)
    with pytest.raises(ValueError, match="schedule must be one of"):
        pipeline.measured_run("zigzag", 2, 2, config="nano")
    with pytest.raises(ValueError, match="micro_batches must divide batch_size=8"):
        pipeline.measured_run("1f1b", 2, 3, config="nano")
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        pipeline.measured_run("1f1b", 3, 2, config="nano")


# -- 3D ------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mesh_2x2x2_trains_like_one_process(optimizer):
    # SGD's step is proportional to the gradient: without the data-parallel average its losses differ from
    # one process's by 1.4e-3 at step 3 (checked by removing it); AdamW's nearly scale-free step hides that
    out = mesh.run_mesh(2, 2, 2, steps=3, config="nano", optimizer=optimizer)
    assert len(out["losses"]) == 3
    assert out["max_loss_diff"] <= 1e-5


def test_mesh_layout_and_bad_input():
    m = mesh.ProcessMesh(2, 2, 2)
    groups = m.layout()
    assert groups["tp"][0] == [0, 1] and groups["dp"][0] == [0, 2] and groups["pp"][0] == [0, 4]
    assert all(m.rank_of(**vars(m.coord(r))) == r for r in range(8))
    with pytest.raises(ValueError, match="dp"):
        mesh.ProcessMesh(0, 1, 1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        mesh.run_mesh(1, 1, 2, optimizer="adam")
    with pytest.raises(ValueError, match="lr must be a positive"):
        mesh.run_mesh(1, 1, 2, lr=0)
    cfg = get_config("nano")
    with pytest.raises(ValueError, match="n_head"):
        mesh.check_mesh(cfg, 1, 4, 1, 8, 1)
    with pytest.raises(ValueError, match="layers"):
        mesh.check_mesh(cfg, 1, 1, 3, 8, 1)
    with pytest.raises(ValueError, match="batch_size"):
        mesh.check_mesh(cfg, 3, 1, 1, 8, 1)
