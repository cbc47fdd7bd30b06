"""A planner for training a GPT on thousands of GPUs: memory per GPU and step time of a dp x tp x pp layout.

Nothing here runs a model; every number comes from a formula, so a learner can move a
layout in a widget and see why it fits (or not) and where the step time goes.

Notation (Narayanan et al. 2021): l layers, h hidden size, a heads, V vocabulary, s sequence
length, B global batch, b micro-batch, t tensor-, p pipeline-, d data-parallel size,
m = B / (d b) micro-batches per step, v virtual stages per GPU (interleaving).

Counting, from D. Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC21 (arXiv:2104.04473), section 5.1 and appendix:

    parameters   P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h))
    model FLOPs  F = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))   (forward + backward)
    with full activation recomputation (one more forward of every layer):
                 F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))

Memory per GPU, mixed-precision Adam: 2 bytes of bf16 weights, 2 of gradients and 12 of fp32
master weights, momentum and variance per parameter (the optimizer part divided by d when the
optimizer state is sharded, zero=1). Activations per layer and micro-batch, from V. Korthikanti
et al., "Reducing Activation Recomputation in Large Transformer Models", MLSys 2023
(arXiv:2205.05198), section 4 (no sequence parallelism):

    no recompute          s b h (10 + 24/t + 5 a s/(h t))   bytes   (t = 1: s b h (34 + 5 a s/h))
    selective recompute   s b h (10 + 24/t)                 (attention scores are recomputed)
    full recompute        2 s b h                           (only each layer's input is kept)

Under 1F1B the first pipeline stage holds its l/p layers for min(m, p) micro-batches in flight,
so about l layers' worth (times 1 + (p-1)/(p v) when interleaved, Korthikanti section 4.2.3).

Time of one step (all on the busiest GPU; a ring all-reduce of N bytes over n GPUs costs
2 (n-1)/n N / bandwidth):

    compute   hardware FLOPs / (num_gpus * peak * matmul_efficiency)
    tensor    per layer and micro-batch 4 all-reduces (6 with full recompute) of b s h 2 bytes,
              over NVLink when t fits in a node
    pipeline  per micro-batch and virtual stage one send forward and one backward of b s h 2 / t
              bytes per GPU (the scatter/gather of Narayanan section 4.1), over InfiniBand when
              the stages sit on different nodes
    bubble    (p-1) / (v m + p-1) of the pipeline's time is idle: Narayanan's bubble of (p-1)/(v m)
              of the busy time (section 2.2.2); bubble_fraction(p, m) when v = 1
    data      2 (d-1)/d * 2 bytes * (parameters per GPU), after the pipeline flush, NOT
              overlapped with compute (as in Megatron-LM 2021); zero=1 replaces it with a
              reduce-scatter plus an all-gather, which move the same bytes

    step = (compute + tensor + pipeline) / (1 - bubble) + data

Placement: tp innermost (consecutive GPUs of a node), then pp, then dp. Not modelled: the
optimizer step itself, the embedding and logits work of the first and last stages beyond the
FLOP count, overlap of tensor-parallel communication, latency of small messages, sequence
parallelism, the logits' activations. Link bandwidths are data-sheet figures (NCCL reaches less).

The one judgement in here is ``LAYER_FACTOR`` (see ``GPUSpec``): it turns a GPU's measured GEMM
ceiling into ``matmul_efficiency``, is the same for every run and every GPU, and was set with the
published runs in view. ``validate()`` shows how close they land, and how wide the band of values
is that would have passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .._args import check_int, check_number
from .pipeline import bubble_fraction

RECOMPUTE = ("none", "selective", "full")


_positive_int = check_int


def _ring(n_bytes: float, n: int, bandwidth: float) -> float:
    """Seconds for a ring all-reduce of ``n_bytes`` over ``n`` GPUs: 2 (n-1)/n * bytes / bandwidth."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * n_bytes / bandwidth


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A GPT: ``n_layer`` blocks of attention + MLP (hidden ``ffn_mult * d_model``), learned positions."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    ffn_mult: int = 4

    def __post_init__(self):
        for field in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len", "ffn_mult"):
            _positive_int(field, getattr(self, field))
        if self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")

    @property
    def layer_params(self) -> int:
        """(4 + 2f) h^2 weights and (9 + f) h biases and LayerNorm gains per block: 12 h^2 + 13 h for f = 4."""
        h, f = self.d_model, self.ffn_mult
        return (4 + 2 * f) * h * h + (9 + f) * h

    @property
    def params(self) -> int:
        """12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)): the blocks plus token and position embeddings (tied head)."""
        return self.n_layer * self.layer_params + (self.vocab_size + self.seq_len) * self.d_model

    def flops_per_step(self, global_batch: int, recompute: str = "none") -> float:
        """FLOPs of one step over ``global_batch`` sequences, a multiply-add counted as 2.

        A block's forward is 2 (4 + 2f) B s h^2 (matmuls) + 4 B s^2 h (scores and weighted sum);
        the logits 2 B s h V. Backward costs twice the forward. ``recompute="full"`` runs every
        block's forward once more (96 instead of 72 in the closed forms of the module docstring),
        ``"selective"`` only the attention core (4 B s^2 h per block).
        """
        _positive_int("global_batch", global_batch)
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        B, s, h, L = global_batch, self.seq_len, self.d_model, self.n_layer
        block_fwd = 2 * (4 + 2 * self.ffn_mult) * B * s * h * h + 4 * B * s * s * h
        logits_fwd = 2 * B * s * h * self.vocab_size
        total = 3 * (L * block_fwd + logits_fwd)
        if recompute == "full":
            total += L * block_fwd
        elif recompute == "selective":
            total += L * 4 * B * s * s * h
        return float(total)


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("labgpt-tiny", 6, 192, 6, 128, 512),
        ModelSpec("gpt2-small", 12, 768, 12, 50304, 1024),  # 50257 padded to a multiple of 64
        ModelSpec("gpt3-1.3b", 24, 2048, 16, 51200, 2048),  # Brown et al. 2020, Table 2.1
        ModelSpec("gpt3-175b", 96, 12288, 96, 51200, 2048),  # the 174.6B of Narayanan et al. Table 2
        ModelSpec("megatron-145b", 80, 12288, 96, 51200, 2048),  # Narayanan et al. Table 1, 145.6B row
        ModelSpec("megatron-1t", 128, 25600, 160, 51200, 2048),  # Narayanan et al. Table 1, 1008B row
    )
}


# ---------------------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """One GPU of a cluster. Bandwidths are bytes/s per GPU in one direction.

    ``matmul_efficiency`` is the fraction of ``peak_flops`` that a transformer's compute runs at
    in practice: large GEMMs reach about 80-86% of peak (measured "maximum achievable matmul
    FLOPS"), and the memory-bound kernels between them (LayerNorm, softmax, dropout, GeLU)
    pull a whole layer lower; see ``LAYER_FACTOR``. It is an assumption, not a measurement of
    this kit. Memory is the data sheet's GB taken as 10^9 bytes (a little below the real GiB).
    """

    name: str
    peak_flops: float
    memory_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int
    matmul_efficiency: float
    source: str

    def __post_init__(self):
        for field in ("peak_flops", "memory_bytes", "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)!r}")
        _positive_int("gpus_per_node", self.gpus_per_node)
        if not 0 < self.matmul_efficiency <= 1:
            raise ValueError(f"matmul_efficiency must be in (0, 1], got {self.matmul_efficiency!r}")


# matmul_efficiency = (best large bf16 GEMM / peak, measured) x LAYER_FACTOR.
# The GEMM ceilings are "maximum achievable matmul FLOPS" measured with mamf-finder.py and listed in
# S. Bekman, "Machine Learning Engineering Open Book", compute/accelerator/README.md: A100 SXM 267.9 of
# 312 TFLOP/s (85.9%), H100 SXM 792.1 of 989 (80.1%); the H200 has the H100's compute die, so it gets
# the same. LAYER_FACTOR is this module's one assumption: a transformer layer spends about 30% of its
# time outside peak-shaped GEMMs (attention core, softmax, LayerNorm, GeLU, dropout, residual adds,
# GEMMs with smaller or awkward shapes). It is a judgement, not a measurement, and it is not fitted
# per run: any LAYER_FACTOR from 0.54 to 0.81 keeps every PUBLISHED run within +-25% (see validate()).
LAYER_FACTOR = 0.70
_A100_EFFICIENCY = round(0.859 * LAYER_FACTOR, 3)  # 0.601
_H100_EFFICIENCY = round(0.801 * LAYER_FACTOR, 3)  # 0.561
_EFFICIENCY_NOTE = (
    "matmul_efficiency: measured max matmul fraction (Bekman, ML Engineering Open Book, MAMF table) x LAYER_FACTOR 0.70"
)
_A100_SOURCE = (
    "NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 80 GB HBM2e (40 GB HBM2), NVLink 3 600 GB/s = 300 per "
    "direction; DGX A100: 8x 200 Gb/s HDR InfiniBand per node, one per GPU = 25 GB/s. " + _EFFICIENCY_NOTE
)
_H100_SOURCE = (
    "NVIDIA H100/H200 datasheets: 989 TFLOP/s dense bf16 (1979 with sparsity), H100 80 GB HBM3, H200 141 GB "
    "HBM3e, NVLink 4 900 GB/s = 450 per direction; DGX H100/H200: 8x 400 Gb/s NDR per node, one per GPU = "
    "50 GB/s. " + _EFFICIENCY_NOTE
)
GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        # name, peak FLOP/s, memory, NVLink and InfiniBand byte/s per GPU, GPUs per node, efficiency, source
        GPUSpec("A100-80GB", 312e12, 80e9, 300e9, 25e9, 8, _A100_EFFICIENCY, _A100_SOURCE),
        GPUSpec("A100-40GB", 312e12, 40e9, 300e9, 25e9, 8, _A100_EFFICIENCY, _A100_SOURCE),
        GPUSpec("H100-SXM", 989e12, 80e9, 450e9, 50e9, 8, _H100_EFFICIENCY, _H100_SOURCE),
        GPUSpec("H200", 989e12, 141e9, 450e9, 50e9, 8, _H100_EFFICIENCY, _H100_SOURCE),
    )
}


# ---------------------------------------------------------------------------------------
# Layouts and plans
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How ``dp * tp * pp`` GPUs share a step of ``global_batch`` sequences fed as ``micro_batch``-sized pieces."""

    dp: int
    tp: int
    pp: int
    micro_batch: int
    global_batch: int
    recompute: str = "none"
    zero: int = 0
    interleave: int = 1

    def __post_init__(self):
        for field in ("dp", "tp", "pp", "micro_batch", "global_batch", "interleave"):
            _positive_int(field, getattr(self, field))
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.zero not in (0, 1):
            raise ValueError(f"zero must be 0 (replicated optimizer) or 1 (sharded over dp), got {self.zero!r}")
        if self.global_batch % (self.dp * self.micro_batch):
            raise ValueError(
                f"global_batch ({self.global_batch}) must be divisible by dp * micro_batch "
                f"({self.dp} * {self.micro_batch} = {self.dp * self.micro_batch})"
            )

    @property
    def num_gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def micro_batches(self) -> int:
        """m = global_batch / (dp * micro_batch): micro-batches each pipeline runs per step."""
        return self.global_batch // (self.dp * self.micro_batch)


@dataclass(frozen=True)
class Plan:
    """What a layout costs: bytes per GPU (first pipeline stage, the fullest) and seconds per step."""

    model: ModelSpec
    gpu: GPUSpec
    layout: Layout
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float
    bubble: float
    model_flops: float
    hardware_flops: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu.memory_bytes

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.pp_comm_s + self.bubble_s + self.dp_comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch * self.model.seq_len / self.step_s

    @property
    def flops_per_gpu(self) -> float:
        """Achieved hardware FLOP/s per GPU, recomputation included: what Megatron-LM reports."""
        return self.hardware_flops / (self.layout.num_gpus * self.step_s)

    @property
    def aggregate_flops(self) -> float:
        return self.hardware_flops / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: FLOPs without recomputation / (num_gpus * peak * step time)."""
        return self.model_flops / (self.layout.num_gpus * self.gpu.peak_flops * self.step_s)

    @property
    def hfu(self) -> float:
        """Hardware FLOPs utilisation: the same with the recomputed FLOPs counted."""
        return self.hardware_flops / (self.layout.num_gpus * self.gpu.peak_flops * self.step_s)

    def as_dict(self) -> dict:
        """The layout and every number of the plan, flat: one row of a table."""
        keys = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "total_bytes", "fits")
        keys += ("compute_s", "tp_comm_s", "pp_comm_s", "bubble_s", "dp_comm_s", "step_s", "bubble")
        keys += ("tokens_per_s", "flops_per_gpu", "aggregate_flops", "mfu", "hfu")
        head = {"model": self.model.name, "gpu": self.gpu.name, **asdict(self.layout), "num_gpus": self.layout.num_gpus}
        return head | {key: getattr(self, key) for key in keys}

    def table(self) -> str:
        lo, GB = self.layout, 1e9
        lines = [
            f"{self.model.name} on {lo.num_gpus} x {self.gpu.name}: dp {lo.dp} x tp {lo.tp} x pp {lo.pp}, "
            f"micro-batch {lo.micro_batch}, global batch {lo.global_batch} (m = {lo.micro_batches}), "
            f"recompute {lo.recompute}, zero {lo.zero}, interleave {lo.interleave}",
            f"  memory per GPU   weights {self.weights_bytes / GB:7.2f} GB   gradients {self.gradients_bytes / GB:7.2f} GB"
            f"   optimizer {self.optimizer_bytes / GB:7.2f} GB   activations {self.activations_bytes / GB:7.2f} GB",
            f"                   total {self.total_bytes / GB:7.2f} GB of {self.gpu.memory_bytes / GB:.0f} GB: "
            + ("fits" if self.fits else "DOES NOT FIT"),
            f"  step {self.step_s:9.3f} s   compute {self.compute_s:.3f}   tensor comm {self.tp_comm_s:.3f}   "
            f"pipeline comm {self.pp_comm_s:.3f}   bubble {self.bubble_s:.3f} ({self.bubble:.1%})   "
            f"data comm {self.dp_comm_s:.3f}",
            f"  {self.tokens_per_s:,.0f} tokens/s   {self.flops_per_gpu / 1e12:.0f} TFLOP/s per GPU   "
            f"{self.aggregate_flops / 1e15:.1f} PFLOP/s in all   MFU {self.mfu:.1%}   HFU {self.hfu:.1%}",
        ]
        return "\n".join(lines)

    __str__ = table


def _lookup(value, registry: dict, kind: str):
    if isinstance(value, str):
        if value not in registry:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(registry)}")
        return registry[value]
    return value


def activation_bytes_per_layer(model: ModelSpec, micro_batch: int, tp: int, recompute: str) -> float:
    """Korthikanti et al. 2022, section 4: bytes one layer keeps for the backward pass, per GPU."""
    s, b, h, a, t = model.seq_len, micro_batch, model.d_model, model.n_head, tp
    if recompute == "full":
        return 2 * s * b * h
    if recompute == "selective":
        return s * b * h * (10 + 24 / t)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def plan(model: ModelSpec | str, gpu: GPUSpec | str, layout: Layout) -> Plan:
    """Memory per GPU and time per step of ``layout`` (formulas in the module docstring)."""
    model, gpu = _lookup(model, MODELS, "model"), _lookup(gpu, GPUS, "gpu")
    lo = layout
    d, t, p, v, b, m = lo.dp, lo.tp, lo.pp, lo.interleave, lo.micro_batch, lo.micro_batches
    L, h, s = model.n_layer, model.d_model, model.seq_len
    if model.n_head % t:
        raise ValueError(f"tp ({t}) must divide n_head ({model.n_head}) of {model.name}")
    if p > L:
        raise ValueError(f"pp ({p}) must be <= n_layer ({L})")
    if L % (p * v):
        raise ValueError(f"n_layer ({L}) must be divisible by pp * interleave ({p} * {v} = {p * v})")

    # Memory of the first stage: its l/p blocks plus the token and position embeddings, split t ways.
    # (The last stage holds the tied output embedding instead of the position one: about the same.)
    stage_params = (L // p) * model.layer_params + (model.vocab_size + s) * h
    params_per_gpu = stage_params / t
    weights, grads = 2 * params_per_gpu, 2 * params_per_gpu
    optimizer = 12 * params_per_gpu / (d if lo.zero else 1)
    interleave_extra = 1 + (p - 1) / (p * v) if v > 1 else 1.0
    in_flight_layers = (L // p) * min(m, p) * interleave_extra
    activations = in_flight_layers * activation_bytes_per_layer(model, b, t, lo.recompute)
    if lo.recompute == "full":  # the backward of one block rebuilds all of that block's activations
        activations += activation_bytes_per_layer(model, b, t, "none")

    # Time of the busiest GPU.
    model_flops = model.flops_per_step(lo.global_batch, "none")
    hardware_flops = model.flops_per_step(lo.global_batch, lo.recompute)
    compute = hardware_flops / (lo.num_gpus * gpu.peak_flops * gpu.matmul_efficiency)
    act_bytes = b * s * h * 2  # one micro-batch's hidden states in bf16
    tp_bw = gpu.intra_node_bandwidth if t <= gpu.gpus_per_node else gpu.inter_node_bandwidth
    all_reduces = 6 if lo.recompute == "full" else 4
    tp_comm = m * (L // p) * all_reduces * _ring(act_bytes, t, tp_bw)
    if p == 1:
        pp_comm = 0.0
    elif t * p <= gpu.gpus_per_node:  # the whole pipeline sits in one node: full tensors over NVLink
        pp_comm = m * v * 2 * act_bytes / gpu.intra_node_bandwidth
    else:  # each tensor-parallel rank sends 1/t of the tensor over its own NIC (scatter/gather)
        pp_comm = m * v * 2 * (act_bytes / t) / gpu.inter_node_bandwidth
    bubble = bubble_fraction(p, v * m)  # (p-1)/(v m + p-1): the idle time shrinks v-fold, as if v m micro-batches
    busy = compute + tp_comm + pp_comm
    bubble_s = busy * bubble / (1 - bubble)
    dp_bw = gpu.intra_node_bandwidth if lo.num_gpus <= gpu.gpus_per_node else gpu.inter_node_bandwidth
    dp_comm = _ring(2 * params_per_gpu, d, dp_bw)
    return Plan(
        model=model,
        gpu=gpu,
        layout=lo,
        weights_bytes=weights,
        gradients_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        compute_s=compute,
        tp_comm_s=tp_comm,
        pp_comm_s=pp_comm,
        bubble_s=bubble_s,
        dp_comm_s=dp_comm,
        bubble=bubble,
        model_flops=model_flops,
        hardware_flops=hardware_flops,
    )


# ---------------------------------------------------------------------------------------
# Checking the model against published runs
# ---------------------------------------------------------------------------------------
_NARAYANAN = "Narayanan et al., Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM, SC21"
_TABLE_1 = _NARAYANAN + ", Table 1"
_TABLE_2 = _NARAYANAN + ", Table 2 (PTD-P; model-parallel size 96 read as tp 8 x pp 12)"


def _run(name, model, layout, flops_per_gpu, aggregate_flops, source) -> dict:
    fraction = flops_per_gpu / GPUS["A100-80GB"].peak_flops
    return dict(name=name, model=model, gpu="A100-80GB", layout=layout, flops_per_gpu=flops_per_gpu,
                aggregate_flops=aggregate_flops, fraction_of_peak=fraction, source=source)  # fmt: skip


# Reported throughput counts hardware FLOPs (full recomputation included). Table 1 does not give the
# micro-batch size: 1 is assumed, as in Table 2.
# Table 2 gives per-GPU throughput only; its aggregate here is that times the GPU count.
PUBLISHED: list[dict] = [
    _run("Megatron-LM 1T on 3072 A100s", "megatron-1t", Layout(6, 8, 64, 1, 3072, "full"), 163e12, 502.0e15,
         _TABLE_1 + ", 1008.0B row: 163 TFLOP/s per GPU, 52% of peak, 502.0 PFLOP/s"),
    _run("Megatron-LM 145.6B on 1536 A100s", "megatron-145b", Layout(24, 8, 8, 1, 2304, "full"), 148e12, 227.1e15,
         _TABLE_1 + ", 145.6B row (GPT-3's width, 80 layers): 148 TFLOP/s per GPU, 47% of peak, 227.1 PFLOP/s"),
    _run("GPT-3 175B on 1536 A100s", "gpt3-175b", Layout(16, 8, 12, 1, 1536, "full"), 141e12, 141e12 * 1536,
         _TABLE_2 + ", 174.6B on 1536 GPUs, batch 1536: 141 TFLOP/s per GPU"),
    _run("GPT-3 175B on 384 A100s", "gpt3-175b", Layout(4, 8, 12, 1, 1536, "full"), 153e12, 153e12 * 384,
         _TABLE_2 + ", 174.6B on 384 GPUs, batch 1536: 153 TFLOP/s per GPU"),
]  # fmt: skip


def validate(gpu: GPUSpec | str | None = None) -> list[dict]:
    """Predicted against reported FLOP/s for every run in ``PUBLISHED``; ratio = predicted / reported.

    Every row uses the same GPU spec (``gpu`` overrides it, to try another matmul_efficiency).
    With the A100's 0.601 (aggregate FLOP/s, predicted / reported):

        1T on 3072 GPUs        488 / 502.0 PFLOP/s   0.97   (159 vs 163 TFLOP/s per GPU)
        145.6B on 1536 GPUs    243 / 227.1 PFLOP/s   1.07   (158 vs 148)
        175B on 1536 GPUs      234 / 216.6 PFLOP/s   1.08   (152 vs 141)
        175B on 384 GPUs        64 /  58.8 PFLOP/s   1.09   (167 vs 153)

    Any efficiency from 0.46 to 0.69 keeps every row within +-25%, so the check is not a knife
    edge; but the bare GEMM ceiling (0.859) would land 36-50% high: a big GEMM's speed is not a
    transformer layer's speed. The model also gets the trend of Table 2 right (fewer micro-batches
    per pipeline as GPUs are added: a bigger bubble, lower throughput), and slightly
    overestimates the smaller models, whose narrower GEMMs run further below peak than a single
    efficiency can say. The paper does not list the pipeline schedule or every micro-batch size;
    these rows assume the default 1F1B schedule (interleave 1) and micro-batch 1.
    """
    rows = []
    for run in PUBLISHED:
        p = plan(run["model"], gpu or run["gpu"], run["layout"])
        rows.append(
            {
                "name": run["name"],
                "predicted_flops_per_gpu": p.flops_per_gpu,
                "reported_flops_per_gpu": run["flops_per_gpu"],
                "predicted_aggregate_flops": p.aggregate_flops,
                "reported_aggregate_flops": run["aggregate_flops"],
                "ratio": p.aggregate_flops / run["aggregate_flops"],
                "predicted_hfu": p.hfu,
                "reported_fraction_of_peak": run["fraction_of_peak"],
                "fits": p.fits,
                "source": run["source"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# Searching layouts
# ---------------------------------------------------------------------------------------
def search_layouts(
    model: ModelSpec | str,
    gpu: GPUSpec | str,
    num_gpus: int,
    global_batch: int,
    micro_batch: int = 1,
    recompute: str = "full",
    memory_limit: float | None = None,
    zero: int = 0,
) -> list[Plan]:
    """Every dp x tp x pp = ``num_gpus`` layout that fits ``memory_limit`` bytes per GPU, fastest first.

    tp runs over powers of two up to a node's GPUs that divide the head count; pp over the
    divisors of the layer count; dp is what is left, and must split the batch into whole
    micro-batches. ``memory_limit`` defaults to the GPU's memory.
    """
    model, gpu = _lookup(model, MODELS, "model"), _lookup(gpu, GPUS, "gpu")
    _positive_int("num_gpus", num_gpus)
    _positive_int("global_batch", global_batch)
    _positive_int("micro_batch", micro_batch)
    limit = gpu.memory_bytes if memory_limit is None else memory_limit
    check_number("memory_limit", limit, note=" of bytes (or None: the GPU's memory)")
    plans = []
    tp = 1
    while tp <= min(gpu.gpus_per_node, num_gpus):
        for pp in range(1, model.n_layer + 1):
            if model.n_head % tp or model.n_layer % pp or num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            if global_batch % (dp * micro_batch):
                continue
            p = plan(model, gpu, Layout(dp, tp, pp, micro_batch, global_batch, recompute, zero))
            if p.total_bytes <= limit:
                plans.append(p)
        tp *= 2
    return sorted(plans, key=lambda p: p.step_s)


def plot_breakdown(plans: list[Plan], axes=None):
    """Two stacked bar charts, one bar per plan: memory per GPU and where the step time goes."""
    import matplotlib.pyplot as plt

    if not plans:
        raise ValueError("plans must hold at least one Plan")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"d{p.layout.dp} t{p.layout.tp} p{p.layout.pp}" for p in plans]
    x = range(len(plans))
    parts = [
        (axes[0], 1e9, "GB per GPU", ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")),
        (axes[1], 1.0, "seconds per step", ("compute_s", "tp_comm_s", "pp_comm_s", "bubble_s", "dp_comm_s")),
    ]
    for ax, scale, ylabel, keys in parts:
        bottom = [0.0] * len(plans)
        for key in keys:
            values = [getattr(p, key) / scale for p in plans]
            ax.bar(x, values, bottom=bottom, label=key.rsplit("_", 1)[0].replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(list(x), labels, rotation=30, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[0].axhline(plans[0].gpu.memory_bytes / 1e9, color="k", ls="--", lw=1)
    axes[0].set_title(f"memory per GPU ({plans[0].gpu.name}: dashed)", fontsize=10)
    axes[1].set_title("time per step", fontsize=10)
    return axes
