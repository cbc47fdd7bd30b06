"""The fused decoding kernels against their PyTorch references (and the references against PyTorch's own ops),
under the Triton interpreter on CPU and on CUDA when present; the fused decode step against LabGPT's."""

import math

import pytest
import torch
import torch.nn.functional as F

from labkit import kernels, load_model, serving
from labkit.kernels import decode_kernels as dk
from labkit.kernels.quant_kernels import GemvConfig
from labkit.model import LabGPT, get_config

triton_params = [
    pytest.param("cpu", marks=pytest.mark.skipif(not (kernels.interpreting() and kernels.triton_at_least(kernels.MIN_TRITON)), reason="needs TRITON_INTERPRET=1 and triton >= 3.2")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
requires_triton = pytest.mark.skipif(not kernels.triton_installed(), reason="needs triton")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cache(rows=2, heads=3, positions=40, hs=8, dtype=torch.float32, device="cpu", seed=0):
    g = _gen(seed)
    k = torch.randn(rows, heads, positions, hs, generator=g).to(device, dtype)
    v = torch.randn(rows, heads, positions, hs, generator=g).to(device, dtype)
    return k, v


# ------------------------------------------------------------------ the references are right
def test_attention_reference_merged_equals_sdpa_over_the_visible_keys():
    k, v = _cache()
    qkv = torch.randn(2, 3 * 24, generator=_gen(1))
    pos = torch.tensor([5, 37])
    for splits in (1, 2, 8):
        y = dk.merge_attention(dk.decode_attention_reference(qkv, k, v, pos, 3, splits))
        for b in range(2):
            q = qkv[b, :24].view(3, 1, 8)
            ref = F.scaled_dot_product_attention(q, k[b, :, : pos[b] + 1], v[b, :, : pos[b] + 1])
            torch.testing.assert_close(y[b], ref.flatten(), rtol=1e-5, atol=1e-6)


def test_linear_reference_equals_layernorm_linear_gelu_and_writes_the_cache():
    g = _gen(2)
    x, w, b = torch.randn(2, 24, generator=g), torch.randn(72, 24, generator=g), torch.randn(72, generator=g)
    ln = (torch.randn(24, generator=g), torch.randn(24, generator=g), 1e-5)
    ref = F.linear(F.layer_norm(x, (24,), ln[0], ln[1], 1e-5), w, b)
    torch.testing.assert_close(dk.decode_linear(x, w, b, ln=ln, backend="reference"), ref)
    torch.testing.assert_close(dk.decode_linear(x, w, b, gelu=True, backend="reference"),
                               F.gelu(F.linear(x, w, b), approximate="tanh"))  # fmt: skip
    k, v = torch.zeros(2, 3, 10, 8), torch.zeros(2, 3, 10, 8)
    pos = torch.tensor([0, 9])
    y = dk.decode_linear(x, w, b, kv=(k, v, pos), backend="reference")
    for row in range(2):
        assert torch.equal(k[row, :, pos[row]], y[row, 24:48].view(3, 8))
        assert torch.equal(v[row, :, pos[row]], y[row, 48:].view(3, 8))
    assert k.abs().sum() == y[:, 24:48].abs().sum()  # nothing else written
    out = torch.ones(2, 72)
    assert dk.decode_linear(x, w, b, out=out, backend="reference") is out
    torch.testing.assert_close(out, 1 + F.linear(x, w, b))


# ------------------------------------------------------------------ kernels vs references
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-3, atol=2e-3)}


@requires_triton
@pytest.mark.parametrize("device", triton_params)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["plain", "ln", "ln_gelu", "out", "out_split_k", "kv", "parts", "prefetch_ln",
                                  "prefetch_parts"])
def test_decode_linear_kernel_matches_reference(device, dtype, mode):
    g = _gen(3)
    B, K, N = 2, 48, 72  # K is not a multiple of the interpreter's 32-wide blocks: the edges are masked
    x = torch.randn(B, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype)
    kw = {}
    if "ln" in mode:
        kw["ln"] = (torch.randn(K, generator=g).to(device, dtype), torch.randn(K, generator=g).to(device, dtype), 1e-5)
        x = x * 3 + 2  # a mean and a spread the normalization must remove
    if mode == "ln_gelu":
        kw["gelu"] = True
    if mode.endswith("parts"):
        k, v = _cache(B, 6, 30, 8, dtype, device)
        qkv = torch.randn(B, 3 * K, generator=g).to(device)
        x = dk.decode_attention_reference(qkv, k, v, torch.tensor([3, 29], device=device), 6, 4)
    if mode == "kv":
        w, b = w[:48], b[:48]  # 48 outputs: q, k and v of 2 heads x 8
        kv_ref = [torch.zeros(B, 2, 12, 8, device=device, dtype=dtype) for _ in range(2)]
        kv_new = [t.clone() for t in kv_ref]
        pos = torch.tensor([0, 11], device=device)
        kw_ref, kw_new = dict(kw, kv=(*kv_ref, pos)), dict(kw, kv=(*kv_new, pos))
    else:
        kw_ref = kw_new = kw
    config = GemvConfig(8, 32, 3 if mode == "out_split_k" else 1, 1, 1)  # 3 K-slices: two full, one partial
    if mode.startswith("prefetch"):
        config = GemvConfig(8, 64, 1, 1, 1)  # one 64-wide tile covers K = 48: loaded whole, before the wait
    if mode.startswith("out"):
        start = torch.randn(B, N, generator=g).to(device)
        kw_ref, kw_new = dict(kw, out=start.clone()), dict(kw, out=start.clone())
    ref = dk.decode_linear(x, w, b, backend="reference", **kw_ref)
    got = dk.decode_linear(x, w, b, backend="triton", config=config, **kw_new)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    if mode == "kv":
        cache_tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)  # one bf16 ulp
        for r, n in zip(kv_ref, kv_new):
            torch.testing.assert_close(n, r, **cache_tol)


@requires_triton
@pytest.mark.parametrize("device", triton_params)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_decode_attention_kernel_matches_reference(device, dtype, splits):
    k, v = _cache(3, 2, 70, 12, dtype, device, seed=4)  # head size 12: not a power of two
    qkv = torch.randn(3, 3 * 24, generator=_gen(5)).to(device)
    pos = torch.tensor([0, 16, 69], device=device)  # one key; a split boundary; the whole cache
    ref = dk.decode_attention_reference(qkv, k, v, pos, 2, splits)
    got = dk.decode_attention(qkv, k, v, pos, 2, splits, backend="triton")
    assert torch.equal(got.m.isinf(), ref.m.isinf())  # the same splits are empty
    finite = ~ref.m.isinf()
    torch.testing.assert_close(got.m[finite], ref.m[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.denom, ref.denom, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.acc, ref.acc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dk.merge_attention(got), dk.merge_attention(ref), rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("device", triton_params)
def test_embed_kernel_matches_reference_and_clamps_at_the_context_end(device):
    g = _gen(6)
    wte, wpe = torch.randn(50, 40, generator=g).to(device), torch.randn(16, 40, generator=g).to(device)
    tokens = torch.tensor([3, 49, 0], device=device)
    length = torch.tensor([0, 7, 16], device=device)
    x_ref, pos_ref = dk.embed(tokens, length.clone(), wte, wpe, backend="reference")
    moved = length.clone()
    x, pos = dk.embed(tokens, moved, wte, wpe, backend="triton")
    torch.testing.assert_close(x, x_ref)
    assert pos.tolist() == pos_ref.tolist() == [0, 7, 15]
    assert moved.tolist() == [1, 8, 16]


@requires_triton
@pytest.mark.parametrize("device", triton_params)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_t", [16, 32, 128])  # earlier positions in the prefetched tile and a loop; all in it
def test_attention_proj_kernel_matches_reference_and_sdpa(device, dtype, block_t):
    k, v = _cache(3, 2, 70, 12, dtype, device, seed=8)
    g = _gen(9)
    qkv = torch.randn(3, 72, generator=g).to(device)
    w = (torch.randn(40, 24, generator=g) / 5).to(device, dtype)
    b = torch.randn(40, generator=g).to(device, dtype)
    pos = torch.tensor([0, 16, 69], device=device)
    start = torch.randn(3, 40, generator=g).to(device)
    ref = dk.decode_attention_proj(qkv, k, v, pos, 2, w, b, start.clone(), backend="reference")
    got = dk.decode_attention_proj(qkv, k, v, pos, 2, w, b, start.clone(), backend="triton",
                                   config=dk.AttentionProjConfig(32, block_t, 1))  # fmt: skip
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for row in range(3):  # the oracle: PyTorch's attention over the visible keys, then the projection
        n = int(pos[row]) + 1
        att = F.scaled_dot_product_attention(qkv[row, :24].view(2, 1, 12), k[row, :, :n].float(), v[row, :, :n].float())
        torch.testing.assert_close(ref[row], start[row] + F.linear(att.flatten(), w.float(), b.float()),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


@requires_triton
@pytest.mark.parametrize("device", triton_params)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [
    dk.MLPConfig(8, 32, 1), dk.MLPConfig(8, 64, 1),  # a loop along C; one tile
    dk.MLPConfig(8, 64, 1, True),  # the row as two tiles, 32 + 16 columns
    # hidden units dealt over the interpreter's 4 "SMs" (on a GPU, its own count): 24 of a block of 32 (8 programs);
    # 10 of 16, the last program with 2 (20 programs), with a tail, and with a loop along C (no tail there)
    dk.MLPConfig(32, 64, 1, True, 2), dk.MLPConfig(16, 64, 1, True, 5), dk.MLPConfig(16, 32, 1, True, 5),
])  # fmt: skip
def test_mlp_kernel_matches_reference_and_labgpts_block(device, dtype, config):
    torch.manual_seed(10)
    model = LabGPT(get_config("nano", n_embd=48, n_head=4)).to(device, dtype)
    block = model.transformer.h[0]
    with torch.no_grad():
        block.ln_2.weight.normal_()
        block.ln_2.bias.normal_()
    x = (torch.randn(2, 48, generator=_gen(11)) * 2 + 1).to(device)
    ln = (block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    mlp = block.mlp
    args = (ln, mlp.c_fc.weight, mlp.c_fc.bias, dk.transposed_weight(mlp.c_proj), mlp.c_proj.bias)
    ref = dk.decode_mlp(x, *args, torch.zeros(2, 48, device=device), backend="reference")
    got = dk.decode_mlp(x, *args, torch.zeros(2, 48, device=device), backend="triton", config=config)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    with torch.no_grad():  # the oracle: LabGPT's own modules, in fp32
        oracle = x + mlp.float()(block.ln_2.float()(x))
    torch.testing.assert_close(ref, oracle, rtol=1e-4, atol=1e-4)


@requires_triton
@pytest.mark.parametrize("device", triton_params)
def test_decode_linear_zeroes_the_spare_buffer(device):
    g = _gen(12)
    x, w = torch.randn(2, 16, generator=g).to(device), torch.randn(48, 16, generator=g).to(device)
    for backend in ("reference", "triton"):
        spare = torch.randn(2, 16, generator=g).to(device)
        y = dk.decode_linear(x, w, zero=spare, backend=backend)
        assert torch.equal(spare, torch.zeros_like(spare))
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("device", triton_params)
@pytest.mark.parametrize("config", [
    dk.MLPConfig(8, 64, 1, True),  # a width of 44 as 32 + 16 columns: the tail tile partly masked
    dk.MLPConfig(16, 64, 1, False, 3),  # one tile, units dealt out: 15 of 16 rows (12 programs, the last with 11)
    dk.MLPConfig(16, 64, 1, True, 3),  # both
])  # fmt: skip
def test_mlp_kernel_with_a_partial_tail(device, config):
    g = _gen(13)
    C, hidden = 44, 176
    x = (torch.randn(2, C, generator=g) * 2 + 1).to(device)
    ln = (torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device), 1e-5)
    fc_w, fc_b = (torch.randn(hidden, C, generator=g) / 6).to(device), torch.randn(hidden, generator=g).to(device)
    pt_w, pt_b = (torch.randn(hidden, C, generator=g) / 12).to(device), torch.randn(C, generator=g).to(device)
    ref = dk.decode_mlp(x, ln, fc_w, fc_b, pt_w, pt_b, torch.zeros(2, C, device=device), backend="reference")
    got = dk.decode_mlp(x, ln, fc_w, fc_b, pt_w, pt_b, torch.zeros(2, C, device=device), backend="triton", config=config)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mlp_launch_tiles_and_units():
    # GPT-2-small's MLP on 132 SMs: 768 columns as 512 + 256; 24 hidden units a program, 128 programs
    assert dk.mlp_launch(dk.MLPConfig(32, 1024, 8, True, 1), 768, 3072, 132) == (
        128, dict(BLOCK_H=32, BLOCK_K=512, BLOCK_R=256, UNITS=24, PREFETCH=True))
    assert dk.mlp_launch(dk.MLPConfig(32, 1024, 8), 768, 3072, 132) == (
        96, dict(BLOCK_H=32, BLOCK_K=1024, BLOCK_R=0, UNITS=32, PREFETCH=True))
    assert dk.mlp_launch(dk.MLPConfig(8, 1024, 4, True), 1024, 4096, 132)[1]["BLOCK_R"] == 0  # a power of two: one tile
    assert dk.mlp_launch(dk.MLPConfig(8, 1024, 4, True), 192, 768, 132)[1] == dict(
        BLOCK_H=8, BLOCK_K=128, BLOCK_R=64, UNITS=8, PREFETCH=True)
    assert dk.mlp_launch(dk.MLPConfig(8, 256, 4, True), 768, 3072, 132)[1]["BLOCK_R"] == 0  # a loop: no tail
    assert dk.mlp_launch(dk.MLPConfig(8, 1024, 4, True), 600, 2400, 132)[1]["BLOCK_K"] == 512  # 600 = 512 + 88 ...
    assert dk.mlp_launch(dk.MLPConfig(8, 1024, 4, True), 600, 2400, 132)[1]["BLOCK_R"] == 128  # ... in 128
    with pytest.raises(ValueError, match="block_h"):  # 3072 units over 132 SMs is 24 a program: more than 16
        dk.mlp_launch(dk.MLPConfig(16, 1024, 4, True, 1), 768, 3072, 132)


def test_transposed_weight_is_made_once_per_weight_version():
    linear = torch.nn.Linear(4, 6)
    t1 = dk.transposed_weight(linear)
    assert torch.equal(t1, linear.weight.t()) and t1.is_contiguous()
    assert dk.transposed_weight(linear) is t1
    with torch.no_grad():
        linear.weight.mul_(2)
    assert torch.equal(dk.transposed_weight(linear), linear.weight.t())


# ------------------------------------------------------------------ the whole step
def _decode(model, step, prompt, n):
    cache = serving.SlotCache(model, 1)
    tok = cache.admit(model, 0, prompt).argmax().view(1)
    out = [int(tok)]
    for _ in range(n - 1):
        tok = step(cache, tok).argmax(-1)
        out.append(int(tok))
    return out


@pytest.mark.parametrize("kernels_per_layer", [3, 5])
def test_fused_step_reference_decodes_tinys_greedy_tokens(kernels_per_layer):
    model, tok = load_model("tiny")
    prompt = tok.encode("Q: 12 + 30 = ")
    step = lambda c, t: serving.fused_decode_step(model, c, t, kernels_per_layer, backend="reference")  # noqa: E731
    fused = _decode(model, step, prompt, 40)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), 40, temperature=0)[0, len(prompt) :].tolist()
    assert fused == ref


@requires_triton
@pytest.mark.parametrize("device", triton_params)
@pytest.mark.parametrize("kernels_per_layer", [3, 5])
def test_fused_step_kernels_equal_decode_step(device, kernels_per_layer):
    torch.manual_seed(0)
    model = LabGPT(get_config("nano")).to(device).eval()
    caches = [serving.SlotCache(model, 2) for _ in range(2)]
    for cache in caches:
        cache.admit(model, 0, [1, 5, 7])
        cache.admit(model, 1, list(range(20, 40)))  # rows at different positions
    tokens = torch.tensor([4, 9], device=device)
    for _ in range(6):  # row 0 leaves its second split empty, row 1 fills both
        ref = serving.decode_step(model, caches[0], slice(None), tokens)
        got = serving.fused_decode_step(model, caches[1], tokens, kernels_per_layer, splits=2, backend="triton")
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        tokens = ref.argmax(-1)
    assert torch.equal(caches[0].length, caches[1].length)
    for layer in range(2):
        torch.testing.assert_close(caches[1].k[layer], caches[0].k[layer], rtol=1e-5, atol=1e-5)


def test_decode_kernels_bad_input():
    x, w = torch.randn(2, 8), torch.randn(12, 8)
    with pytest.raises(ValueError, match="x must have 8 columns"):
        dk.decode_linear(torch.randn(2, 7), w)
    with pytest.raises(ValueError, match="gelu and out"):
        dk.decode_linear(x, w, gelu=True, out=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="out must be"):
        dk.decode_linear(x, w, out=torch.zeros(2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        dk.decode_linear(x, w, torch.zeros(5))
    k, v = _cache(2, 2, 10, 2)
    with pytest.raises(ValueError, match="splits"):
        dk.decode_attention(x[:, :6].repeat(1, 2), k, v, torch.tensor([1, 2]), 2, splits=3)
    with pytest.raises(ValueError, match="pos"):
        dk.decode_attention(x[:, :6].repeat(1, 2), k, v, torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="n_head"):
        dk.decode_attention(x[:, :6].repeat(1, 2), k, v, torch.tensor([1, 2]), 5)
    model = LabGPT(get_config("nano")).eval()
    cache = serving.SlotCache(model, 1)
    with pytest.raises(ValueError, match="one entry per cache slot"):
        serving.fused_decode_step(model, cache, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="kernels_per_layer"):
        serving.fused_decode_step(model, cache, torch.tensor([1]), kernels_per_layer=4)
    mlp = model.transformer.h[0].mlp
    ln = (torch.ones(32), torch.zeros(32), 1e-5)
    x = torch.randn(1, 32)
    with pytest.raises(ValueError, match="out must not overlap x"):
        dk.decode_mlp(x, ln, mlp.c_fc.weight, mlp.c_fc.bias, dk.transposed_weight(mlp.c_proj), mlp.c_proj.bias, x)
    both = torch.zeros(2, 32)  # out and x in one buffer, one row apart: no overlap, allowed
    dk.decode_mlp(both[:1], ln, mlp.c_fc.weight, mlp.c_fc.bias, dk.transposed_weight(mlp.c_proj), mlp.c_proj.bias,
                  both[1:])  # fmt: skip
    residual = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="out must not overlap x"):  # the residual add into its own input
        dk.decode_linear(residual, torch.randn(32, 32), out=residual)
    with pytest.raises(ValueError, match="zero must not overlap"):
        dk.decode_linear(x, torch.randn(32, 32), zero=x)
    qkv = torch.randn(1, 96)
    with pytest.raises(ValueError, match="out must not overlap qkv"):
        dk.decode_attention_proj(qkv, *_cache(1, 2, 10, 16), torch.tensor([3]), 2, torch.randn(32, 32), None, qkv[:, :32])
    with pytest.raises(ValueError, match="pos must be a contiguous"):
        dk.decode_attention(qkv.repeat(2, 1), *_cache(2, 2, 10, 16), torch.tensor([3, 0, 1, 0])[::2], 2)
    with pytest.raises(ValueError, match="name must be one of"):
        dk.gpu_spec("matmul_kernel")
    for bad in ([3, 10], [-1, 0]):  # past the cache's 10 positions, or before the first
        with pytest.raises(ValueError, match=r"pos must lie in \[0, 10\)"):
            dk.decode_attention(qkv.repeat(2, 1), *_cache(2, 2, 10, 16), torch.tensor(bad), 2)
        with pytest.raises(ValueError, match=r"pos must lie in \[0, 10\)"):
            dk.decode_linear(torch.randn(2, 32), torch.randn(96, 32), kv=(*_cache(2, 2, 10, 16), torch.tensor(bad)))
    with pytest.raises(ValueError, match=r"pos must lie in \[0, 10\)"):
        dk.decode_attention_proj(qkv, *_cache(1, 2, 10, 16), torch.tensor([10]), 2, torch.randn(32, 32), None,
                                 torch.zeros(1, 32))  # fmt: skip
    model.train()
    model.config.dropout = 0.1
    with pytest.raises(ValueError, match="model.eval"):
        serving.fused_decode_step(model, cache, torch.tensor([1]))
    model.eval()
    with pytest.raises(ValueError, match="proj_weight_t"):
        dk.decode_mlp(x, ln, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias, torch.zeros(1, 32))
    with pytest.raises(ValueError, match="zero must be"):
        dk.decode_linear(x, mlp.c_fc.weight, zero=torch.zeros(1, 500))
    from labkit.quant import quantize_model

    with pytest.raises(ValueError, match="plain nn.Linear"):
        serving.fused_decode_step(quantize_model(model, "w8a8"), cache, torch.tensor([1]))


@requires_triton
@pytest.mark.skipif(not (kernels.interpreting() and kernels.triton_at_least(kernels.MIN_TRITON)), reason="needs TRITON_INTERPRET=1 and triton >= 3.2")
def test_decode_linear_autotunes_without_adding_into_out_twice(monkeypatch):
    # on a GPU each shape's launch configuration is timed once; here the interpreter stands in for it
    monkeypatch.setattr(dk, "_on_interpreter", lambda t: False)
    monkeypatch.setattr(dk, "DECODE_GEMV_CONFIGS", [GemvConfig(8, 32, 1, 1, 1), GemvConfig(4, 32, 2, 1, 1)])
    monkeypatch.setattr(dk, "_tuned", {})
    g = _gen(7)
    x, w, b = torch.randn(1, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    out = torch.randn(1, 24, generator=g)
    expected = out + F.linear(x, w, b)
    dk.decode_linear(x, w, b, out=out, backend="triton")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (key,) = dk._tuned
    assert len(dk.autotune_log[key]) == 2  # both configs timed
    y = dk.decode_linear(x, w, b, backend="triton")  # without out: split-K configs are not candidates
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    (second,) = set(dk._tuned) - {key}
    assert [c.split_k for c in dk.candidates(second)] == [1] and len(dk.autotune_log[second]) == 1


def test_decode_linear_never_splits_k_when_it_writes_the_cache():
    # each K-slice would store its own partial sum into the KV cache: such configs are refused, and not candidates
    g = _gen(8)
    B, H, hs = 1, 2, 4
    C = H * hs
    x, w = torch.randn(B, 32, generator=g), torch.randn(3 * C, 32, generator=g)
    k_cache, v_cache = torch.zeros(B, H, 8, hs), torch.zeros(B, H, 8, hs)
    pos = torch.tensor([3])
    with pytest.raises(ValueError, match="cannot write the cache"):
        dk.decode_linear(x, w, out=torch.zeros(B, 3 * C), kv=(k_cache, v_cache, pos), backend="triton",
                         config=GemvConfig(8, 32, 2, 1, 1))  # fmt: skip
    out = torch.zeros(B, 3 * C)
    dk.decode_linear(x, w, out=out, kv=(k_cache, v_cache, pos), backend="triton")
    y = F.linear(x, w)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache[0, :, 3], y[0, C:2 * C].view(H, hs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache[0, :, 3], y[0, 2 * C:].view(H, hs), rtol=1e-5, atol=1e-5)
    key = next(k for k in dk._candidates if k[0] == "decode_linear" and k[9] and k[8])  # out and kv
    assert all(c.split_k == 1 for c in dk.candidates(key))


def test_decode_kernels_read_strided_bias_and_norm_vectors():
    g = _gen(9)
    x, w = torch.randn(2, 32, generator=g), torch.randn(12, 32, generator=g)
    b, lnw, lnb = (torch.randn(2 * n, generator=g)[::2] for n in (12, 32, 32))  # stride 2: views of longer tensors
    for backend in ("triton", "reference"):
        y = dk.decode_linear(x, w, b, ln=(lnw, lnb, 1e-5), backend=backend)
        torch.testing.assert_close(y, F.linear(F.layer_norm(x, (32,), lnw, lnb, 1e-5), w, b), rtol=1e-4, atol=1e-4)


def test_embed_names_tokens_and_lengths_outside_the_tables():
    wte, wpe = torch.randn(50, 8), torch.randn(16, 8)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="tokens must be ids in 0..49"):
            dk.embed(torch.tensor([60]), torch.tensor([0]), wte, wpe, backend=backend)
        with pytest.raises(ValueError, match="length must be >= 0"):
            dk.embed(torch.tensor([1]), torch.tensor([-1]), wte, wpe, backend=backend)


# ------------------------------------------------------------------ compiled for a Hopper GPU, here
def _hopper_compiler():
    if torch.cuda.is_available():
        pytest.skip("a GPU compiles the kernels for real in the tests above")
    pytest.importorskip("triton")
    if not kernels.triton_at_least(kernels.MIN_TRITON_PDL):  # some variants wait on their predecessor (PDL)
        pytest.skip(f"compiling the PDL variants needs triton >= {'.'.join(map(str, kernels.MIN_TRITON_PDL))}")
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401  (the backend, with its ptxas)




GEMV_VARIANTS = [(1, False, False, True, 1), (2, False, True, False, 1), (1, True, False, False, 1), (0, False, True, False, 4)]
PDL = [False, True, False, True]  # programmatic dependent launch in some of them


def test_decode_kernels_compile_for_hopper_with_vector_loads():
    _hopper_compiler()
    from labkit.kernels.ptx import kernel_report

    gemvs = [dk.gpu_spec("linear_kernel",
        C=768, HS=64, SPLITS=8, PROLOGUE=prologue, HAS_BIAS=True, GELU=gelu, ACCUMULATE=accumulate, KV_WRITE=kv,
        ZERO=kv, BLOCK_N=16, BLOCK_K=1024 if pdl and split_k == 1 else 256, SPLIT_K=split_k, USE_PDL=pdl,
        PREFETCH=pdl and split_k == 1, ARGMAX=False)
        for (prologue, gelu, accumulate, kv, split_k), pdl in zip(GEMV_VARIANTS, PDL)]  # fmt: skip
    layer = [
        dk.gpu_spec("attention_proj_kernel", H=12, HS=64, BLOCK_D=64, BLOCK_T=32, BLOCK_N=64, HAS_BIAS=True,
                    USE_PDL=True),
        dk.mlp_spec(dk.MLPConfig(8, 1024, 4)),
        dk.gpu_spec("attention_kernel", 2, H=12, HS=64, BLOCK_D=64, SPLITS=8, BLOCK_T=16, USE_PDL=False),
        dk.gpu_spec("embed_kernel", BLOCK=1024, USE_PDL=True),
    ]  # fmt: skip
    full = kernel_report("labkit.kernels.decode_triton", gemvs + layer)
    report, sass = [r["memory"] for r in full], [r["sass"] for r in full]
    for ops in report[: len(GEMV_VARIANTS)]:
        # a (16, 256) bf16 weight tile over 128 threads: 32 weights each, in 4 loads of 16 bytes
        assert ops.get("ld.global.v4.b32", 0) >= 4, ops
    # the kernels that add into shared outputs (split-K GEMV, attention times projection, MLP) do it with
    # fire-and-forget REDs in the machine code, never ATOMs that wait for an answer. (The PTX differs by
    # version: Triton 3.9 writes red.global...relaxed, 3.6 an atom whose unused result ptxas drops.)
    sums = [split_k > 1 for *_, split_k in GEMV_VARIANTS] + [True, True, False, False]
    for machine, adds in zip(sass, sums):
        assert any(op.split(".")[0] in ("RED", "REDG") for op in machine) == adds, machine
        assert not any(op.startswith("ATOM") for op in machine), machine
    pdl = PDL + [True, True, False, True]
    for ops, order, uses_pdl in zip(report, (r["pdl"] for r in full), pdl):
        assert any(op.startswith("ld.global.v") for op in ops), ops  # weights and cache arrive in vector loads
        # with PDL each kernel waits for its predecessor's writes and lets its successor launch; without, neither
        assert ("griddepcontrol.wait" in ops) == ("griddepcontrol.launch_dependents" in ops) == uses_pdl, ops
        # in that order: a kernel lets its successor launch only once it has waited, so when a kernel starts, the
        # one two before it has finished (what the attention kernel's loads before its wait rely on)
        assert order == (["wait", "launch_dependents"] if uses_pdl else []), order


def test_decode_kernels_load_what_no_earlier_kernel_writes_before_the_wait():
    # with PDL a kernel's loads before griddepcontrol.wait overlap the previous kernel; after it, each is a round trip
    _hopper_compiler()
    from labkit.kernels.ptx import kernel_report

    def gemv(prologue):
        return dk.gpu_spec("linear_kernel", C=768, HS=64, SPLITS=8, PROLOGUE=prologue, HAS_BIAS=True, GELU=False,
                           ACCUMULATE=False, KV_WRITE=True, ZERO=True, BLOCK_N=8, BLOCK_K=1024, SPLIT_K=1, USE_PDL=True,
                           PREFETCH=True, ARGMAX=False)  # fmt: skip

    def attention(block_t):
        return dk.gpu_spec("attention_proj_kernel", H=12, HS=64, BLOCK_D=64, BLOCK_T=block_t, BLOCK_N=64,
                           HAS_BIAS=True, USE_PDL=True)  # fmt: skip

    plain, normed, short, long = (r["loads"] for r in kernel_report(
        "labkit.kernels.decode_triton", [gemv(0), gemv(1), attention(16), attention(64)]))  # fmt: skip
    # the LayerNorm's weight and bias load before the wait; after it, the row once, as without a LayerNorm
    assert normed["before"] > plain["before"] and normed["after"] == plain["after"], (plain, normed)
    # the earlier positions' keys and values load before the wait: a longer first tile, more loads there
    assert long["before"] > short["before"], (short, long)


def test_greedy_kernels_compile_for_hopper():
    # the lm_head GEMV folding its blocks' argmax into one int64 a row, and the kernel that unpacks it
    _hopper_compiler()
    from labkit.kernels.ptx import kernel_report

    full = kernel_report("labkit.kernels.decode_triton", [
        dk.gpu_spec("linear_kernel",
            C=1, HS=1, SPLITS=1, PROLOGUE=1, HAS_BIAS=False, GELU=False, ACCUMULATE=False, KV_WRITE=False, ZERO=False,
            BLOCK_N=8, BLOCK_K=1024, SPLIT_K=1, USE_PDL=True, PREFETCH=True, ARGMAX=True),
        dk.gpu_spec("greedy_kernel", 1, EMPTY=dk.GREEDY_EMPTY, USE_PDL=True),
    ])  # fmt: skip
    gemv, greedy = full
    # one 64-bit signed max a program, fire-and-forget: a RED, not an ATOM that waits for the old value
    assert any(op.split(".")[0] in ("RED", "REDG") and "MAX" in op and "64" in op for op in gemv["sass"]), gemv["sass"]
    assert "griddepcontrol.wait" in greedy["memory"] and "griddepcontrol.wait" in gemv["memory"]
    assert gemv["pdl"] == greedy["pdl"] == ["wait", "launch_dependents"]


def test_compile_for_gpu_names_missing_arguments():
    _hopper_compiler()
    from labkit.kernels import decode_triton
    from labkit.kernels.ptx import compile_for_gpu

    with pytest.raises(ValueError, match="missing"):
        compile_for_gpu(decode_triton.mlp_kernel, {}, dict(BLOCK_H=16, BLOCK_K=256, USE_PDL=False, PREFETCH=False))


@requires_triton
@pytest.mark.skipif(not (kernels.interpreting() and kernels.triton_at_least(kernels.MIN_TRITON)), reason="needs TRITON_INTERPRET=1 and triton >= 3.2")
def test_tune_fused_step_times_whole_steps_and_leaves_wrong_configs_out(monkeypatch):
    # on a GPU the steps are replayed from a CUDA graph; here the interpreter runs them, timed plainly
    from labkit.kernels.decode_kernels import AttentionProjConfig, MLPConfig

    gemv = [GemvConfig(8, 32, 1, 1, 1), GemvConfig(16, 64, 1, 1, 1)]
    bad = MLPConfig(16, 64, 1)  # its launches are dropped below: a kernel that writes nothing
    monkeypatch.setattr(dk, "_tuned", {})
    monkeypatch.setattr(dk, "_candidates", {})
    monkeypatch.setattr(dk, "DECODE_GEMV_CONFIGS", gemv)
    monkeypatch.setattr(dk, "ATTENTION_PROJ_CONFIGS", [AttentionProjConfig(32, 16, 1), AttentionProjConfig(16, 32, 1)])
    monkeypatch.setattr(dk, "MLP_CONFIGS", [MLPConfig(8, 32, 1), bad])
    launch_mlp = dk._launch_mlp
    monkeypatch.setattr(dk, "_launch_mlp", lambda *a, **k: None if a[7] == bad else launch_mlp(*a, **k))
    torch.manual_seed(0)
    model = LabGPT(get_config("nano")).eval()
    cache = serving.SlotCache(model, 1)
    cache.admit(model, 0, list(range(1, 31)))  # 30 positions: the step timed at 20 writes over a real one
    before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
    result = serving.tune_fused_decode_step(model, cache, length=20, replays=1, rounds=1)
    assert cache.length.tolist() == [30]  # restored
    for (k, v), (k0, v0) in zip(zip(cache.k, cache.v), before):  # and what the timed steps wrote, put back
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert result["passes"] in (1, 2)  # a second pass only where the first one changed a choice
    kinds = [key[0] for key in result["kernels"]]
    assert kinds == ["decode_linear", "decode_attention_proj", "decode_mlp", "decode_linear"]  # launch order, each once
    for key, timings in result["kernels"].items():
        assert [c for c, _ in timings] == dk.candidates(key)
        assert result["chosen"][key] == dk._tuned[key]
        times = dict(timings)
        assert times[result["chosen"][key]] == min(t for t in times.values() if t is not None)
    mlp_key = next(key for key in result["kernels"] if key[0] == "decode_mlp")
    assert dict(result["kernels"][mlp_key])[bad] is None and dk._tuned[mlp_key] != bad
    assert result["before_s"] > 0 and result["after_s"] > 0
    # the tuned step still decodes: equal to the eager step's logits
    reference_cache = serving.SlotCache(model, 1)
    reference_cache.admit(model, 0, list(range(1, 31)))
    ref = serving.decode_step(model, reference_cache, slice(None), torch.tensor([4]))
    got = serving.fused_decode_step(model, cache, torch.tensor([4]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="passes must be an int >= 1"):
        serving.tune_fused_decode_step(model, cache, passes=0)
    with pytest.raises(ValueError, match="length must be"):
        serving.tune_fused_decode_step(model, cache, length=model.config.block_size)
    with pytest.raises(ValueError, match="tolerance"):
        serving.tune_fused_decode_step(model, cache, tolerance=0)
    with pytest.raises(ValueError, match="no kernel was launched"):
        dk.candidates(("nothing",))


def test_graph_seconds_times_calls_and_checks_its_arguments():
    from labkit import bench

    seconds, out = bench.graph_seconds(lambda: torch.ones(3) * 2, replays=2, rounds=2, device="cpu")
    assert seconds > 0 and torch.equal(out, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="replays"):
        bench.graph_seconds(lambda: None, replays=0, device="cpu")
    with pytest.raises(ValueError, match="fn must be"):
        bench.graph_seconds(None, device="cpu")


# ------------------------------------------------------------------ greedy decoding inside the kernels
def test_pack_best_orders_as_argmax_first_index_on_ties():
    values = torch.tensor([-float("inf"), -3.5, -1e-30, 0.0, 1e-30, 2.0, 2.0, float("inf")])
    keys = dk.pack_best(values, torch.arange(8))
    assert torch.equal(keys.argsort(), torch.tensor([0, 1, 2, 3, 4, 6, 5, 7]))  # the tie: index 5 above 6
    assert (keys > dk.GREEDY_EMPTY).all()
    signed_zeros = dk.pack_best(torch.tensor([0.0, -0.0]), torch.tensor([1, 0]))  # equal, as torch.argmax sees them
    assert signed_zeros[1] > signed_zeros[0]  # so the smaller index wins


@pytest.mark.parametrize("device", ["reference"] + triton_params)
def test_decode_linear_argmax_equals_torch_argmax(device):
    backend = "reference" if device == "reference" else "triton"
    device = "cpu" if device == "reference" else device
    g = _gen(3)
    x, w = torch.rand(3, 32, generator=g), torch.randn(203, 32, generator=g) / 8  # 203 outputs: a ragged last block
    w[[40, 60, 150]] = 1.0  # the largest output of every row, three times: the first index wins
    x, w = x.to(device), w.to(device)
    best = dk.greedy_buffer(3, device)
    tokens = torch.full((3,), -1, dtype=torch.long, device=device)
    y = dk.decode_linear(x, w, argmax=best, backend=backend)
    assert dk.greedy_tokens(best, tokens, 203, backend=backend).tolist() == [40, 40, 40]
    assert torch.equal(tokens, y.argmax(-1))
    assert (best == dk.GREEDY_EMPTY).all()  # emptied for the next step
    x = torch.randn(3, 32, generator=g).to(device)  # no ties: random rows, negative maxima too
    w = torch.randn(203, 32, generator=g).to(device) - 3
    y = dk.decode_linear(x, w, argmax=best, backend=backend)
    dk.greedy_tokens(best, tokens, 203, backend=backend)
    assert torch.equal(tokens, F.linear(x, w).argmax(-1)) and torch.equal(tokens, y.argmax(-1))
    dk.decode_linear(x, w.neg(), argmax=best, backend=backend)
    assert torch.equal(dk.greedy_tokens(best, tokens, 203, backend=backend), F.linear(x, w.neg()).argmax(-1))


def test_greedy_bad_input():
    best = dk.greedy_buffer(2)
    with pytest.raises(ValueError, match="argmax must be"):
        dk.decode_linear(torch.randn(2, 4), torch.randn(5, 4), argmax=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax and out"):
        dk.decode_linear(torch.randn(2, 4), torch.randn(5, 4), out=torch.zeros(2, 5), argmax=best)
    with pytest.raises(ValueError, match="tokens must be"):
        dk.greedy_tokens(best, torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="best must be"):
        dk.greedy_tokens(best.float(), torch.zeros(2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="vocab"):
        dk.greedy_tokens(best, torch.zeros(2, dtype=torch.long), 0)
    model = LabGPT(get_config("nano")).eval()
    cache = serving.SlotCache(model, 2)
    with pytest.raises(ValueError, match="next_tokens must be"):
        serving.fused_decode_step(model, cache, torch.tensor([1, 2]), next_tokens=torch.zeros(2))


@pytest.mark.parametrize("device", ["reference"] + triton_params)
def test_fused_step_greedy_tokens_feed_the_next_step(device):
    backend = "reference" if device == "reference" else "triton"
    device = "cpu" if device == "reference" else device
    torch.manual_seed(0)
    model = LabGPT(get_config("nano")).to(device).eval()
    caches = [serving.SlotCache(model, 2) for _ in range(2)]
    for cache in caches:
        cache.admit(model, 0, [1, 5, 7])
        cache.admit(model, 1, list(range(20, 40)))
    tokens = torch.tensor([4, 9], device=device)
    fed = tokens.clone()
    for _ in range(5):
        ref = serving.decode_step(model, caches[0], slice(None), tokens)
        got = serving.fused_decode_step(model, caches[1], fed, backend=backend, next_tokens=fed)  # feeds itself
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        tokens = ref.argmax(-1)
        assert torch.equal(fed, tokens)


def test_warm_up_calls_fn_outside_any_graph():
    from labkit import bench

    calls = []
    bench.warm_up(lambda: calls.append(1), "cpu", calls=2)
    assert calls == [1, 1]
