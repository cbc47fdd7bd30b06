# %% [markdown]
# # 08 · Quantization: small integers for weights and activations
#
# **Goals.** Write the affine map `q = round(W/s + z)` and its inverse by hand and check them
# against PyTorch's own quantizer; choose the scale per tensor, per channel or per group, and
# by calibration (min-max, percentile, MSE); quantize LabGPT after training (PTQ) three ways,
# int8 and int4 weight-only and W8A8, and measure what each costs in quality and saves in
# memory and time; see why batch size decides between weight-only and W8A8; read the Triton
# kernels that make them fast on a GPU.
#
# **Expected run time.** About 1 minute on the kit's 2-core test CPU (a laptop may take twice as long; more if other programs keep its cores busy).
#
# **The survey's claims, tested here.** "Reducing the precision of model weights and
# activations from 32-bit floating point to 8-bit integers can significantly lower the
# computational load and memory bandwidth, resulting in faster inference times", and "the
# impact on model accuracy can be mitigated by fine-tuning the quantized model on a subset of
# the original training data".

# %%
import copy
import json
import os
import warnings

import torch

if not torch.cuda.is_available():
    # the kernels' own Triton code runs in Triton's CPU interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib.pyplot as plt

import labkit
from labkit import bench, check, data, quant
from labkit.evaluation import evaluate, perplexity
from labkit.kernels import quant_kernels
from labkit.train import validation_text

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")  # torch.quantize_per_tensor's
warnings.filterwarnings("ignore", category=DeprecationWarning)  # announcements of torch.ao.quantization's move
labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
validation = validation_text(12_000)
results = json.loads((labkit.DATA_DIR / "quant_results.json").read_text())  # the long runs (tools/quant_experiments.py)

# %% [markdown]
# ## 1. The seed's formula, by hand
#
# An integer grid of `2^bits` levels stands for an interval of reals. The **scale** `s` is the
# step between levels, the **zero point** `z` the integer that stands for 0.0:
#
# `q = clamp(round(x / s) + z, q_min, q_max)`        `x̂ = (q - z) · s`
#
# (the survey writes `round(W/s + z)`: the same, since `z` is an integer). Asymmetric 8-bit
# uses the grid 0..255 and fits `[min, max]` (widened to contain 0, so zero is exact):
# `s = (max − min) / 255`, `z = −round(min / s)`. Inside the range, the error is at most `s/2`.

# %%
x = torch.tensor([-1.7, -0.4, 0.0, 0.33, 1.2, 2.9])
lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
s = (hi - lo) / 255
z = round(-lo / s)
q = torch.clamp(torch.round(x / s) + z, 0, 255)
x_hat = (q - z) * s
print(f"s = {s:.6f}, z = {z}")
print("q     =", q.int().tolist())
print("x_hat =", [round(v, 4) for v in x_hat.tolist()], " max error", f"{(x - x_hat).abs().max().item():.4f} <= s/2 = {s / 2:.4f}")
theirs = torch.quantize_per_tensor(x, s, z, torch.quint8)
print("equal to torch.quantize_per_tensor(...).int_repr():", torch.equal(q.to(torch.uint8), theirs.int_repr()))

# %% [markdown]
# The kit's `quant.quantize` does the same for 2 to 8 bits, symmetric (`z = 0`, grid
# `±(2^(bits−1) − 1)`) or asymmetric, per tensor, per channel or per group; its integers equal
# PyTorch's at 8 bits (the tests check every case, and its min-max scales equal
# `torch.ao.quantization.MinMaxObserver`'s).

# %%
labkit.show_source(quant.quantize)

# %% [markdown]
# ## 2. Granularity: one scale for what?
#
# One scale for a whole weight matrix must cover its largest value; rows (output channels)
# with small weights then use only a few of the levels. LabGPT's first MLP matrix: the largest
# |w| of each row varies a lot.

# %%
model, tokenizer = labkit.load_model("tiny")
W = model.transformer.h[0].mlp.c_fc.weight.detach()  # (768, 192)
row_max = W.abs().amax(dim=1)
print(f"{tuple(W.shape)}: largest |w| per row from {row_max.min():.3f} to {row_max.max():.3f} "
      f"({row_max.max() / row_max.min():.1f}x apart)")
print(f"{'granularity':<16} {'bits':>4} {'relative error':>15} {'scales':>7} {'bits per weight':>16}")
for bits in (8, 4):
    for name, kwargs in (("per tensor", {}), ("per channel", {"axis": 0}), ("groups of 32", {"group_size": 32})):
        q, scale, zero_point = quant.quantize(W, bits, **kwargs)
        error = (quant.dequantize(q, scale, zero_point) - W).norm() / W.norm()
        n_scales = scale.numel()
        overhead = n_scales * (4 + 1) * 8 / W.numel()  # an fp32 scale and an 8-bit zero point each
        print(f"{name:<16} {bits:>4} {error.item():>15.4f} {n_scales:>7} {bits + overhead:>16.2f}")

# %% [markdown]
# Per-channel scales cost almost nothing and cut the error by more than half; groups of 32
# cut it further, for 1.25 more bits per weight (the int4 layer stores fp16 scales and 8-bit
# zero points: 0.75 bits). Each bit fewer doubles the step: 4-bit errors are about 2^4 = 16×
# the 8-bit ones. Whether a model notices is another question (section 4).
#
# ## 3. Calibration: where to clip
#
# Weights are known in advance; activations are not, and they have outliers. Min-max keeps
# every value and stretches the grid; clipping the rare largest values (percentile), or
# searching for the clip that minimises the squared error (MSE), trades a large error on a
# few values for a smaller step everywhere. The input of LabGPT's last MLP projection (after
# the GELU), on real text:

# %%
captured = {}
hook = model.transformer.h[5].mlp.c_proj.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0].detach()))
with torch.no_grad():
    model(tokenizer.tensor(validation[:512]))
hook.remove()
activations = captured["x"].flatten()
print(f"{activations.numel()} activations: min {activations.min():.3f}, max {activations.max():.3f}, "
      f"99.9th percentile of |x| {activations.abs().kthvalue(int(0.999 * activations.numel())).values:.3f}")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].hist(activations.numpy(), bins=200, log=True, color="gray")
print(f"{'method':<11} {'bits':>4} {'clip range':>18} {'mean squared error':>19}")
for bits in (8, 4):
    for method, color in (("minmax", "tab:blue"), ("percentile", "tab:orange"), ("mse", "tab:green")):
        q, scale, zero_point = quant.quantize(activations, bits, method=method)
        error = (quant.dequantize(q, scale, zero_point) - activations).pow(2).mean().item()
        bottom, top = (-zero_point * scale).item(), ((2**bits - 1 - zero_point) * scale).item()  # the grid's ends
        if bits == 4:
            axes[0].axvline(top, color=color, ls="--", label=f"{method} (4-bit) clip")
            axes[1].bar(method, error, color=color)
        print(f"{method:<11} {bits:>4} {f'[{bottom:.2f}, {top:.2f}]':>18} {error:>19.2e}")
axes[0].set(xlabel="activation value", ylabel="count", title="input of h.5.mlp.c_proj (log scale)")
axes[0].legend(fontsize=7)
axes[1].set(ylabel="mean squared error", title="4-bit, per tensor")
fig.tight_layout()
plt.show()

# %% [markdown]
# At 8 bits min-max is already good and a fixed 99.9th-percentile clip *hurts* (the values it
# clips are far out, and an 8-bit grid had steps to spare); MSE still finds a better clip,
# with about 40% less error than min-max. At 4 bits the grid's 16 levels are precious: clipping
# the long tail cuts the error by about half (the percentile clip) to 60% (MSE's), and MSE beats
# the fixed percentile.
#
# ## 4. Post-training quantization of LabGPT
#
# `quant.quantize_model(model, scheme)` swaps every linear layer (the tied embedding/head
# excepted) for a quantized one, in place, as gpt-fast does:
#
# - **int8 weight-only**: int8 weights with one scale per output channel; activations stay fp32.
# - **int4 weight-only**: 4-bit weights, two per byte, with an fp16 scale and an 8-bit zero point
#   per group of 32 (or per channel, or per tensor).
# - **W8A8**: int8 weights per channel *and* int8 activations, quantized per token on the fly
#   (dynamic), multiplied by an integer matmul. On a CPU that is oneDNN's int8 GEMM:
#   `torch._int_mm` for small layers and few rows, and for big ones weights packed once into
#   oneDNN's layout with the per-channel scales applied inside the GEMM
#   (`quant.cpu_int8_backend()` says whether this CPU runs that path exactly).

# %%
labkit.show_source(quant.W8A8Linear.forward)

# %% [markdown]
# Quality and weight memory of each scheme, live on 12k characters and 20 prompts per task
# (the long run in `data/quant_results.json` used 100k characters and 200 prompts per task;
# both below):

# %%
live = {k: v for k, v in quant.PTQ_VARIANTS.items() if k != "int4 weight-only, per channel"}
table = quant.scheme_table(live, text=validation, n_task=20, prefill_shape=(4, 256), decode_tokens=32, repeat=3)
fp32 = table[0]
print(f"{'scheme':<32} {'perplexity':>10} {'vs fp32':>8} {'accuracy':>9} {'weights (MB)':>13} {'smaller':>8}")
for row in table:
    print(f"{row['variant']:<32} {row['perplexity']:>10.4f} {100 * (row['perplexity'] / fp32['perplexity'] - 1):>+7.2f}% "
          f"{100 * row['accuracy']:>8.1f}% {row['weight_bytes'] / 1e6:>13.3f} {fp32['weight_bytes'] / row['weight_bytes']:>7.2f}x")
print("\nlong run (tools/quant_experiments.py):")
long_fp32 = results["ptq"][0]
for row in results["ptq"]:
    print(f"{row['variant']:<32} {row['perplexity']:>10.4f} {100 * (row['perplexity'] / long_fp32['perplexity'] - 1):>+7.2f}% "
          f"{100 * row['accuracy']:>8.1f}%")

# %% [markdown]
# And their measured speed on this machine, side by side: a forward pass over 4 × 256 tokens
# (prefill) and greedy decoding at batch 1 with the KV cache, per token:

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'scheme':<32} {'prefill':>10} {'vs fp32':>8} {'decode/token':>13} {'vs fp32':>8}   on {bench.device_label('cpu')}")
for row in table:
    print(f"{row['variant']:<32} {1e3 * row['prefill_s']:>8.1f}ms {fp32['prefill_s'] / row['prefill_s']:>7.2f}x "
          f"{1e3 * row['decode_s_per_token']:>11.2f}ms {fp32['decode_s_per_token'] / row['decode_s_per_token']:>7.2f}x")

# %% [markdown]
# What the table says, on LabGPT (the long run's figures):
#
# - **Quality.** 8 bits cost nothing measurable (int8 weight-only and W8A8 within 0.05% of
#   fp32 perplexity, every task still at 100%). 4 bits with groups of 32 are as good; 4 bits
#   per channel cost 0.5% perplexity and 4 bits *per tensor* 2.4% and 1% of the task answers:
#   granularity matters more than the number of bits.
# - **Memory.** The quantized linears' weights are 4× smaller in int8 (plus one scale per
#   output channel) and `32 / (4 + 24/32) ≈ 6.7×` in int4 (4 bits a weight, plus a 16-bit
#   scale and an 8-bit zero point shared by 32 weights); the whole model shrinks less, because the embedding table (tied to the output
#   head), the biases and the LayerNorms stay fp32.
# - **Speed on a CPU.** Only W8A8 is faster, and only in prefill: it replaces fp32
#   multiply-adds by int8 ones (VNNI instructions do 4× more of them per cycle). The
#   weight-only layers dequantize their weights on every call in PyTorch, which costs more
#   than it saves; their pay-off needs a kernel that reads the small integers and converts
#   them in registers (section 6). And decoding one token at a time is dominated by per-call
#   overheads at this model size. Section 5 says why W8A8 prefill is not faster still.
#
# ### Fine-tuning the quantized model (the survey's mitigation)
#
# The survey suggests fine-tuning on a subset of the training data. The 4-bit weights cannot
# move (they are integers), but everything else can: biases, LayerNorms and the embeddings
# adapt to the rounding. Results of 200 steps of 8 × 256 tokens (`tools/quant_experiments.py`),
# with the honest control beside it, the fp32 model fine-tuned the same way:

# %%
runs = results["finetune"]
ptq_tensor = next(r for r in results["ptq"] if r["variant"] == "int4 weight-only, per tensor")
control = runs["fp32 fine-tuned (control)"]
tuned = runs["int4 per tensor, PTQ + fine-tune of float parameters"]
print(f"fp32:                                  perplexity {long_fp32['perplexity']:.4f}")
print(f"fp32 fine-tuned (control):             perplexity {control['perplexity']:.4f}")
print(f"int4 per tensor, PTQ:                  perplexity {ptq_tensor['perplexity']:.4f}")
print(f"int4 per tensor, PTQ + fine-tune:      perplexity {tuned['perplexity']:.4f}, accuracy {100 * tuned['accuracy']:.1f}%")
gap = ptq_tensor["perplexity"] - long_fp32["perplexity"]
print(f"recovered: {100 * (ptq_tensor['perplexity'] - tuned['perplexity']) / gap:.0f}% of the gap to fp32 "
      f"(against the fine-tuned fp32 control: {100 * (ptq_tensor['perplexity'] - tuned['perplexity']) / (ptq_tensor['perplexity'] - control['perplexity']):.0f}%)")

# %% [markdown]
# Tuning the float parameters around frozen 4-bit weights recovers about 60% of the gap
# (half, judged against the control: the fp32 model also gains from the extra training).
# Notebook 09 trains the weights themselves *through* the quantizer (QAT) and closes the whole
# gap to fp32 (about 80% of it against the fine-tuned control).
#
# ## 5. Weight-only or W8A8? Batch size decides
#
# A linear layer of `K × N` weights applied to `B` tokens does `2·B·K·N` FLOPs and must read
# the `K·N` weights once, whatever `B`. At batch 1 (decoding) it does 2 FLOPs per weight
# read: memory-bound, so what pays is **fewer bytes per weight**, and weight-only
# quantization gives exactly that (int8 halves bf16's bytes, int4 quarters them) while keeping
# the activations in floating point, where their outliers do no harm. At large `B` (prefill,
# big batches) the same weights serve many tokens, the layer is compute-bound, and only
# **cheaper arithmetic** helps: W8A8's int8 multiply-adds, at the price of quantizing the
# activations on the fly. Measured here, a 2048 × 2048 layer at growing batch sizes:

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
layer = torch.nn.Linear(2048, 2048)
weight_only, w8a8 = quant.Int8WeightOnlyLinear.from_linear(layer), quant.W8A8Linear.from_linear(layer)
print("W8A8's integer matmul on this CPU:", quant.cpu_int8_backend(), "(packed weights from 16 rows)")
batches, speedups = (1, 4, 16, 64, 256), {"int8 weight-only (dequantize, then fp32)": [], "W8A8 (oneDNN int8)": []}
with torch.no_grad():
    for b in batches:
        xb = torch.randn(b, 2048)
        rows = bench.compare({"fp32": lambda: layer(xb), "int8 weight-only (dequantize, then fp32)": lambda: weight_only(xb),
                              "W8A8 (oneDNN int8)": lambda: w8a8(xb)}, warmup=2, repeat=5, show=False)
        for row in rows[1:]:
            speedups[row["variant"]].append(row["speedup"])
        print(f"batch {b:>3}: fp32 {1e3 * rows[0]['variant_s']:7.2f} ms, " + ", ".join(
            f"{r['variant'].split(' (')[0]} {r['speedup']:.2f}x" for r in rows[1:]))
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, values in speedups.items():
    ax.plot(batches, values, "o-", label=name)
ax.axhline(1.0, color="gray", lw=0.8)
ax.set(xscale="log", xlabel="batch (tokens)", ylabel="speedup vs fp32", title="2048 x 2048 linear on this CPU")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# On this CPU W8A8 wins at every batch size: at large batch by its int8 arithmetic (3.5–5.5×
# fp32 per layer from batch 16 on the kit's test CPU, with the weights packed once), and at
# batch 1 too, because its weights are int8 and `torch._int_mm` reads them as they are (4×
# fewer bytes than fp32). The int8
# weight-only layer never wins here: in PyTorch it converts its whole weight to fp32 on every
# call, reading and writing more bytes than it saves. Weight-only needs a kernel that converts
# in registers (section 6); on a GPU that kernel is where decoding gets faster.
#
# ### Why LabGPT's W8A8 prefill is not 2× faster: Amdahl's law
#
# Only the linear layers become integer matmuls. Amdahl's law predicts the whole model's
# speedup from two measurements: the share `f` of the fp32 forward pass spent in linears, and
# how much faster the linears alone get (`s`): `1 / ((1 − f) + f / s)`. Time the model with
# its linear layers replaced by instant ones (what the rest costs), then time `tiny`'s four
# linear shapes alone, fp32 against W8A8, on the same 1,024 tokens; then compare the
# prediction with the whole W8A8 model, measured:

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.model import replace_linears

idx = torch.randint(0, 100, (4, 256))
no_linears = replace_linears(copy.deepcopy(model), lambda name, lin: quant.NoOpLinear(lin.out_features))
gemm_only = replace_linears(copy.deepcopy(model), lambda name, lin: quant.Int8GemmOnlyLinear(lin))
w8a8_model = quant.quantize_model(copy.deepcopy(model), "w8a8")
with torch.no_grad():
    rows = bench.compare({"fp32": lambda: model(idx), "w8a8": lambda: w8a8_model(idx),
                          "fp32 without linears": lambda: no_linears(idx),
                          "only the int8 GEMMs": lambda: gemm_only(idx)}, warmup=1, repeat=5)
    block = model.transformer.h[0]
    alone = {"fp32": 0.0, "w8a8": 0.0}
    for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        x_lin = torch.randn(idx.numel(), lin.in_features)
        q_lin = quant.W8A8Linear.from_linear(lin)
        pair = bench.compare({"fp32": lambda: lin(x_lin), "w8a8": lambda: q_lin(x_lin)}, warmup=2, repeat=7, show=False)
        alone["fp32"] += pair[0]["variant_s"]
        alone["w8a8"] += pair[1]["variant_s"]
t_fp32, t_w8a8, t_rest, t_gemm = (r["variant_s"] for r in rows)
share = 1 - t_rest / t_fp32
linear_speedup = alone["fp32"] / alone["w8a8"]
print(f"linears are {100 * share:.0f}% of the fp32 forward pass; timed alone, W8A8 makes tiny's linears "
      f"{linear_speedup:.1f}x faster;")
print(f"Amdahl predicts 1 / ((1 - {share:.2f}) + {share:.2f} / {linear_speedup:.1f}) = "
      f"{1 / ((1 - share) + share / linear_speedup):.2f}x; the whole W8A8 model measured {t_fp32 / t_w8a8:.2f}x;")
print(f"with infinitely fast linears at most {t_fp32 / t_rest:.2f}x;")
print(f"with linears that cost only their int8 GEMM (quantizing and dequantizing free) at most {t_fp32 / t_gemm:.2f}x")

# %% [markdown]
# LabGPT `tiny` is narrow (width 192): attention over 256 tokens, the GELU and the LayerNorms
# take a large share of its time (the first line above), and no integer matmul touches them;
# and at width 192 each integer matmul is small, so quantizing its input and dequantizing its
# output weigh more than in a 2048-wide layer: timed alone, tiny's linears gain only about
# 2× from W8A8, against 4× and more for the 2048-wide layer of section 5. The goal set for
# this lab was 2× on `tiny`'s prefill; on a 2-core CPU quantizing the linear layers cannot
# reach it: even infinitely fast linears give at most 2.4–2.7×, linears that cost nothing
# but their int8 GEMM (nothing quantized, nothing dequantized) 1.75–1.9×, and the whole W8A8
# model 1.3–1.65× (ranges across runs on the kit's first test CPU; this run's are printed
# above). How much W8A8 gains depends on the CPU: on later test VMs, Xeons with AMX, the three
# measured 2.1–2.3×, 1.46–1.59× and 1.03–1.19× (`benchmarks/cpu/`), quantizing and
# dequantizing there costing as much time as the int8 GEMMs themselves. Amdahl's
# prediction, built from the linears timed alone, comes out above that measurement: alone, a
# linear runs with its weights and input hot in cache, while inside the model every other
# operator competes for it. Wider models (GPT-2's 768) put more of their time in the matmuls,
# and there W8A8 comes closer to its per-layer speedup.
#
# ## 6. The kernels
#
# On a GPU the weight-only schemes need a kernel that reads the small integers and turns
# them into floats *in registers*: dequantizing into a full bf16 matrix first would write and
# read back more bytes than the fp16 matmul itself. Three Triton kernels live in
# `labkit/kernels/quant_kernels.py`, each beside its PyTorch reference (the CPU path and the
# test oracle). The decode-shaped int8 one: each program owns a few output channels and walks
# along K, accumulating `w · x` in a register tile that is summed once at the end; the
# per-channel scale multiplies the finished dot product (`Σ x·(q·s) = s·Σ x·q`).

# %%
import inspect

if quant_kernels.interpreting() or torch.cuda.is_available():
    print(inspect.getsource(quant_kernels._kernels()[1].fn))

# %% [markdown]
# On a CPU this notebook set `TRITON_INTERPRET=1`, so the same kernel code runs in Triton's
# interpreter (slowly: it is for reading and testing). Against the references:

# %%
device = labkit.get_device()
g = torch.Generator().manual_seed(0)
xs = torch.randn(2, 256, generator=g).to(device)
w_q = torch.randint(-127, 128, (48, 256), dtype=torch.int8, generator=g).to(device)
w_s = (torch.rand(48, generator=g) / 100).to(device)
q4, s4, z4, _ = quant.int4_parameters(torch.randn(48, 256, generator=g), 32)
p4, s4, z4 = quant_kernels.pack_int4(q4).to(device), s4.to(device), z4.to(device)
x_q, x_s = quant.quantize_per_token(torch.randn(20, 256, generator=g).to(device))
pairs = {
    "int8_weight_only_linear": (quant_kernels.int8_weight_only_linear(xs, w_q, w_s, backend="triton"),
                                quant_kernels.int8_weight_only_linear_reference(xs, w_q, w_s)),
    "int4_weight_only_linear": (quant_kernels.int4_weight_only_linear(xs, p4, s4, z4, 32, backend="triton"),
                                quant_kernels.int4_weight_only_linear_reference(xs, p4, s4, z4, 32)),
    "int8_linear (W8A8)": (quant_kernels.int8_linear(x_q, w_q, x_s, w_s, backend="triton"),
                           quant_kernels.int8_linear_reference(x_q, w_q, x_s, w_s)),
}  # fmt: skip
for name, (got, expected) in pairs.items():
    print(f"{name:<24} equals its reference (relative 1e-4): {torch.allclose(got, expected, rtol=1e-4, atol=1e-4)}")

# %% [markdown]
# **On a GPU** (`benchmarks/gpu_check_quant.py`): the bars are, at batch 1 with K = 8192,
# N = 28672 (a 70B-class MLP projection), int8 weight-only ≥ 1.8× and int4 ≥ 2.8× faster than
# the bf16 cuBLAS GEMV, and the W8A8 kernel at 8192³ ≥ 90% of `torch._int_mm`;
# the ideal, set by bytes alone, is 2× and 4×. The kit's recorded H100 run:

# %%
run = bench.recorded_results("gpu_results_quant_h100.json")
if run is None:
    print("benchmarks/ is not beside this install: see benchmarks/RESULTS.md in the repository")
else:
    print(run["device"], "| torch", run["torch"], "| Triton", run["triton"])
    bars = {"labkit int8_weight_only_linear": 1.8, "labkit int4_weight_only_linear": 2.8,
            "labkit int8_linear (bf16 out, fused dequant)": 0.9}  # fmt: skip
    for row in run["weight_only"] + run["w8a8"]:
        bar = bars.get(row["variant"])
        verdict = "" if bar is None else f"  (bar {bar}x: {'met' if row['speedup'] >= bar else 'NOT met'})"
        print(f"{row['name']:<30} {row['variant']:<46} {row['variant_s'] * 1e6:8.1f} us  "
              f"{row['speedup']:5.2f}x {row['baseline']}{verdict}")

# %% [markdown]
# The int8 kernel reads half the bytes of bf16 and runs at nearly the same GB/s, so it is
# nearly 2× faster; the int4 kernel reads a quarter but spends its time unpacking nibbles
# and applying group scales, so it is no faster than int8: compute, not memory, bounds it.
# With a GPU, the cell below measures them on yours.

# %%
# NBVAL_IGNORE_OUTPUT
if device.type == "cuda":
    K, N = 8192, 28672
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5
    xv = torch.randn(1, K, device=device, dtype=torch.bfloat16)
    q8, s8, _ = quant.quantize(w, 8, axis=0, symmetric=True)
    q4, s4, z4, _ = quant.int4_parameters(w, 128)
    p4 = quant_kernels.pack_int4(q4)
    bench.compare({"bf16 cuBLAS": lambda: torch.nn.functional.linear(xv, w),
                   "int8 weight-only": lambda: quant_kernels.int8_weight_only_linear(xv, q8, s8.flatten()),
                   "int4 weight-only": lambda: quant_kernels.int4_weight_only_linear(xv, p4, s4, z4, 128)},
                  warmup=5, repeat=20)  # fmt: skip
else:
    print("no GPU here: the kernels ran in the interpreter above; run benchmarks/gpu_check_quant.py on a GPU")

# %% [markdown]
# ### Unpacking nibbles: count the instructions
#
# "Compute bounds it" can be made exact. An H100 issues one instruction for 32 threads
# (a warp) per clock on each of the 4 schedulers of each of its 132 SMs: 33.5 T thread
# instructions a second, the same number as its fp32 multiply-adds (67 TFLOP/s on the
# datasheet is 2 FLOPs each). Its integer unit (shifts, logical ops) has half as many lanes
# as the float unit. Reading 235M 4-bit weights (117 MB) at 3.35 TB/s takes 35 µs; in that
# time the GPU can issue this many instructions per weight:

# %%
from labkit import hardware

h100 = next(r for r in hardware.datasheet() if r["name"].startswith("NVIDIA H100"))
lanes = h100["fp32_tflops"] * 1e12 / 2  # thread instructions a second: one multiply-add (2 FLOPs) each
weights = 8192 * 28672
memory_s = weights / 2 / (h100["memory_bandwidth_gbs"] * 1e9)  # half a byte a weight
print(f"{h100['name']}: {lanes / 1e12:.1f} T instructions/s; the int4 weights take {memory_s * 1e6:.1f} us to read; "
      f"budget {lanes * memory_s / weights:.2f} instructions a weight (integer ones count double)")

# %% [markdown]
# Unpacking a nibble the obvious way (`(byte >> 4) & 0xF`, convert to float, subtract the
# zero point) costs several integer instructions per weight, and the kit's first int4 GEMV
# measured 83.7 µs on an H100, 1.93× bf16. Two cheaper ways, both in
# `int4_gemv_words_kernel`, read 32-bit words of 8 nibbles:
#
# - **float words**: shift a nibble to bits 16–19 and OR it under the exponent of 2²³: the
#   bits now *are* the float 2²³ + q·2¹⁶, with no conversion instruction (the 2²³ part is
#   taken off once per word);
# - **fp16 halves**: one AND-OR puts *two* nibbles under the exponent of two fp16 1024s at
#   once, because a 32-bit register holds two halves: `(u & 0x000F000F) | 0x64006400` is the
#   pair (1024 + q₀, 1024 + q₄); the mask `0x00F000F0` gives 1024 + 16·q for the odd columns.
#
# The trick needs nothing but bits, so PyTorch can show it on this CPU (`.view` reinterprets
# the bytes):

# %%
u = torch.tensor([0x76543210], dtype=torch.int32)  # column i holds the nibble q = i
magic = 0x64006400  # two fp16 1024.0s
pairs = {"columns 0, 4": (u & 0x000F000F) | magic, "columns 1, 5": (u & 0x00F000F0) | magic,
         "columns 2, 6": ((u >> 8) & 0x000F000F) | magic, "columns 3, 7": ((u >> 8) & 0x00F000F0) | magic}  # fmt: skip
for name, word in pairs.items():
    halves = word.view(torch.float16).tolist()  # little-endian: the low half first
    print(f"{name}: {hex(word.item())} -> fp16 {halves} -> q = {[(h - 1024) / (16 if name[8] in '1357' else 1) for h in halves]}")

# %% [markdown]
# On the GPU the two halves go to fp32 in one instruction each, which runs beside the
# integer unit. Compiled for Hopper here (Triton ships NVIDIA's assembler), the main loop of
# each kernel, counted per weight, and the time that count alone would take (the larger of
# all instructions over the issue rate and integer ones over the integer unit's):

# %%
# NBVAL_IGNORE_OUTPUT
projected = {}  # unpacking: the time its count projects on the H100
try:
    from labkit.kernels.ptx import kernel_report

    words = dict(GROUP=128, BLOCK_N=128, BLOCK_W=16, SPLIT_K=1, ASM=True)  # 2 warps
    kernels = {  # name: (kernel and its launch constants, weights one thread handles per loop iteration)
        "bytes (the first int4 GEMV)": (quant_kernels.gpu_spec("int4_gemv_kernel", 4, GROUP=128, BLOCK_N=16,
                                                               BLOCK_K=512, SPLIT_K=1), 64),
        "float words": (quant_kernels.gpu_spec("int4_gemv_words_kernel", 2, HALVES=False, **words), 256),
        "fp16 halves": (quant_kernels.gpu_spec("int4_gemv_words_kernel", 2, HALVES=True, **words), 256),
    }  # fmt: skip
    reports = kernel_report("labkit.kernels.quant_kernels", [k for k, _ in kernels.values()])
    integer_ops = ("LOP3", "SHF", "IMAD", "IADD3", "PRMT", "LEA", "MOV")
    print(f"{'unpacking':<28} {'instructions/weight':>20} {'integer/weight':>15} {'instruction-bound time':>24}")
    bound_s = {}
    for (name, (_, per_thread)), report in zip(kernels.items(), reports):
        total = sum(report["loop"].values()) / per_thread
        integer = sum(report["loop"].get(op, 0) for op in integer_ops) / per_thread
        bound_s[name] = weights * max(total / lanes, integer / (lanes / 2))
        print(f"{name:<28} {total:>20.2f} {integer:>15.2f} {bound_s[name] * 1e6:>21.1f} us")
    if run is not None:  # the recorded H100 run: how far the byte kernel was from its count
        import triton

        measured = next(r for r in run["weight_only"] if r["variant"] == "labkit int4_weight_only_linear")
        ratio = measured["variant_s"] / bound_s["bytes (the first int4 GEMV)"]
        print(f"\ncompiled here by Triton {triton.__version__}; the recorded run's kernels by Triton {run['triton']}")
        print(f"the byte kernel measured {measured['variant_s'] * 1e6:.1f} us on the H100, {ratio:.2f}x its count's time;"
              f" at the same ratio (bf16 took {measured['baseline_s'] * 1e6:.1f} us):")
        for name, seconds in bound_s.items():
            projected[name] = max(seconds * ratio, memory_s)
            print(f"  {name:<28} ~{projected[name] * 1e6:5.1f} us, {measured['baseline_s'] / projected[name]:.2f}x bf16 "
                  f"(bar 2.8x)")  # fmt: skip
except (ImportError, RuntimeError, OSError) as err:  # no triton, or a wheel without NVIDIA's tools
    print(f"cannot compile for a GPU here ({type(err).__name__}): see benchmarks/RESULTS.md for the counts")

# %% [markdown]
# The count is a lower bound: no kernel issues an instruction on every scheduler every clock
# (it waits for its loads and for its own results), and the byte kernel measured above its
# count's time. The count also depends on the compiler: Triton 3.6, which built the recorded
# run's kernels, compiles all three into more instructions than Triton 3.9 does (the byte
# kernel most: a sum across threads stays inside its loop; `benchmarks/RESULTS.md` lists
# both), so the projection above is only as good as the two versions agree. But the count is
# the part a kernel writer controls, and it ranks the three the same way under both: the
# fp16 halves bring it under the time the bytes take, so that kernel can be bound by memory.
# The autotuner times all of them and keeps the fastest, after checking each one's output
# against the PyTorch reference; what it reaches is for a GPU to say
# (`benchmarks/gpu_check_quant.py`).
#
# **The GPU said no.** The kit's next H100 run timed every configuration of all three; the
# fastest of each kind, against the projection above (where this machine could compile it):

# %%
# NBVAL_IGNORE_OUTPUT
later = bench.recorded_results("gpu_results_quant_h100_1127_run1.json")
if later is None:
    print("benchmarks/ is not beside this install: see benchmarks/RESULTS.md in the repository")
else:
    table = [(config, seconds) for config, seconds in later["autotune"][next(
        k for k in later["autotune"] if k.startswith("int4 128 torch.bfloat16 gemv"))] if seconds is not None]  # fmt: skip
    kinds = {"bytes (the first int4 GEMV)": "words=False", "float words": "halves=False", "fp16 halves": "halves=True"}
    print(f"{later['device']}, Triton {later['triton']}: the autotuner's fastest config of each kind")
    for kind, mark in kinds.items():
        fastest = min(s for config, s in table if ("words=False" in config) == kind.startswith("bytes") and mark in config)
        guess = projected.get(kind)
        print(f"  {kind:<28} measured {fastest * 1e6:6.1f} us" + (f", projected ~{guess * 1e6:.1f} us" if guess else ""))
    # word kernels, config by config: the same rows, warps and stages, in steps of 128 or 64 columns
    timed = dict(table)
    print("word kernels, steps of 128 columns (a group's scale and zero point once a step) vs 64 (twice):")
    for config, seconds in table:
        if "words=True" in config and "block_k=64," in config:
            wide = timed.get(config.replace("block_k=64,", "block_k=128,"))
            if wide is not None:
                kind = "fp16 halves" if "halves=True" in config else "float words"
                rows = config.split("block_n=")[1].split(",")[0]
                print(f"  {kind:<12} {rows:>4} rows: {wide * 1e6:6.1f} us vs {seconds * 1e6:6.1f} us "
                      f"(+{100 * (seconds / wide - 1):.0f}%)")

# %% [markdown]
# The fp16 halves kernel cut the instructions but not the time: the byte kernel stayed the
# fastest, so the instruction count was not what bounded these kernels on the H100. The
# last lines point elsewhere: the same word kernel walking a group in two steps of 64
# columns, and so loading each row's scale and zero point twice as often, was slower,
# the halves kernel much slower. A step loads one scale (fp16) and one zero point (uint8)
# for each of its rows, and stored as `(N, K/g)` (row by row) those values lie a whole row
# of groups apart: two memory transactions a row for three useful bytes, as many
# transactions as a 128-column step's weights take. Stored group by group
# (`quant_kernels.group_major`, a `(K/g, N)` layout seen as `(N, K/g)`), a step's scales are
# one contiguous run, and `Int4WeightOnlyLinear` now stores them that way. Whether it closes
# the gap to 2.8× is, again, for a GPU run to say (`benchmarks/gpu_check_quant.py` times
# both layouts side by side).
#
# A third layout goes further, for the weights themselves: **K-major**
# (`quant_kernels.k_major`, the packed bytes stored as `(K/2, N)`). Then one byte row holds
# a pair of input columns for every output, and a program that owns 1024 consecutive outputs
# reads each row as one contiguous run of 1024 bytes, 8 bytes to each of its 128 threads.
# Every thread keeps the same outputs from row to row, so `Σ q·x` builds up in its own
# registers: the kernel never sums across threads inside its loop (the byte kernel above
# exchanges partial sums between threads at every step), x is the same two numbers for every thread of a
# row, and with group-major scales a step's scales are contiguous too. Read as 32-bit words
# (4 outputs a word), each nibble is shifted straight out of the word under the exponent of
# 2^23: a shift, a logical op and a multiply-add a weight. The price: the
# programs own no whole rows of `W`, so K is split across programs (4 to 16 ways), which add
# into the output atomically. `int4_weight_only_linear` takes either layout; the tests check
# the K-major kernel against the reference under the interpreter, and the GPU check times it
# beside the others (not yet run on a GPU).

# %% [markdown]
# ## 7. The widget: bits, granularity, group size, calibration
#
# Every linear weight of LabGPT is rounded to the chosen grid (simulated in fp32, so any bit
# width works), then: the histogram of one layer's rounding errors in units of its step, the
# perplexity, the size of the weights, and (for 8 and 4 bits, which have layers here) the
# measured decode speed of the real quantized model.

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore

base_ppl = perplexity(model, tokenizer, validation[:8000])
linear_params = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")


def quantization_view(fig, bits, granularity, group_size, method):
    m = copy.deepcopy(model)
    kwargs = {"tensor": {}, "channel": {"axis": 0}, "group": {"group_size": group_size}}[granularity]
    n_scales = 0
    with torch.no_grad():
        for name, layer in m.named_modules():
            if isinstance(layer, torch.nn.Linear) and name != "lm_head":
                q, scale, zero_point = quant.quantize(layer.weight, bits, method=method, **kwargs)
                if name == "transformer.h.0.mlp.c_fc":
                    steps = ((layer.weight - quant.dequantize(q, scale, zero_point)) / quant._expand(scale, q.shape)).flatten()
                layer.weight.copy_(quant.dequantize(q, scale, zero_point))
                n_scales += scale.numel()
    ppl = perplexity(m, tokenizer, validation[:8000])
    megabytes = (linear_params * bits / 8 + n_scales * 3) / 1e6  # fp16 scale + 8-bit zero point each
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(steps.numpy(), bins=60, color="tab:blue")
    ax1.set(xlabel="error / step (h.0.mlp.c_fc)", ylabel="weights", title=f"{bits}-bit, {granularity}, {method}")
    ax2.bar(["fp32", "quantized"], [base_ppl, ppl], color=["gray", "tab:blue"])
    ax2.set(ylim=(min(base_ppl, ppl) * 0.98, max(base_ppl, ppl) * 1.01), ylabel="perplexity")
    speed = "no layer for this bit width and calibration: simulated only"
    scheme = {8: "int8_weight_only", 4: "int4_weight_only"}.get(bits)
    if scheme is not None and method == "minmax":  # the real layers: int8 per channel, int4 as chosen
        real = quant.quantize_model(copy.deepcopy(model), scheme, group_size=group_size, granularity=granularity)
        prompt = tokenizer.tensor("Once upon a time")
        with torch.no_grad():
            times = bench.compare({"fp32": lambda: model.generate(prompt, 16, temperature=0),
                                   "quantized": lambda: real.generate(prompt, 16, temperature=0)},
                                  warmup=1, repeat=3, show=False)  # fmt: skip
        speed = f"decode {times[1]['speedup']:.2f}x fp32 on this machine"
    return (f"perplexity {ppl:.4f} (fp32 {base_ppl:.4f}); linear weights {megabytes:.2f} MB "
            f"(fp32 {linear_params * 4 / 1e6:.2f} MB); {speed}")


explore(quantization_view, bits=(2, 8, 1, 4), granularity=["group", "channel", "tensor"],
        group_size=[32, 16, 64], method=["minmax", "percentile", "mse"])  # fmt: skip

# %% [markdown]
# ## Your turn
#
# **Exercise 1.** Write `quantize` (asymmetric, grid `0..2^bits − 1`) and `dequantize`. The
# starter forgets something that matters for values outside the range.

# %%
def quantize(x, scale, zero_point, bits):
    # your code: q = round(x / s) + z, on the grid 0 .. 2**bits - 1
    return torch.round(x / scale + zero_point)


def dequantize(q, scale, zero_point):
    return (q - zero_point) * scale


passed = check.quantize_dequantize(quantize, dequantize)

# %% [markdown]
# **Exercise 2.** Pick the min-max scale and zero point of a tensor for `bits` bits
# (asymmetric, per tensor), as PyTorch's `MinMaxObserver` does. The starter is close.

# %%
def pick_scale(x, bits):
    # your code: return (scale, zero_point)
    lo, hi = x.min().item(), x.max().item()
    scale = (hi - lo) / 2**bits
    return scale, round(-lo / scale)


passed = check.pick_scale(pick_scale)

# %%
from labkit.solutions import quant as solutions

passed = check.quantize_dequantize(solutions.quantize, solutions.dequantize) and check.pick_scale(solutions.pick_scale)

# %% [markdown]
# ## Takeaways
#
# - `q = round(x/s) + z`, `x̂ = (q − z)·s`: the error is at most `s/2` inside the clipping
#   range; choosing the range (calibration) and its granularity matters more than the bits.
# - On LabGPT, 8-bit weights (and W8A8) lose nothing measurable; 4 bits need per-group scales.
#   Fine-tuning the float parameters around frozen 4-bit weights recovers part of a gap; QAT
#   (notebook 09) recovers more.
# - The survey's "faster inference" holds where the arithmetic or the bytes dominate: W8A8 at
#   large batch on a CPU with int8 instructions (several times fp32 per layer, section 5),
#   weight-only at batch 1
#   on a GPU with a fused kernel. Whole-model gains are capped by what stays in float (Amdahl).
#
# ## References
#
# - B. Jacob et al., *Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference*, CVPR 2018.
# - M. Nagel et al., *A White Paper on Neural Network Quantization*, 2021.
# - T. Dettmers et al., *LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale*, NeurIPS 2022.
# - G. Xiao et al., *SmoothQuant: Accurate and Efficient Post-Training Quantization for LLMs*, ICML 2023.
# - E. Frantar et al., *GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers*, ICLR 2023.
# - PyTorch gpt-fast, `quantize.py` (int8/int4 weight-only by module swap).
