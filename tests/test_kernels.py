"""Every kernel against its PyTorch reference: under the Triton interpreter on CPU, and on CUDA when present."""

import pytest
import torch

from labkit import kernels
from labkit.kernels import matmul, matmul_reference, matmul_triton
from labkit.kernels.matmul_kernel import TMA_CONFIGS, TileConfig, autotune, autotune_log, tma_possible

pytest.importorskip("triton")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not (kernels.interpreting() and kernels.triton_at_least(kernels.MIN_TRITON)), reason="needs TRITON_INTERPRET=1 and triton >= 3.2")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
# one ulp of the output dtype, relative (the kernel sums in fp32 in another order, then rounds once)
TOLERANCES = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 32, 32), (70, 50, 40), (1, 64, 33), (65, 17, 96)])
def test_matmul_matches_reference(device, dtype, shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    torch.testing.assert_close(matmul(a, b, backend="triton"), matmul_reference(a, b), **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_strided_inputs_and_explicit_blocks(device):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(48, 80, generator=g).to(device=device, dtype=torch.float16).t()  # (80, 48), column-major
    b = torch.randn(48, 24, generator=g).to(device=device, dtype=torch.float16)
    out = matmul_triton(a, b, TileConfig(16, 16, 16, 1, 1))
    torch.testing.assert_close(out, matmul_reference(a, b), **TOLERANCES[torch.float16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("shape", [(72, 40, 56), (32, 64, 32), (8, 24, 80)])
def test_persistent_tma_matmul_matches_reference(device, dtype, split, shape):
    """The persistent, TMA-fed kernel: ragged edges (zeros from the descriptor), more tiles
    than programs, and the split epilogue."""
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    if not tma_possible(a, b):
        pytest.skip("this GPU has no TMA (compute capability < 9.0)")
    out = matmul_triton(a, b, TileConfig(32, 32, 16, 1, 1, 2, persistent=True, epilogue_split=split))
    torch.testing.assert_close(out, matmul_reference(a, b), **TOLERANCES[dtype])
    if device == "cuda":
        for cfg in TMA_CONFIGS:  # the real candidates compile and agree (or cannot run on this GPU)
            try:
                out = matmul_triton(a, b, cfg)
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: autotune skips it too
                print(f"{cfg}: {type(err).__name__}")
                continue
            torch.testing.assert_close(out, matmul_reference(a, b), **TOLERANCES[dtype])


def test_tma_needs_aligned_row_major_operands(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not kernels.triton_at_least(kernels.MIN_TRITON_TMA_INTERPRETER):
        pytest.skip("the interpreter emulates tensor descriptors correctly from triton 3.6")
    a, b = torch.zeros(16, 32).half(), torch.zeros(32, 16).half()
    assert tma_possible(a, b)
    assert not tma_possible(a, torch.zeros(32, 12).half())  # rows of 24 bytes: not 16-byte aligned
    assert not tma_possible(torch.zeros(32, 16).half().t(), b)  # column-major A
    with pytest.raises(ValueError, match="TMA"):
        matmul_triton(a.t().contiguous().t(), b, TileConfig(16, 16, 16, 1, 1, persistent=True))


def test_reference_path_is_the_oracle_and_equals_torch():
    a, b = torch.randn(20, 30).half(), torch.randn(30, 10).half()
    expected = (a.float() @ b.float()).half()
    assert torch.equal(matmul(a, b, backend="reference"), expected)


def test_bad_shapes_and_dtypes_are_value_errors():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 2\)"):
        matmul(torch.zeros(3, 4).half(), torch.zeros(5, 2).half())
    with pytest.raises(ValueError, match="float32"):
        matmul(torch.zeros(3, 4), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="float16 and torch.bfloat16|torch.float16 and"):
        matmul(torch.zeros(3, 4).half(), torch.zeros(4, 2).bfloat16())
    with pytest.raises(ValueError, match="2-D"):
        matmul(torch.zeros(2, 3, 4).half(), torch.zeros(4, 2).half())
    with pytest.raises(ValueError, match="backend"):
        matmul(torch.zeros(3, 4).half(), torch.zeros(4, 2).half(), backend="cuda-magic")


@pytest.mark.parametrize("device", DEVICES)
def test_autotune_times_every_config_and_keeps_the_fastest(device):
    a = torch.randn(40, 32).to(device=device, dtype=torch.float16)
    b = torch.randn(32, 24).to(device=device, dtype=torch.float16)
    c = torch.empty(40, 24, device=device, dtype=torch.float16)
    candidates = [TileConfig(16, 16, 16, 1, 1), TileConfig(32, 32, 32, 1, 1)]
    best = autotune(a, b, c, candidates)
    timings = autotune_log[next(k for k in autotune_log if k[:3] == (40, 24, 32))]
    assert [cfg for cfg, _ in timings] == candidates
    assert best == min(((t, cfg) for cfg, t in timings if t is not None), key=lambda x: x[0])[1]
    torch.testing.assert_close(c, matmul_reference(a, b), **TOLERANCES[torch.float16])


def test_autotune_leaves_out_a_config_whose_output_is_wrong():
    from labkit.kernels import fastest

    y = torch.zeros(4)  # one output buffer shared by every config, as the kernels' wrappers do

    def run(name):
        if name in ("right", "also right"):
            y.fill_(1.0)
        elif name == "wrong":
            y.fill_(2.0)
        elif name == "half written":
            y[:2] = 1.0
        return y  # "writes nothing": leaves whatever the previous config wrote

    check = lambda out: bool(torch.allclose(out, torch.ones(4)))  # noqa: E731
    names = ["wrong", "right", "writes nothing", "half written", "also right"]
    with pytest.warns(UserWarning, match="gives a wrong output"):
        best, timings = fastest(names, run, torch.device("cpu"), check)
    timed = {name for name, seconds in timings if seconds is not None}
    assert timed == {"right", "also right"}  # stale numbers from an earlier config do not pass
    assert best in timed
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 2 .*2 gave wrong outputs"):
        fastest(["wrong", "writes nothing"], run, torch.device("cpu"), check)


def test_a_triton_too_old_for_the_kernels_is_left_unused(monkeypatch):
    """Triton 3.1's interpreter computes garbage with numpy 2: an older Triton than MIN_TRITON runs the references."""
    x = torch.randn(4, 4)
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(kernels, "triton_version", lambda: (3, 1))
    kernels.triton_usable.cache_clear()
    try:
        with pytest.warns(UserWarning, match="older than 3.2"):
            assert not kernels.triton_usable()
        assert kernels.choose_backend("auto", x) == "reference"
        with pytest.raises(ValueError, match=r"3\.2 or newer \(found: 3\.1\)"):
            kernels.choose_backend("triton", x)
        assert not kernels.tma_supported(x) and not kernels.triton_at_least(kernels.MIN_TRITON_PDL)
    finally:
        kernels.triton_usable.cache_clear()
    monkeypatch.setattr(kernels, "triton_version", lambda: (3, 5))
    assert kernels.triton_at_least(kernels.MIN_TRITON_PDL) and not kernels.triton_at_least(kernels.MIN_TRITON_TMA_INTERPRETER)


def test_flash_attention_masks_with_a_floor_not_an_offset():
    # a masked key with a huge score must not come back: masked scores are set to -1e6, not shifted by it (shifted,
    # key 1's 1.4e6 in log2 units would still be +4e5 and beat the visible key 0's -5.4e4)
    from labkit.kernels.flash_attention import flash_attention_reference, flash_attention_triton

    q = torch.zeros(1, 1, 2, 16)
    k = torch.zeros(1, 1, 2, 16)
    q[0, 0, 0, 0], k[0, 0, 0, 0], k[0, 0, 1, 0] = 100.0, -1500.0, 40000.0  # query 0 sees key 0 only
    v = torch.randn(1, 1, 2, 16, generator=torch.Generator().manual_seed(0))
    expected = flash_attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(flash_attention_triton(q, k, v, causal=True), expected, rtol=1e-4, atol=1e-4)


def test_launch_configs_and_head_dim_are_checked_by_name():
    from labkit.kernels.flash_attention import AttentionConfig, flash_attention

    for bad, match in ((dict(block_m=24), "block_m must be a power of two"), (dict(block_m=0), "block_m"),
                       (dict(num_warps=3), "num_warps"), (dict(num_stages=0), "num_stages")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            AttentionConfig(**{**dict(block_m=64, block_n=64, num_stages=2, num_warps=4), **bad})
        with pytest.raises(ValueError, match=match.replace("block_m", "block_m")):
            TileConfig(**{**dict(block_m=64, block_n=64, block_k=32, num_stages=2, num_warps=4), **bad})
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        flash_attention(*(torch.zeros(1, 1, 4, 0) for _ in range(3)), backend="triton")
