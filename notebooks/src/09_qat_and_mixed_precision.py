# %% [markdown]
# # 09 · Quantization-aware training and mixed-precision training
#
# **Goals.** Train *through* the quantizer: fake quantization `Dequantize(Quantize(W))·x` with a
# straight-through estimator, and measure how much of the 4-bit gap it recovers on LabGPT;
# then train in 16-bit floats: what overflows and underflows, why the master weights stay
# fp32, and a dynamic loss scaler written from scratch that makes exactly the decisions of
# `torch.amp.GradScaler`; finally, time and memory of a training step in fp32 vs bf16.
#
# **Expected run time.** About 1 minute on the kit's 2-core test CPU (a laptop may take twice as long; more if other programs keep its cores busy).
#
# **The survey's claims, tested here.** QAT "typically achieves higher accuracy compared to
# post-training quantization"; mixed precision "significantly speeds up computation and
# reduces memory usage" (BERT: "~40% less training time and 50% less memory without
# sacrificing accuracy").

# %%
import copy
import json
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import labkit
from labkit import bench, check, hardware, memory, quant
from labkit.model import LabGPT, get_config
from labkit.train import finetune, validation_text

labkit.seed_everything(0)
torch.set_num_threads(min(4, torch.get_num_threads()))
validation = validation_text(16_000)
results = json.loads((labkit.DATA_DIR / "quant_results.json").read_text())  # the long runs (tools/quant_experiments.py)

# %% [markdown]
# ## 1. Training through a rounding step
#
# Quantization-aware training keeps fp32 **master weights** and, in every forward pass, uses
# their quantized values: `W_q = Dequantize(Quantize(W))`. The network learns weights that
# survive the rounding. (The survey writes `QAT(W, x) = Dequantize(Quantize(W)·x)`: multiply
# the integers, then rescale. With zero points of 0 and one scale per output channel the two
# are the same number, `s·(q·x) = (s·q)·x`; we write the form that trains.) The obstacle: `round` is flat almost everywhere, so its gradient is 0
# and nothing would ever train:

# %%
w = torch.tensor([0.12, 0.37, -0.81], requires_grad=True)
torch.round(w / 0.1).sum().backward()
print("gradient of round(w / s):", w.grad.tolist())

# %% [markdown]
# The **straight-through estimator** (Bengio et al., 2013) pretends, in the backward pass,
# that the rounding was the identity: the gradient passes straight through, except where the
# weight fell outside the grid and was clipped (there, moving it changes nothing: gradient 0).

# %%
labkit.show_source(quant.FakeQuantize)

# %% [markdown]
# The oracle is PyTorch's own `torch.fake_quantize_per_channel_affine`, forward and gradient:

# %%
g = torch.Generator().manual_seed(0)
weights = (torch.randn(4, 32, generator=g) * 2).requires_grad_()
scale, zero_point = torch.tensor([0.05, 0.1, 0.2, 0.4]), torch.tensor([8, 8, 3, 12], dtype=torch.int32)
ours = quant.FakeQuantize.apply(weights, scale[:, None], zero_point[:, None].float(), 0, 15)
twin = weights.detach().clone().requires_grad_()
theirs = torch.fake_quantize_per_channel_affine(twin, scale, zero_point, 0, 0, 15)
upstream = torch.randn(4, 32, generator=g)
ours.backward(upstream)
theirs.backward(upstream)
print("forward equal:", torch.equal(ours, theirs), "| gradient equal:", torch.equal(weights.grad, twin.grad),
      f"| {int((weights.grad == 0).sum())} of 128 weights were clipped (gradient 0)")  # fmt: skip

# %% [markdown]
# ## 2. QAT on LabGPT
#
# Notebook 08 found that 4-bit weights with groups of 32 cost LabGPT nothing; the gap worth
# closing is **4 bits with one scale per tensor** (2–3% perplexity). `quant.prepare_qat` swaps
# every linear for a `QATLinear` (an `nn.Linear` whose forward fake-quantizes its weight);
# after training, `quantize_model` turns it into the real int4 layer, with the same numbers
# (checked below).
# A short live run, 30 steps of 8 × 256 tokens (AdamW at 3e-4), after the two baselines:

# %%
model, tokenizer = labkit.load_model("tiny")
ppl_fp32 = labkit.evaluation.perplexity(model, tokenizer, validation)
ptq = quant.quantize_model(copy.deepcopy(model), "int4_weight_only", granularity="tensor")
ppl_ptq = labkit.evaluation.perplexity(ptq, tokenizer, validation)
print(f"perplexity: fp32 {ppl_fp32:.4f}, 4-bit per-tensor PTQ {ppl_ptq:.4f} ({100 * (ppl_ptq / ppl_fp32 - 1):+.2f}%)")

# %%
# NBVAL_IGNORE_OUTPUT
qat = quant.prepare_qat(copy.deepcopy(model), granularity="tensor")
print(qat.transformer.h[0].mlp.c_fc)
losses = finetune(qat, steps=30, batch_size=8, seq_len=256, lr=3e-4, progress=False)
probe = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits_qat = qat(probe)  # the fake-quantized model, before the swap
qat_int4 = quant.quantize_model(qat, "int4_weight_only", granularity="tensor")
with torch.no_grad():
    conversion_gap = (qat_int4(probe) - logits_qat).abs().max().item()
ppl_qat = labkit.evaluation.perplexity(qat_int4, tokenizer, validation)
recovered = (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_fp32)
print(f"4-bit after 30 QAT steps: perplexity {ppl_qat:.4f}, {100 * recovered:.0f}% of the gap recovered")

# %%
print(f"30 QAT steps recovered at least half of the 4-bit gap: {recovered >= 0.5}")
print(f"the real int4 model gives the fake-quantized model's logits (max difference <= 1e-4): {conversion_gap <= 1e-4}")

# %% [markdown]
# The long runs (`tools/quant_experiments.py`: 200 steps of 8 × 256 tokens, perplexity on
# 100k characters, 200 prompts per task), with the honest control: the fp32 model fine-tuned
# the same way, which shows how much of any improvement is just more training.

# %%
ptq_rows = {r["variant"]: r for r in results["ptq"]}
finetuned = results["finetune"]
fp32_long, control = ptq_rows["fp32"]["perplexity"], finetuned["fp32 fine-tuned (control)"]["perplexity"]
print(f"fp32: perplexity {fp32_long:.4f}; fp32 fine-tuned the same way (control): {control:.4f}\n")
print(f"{'4-bit model':<55} {'perplexity':>10} {'accuracy':>9} {'gap closed':>11} {'vs control':>11}")
for granularity in ("tensor", "channel"):
    ptq_row = ptq_rows[f"int4 weight-only, per {granularity}"]
    runs = [(f"int4 per {granularity}, PTQ", ptq_row)] + [(k, v) for k, v in finetuned.items() if f"per {granularity}" in k]
    for label, row in runs:
        closed = (ptq_row["perplexity"] - row["perplexity"]) / (ptq_row["perplexity"] - fp32_long)
        vs_control = (ptq_row["perplexity"] - row["perplexity"]) / (ptq_row["perplexity"] - control)
        print(f"{label:<55} {row['perplexity']:>10.4f} {100 * row['accuracy']:>8.1f}% {100 * closed:>10.0f}% "
              f"{100 * vs_control:>10.0f}%")
qat_200 = finetuned["int4 per tensor, QAT 200 steps"]["perplexity"]
ptq_tensor = ptq_rows["int4 weight-only, per tensor"]["perplexity"]
print(f"\nQAT (200 steps) recovers at least half of the per-tensor 4-bit gap: {ptq_tensor - qat_200 >= 0.5 * (ptq_tensor - fp32_long)}")

# %% [markdown]
# QAT beats both PTQ and fine-tuning the float parameters around frozen 4-bit weights (the
# survey's claim holds): after 200 steps the 4-bit model is as good as the fp32 one, and 50
# steps already get almost all of it. Part of what any fine-tune "recovers" is plain
# training: the fp32 control improves too (the shipped model has not seen this fresh text).
# Judged against that control, QAT still closes about 80% of the gap, the float-parameter
# fine-tune about half. Per channel, the PTQ gap is small (about half a percent); QAT closes
# half of it against the untouched fp32 model but only about a quarter against the control,
# and the per-channel QAT model ends a little *worse* than the per-tensor one: with a gap
# this small, 200 steps of fresh text move the result as much as the quantizer does.
#
# ## 3. Mixed-precision training: 16-bit floats
#
# Notebook 01 tabled the formats; the three that matter for training:

# %%
for r in hardware.format_properties():
    if r["format"] in ("fp32", "bf16", "fp16"):
        print(f"{r['format']:<5} largest {r['max']:.4g}, smallest normal {r['smallest_normal']:.3g}, epsilon {r['epsilon']:.3g}")
print("70000 in fp16:", torch.tensor(70000.0).half().item(), "| in bf16:", torch.tensor(70000.0).bfloat16().item())

# %% [markdown]
# fp16 has a small range: values above 65,504 overflow to inf, and values below 2⁻²⁵ ≈ 3e-8
# (half its smallest subnormal, 2⁻²⁴ ≈ 6e-8) round to 0. bf16 keeps fp32's 8-bit exponent (same range) but only
# 7 mantissa bits. Gradients are small numbers: LabGPT's, for one batch, cast to fp16:

# %%
x_batch, y_batch = labkit.train.Batches(labkit.data.corpus(200_000, seed=5), tokenizer, 256, seed=5)(8, "cpu")
model.zero_grad()
model.loss(x_batch, y_batch).backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
nonzero = grads[grads != 0]
for scale in (1.0, 2.0**16, 2.0**24, 2.0**32):
    as_fp16 = (nonzero * scale).half()
    print(f"loss scale 2^{int(math.log2(scale)):>2}: {100 * (as_fp16 == 0).float().mean().item():5.2f}% of the "
          f"gradients underflow to 0, {100 * torch.isinf(as_fp16).float().mean().item():5.2f}% overflow")

# %% [markdown]
# Multiplying the loss by a scale `S` multiplies every gradient by `S` (backpropagation is
# linear), lifting the small ones into fp16's range; dividing by `S` before the optimizer step
# undoes it. Too large an `S` overflows. Dynamic loss scaling finds the largest safe `S` as it
# goes: on an overflow, skip the step and halve `S`; after `growth_interval` clean steps, double it.
#
# **Why fp32 master weights.** An update much smaller than a weight is lost when the sum is
# rounded to 16 bits: bf16's epsilon is 2^-7 ≈ 0.008, so `1.0 + 0.001` is `1.0` again.

# %%
update = 1e-3
w16, w32 = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0)
for _ in range(1000):
    w16 += update
    w32 += update
print(f"1.0 plus a thousand updates of {update}: bf16 weight {w16.item()}, fp32 weight {w32.item():.4f}")

# %% [markdown]
# So mixed precision computes in 16 bits (autocast casts the inputs of each matmul) and
# updates fp32 weights. The kit's loss scaler, written out:

# %%
labkit.show_source(quant.LossScaler)

# %% [markdown]
# The oracle: the same training run (LabGPT `nano`, fp16 autocast, real overflows: it
# starts at `S = 2^24`) with our scaler and with `torch.amp.GradScaler`, compared step by step:

# %%
def fp16_run(scaler, steps=40):
    torch.manual_seed(0)
    net = LabGPT(get_config("nano"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    scales, skipped = [], []
    for _ in range(steps):
        scales.append(float(torch.tensor(scaler.get_scale(), dtype=torch.float32)))  # both keep S in fp32
        with torch.autocast("cpu", dtype=torch.float16):
            logits = net(ids)
        loss = F.cross_entropy(logits.float().view(-1, 128), ids.view(-1))
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        skipped.append(scaler.get_scale() < scales[-1])
    return scales, skipped, [p.detach() for p in net.parameters()]


ours = fp16_run(quant.LossScaler(init_scale=2.0**24, growth_interval=5))
theirs = fp16_run(torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=5))
print("scales equal:", ours[0] == theirs[0], "| skipped steps equal:", ours[1] == theirs[1],
      "| final weights equal:", all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2])))  # fmt: skip
print(f"{sum(ours[1])} of {len(ours[1])} steps skipped; log2(scale) per step:", [int(math.log2(s)) for s in ours[0]])

# %% [markdown]
# The scale backs off from 2^24 until the gradients fit, then saw-tooths: every 5 clean steps
# it doubles, overflows, halves. Real runs use a `growth_interval` of 2000.
#
# ### fp32 vs bf16 autocast: time and memory of a training step
#
# Activation memory is counted exactly (every tensor autograd saves for the backward pass,
# `labkit.memory.peak_activation_bytes`); time is measured here, side by side.

# %%
ids = x_batch[:4]
params = list(model.parameters())


def step(dtype):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            logits = model(ids)
        F.cross_entropy(logits.float().view(-1, logits.size(-1)), ids.reshape(-1)).backward()
        model.zero_grad(set_to_none=True)

    return run


fp32_bytes = memory.peak_activation_bytes(step(None), exclude=params)
bf16_bytes = memory.peak_activation_bytes(step(torch.bfloat16), exclude=params)
print(f"activations saved for backward (4 x 256 tokens): fp32 {fp32_bytes / 2**20:.1f} MiB, "
      f"bf16 autocast {bf16_bytes / 2**20:.1f} MiB ({100 * (1 - bf16_bytes / fp32_bytes):.0f}% less)")

# %%
# NBVAL_IGNORE_OUTPUT
rows = bench.compare({"fp32": step(None), "bf16 autocast": step(torch.bfloat16)}, warmup=1, repeat=3)

# %% [markdown]
# Autocast saves about a third of the activation memory here, not half: LayerNorm, softmax
# and the loss stay fp32 by design (autocast keeps precision-sensitive ops in fp32), and
# autocast also keeps bf16 copies of the weights for the backward pass. The speed depends on
# the hardware: CPUs with AVX-512 BF16 or AMX have bf16 dot-product instructions (this
# machine's, printed below), many do not. On a GPU, bf16 tensor cores run about 2× TF32 and
# many times plain fp32. `benchmarks/gpu_check_quant.py` timed a GPT-2-small training step
# both ways on an H100 (printed below, from the recorded run). The survey's BERT figures
# (training time cut by about 40%, memory by 50%) do not carry over as such: the time falls
# much further on an H100, while peak memory falls far less than half, because the fp32
# master weights, gradients and Adam's two moments do not shrink.

# %%
# NBVAL_IGNORE_OUTPUT
print("this CPU's vector instructions, as PyTorch uses them:", torch.backends.cpu.get_cpu_capability())
run = bench.recorded_results("gpu_results_quant_h100_run6.json")
if run is not None:
    fp32_row, bf16_row = run["mixed_precision"]
    print(f"recorded on {run['device']}, {fp32_row['name']}: fp32 {1e3 * fp32_row['variant_s']:.1f} ms, "
          f"{fp32_row['peak_memory_bytes'] / 2**30:.2f} GiB; bf16 autocast {1e3 * bf16_row['variant_s']:.1f} ms, "
          f"{bf16_row['peak_memory_bytes'] / 2**30:.2f} GiB: {fp32_row['variant_s'] / bf16_row['variant_s']:.1f}x faster, "
          f"{100 * (1 - bf16_row['peak_memory_bytes'] / fp32_row['peak_memory_bytes']):.0f}% less peak memory")

# %% [markdown]
# ## 4. The widget: dynamic loss scaling
#
# A stream of gradients whose largest value drifts (log-normal); an fp16 gradient overflows
# when `S × max|g|` exceeds 65,504. Move the initial scale and the growth interval: how many
# steps are skipped, and how close does `S` stay to the largest safe value?

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.widgets import explore


def scaler_view(fig, log2_init_scale, growth_interval):
    scaler = quant.LossScaler(init_scale=2.0**log2_init_scale, growth_interval=growth_interval)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    largest = torch.exp(torch.randn(300, generator=torch.Generator().manual_seed(1)) * 0.3 + 2.0)  # max |g| per step
    for g_max in largest.tolist():
        scaled = g_max * scaler.get_scale()
        param.grad = torch.tensor([scaled if scaled <= 65504 else float("inf")])  # what fp16 would hold
        scaler.step(optimizer)
        scaler.update()
    ax = fig.add_subplot()
    steps = range(len(scaler.history))
    ax.plot(steps, [math.log2(h["scale"]) for h in scaler.history], label="log2 S")
    ax.plot(steps, [math.log2(65504 / g) for g in largest.tolist()], color="gray", lw=0.8, label="largest safe log2 S")
    skips = [i for i, h in enumerate(scaler.history) if h["skipped"]]
    ax.plot(skips, [math.log2(scaler.history[i]["scale"]) for i in skips], "x", color="tab:red", label="skipped step")
    ax.set(xlabel="step", ylabel="log2 scale")
    ax.legend(fontsize=8)
    return f"{len(skips)} of {len(largest)} steps skipped ({100 * len(skips) / len(largest):.1f}%)"


explore(scaler_view, log2_init_scale=(4, 30, 1, 24), growth_interval=(1, 100, 1, 10))

# %% [markdown]
# ## Your turn
#
# **Exercise.** Write fake quantization with a straight-through estimator: the forward value
# is `(clamp(round(w/s) + z, q_min, q_max) − z)·s`, the gradient passes straight through
# where `w` was inside the grid and is 0 where it was clipped. The starter rounds correctly
# but has no gradient at all.

# %%
def straight_through(w, scale, zero_point, qmin, qmax):
    # your code: same forward value, but a straight-through gradient
    return (torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax) - zero_point) * scale


passed = check.straight_through(straight_through)

# %%
from labkit.solutions import quant as solutions

passed = check.straight_through(solutions.straight_through)

# %% [markdown]
# ## Takeaways
#
# - QAT trains fp32 master weights through `Dequantize(Quantize(W))` with a straight-through
#   gradient; on LabGPT it closes far more of a 4-bit gap than PTQ plus fine-tuning, in a few
#   dozen steps (the survey's claim holds), though part of any gain is just extra training.
# - fp16 underflows small gradients and overflows large ones; a dynamic loss scaler (ours
#   makes the same decisions as `torch.amp.GradScaler`, overflow for overflow) keeps them in
#   range. bf16 has fp32's range and needs no scaling; both need fp32 master weights.
# - Autocast halves the bytes of the tensors it casts, not of everything: about a third less
#   activation memory here; its speed-up is a property of the hardware's 16-bit units.
#
# ## References
#
# - Y. Bengio, N. Léonard, A. Courville, *Estimating or Propagating Gradients Through Stochastic Neurons*, 2013 (the STE).
# - B. Jacob et al., *Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference*, CVPR 2018.
# - P. Micikevicius et al., *Mixed Precision Training*, ICLR 2018 (loss scaling, fp32 master weights).
# - D. Kalamkar et al., *A Study of BFLOAT16 for Deep Learning Training*, 2019.
