"""Sparse attention equals dense masked attention; the flash kernel equals its reference; LabGPT backends."""

import pytest
import torch
import torch.nn.functional as F

from labkit import check, kernels, sparse
from labkit.kernels.flash_attention import (
    AttentionConfig,
    attention_mask,
    autotune,
    autotune_log,
    flash_attention,
    flash_attention_blockwise,
    flash_attention_reference,
    flash_attention_triton,
    tma_possible,
    tuning_key,
)
from labkit.model import LabGPT, get_config
from labkit.solutions import sparse as solutions

FP32 = dict(rtol=1e-5, atol=1e-5)  # the bar: fp32 results equal to 1e-5


def qkv(B, H, T, S, D, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


@pytest.fixture
def one_thread():
    """Tiny decode steps gain nothing from a second thread, and on a shared CPU each op would wait for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_with(mask_full, q, k, v):
    """The oracle: SDPA under the last T rows of an (S, S) mask (the queries are the newest positions)."""
    T, S = q.size(2), k.size(2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_full[S - T :])


# ---------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------
def test_sliding_window_mask_rows_see_exactly_the_window():
    mask = sparse.sliding_window_mask(10, 3)
    for i in range(10):
        assert mask[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
    assert torch.equal(sparse.sliding_window_mask(7, 7), torch.ones(7, 7, dtype=torch.bool).tril())


def test_strided_mask_is_the_union_of_the_two_sparse_transformer_heads():
    T, stride = 20, 4
    mask = sparse.strided_mask(T, stride)
    for i in range(T):
        expected = {j for j in range(max(0, i - stride + 1), i + 1)} | set(range(i % stride, i + 1, stride))
        assert set(mask[i].nonzero().flatten().tolist()) == expected


def test_block_mask_expands_the_layout_with_global_blocks():
    layout = sparse.block_layout(5, local_blocks=2, global_blocks=1)
    assert layout.tolist()[4] == [True, False, False, True, True]  # global block 0, local blocks 3 and 4
    mask = sparse.block_sparse_mask(18, block_size=4, local_blocks=2, global_blocks=1)
    assert mask.shape == (18, 18)
    assert mask[17].nonzero().flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17]
    assert not mask.triu(1).any()  # causal


def test_pattern_mask_dispatches_and_density_counts_causal_pairs():
    assert torch.equal(sparse.pattern_mask("local", 9, window=2), sparse.sliding_window_mask(9, 2))
    assert torch.equal(sparse.pattern_mask("strided", 9, stride=3), sparse.strided_mask(9, 3))
    assert sparse.density(torch.ones(8, 8, dtype=torch.bool).tril()) == 1.0
    assert sparse.density(sparse.sliding_window_mask(8, 1)) == pytest.approx(8 / 36)


def test_plot_masks_draws_one_panel_per_pattern():
    import matplotlib

    matplotlib.use("Agg")
    fig = sparse.plot_masks({p: sparse.pattern_mask(p, 32) for p in sparse.PATTERNS})
    assert len(fig.axes) == 3 and "of causal pairs" in fig.axes[0].get_title()


# ---------------------------------------------------------------------------------------
# O(n·k) attention equals dense masked attention
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B, H, T, S, D, window, block",
    [
        (2, 3, 200, 200, 16, 37, None),  # T not a multiple of the block
        (1, 2, 77, 77, 8, 5, 16),
        (1, 2, 64, 64, 32, 64, None),  # window = T: dense causal
        (1, 1, 50, 50, 8, 300, None),  # window longer than the sequence
        (1, 1, 100, 100, 4, 1, None),  # each query sees only itself
        (2, 2, 1, 50, 8, 7, None),  # one decode step with a cache
        (1, 2, 5, 130, 8, 300, None),  # a few new tokens after a long cache
        (1, 2, 33, 64, 8, 16, 8),  # a chunk of queries, window shorter than the cache
    ],
)
def test_sliding_window_attention_equals_dense_masked(B, H, T, S, D, window, block):
    q, k, v = qkv(B, H, T, S, D, seed=T + S)
    expected = dense_with(sparse.sliding_window_mask(S, window), q, k, v)
    torch.testing.assert_close(sparse.sliding_window_attention(q, k, v, window, block), expected, **FP32)


def test_block_sparse_small_chunks_equal_one_chunk(monkeypatch):
    q, k, v = qkv(1, 2, 150, 150, 16)
    layout = sparse.block_layout(10, 3, 1)
    whole = sparse.block_sparse_attention(q, k, v, layout, 16)
    monkeypatch.setattr(sparse, "CHUNK_BYTES", 1)  # one query block per step
    torch.testing.assert_close(sparse.block_sparse_attention(q, k, v, layout, 16), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "T, S, block, local, n_global",
    [(200, 200, 16, 2, 1), (77, 77, 10, 3, 0), (1, 50, 7, 2, 1), (5, 130, 16, 1, 2), (33, 64, 8, 2, 1)],
)
def test_block_sparse_attention_equals_dense_masked(T, S, block, local, n_global):
    q, k, v = qkv(2, 2, T, S, 16, seed=S)
    layout = sparse.block_layout(-(-S // block), local, n_global)
    expected = dense_with(sparse.block_sparse_mask(S, block, local, n_global), q, k, v)
    torch.testing.assert_close(sparse.block_sparse_attention(q, k, v, layout, block), expected, **FP32)


def test_block_sparse_attention_with_a_random_non_causal_layout():
    g = torch.Generator().manual_seed(3)
    layout = torch.rand(6, 6, generator=g) < 0.4
    layout |= torch.eye(6, dtype=torch.bool)
    q, k, v = qkv(1, 2, 45, 45, 8)
    mask = layout.repeat_interleave(8, 0).repeat_interleave(8, 1)[:45, :45]
    out = sparse.block_sparse_attention(q, k, v, layout, 8, causal=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **FP32)


def test_a_banded_layout_equals_the_sliding_window_on_block_boundaries():
    q, k, v = qkv(1, 2, 96, 96, 16)
    layout = sparse.block_layout(6, local_blocks=2, global_blocks=0)  # query block sees its block and the one before
    blockwise = sparse.block_sparse_attention(q, k, v, layout, 16)
    torch.testing.assert_close(blockwise[:, :, 16::16], sparse.sliding_window_attention(q, k, v, 17)[:, :, 16::16])


def test_gradients_equal_dense_masked_attention():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 40, 40, 8))
    sparse.sliding_window_attention(q, k, v, 9).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dense_with(sparse.sliding_window_mask(40, 9), q, k, v).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, **FP32)


def test_half_precision_runs_and_is_close():
    q, k, v = qkv(1, 2, 70, 70, 16, dtype=torch.bfloat16)
    expected = dense_with(sparse.sliding_window_mask(70, 12), q.float(), k.float(), v.float())
    out = sparse.sliding_window_attention(q, k, v, 12)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 has 8 bits of mantissa


# ---------------------------------------------------------------------------------------
# LabGPT backends
# ---------------------------------------------------------------------------------------
def test_sliding_backend_with_a_window_covering_the_sequence_gives_sdpa_logits(nano):
    idx = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nano(idx)
        sparse.use_sliding_window(nano, 64)
        assert nano.config.attention == "sliding-64"
        torch.testing.assert_close(nano(idx), expected, **FP32)
        sparse.use_block_sparse(nano, block_size=8, local_blocks=5, global_blocks=0)  # 5 blocks of 8 = all 40
        torch.testing.assert_close(nano(idx), expected, **FP32)


def test_a_short_window_changes_the_logits_beyond_the_window(nano):
    idx = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = nano(idx)
        sparse.use_sliding_window(nano, 4)
        local = nano(idx)
    torch.testing.assert_close(local[:, :4], dense[:, :4], **FP32)  # the first 4 queries see everything anyway
    assert not torch.allclose(local[:, 10:], dense[:, 10:], atol=1e-4)


@pytest.mark.parametrize("use", [lambda m: sparse.use_sliding_window(m, 6), lambda m: sparse.use_block_sparse(m, 4)])
def test_kv_cache_generation_equals_no_cache_generation(nano, use, one_thread):
    use(nano)
    prompt = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    cached = nano.generate(prompt, 14, temperature=0, use_cache=True)  # 25 tokens: well past the window
    uncached = nano.generate(prompt, 14, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # and the logits of a cached forward equal the full forward's
        cache = nano.new_cache(2)
        nano(cached[:, :17], cache=cache)
        step = nano(cached[:, 17:25], cache=cache)
        torch.testing.assert_close(step, nano(cached[:, :25])[:, 17:], **FP32)


def test_flash_backend_gives_sdpa_logits(nano):
    idx = torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = nano(idx)
        nano.set_attention("flash")
        torch.testing.assert_close(nano(idx), expected, **FP32)


def test_the_default_sliding_backend_is_registered():
    model = LabGPT(get_config("nano", attention="sliding"))
    assert model.config.attention == "sliding"


# ---------------------------------------------------------------------------------------
# The Triton kernel against its reference (interpreter on CPU, CUDA when present)
# ---------------------------------------------------------------------------------------
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not (kernels.interpreting() and kernels.triton_at_least(kernels.MIN_TRITON)), reason="needs TRITON_INTERPRET=1 and triton >= 3.2")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
# the interpreter upcasts to fp32, a GPU rounds the softmax weights to 16 bits before p @ v
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
KERNEL_CASES = [  # T, S, D, causal, window
    (37, 37, 16, True, None),  # ragged last query block
    (64, 64, 16, True, None),
    (50, 50, 8, True, 9),  # window, head dim padded to 16
    (7, 40, 16, True, None),  # queries after a cache
    (1, 45, 16, True, 5),  # one decode step in a window
    (33, 33, 32, False, None),
    (20, 30, 24, False, None),  # head dim 24 padded to 32
    (96, 96, 16, True, 40),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, S, D, causal, window", KERNEL_CASES)
def test_flash_kernel_matches_reference(device, dtype, T, S, D, causal, window):
    q, k, v = qkv(2, 2, T, S, D, seed=T * S + D, dtype=dtype, device=device)
    out = flash_attention(q, k, v, causal=causal, window=window, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, flash_attention_reference(q, k, v, causal, window), **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, S, D, causal, window", KERNEL_CASES)
def test_flash_kernel_with_tma_loads_matches_reference(device, dtype, T, S, D, causal, window):
    """K and V through tensor descriptors over (B·H·S, D): a tile past one head's last key holds
    the next head's rows, which the kernel must mask out of the scores and the values."""
    q, k, v = qkv(2, 2, T, S, D, seed=T * S + D + 1, dtype=dtype, device=device)
    k[0, 1, :] = float("inf")  # the head after (0, 0): its rows must never reach (0, 0)'s output
    v[0, 1, :] = float("nan")
    if not tma_possible(k, v):
        pytest.skip("no TMA on this GPU (compute capability < 9.0)")
    out = flash_attention_triton(q, k, v, causal, window, AttentionConfig(16, 16, 1, 1, tma=True))
    expected = flash_attention_reference(q, k, v, causal, window)
    torch.testing.assert_close(out[0, 0], expected[0, 0], **TOLERANCES[dtype])
    torch.testing.assert_close(out[1], expected[1], **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [AttentionConfig(32, 16, 1, 1), AttentionConfig(16, 32, 1, 1)])
def test_flash_kernel_block_shapes_and_strided_inputs(device, config):
    q, k, v = qkv(1, 3, 45, 45, 16, device=device)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory, as a model's qkv split gives
    for window in (None, 11):
        out = flash_attention_triton(q, k, v, True, window, config)
        torch.testing.assert_close(out, flash_attention_reference(q, k, v, True, window), **FP32)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_autotune_times_every_config_and_keeps_the_fastest(device):
    q, k, v = qkv(1, 2, 40, 40, 16, device=device)
    out = torch.empty_like(q)
    candidates = [AttentionConfig(16, 16, 1, 1), AttentionConfig(32, 16, 1, 1)]
    best = autotune(q, k, v, out, True, 8, 0.25, candidates)
    timings = autotune_log[tuning_key(q, k, True, 8)]
    assert [cfg for cfg, _ in timings] == candidates
    assert best == min(((t, cfg) for cfg, t in timings if t is not None), key=lambda x: x[0])[1]
    torch.testing.assert_close(out, flash_attention_reference(q, k, v, True, 8), **FP32)


@pytest.mark.parametrize("causal, window", [(True, None), (True, 10), (False, None)])
def test_blockwise_online_softmax_equals_the_reference(causal, window):
    q, k, v = qkv(1, 2, 45, 45 if causal else 60, 8)
    expected = flash_attention_reference(q, k, v, causal, window)
    torch.testing.assert_close(flash_attention_blockwise(q, k, v, causal, window, 16, 8), expected, **FP32)


def test_reference_equals_sdpa_and_the_sparse_module():
    q, k, v = qkv(1, 2, 60, 60, 16)
    torch.testing.assert_close(
        flash_attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True), **FP32
    )
    torch.testing.assert_close(
        flash_attention_reference(q, k, v, window=13), sparse.sliding_window_attention(q, k, v, 13), **FP32
    )
    assert torch.equal(attention_mask(60, 60, window=13), sparse.sliding_window_mask(60, 13))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def test_bad_input_is_a_value_error_that_names_it():
    q, k, v = qkv(1, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sparse.sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        sparse.sliding_window_attention(q, k, v, 4, block_size=0)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        sparse.block_sparse_attention(q, k, v, sparse.block_layout(2), 0)
    with pytest.raises(ValueError, match=r"layout must be a \(2, 2\) bool"):
        sparse.block_sparse_attention(q, k, v, sparse.block_layout(3), 8)
    with pytest.raises(ValueError, match="diagonal"):
        sparse.block_sparse_attention(q, k, v, torch.zeros(2, 2, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="4-D"):
        sparse.sliding_window_attention(q[0], k[0], v[0], 4)
    with pytest.raises(ValueError, match="same B, H, D"):
        sparse.sliding_window_attention(q, k[..., :4], v[..., :4], 4)
    with pytest.raises(ValueError, match="queries are the last positions"):
        sparse.sliding_window_attention(torch.zeros(1, 2, 20, 8), k, v, 4)
    with pytest.raises(ValueError, match="pattern must be one of"):
        sparse.pattern_mask("diagonal", 8)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        sparse.pattern_mask("strided", 8, stride=0)
    with pytest.raises(ValueError, match="global_blocks must be an int >= 0"):
        sparse.block_layout(4, 2, -1)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sparse.use_sliding_window(LabGPT(get_config("nano")), 0)
    with pytest.raises(ValueError, match="q_offset must equal"):
        sparse.sliding_backend(4)(q, k, v, 3)


def test_kernel_bad_input_is_a_value_error():
    q, k, v = qkv(1, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        flash_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="window needs causal=True"):
        flash_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="dtypes must match"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="dtypes must match"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="last positions"):
        flash_attention(torch.zeros(1, 2, 20, 8), k, v)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, backend="cuda-magic")
    with pytest.raises(ValueError, match="forward-only"):
        flash_attention(q.requires_grad_(), k, v, backend="triton")


def test_flash_attention_takes_the_differentiable_path_when_gradients_are_needed():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20, 20, 8))
    flash_attention(q, k, v).sum().backward()  # "auto": the reference, even where the kernel could run
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ---------------------------------------------------------------------------------------
# The exercise
# ---------------------------------------------------------------------------------------
def test_window_mask_checker_accepts_the_solution_and_rejects_an_off_by_one(capsys):
    assert check.window_mask(solutions.window_mask)
    assert not check.window_mask(lambda T, w: torch.ones(T, T, dtype=torch.bool).tril().triu(-w))  # w+1 keys
    assert not check.window_mask(lambda T, w: sparse.sliding_window_mask(T, w).float())  # not bool
    out = capsys.readouterr().out
    assert out.count("PASS window_mask") == 1 and out.count("NOT YET window_mask") == 2 and "hint" in out
