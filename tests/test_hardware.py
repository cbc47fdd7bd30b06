import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from labkit import hardware
from labkit.model import LabGPT, get_config


def test_matmul_counts():
    assert hardware.matmul_flops(2, 3, 4) == 48
    assert hardware.matmul_bytes(2, 3, 4, 2) == (8 + 12 + 6) * 2
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with FlopCounterMode(display=False) as counter:
        a @ b
    assert counter.get_total_flops() == hardware.matmul_flops(5, 3, 7)
    with pytest.raises(ValueError, match="m must be"):
        hardware.matmul_flops(0, 1, 1)


def test_causal_pairs_and_attention_flops():
    assert hardware.causal_pairs(4, 4) == 10  # 1 + 2 + 3 + 4
    assert hardware.causal_pairs(1, 9) == 9  # one decode step sees every key
    assert hardware.attention_flops(2, 3, 5, 5, 8, causal=False) == 4 * 2 * 3 * 25 * 8
    with pytest.raises(ValueError, match="q_len"):
        hardware.attention_flops(1, 1, 5, 4, 8)


def test_forward_flops_equal_pytorchs_flop_counter():
    """The oracle: PyTorch's FlopCounterMode on the real forward (manual attention computes all T x T pairs)."""
    config = get_config("nano")
    model = LabGPT(config).eval().set_attention("manual")
    idx = torch.zeros((2, 24), dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(idx)
    assert counter.get_total_flops() == hardware.forward_flops(config, 2, 24, causal=False)
    assert hardware.forward_flops(config, 2, 24) < hardware.forward_flops(config, 2, 24, causal=False)


def test_weight_bytes_equal_the_parameters():
    for name in ("nano", "tiny"):
        model = LabGPT(get_config(name))
        assert hardware.weight_bytes(model.config, 4) == sum(p.numel() * 4 for p in model.parameters())
    config = get_config("tiny")
    step = hardware.decode_step_bytes(config, batch=1, context_len=99)
    assert step == hardware.weight_bytes(config) + 2 * config.n_layer * 100 * config.n_embd * 4


def test_roofline_time_and_bound():
    # 1 GFLOP and 1 GB on a 10 TFLOP/s, 1 TB/s device: memory takes 1 ms, compute 0.1 ms
    assert hardware.roofline_time(1e9, 1e9, 1e13, 1e12) == pytest.approx(1e-3)
    assert hardware.bound(1e9, 1e9, 1e13, 1e12) == "memory"
    assert hardware.bound(1e12, 1e9, 1e13, 1e12) == "compute"
    with pytest.raises(ValueError):
        hardware.roofline_time(1, 1, 0, 1)


def test_measured_peaks_on_this_machine():
    peaks = hardware.measure_peaks(device="cpu", n=128, formats=("fp32", "bf16"))
    assert peaks["fp32"] > 1e8 and peaks["bfloat16" if False else "bf16"] > 1e7 and peaks["bandwidth"] > 1e8
    assert hardware.matmul_rate("tf32", 64, "cpu") is None  # tf32 is a GPU format
    with pytest.raises(ValueError, match="fmt"):
        hardware.matmul_rate("fp4", 64)
    with pytest.raises(ValueError, match="1 MiB"):
        hardware.copy_bandwidth(1000, device="cpu")


def test_datasheet_has_every_device_with_sources():
    rows = hardware.datasheet()
    names = " ".join(r["name"] for r in rows)
    for device in ("H100", "H200", "A100", "TPU v4", "TPU v5e", "Alveo", "M2"):
        assert device in names, device
    assert {r["kind"] for r in rows} >= {"GPU", "TPU", "FPGA", "SoC", "CPU"}
    assert all(r["source"] for r in rows)
    config = hardware.GPT3
    flops = hardware.forward_flops(config, 1, 2048)
    times = hardware.what_if(flops, hardware.weight_bytes(config, 2))
    assert times and all(t["seconds"] > 0 for t in times)


def test_number_formats():
    props = {r["format"]: r for r in hardware.format_properties()}
    assert props["fp16"]["max"] == 65504.0 and props["bf16"]["epsilon"] == 2.0**-7
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    tf32 = hardware.round_to_format(x, "tf32")
    assert torch.all((tf32.view(torch.int32) & 0x1FFF) == 0)  # 13 low mantissa bits cleared
    assert ((tf32 - x).abs() / x.abs()).max() <= 2.0**-11  # round to nearest: half a tf32 ulp
    assert torch.equal(hardware.round_to_format(x, "bf16"), x.bfloat16().float())
    q = hardware.round_to_format(x, "int8")
    assert len(torch.unique(q)) <= 255
    errors = {f: hardware.matmul_error(f, n=64) for f in hardware.NUMBER_FORMATS}
    assert errors["fp32"] == 0.0
    assert errors["tf32"] < errors["bf16"] < errors["fp8_e4m3"] < errors["fp8_e5m2"]
    with pytest.raises(ValueError, match="fmt"):
        hardware.round_to_format(x, "fp4")


def test_forward_bytes_are_weights_plus_activations():
    config = get_config("tiny")
    one, two = hardware.forward_bytes(config, 1, 100), hardware.forward_bytes(config, 2, 100)
    assert two - one == one - hardware.weight_bytes(config)  # activations scale with tokens


def test_what_if_names_an_unknown_format():
    with pytest.raises(ValueError, match="fmt must be one of"):
        hardware.what_if(1e12, 1e9, "foo")
    assert {r["device"] for r in hardware.what_if(1e12, 1e9, "int8")}  # every format of the tuple has devices
    for fmt in hardware.WHAT_IF_FORMATS:
        assert hardware.what_if(1e12, 1e9, fmt), fmt
