"""The analytic 3D-parallelism planner: counts, identities, published runs, validation errors."""

import dataclasses

import pytest

from labkit.parallel.pipeline import bubble_fraction
from labkit.parallel.planner import (
    GPUS,
    MODELS,
    PUBLISHED,
    GPUSpec,
    Layout,
    ModelSpec,
    Plan,
    plan,
    plot_breakdown,
    search_layouts,
    validate,
)

ONE_T = Layout(dp=6, tp=8, pp=64, micro_batch=1, global_batch=3072, recompute="full")


def test_parameter_counts_match_the_papers():
    assert MODELS["gpt3-175b"].params == pytest.approx(175e9, rel=0.01)
    assert MODELS["megatron-1t"].params == pytest.approx(1008.0e9, rel=0.02)  # Narayanan et al. Table 1
    assert MODELS["megatron-145b"].params == pytest.approx(145.6e9, rel=0.005)
    assert MODELS["gpt2-small"].params == pytest.approx(124e6, rel=0.03)


def test_flops_match_the_closed_forms():
    m = MODELS["gpt3-175b"]
    B, s, L, h, V = 1536, m.seq_len, m.n_layer, m.d_model, m.vocab_size
    no_recompute = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    full = 96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))
    assert m.flops_per_step(B, "none") == pytest.approx(no_recompute, rel=1e-12)
    assert m.flops_per_step(B, "full") == pytest.approx(full, rel=1e-12)
    assert m.flops_per_step(B, "none") < m.flops_per_step(B, "selective") < m.flops_per_step(B, "full")


@pytest.mark.parametrize("row", validate(), ids=lambda r: r["name"])
def test_published_runs_are_reproduced_within_25_percent(row):
    assert 0.75 <= row["ratio"] <= 1.25, row
    assert 0.75 <= row["predicted_flops_per_gpu"] / row["reported_flops_per_gpu"] <= 1.25
    assert row["fits"]


def test_every_published_run_uses_the_same_gpu_spec():
    assert {run["gpu"] for run in PUBLISHED} == {"A100-80GB"}
    assert len(PUBLISHED) >= 2


def test_plan_identities():
    p = plan("megatron-1t", "A100-80GB", ONE_T)
    lo = p.layout
    assert lo.micro_batches == 3072 // (6 * 1)
    assert p.bubble == bubble_fraction(64, lo.micro_batches)
    assert p.total_bytes == p.weights_bytes + p.gradients_bytes + p.optimizer_bytes + p.activations_bytes
    assert p.step_s == pytest.approx(p.compute_s + p.tp_comm_s + p.pp_comm_s + p.bubble_s + p.dp_comm_s)
    # the bubble is its fraction of the pipeline's time
    pipeline = p.compute_s + p.tp_comm_s + p.pp_comm_s + p.bubble_s
    assert p.bubble_s / pipeline == pytest.approx(p.bubble)
    assert p.hfu == pytest.approx(p.flops_per_gpu / p.gpu.peak_flops)
    assert p.mfu == pytest.approx(p.hfu * 72 / 96, rel=0.01)
    assert p.tokens_per_s == pytest.approx(3072 * 2048 / p.step_s)


def test_interleaving_divides_the_bubble():
    lo = dataclasses.replace(ONE_T, interleave=2)
    p = plan("megatron-1t", "A100-80GB", lo)
    busy = p.compute_s + p.tp_comm_s + p.pp_comm_s
    m = lo.micro_batches
    assert p.bubble_s / busy == pytest.approx(63 / (2 * m))  # Narayanan 2.2.2: bubble (p-1)/(v m) of the busy time
    assert p.bubble == pytest.approx(63 / (2 * m + 63))  # so the idle share of the step is (p-1)/(v m + p-1)
    one = plan("megatron-1t", "A100-80GB", ONE_T)
    assert one.bubble == bubble_fraction(64, m) and p.step_s < one.step_s


def test_weights_are_the_first_stage_share():
    m = MODELS["megatron-1t"]
    p = plan(m, "A100-80GB", ONE_T)
    stage = (m.n_layer // 64) * m.layer_params + (m.vocab_size + m.seq_len) * m.d_model
    assert p.weights_bytes == pytest.approx(2 * stage / 8)
    # the first stage also holds the embeddings, so it is a few percent above an even split
    assert p.weights_bytes == pytest.approx(2 * m.params / (8 * 64), rel=0.10)
    # with one stage every parameter is counted once: exactly 2 bytes x params / tp
    one_stage = plan("gpt3-1.3b", "A100-80GB", Layout(dp=8, tp=2, pp=1, micro_batch=4, global_batch=512))
    assert one_stage.weights_bytes == pytest.approx(2 * MODELS["gpt3-1.3b"].params / 2)


def test_recompute_and_zero_save_memory():
    lo = Layout(dp=16, tp=8, pp=12, micro_batch=1, global_batch=1536)
    none = plan("gpt3-175b", "A100-80GB", lo)
    selective = plan("gpt3-175b", "A100-80GB", dataclasses.replace(lo, recompute="selective"))
    full = plan("gpt3-175b", "A100-80GB", dataclasses.replace(lo, recompute="full"))
    assert full.activations_bytes < selective.activations_bytes < none.activations_bytes
    assert full.compute_s > none.compute_s
    zero = plan("gpt3-175b", "A100-80GB", dataclasses.replace(lo, zero=1))
    assert zero.optimizer_bytes == pytest.approx(none.optimizer_bytes / 16)
    assert zero.weights_bytes == none.weights_bytes


def test_more_micro_batches_shrink_the_bubble():
    bubbles = [
        plan("megatron-145b", "A100-80GB", Layout(24, 8, 8, 1, batch, "full")).bubble for batch in (192, 768, 2304)
    ]
    assert bubbles[0] > bubbles[1] > bubbles[2]


def test_the_untouched_trillion_does_not_fit_one_node():
    p = plan("megatron-1t", "A100-80GB", Layout(dp=1, tp=8, pp=1, micro_batch=1, global_batch=8, recompute="full"))
    assert not p.fits
    assert "DOES NOT FIT" in p.table()


def test_table_and_as_dict():
    p = plan("labgpt-tiny", "A100-40GB", Layout(dp=2, tp=2, pp=2, micro_batch=2, global_batch=16))
    d = p.as_dict()
    assert d["num_gpus"] == 8 and d["model"] == "labgpt-tiny" and d["fits"]
    assert d["total_bytes"] == p.total_bytes
    text = str(p)
    assert "dp 2 x tp 2 x pp 2" in text and "MFU" in text and len(text.splitlines()) >= 4


def test_specs_accepted_as_objects():
    gpu = dataclasses.replace(GPUS["H100-SXM"], matmul_efficiency=0.5)
    model = ModelSpec("toy", 4, 64, 4, 100, 32)
    p = plan(model, gpu, Layout(dp=1, tp=2, pp=2, micro_batch=1, global_batch=4))
    assert isinstance(p, Plan) and p.gpu is gpu and p.model is model
    # H100s run the same layout faster than A100s
    assert (
        plan("gpt3-175b", "H100-SXM", Layout(16, 8, 12, 1, 1536, "full")).step_s
        < plan("gpt3-175b", "A100-80GB", Layout(16, 8, 12, 1, 1536, "full")).step_s
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dp": 0}, "dp"),
        ({"tp": 0}, "tp"),
        ({"pp": 0}, "pp"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"global_batch": 0}, "global_batch"),
        ({"global_batch": 100}, "global_batch .* divisible by dp \\* micro_batch"),
        ({"recompute": "some"}, "recompute"),
        ({"zero": 2}, "zero"),
        ({"interleave": 0}, "interleave"),
    ],
)
def test_layout_errors_name_the_argument(kwargs, match):
    args = {"dp": 6, "tp": 8, "pp": 64, "micro_batch": 1, "global_batch": 3072, **kwargs}
    with pytest.raises(ValueError, match=match):
        Layout(**args)


def test_plan_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"tp \(5\) must divide n_head \(96\)"):
        plan("gpt3-175b", "A100-80GB", Layout(dp=1, tp=5, pp=1, micro_batch=1, global_batch=1))
    with pytest.raises(ValueError, match=r"pp \(256\) must be <= n_layer \(128\)"):
        plan("megatron-1t", "A100-80GB", Layout(dp=1, tp=1, pp=256, micro_batch=1, global_batch=1))
    with pytest.raises(ValueError, match=r"n_layer \(96\) must be divisible by pp \* interleave"):
        plan("gpt3-175b", "A100-80GB", Layout(dp=1, tp=8, pp=7, micro_batch=1, global_batch=1))
    with pytest.raises(ValueError, match=r"pp \* interleave \(12 \* 3"):
        plan("gpt3-175b", "A100-80GB", Layout(dp=1, tp=8, pp=12, micro_batch=1, global_batch=1, interleave=3))
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*gpt3-175b"):
        plan("gpt5", "A100-80GB", ONE_T)
    with pytest.raises(ValueError, match="unknown gpu 'B300'.*A100-80GB"):
        plan("gpt3-175b", "B300", ONE_T)
    with pytest.raises(ValueError, match="recompute"):
        MODELS["gpt3-175b"].flops_per_step(8, "sometimes")


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="n_layer"):
        ModelSpec("bad", 0, 64, 4, 100, 32)
    with pytest.raises(ValueError, match=r"n_head \(5\) must divide d_model \(64\)"):
        ModelSpec("bad", 2, 64, 5, 100, 32)
    with pytest.raises(ValueError, match="matmul_efficiency"):
        GPUSpec("bad", 1e12, 1e9, 1e9, 1e9, 8, 1.5, "")


def test_megatron_1t_uses_the_papers_head_count():
    m = MODELS["megatron-1t"]
    assert (m.n_layer, m.d_model, m.n_head, m.vocab_size, m.seq_len) == (128, 25600, 160, 51200, 2048)


def test_search_layouts_fit_and_are_sorted():
    limit = 40e9
    plans = search_layouts("gpt3-175b", "A100-80GB", 1536, 1536, memory_limit=limit)
    assert plans
    assert all(p.total_bytes <= limit and p.layout.num_gpus == 1536 for p in plans)
    times = [p.step_s for p in plans]
    assert times == sorted(times)
    assert all(p.layout.tp in (1, 2, 4, 8) and 96 % p.layout.pp == 0 for p in plans)
    # a looser limit admits at least as many layouts
    assert len(search_layouts("gpt3-175b", "A100-80GB", 1536, 1536, memory_limit=80e9)) >= len(plans)
    assert search_layouts("megatron-1t", "A100-80GB", 8, 8) == []  # a trillion parameters need more than a node


@pytest.mark.parametrize("kwargs, name", [({"micro_batch": 0}, "micro_batch"), ({"global_batch": 2.5}, "global_batch"),
                                          ({"memory_limit": "80e9"}, "memory_limit"), ({"memory_limit": 0}, "memory_limit")])
def test_search_layouts_bad_input_names_the_argument(kwargs, name):
    args = {"global_batch": 1536, **kwargs}
    with pytest.raises(ValueError, match=name):
        search_layouts("gpt3-175b", "A100-80GB", 1536, **args)


def test_interleaving_costs_activation_memory_and_pipeline_traffic():
    lo = Layout(dp=16, tp=8, pp=12, micro_batch=1, global_batch=1536, recompute="selective")
    one = plan("gpt3-175b", "A100-80GB", lo)
    two = plan("gpt3-175b", "A100-80GB", dataclasses.replace(lo, interleave=2))
    assert two.activations_bytes == pytest.approx(one.activations_bytes * (1 + 11 / 24))  # Korthikanti 4.2.3
    assert two.pp_comm_s == pytest.approx(2 * one.pp_comm_s)
    assert two.bubble_s < one.bubble_s


def test_plot_breakdown_draws_two_stacked_charts():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = search_layouts("gpt3-1.3b", "A100-40GB", 64, 512, micro_batch=2)[:4]
    axes = plot_breakdown(plans)
    assert len(axes[0].patches) == 4 * len(plans) and len(axes[1].patches) == 5 * len(plans)
    plt.close("all")
