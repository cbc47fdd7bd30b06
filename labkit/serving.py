"""Serving an LLM: the KV cache, batching many requests, speculative decoding, energy.

Training makes a model; serving pays for every token it generates, for every user, all
day. Four ideas decide what that costs:

1. **KV cache** -- keep every layer's keys and values, so token n costs one position
   instead of re-running n: decoding n tokens is O(n) positions of work, not O(n²).
2. **Continuous batching** -- decode one step for every request in flight as a batch, and
   let a finished request's slot be taken by a waiting one *at the next step* (Orca, vLLM).
   Static batching waits for the whole batch to finish, so one long answer holds every
   slot of its batch hostage.
3. **Speculative decoding** -- a small draft model guesses k tokens; the big model checks
   all k in one forward pass and keeps the longest prefix it agrees with, plus its own
   next token. Greedy output is *identical* to the big model's; it is faster when the
   draft is cheap and usually right.
4. **Energy** -- joules per token, read from the machine's power counters where it has
   them (RAPL on Linux CPUs, NVML on NVIDIA GPUs), estimated from FLOPs otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ._args import check_int, check_number
from .model import KVCache, LabGPT

# -- 1. the KV cache ----------------------------------------------------------------


def generation_time(model: LabGPT, prompt_len: int, new_tokens: int, use_cache: bool, repeat: int = 3,
                    batch_size: int = 1) -> float:
    """Median seconds to greedily generate ``new_tokens`` after a ``prompt_len``-token prompt."""
    check_int("prompt_len", prompt_len)
    check_int("new_tokens", new_tokens, 0)
    if not 1 <= prompt_len + new_tokens <= model.config.block_size:
        raise ValueError(f"prompt_len + new_tokens must be in 1..{model.config.block_size} (the context), "
                         f"got {prompt_len} + {new_tokens}")
    from .bench import measure

    device = model.transformer.wte.weight.device
    idx = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    with torch.no_grad():
        m = measure(lambda: model.generate(idx, new_tokens, temperature=0, use_cache=use_cache), warmup=1,
                    repeat=repeat, device=device)
    return m.median_s


def decode_scaling(model: LabGPT, lengths=(32, 64, 128, 256), prompt_len: int = 16, repeat: int = 3) -> list[dict]:
    """Generation time vs generated length, with and without the cache (the O(n) vs O(n²) plot)."""
    rows = []
    for n in lengths:
        cached = generation_time(model, prompt_len, n, True, repeat)
        uncached = generation_time(model, prompt_len, n, False, repeat)
        rows.append({"tokens": n, "cached_s": cached, "uncached_s": uncached, "speedup": uncached / cached})
    return rows


def fit_power(xs, ys) -> float:
    """The exponent b of y ≈ a·x^b (a least-squares line on log-log axes)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# -- 2. batching many requests ---------------------------------------------------------


@dataclass
class Request:
    """One user's request: it arrives at ``arrival`` s, brings ``prompt`` and wants ``max_new_tokens``."""

    rid: int
    arrival: float
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def latency(self) -> float:
        return self.finished_at - self.arrival


def make_workload(n_requests: int = 48, rate: float = 50.0, prompt_len=(8, 64), short=(4, 16), long=(128, 256),
                  long_fraction: float = 0.15, vocab_size: int = 128, seed: int = 0) -> list[Request]:
    """Poisson arrivals at ``rate`` requests/s; prompt lengths uniform in ``prompt_len``; output
    lengths bimodal (most answers short, ``long_fraction`` of them long): the high variance that
    real chat traffic has and that static batching handles badly."""
    check_int("n_requests", n_requests)
    check_int("vocab_size", vocab_size, 2)  # token 0 is left out of prompts: at least one other
    for name, (lo, hi), low in (("prompt_len", prompt_len, 1), ("short", short, 1), ("long", long, 1)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not low <= lo <= hi:
            raise ValueError(f"{name} must be a (low, high) pair of ints with {low} <= low <= high, got {(lo, hi)!r}")
    if not rate > 0:
        raise ValueError(f"rate (offered load, requests per second) must be > 0, got {rate!r}")
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    t, out = 0.0, []
    for i in range(n_requests):
        t += -math.log(1.0 - torch.rand((), generator=g).item()) / rate  # exponential gaps: Poisson arrivals
        p = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (), generator=g))
        lo, hi = long if torch.rand((), generator=g).item() < long_fraction else short
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        out.append(Request(i, t, torch.randint(1, vocab_size, (p,), generator=g).tolist(), n))
    return out


class SlotCache:
    """A KV cache of ``slots`` rows, each row its own sequence with its own length.

    A continuous-batching server decodes one token for every busy slot in one batched
    forward; each row attends only to its own filled positions (a per-row mask).
    """

    def __init__(self, model: LabGPT, slots: int) -> None:
        cfg = model.config
        p = model.transformer.wte.weight
        shape = (slots, cfg.n_head, cfg.block_size, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.length = torch.zeros(slots, dtype=torch.long, device=p.device)

    def admit(self, model: LabGPT, slot: int, prompt: list[int]) -> torch.Tensor:
        """Prefill ``prompt`` into ``slot``; returns the logits of its last position."""
        idx = torch.tensor([prompt], device=self.length.device)
        cache = KVCache(model.config, 1, device=idx.device, dtype=self.k[0].dtype)
        logits = model(idx, cache=cache)[0, -1]
        T = len(prompt)
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :T] = cache.k[layer][0, :, :T]
            self.v[layer][slot, :, :T] = cache.v[layer][0, :, :T]
        self.length[slot] = T
        return logits


@torch.no_grad()
def decode_step(model: LabGPT, cache: SlotCache, slots, tokens: torch.Tensor, whole_cache: bool = False) -> torch.Tensor:
    """One token for each of ``slots`` (a batch of rows at different positions); returns (B, vocab) logits.

    The same computation as ``LabGPT.forward`` with a cache, written out so that every row
    has its own position: its own positional embedding, its own cache slot, its own mask.
    ``slots`` is a tensor of slot numbers or a slice. With ``whole_cache`` every step attends
    over all ``block_size`` positions (masked): the shapes never change and nothing waits
    for the host, so the step can be captured once in a CUDA graph and replayed.
    """
    t = model.transformer
    # the position each new token takes (a finished row of a static batch may run on: clamp it)
    pos = cache.length[slots].clamp(max=model.config.block_size - 1)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.numel() != pos.numel():
        raise ValueError(f"tokens must be a 1-D tensor with one token per slot ({pos.numel()}), got "
                         f"{tuple(getattr(tokens, 'shape', ())) or type(tokens).__name__}")  # fmt: skip
    x = t.wte(tokens) + t.wpe(pos)  # (B, C)
    x = x.unsqueeze(1)  # (B, 1, C)
    S = model.config.block_size if whole_cache else int(pos.max()) + 1
    visible = torch.arange(S, device=pos.device)[None, :] <= pos[:, None]  # (B, S): each row's own keys
    mask = visible[:, None, None, :]  # (B, 1, 1, S)
    rows = slots  # how the cache is read
    if isinstance(slots, slice):  # writing needs one (row, position) pair per sequence
        slots = torch.arange(cache.length.numel(), device=pos.device)[slots]
    elif not whole_cache:
        first = int(slots[0])
        if bool((slots == torch.arange(first, first + len(slots), device=slots.device)).all()):
            rows = slice(first, first + len(slots))  # a slice reads the cache without a copy
    for layer, block in enumerate(t.h):
        attn = block.attn
        h = block.ln_1(x)
        B, _, C = h.shape
        q, k, v = attn.c_attn(h).split(attn.n_embd, dim=2)
        q, k, v = (z.view(B, 1, attn.n_head, C // attn.n_head).transpose(1, 2) for z in (q, k, v))
        cache.k[layer][slots, :, pos] = k[:, :, 0]
        cache.v[layer][slots, :, pos] = v[:, :, 0]
        keys, values = cache.k[layer][rows, :, :S], cache.v[layer][rows, :, :S]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    cache.length[slots] = pos + 1
    return model.lm_head(t.ln_f(x))[:, 0]


@torch.no_grad()
def fused_decode_step(model: LabGPT, cache: SlotCache, tokens: torch.Tensor, kernels_per_layer: int = 3,
                      splits: int | None = None, backend: str | None = None, pdl: bool | None = None,
                      next_tokens: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``decode_step`` for every slot of ``cache`` in a few fused kernels a layer; returns (B, vocab) fp32 logits.

    The kernels of ``labkit.kernels.decode_kernels``. With ``kernels_per_layer=5``:
    LayerNorm + qkv GEMV (the new key and value written into the cache), attention split
    along the cache (flash-decoding, ``splits`` parts), the parts merged in the output
    projection's prologue and added into the residual stream, LayerNorm + c_fc + GELU, and
    c_proj added into the residual stream. With ``kernels_per_layer=3``: LayerNorm + qkv;
    each head's attention times its slice of the output projection, added atomically; the
    whole MLP in one kernel, each program a block of hidden units. The MLP reads the
    residual stream while it adds into a second buffer (zeroed by the layer's first kernel),
    and the two buffers swap roles every layer.

    The residual stream stays in fp32. Attention reads only each row's filled positions, and
    no shape depends on them: a CUDA graph can capture the step. On a CPU without
    ``TRITON_INTERPRET=1`` the same chain runs the PyTorch references. ``pdl`` (default: where
    supported, Hopper GPUs) launches each kernel with programmatic dependent launch: it starts
    while the previous one finishes (loading weights, which no kernel writes) and waits for
    its results only where it reads them.

    ``next_tokens`` (B,) integer, if given, receives each row's greedy token (the argmax of
    the logits, first index on ties) from the kernels themselves: the lm_head GEMV folds each
    block's largest logit into one int64 a row by atomic max, and one small kernel unpacks it
    (``decode_kernels.greedy_tokens``); no separate pass over the logits. It may be ``tokens``
    itself: a graph-captured step then feeds itself.
    """
    from .kernels import decode_kernels as dk

    if kernels_per_layer not in (3, 5):
        raise ValueError(f"kernels_per_layer must be 3 or 5, got {kernels_per_layer!r}")
    _check_fusable(model)
    t = model.transformer
    if tokens.shape != cache.length.shape:
        raise ValueError(f"tokens must have one entry per cache slot, shape {tuple(cache.length.shape)}, "
                         f"got {tuple(tokens.shape)}")  # fmt: skip
    if next_tokens is not None and (next_tokens.shape != cache.length.shape or next_tokens.dtype not in
                                    (torch.int32, torch.int64) or not next_tokens.is_contiguous()):  # fmt: skip
        raise ValueError(f"next_tokens must be a contiguous integer tensor of shape {tuple(cache.length.shape)}, got "
                         f"{next_tokens.dtype} {tuple(next_tokens.shape)}")  # fmt: skip
    pdl = dk.pdl_supported(tokens) if pdl is None else pdl
    x, pos = dk.embed(tokens, cache.length, t.wte.weight, t.wpe.weight, backend, pdl)  # length moves on here
    spare = torch.empty_like(x) if kernels_per_layer == 3 else None
    for layer, block in enumerate(t.h):
        a, mlp = block.attn, block.mlp
        ln_1 = (block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        ln_2 = (block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        kv = (cache.k[layer], cache.v[layer], pos)
        qkv = dk.decode_linear(x, a.c_attn.weight, a.c_attn.bias, ln=ln_1, kv=kv, zero=spare, backend=backend, pdl=pdl)
        if kernels_per_layer == 3:
            dk.decode_attention_proj(qkv, *kv, a.n_head, a.c_proj.weight, a.c_proj.bias, out=x, backend=backend,
                                     pdl=pdl)  # fmt: skip
            proj_t = dk.transposed_weight(mlp.c_proj)
            dk.decode_mlp(x, ln_2, mlp.c_fc.weight, mlp.c_fc.bias, proj_t, mlp.c_proj.bias, out=spare, backend=backend,
                          pdl=pdl)  # fmt: skip
            x, spare = spare, x
        else:
            parts = dk.decode_attention(qkv, *kv, a.n_head, splits, backend, pdl)
            dk.decode_linear(parts, a.c_proj.weight, a.c_proj.bias, out=x, backend=backend, pdl=pdl)
            h = dk.decode_linear(x, mlp.c_fc.weight, mlp.c_fc.bias, ln=ln_2, gelu=True, backend=backend, pdl=pdl)
            dk.decode_linear(h, mlp.c_proj.weight, mlp.c_proj.bias, out=x, backend=backend, pdl=pdl)
    ln_f = (t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
    if next_tokens is None:
        return dk.decode_linear(x, model.lm_head.weight, None, ln=ln_f, backend=backend, pdl=pdl)
    best = cache.__dict__.get("_greedy_best")  # kept with the cache: the greedy kernel empties it after each step
    if best is None or best.shape != cache.length.shape:
        best = cache.__dict__["_greedy_best"] = dk.greedy_buffer(cache.length.shape[0], cache.length.device)
    logits = dk.decode_linear(x, model.lm_head.weight, None, ln=ln_f, argmax=best, backend=backend, pdl=pdl)
    dk.greedy_tokens(best, next_tokens, model.lm_head.weight.shape[0], backend, pdl)
    return logits


def tune_fused_decode_step(model: LabGPT, cache: SlotCache, kernels_per_layer: int = 3, pdl: bool | None = None,
                           length: int | None = None, replays: int = 20, rounds: int = 3, tolerance: float = 1e-2,
                           passes: int = 2, progress: bool = False) -> dict:  # fmt: skip
    """Choose the launch configurations of ``fused_decode_step`` by timing whole steps; returns what it measured.

    Each kernel's own autotuner (``decode_kernels``) times that kernel alone, launched again
    and again from Python: for kernels of a few microseconds it measures the launch overhead
    more than the GPU, with the kernel's weights hot in L2. This one times what decoding
    runs: a whole step (every layer's weights read once), captured in a CUDA graph and
    replayed (``bench.graph_seconds``). Kernel by kernel, in launch order, each candidate is
    tried with the others held at their current choice, and the fastest kept: coordinate
    descent, up to ``passes`` passes over the kernels (it stops early when a pass changes no
    choice; with programmatic dependent launch one kernel's best depends on its neighbours').
    A candidate whose logits differ from the first choice's by more than ``tolerance`` times
    the largest logit, or that fails to run, is left out.

    ``length`` is the position every row's step is timed at (default: each row's length now):
    the attention reads that many positions, so tune where decoding will spend its time (an
    H100 run chose a configuration fast at 33 positions and slow at 160). The cache is left
    as it was: its lengths, and the keys and values the timed steps overwrite at that
    position. The choices stay in ``decode_kernels`` for every later step of the same shapes;
    the logits each candidate is checked against come from the kernels' PyTorch references. On a CPU (the Triton interpreter or the references) steps
    are timed plainly, which is slow: for tests. Returns {"before_s", "after_s", "passes",
    "kernels": {key: [(config, seconds or None), ...]} (the last pass's timings), "chosen":
    {key: config}}.
    """
    from tqdm.auto import tqdm

    from . import bench
    from .kernels import decode_kernels as dk

    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
    check_int("passes", passes)
    block_size = model.config.block_size
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or not 0 <= length < block_size):
        raise ValueError(f"length must be an int in [0, {block_size - 1}] (the context), got {length!r}")
    device = model.lm_head.weight.device
    tokens = torch.zeros_like(cache.length)
    start = cache.length.clone()
    timed_at = start if length is None else torch.full_like(start, length)
    rows, written = torch.arange(len(start), device=start.device), timed_at.clamp(max=block_size - 1)
    kept = [(k[rows, :, written].clone(), v[rows, :, written].clone()) for k, v in zip(cache.k, cache.v)]

    def step(backend=None):
        cache.length.copy_(timed_at)
        return fused_decode_step(model, cache, tokens, kernels_per_layer, pdl=pdl, backend=backend)

    def timed() -> float | None:
        seconds, logits = bench.graph_seconds(step, replays, rounds, device)
        off = (logits.float() - reference).abs().max()
        return seconds if bool(torch.isfinite(off)) and off <= limit else None

    try:
        with torch.no_grad():
            with dk.recording_keys() as keys:
                step()  # each kernel's own autotuner runs here, once per shape
            reference = step(backend="reference").float()  # what every candidate must give
            limit = tolerance * reference.abs().max()
            before = timed()
            log, chosen = {}, {}
            bar = tqdm(total=passes * len(keys), desc="tuning the fused step", disable=not progress)
            done = 0
            while done < passes:
                done += 1
                changed = False
                for key in keys:
                    first = dk._tuned.get(key)
                    results, best = [], first
                    try:
                        for config in dk.candidates(key):
                            dk._tuned[key] = config
                            try:
                                results.append((config, timed()))
                            except Exception:  # noqa: BLE001 - a config this GPU cannot run is left out, as in kernels.fastest
                                results.append((config, None))
                        ran = [r for r in results if r[1] is not None]
                        best = min(ran, key=lambda r: r[1])[0] if ran else first
                    finally:  # also when interrupted: never leave an unchecked candidate in place
                        if best is None:
                            dk._tuned.pop(key, None)
                        else:
                            dk._tuned[key] = best
                    changed |= best != first
                    log[key], chosen[key] = results, best
                    bar.update()
                if not changed:
                    break
            bar.close()
            after = timed()
    finally:
        cache.length.copy_(start)
        for (k, v), (k_kept, v_kept) in zip(zip(cache.k, cache.v), kept):
            k[rows, :, written] = k_kept
            v[rows, :, written] = v_kept
    return {"before_s": before, "after_s": after, "passes": done, "kernels": log, "chosen": chosen}


def count_ops(fn) -> dict[str, int]:
    """Call ``fn()`` and count the PyTorch operators it runs that compute something (views and
    reshapes left out): in eager mode on a GPU each is (at least) one kernel launch. Returns
    {operator: calls}, most frequent first."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                name = func.overloadpacket.__name__
                counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _check_fusable(model: LabGPT) -> None:
    """The fused step knows LabGPT's own layers only: plain linears, tanh GELU, no dropout at work."""
    if model.training and model.config.dropout > 0:
        raise ValueError("fused_decode_step has no dropout: call model.eval() first (dropout is "
                         f"{model.config.dropout})")  # fmt: skip
    for name, module in model.named_modules():
        if name.endswith(("c_attn", "c_proj", "c_fc")) and type(module) is not torch.nn.Linear:
            raise ValueError(f"fused_decode_step needs LabGPT's plain nn.Linear layers; {name} is "
                             f"{type(module).__name__} (use decode_step)")  # fmt: skip
        if name.endswith("gelu") and getattr(module, "approximate", None) != "tanh":
            raise ValueError(f"fused_decode_step computes tanh GELU; {name} is {module!r} (use decode_step)")


def _finish_token(req: Request, token: int, now: float) -> bool:
    if req.first_token_at is None:
        req.first_token_at = now
    req.output.append(token)
    if len(req.output) >= req.max_new_tokens:
        req.finished_at = now
        return True
    return False


def serve(model: LabGPT, requests: list[Request], policy: str = "continuous", max_batch: int = 8,
          clock=time.perf_counter) -> dict:
    """Serve ``requests`` (greedy decoding) with ``policy`` "static" or "continuous"; returns the
    finished requests and the throughput and latency figures.

    Time is a virtual clock driven by the real model: each prefill and decode step advances
    it by the wall time it took, and requests arrive at their ``arrival`` times on it (an
    idle server jumps to the next arrival). Static batching takes up to ``max_batch``
    waiting requests, runs them as one fixed batch until the longest is done (finished rows
    keep their place, as in a padded batch), then takes the next batch. Continuous batching
    refills a slot as soon as its request finishes.
    """
    if policy not in ("static", "continuous"):
        raise ValueError(f"policy must be 'static' or 'continuous', got {policy!r}")
    check_int("max_batch", max_batch)
    if not requests:
        raise ValueError("requests is empty: serve needs at least one Request (serving.make_workload makes some)")
    for r in requests:
        if not (isinstance(r.arrival, (int, float)) and math.isfinite(r.arrival) and r.arrival >= 0):
            raise ValueError(f"request {r.rid}: arrival must be a finite number of seconds >= 0, got {r.arrival!r}")
        check_int(f"request {r.rid}: max_new_tokens", r.max_new_tokens)
        if not r.prompt or min(r.prompt) < 0 or max(r.prompt) >= model.config.vocab_size:
            raise ValueError(f"request {r.rid}: the prompt must be a non-empty list of token ids in "
                             f"0..{model.config.vocab_size - 1}")  # fmt: skip
        if len(r.prompt) + r.max_new_tokens > model.config.block_size:
            raise ValueError(f"request {r.rid}: prompt {len(r.prompt)} + {r.max_new_tokens} new tokens exceeds the "
                             f"context (block_size {model.config.block_size})")
    reqs = [Request(r.rid, r.arrival, list(r.prompt), r.max_new_tokens) for r in sorted(requests, key=lambda r: r.arrival)]
    device = model.transformer.wte.weight.device
    cache = SlotCache(model, max_batch)
    slot_req: list[Request | None] = [None] * max_batch
    next_token = torch.zeros(max_batch, dtype=torch.long, device=device)
    waiting, now, steps, busy_slot_steps = 0, 0.0, 0, 0

    def admit(slot: int, req: Request) -> None:
        nonlocal now
        start = clock()
        logits = cache.admit(model, slot, req.prompt)
        now += clock() - start
        token = int(logits.argmax())
        slot_req[slot] = None if _finish_token(req, token, now) else req
        next_token[slot] = token

    members: list[int] = []  # static: the slots of the batch now running
    with torch.no_grad():
        while waiting < len(reqs) or any(r is not None for r in slot_req):
            busy = [s for s, r in enumerate(slot_req) if r is not None]
            if policy == "continuous" or not busy:
                if not busy and waiting < len(reqs) and reqs[waiting].arrival > now:
                    now = reqs[waiting].arrival  # idle: jump to the next arrival
                if policy == "static":
                    cache.length.zero_()
                    members = []
                for slot in range(max_batch):
                    if slot_req[slot] is None and waiting < len(reqs) and reqs[waiting].arrival <= now:
                        admit(slot, reqs[waiting])
                        members.append(slot)
                        waiting += 1
                busy = [s for s, r in enumerate(slot_req) if r is not None]
            if not busy:
                continue
            # a static batch keeps computing its finished rows: its shape is fixed until the longest ends
            rows = busy if policy == "continuous" else members
            rows_t = torch.tensor(rows, device=device)
            start = clock()
            logits = decode_step(model, cache, rows_t, next_token[rows_t])
            now += clock() - start
            steps += 1
            busy_slot_steps += len(busy)
            chosen = logits.argmax(-1)
            for i, slot in enumerate(rows):
                req = slot_req[slot]
                if req is None:
                    continue
                token = int(chosen[i])
                next_token[slot] = token
                if _finish_token(req, token, now):
                    slot_req[slot] = None
    tokens = sum(len(r.output) for r in reqs)
    span = max(r.finished_at for r in reqs) - reqs[0].arrival
    lat = sorted(r.latency for r in reqs)
    return {
        "policy": policy,
        "requests": reqs,
        "tokens": tokens,
        "throughput": tokens / span,
        "p50_latency": _percentile(lat, 50),
        "p95_latency": _percentile(lat, 95),
        "decode_steps": steps,
        "slot_utilisation": busy_slot_steps / max(1, steps * max_batch),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def reference_outputs(model: LabGPT, requests: list[Request]) -> dict[int, list[int]]:
    """Each request decoded alone with ``model.generate``: what any scheduler must reproduce."""
    device = model.transformer.wte.weight.device
    out = {}
    with torch.no_grad():
        for r in requests:
            idx = torch.tensor([r.prompt], device=device)
            out[r.rid] = model.generate(idx, r.max_new_tokens, temperature=0)[0, len(r.prompt):].tolist()
    return out


# -- 3. speculative decoding -------------------------------------------------------


def check_same_vocabulary(target: LabGPT, draft: LabGPT) -> None:
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}): the draft must propose the target's tokens")


@torch.no_grad()
def speculative_generate(target: LabGPT, draft: LabGPT, idx: torch.Tensor, max_new_tokens: int, k: int = 4,
                         stats: dict | None = None, stop_below: float | None = None) -> torch.Tensor:
    """Greedy decoding of ``target``, accelerated by ``draft`` guessing ``k`` tokens at a time.

    Each round: the draft proposes d_1..d_k greedily (k cheap steps with its own cache); the
    target runs once on [last token, d_1..d_k] with its cache, giving its own greedy choice
    after every prefix; the longest prefix where they agree is kept, plus the target's
    token at the first disagreement (or after d_k if all agree). Both caches are cropped
    back to the accepted length. Every kept token is the target's own greedy choice, so
    the output equals ``target.generate(idx, n, temperature=0)`` exactly.
    With ``stop_below``, the draft stops a round early once its own top probability falls below
    it (a guess it is unsure of is likely wrong: no point guessing past it), so ``k`` is an upper
    bound. If ``stats`` is a dict, it receives the rounds, proposals and accepted proposals.
    """
    check_same_vocabulary(target, draft)
    check_int("k (draft tokens per round)", k)
    check_int("max_new_tokens", max_new_tokens, 0)
    if stop_below is not None and not 0.0 < stop_below < 1.0:
        raise ValueError(f"stop_below must be a probability in (0, 1) or None, got {stop_below!r}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) < 1:
        raise ValueError(f"idx must be one sequence of token ids, a tensor of shape (1, T) with T >= 1; got "
                         f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    # a round's guesses never run past max_new_tokens (kk = min(k, tokens still to make)), so at most
    # prompt + max_new_tokens positions enter either cache, as in target.generate
    total = idx.size(1) + max_new_tokens
    limit = min(target.config.block_size, draft.config.block_size)
    if total > limit:
        raise ValueError(f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) = {total} must fit the "
                         f"context ({limit} tokens)")
    t_cache, d_cache = target.new_cache(1), draft.new_cache(1)
    t_next = target(idx, cache=t_cache)[:, -1].argmax(-1, keepdim=True)  # the target's first token
    draft(idx[:, :-1], cache=d_cache) if idx.size(1) > 1 else None
    last_in_draft = idx[:, -1:]  # the draft cache holds everything before this token
    out = [idx, t_next]
    produced = 1
    rounds = proposed = accepted = 0
    while produced < max_new_tokens:
        kk = min(k, max_new_tokens - produced)
        # the draft catches up on the tokens it has not seen, then proposes kk tokens
        catch_up = torch.cat([last_in_draft, t_next], dim=1) if last_in_draft is not None else t_next
        logits = draft(catch_up, cache=d_cache)[:, -1]
        guesses = []
        for i in range(kk):
            g = logits.argmax(-1, keepdim=True)
            guesses.append(g)
            if stop_below is not None and float(logits.softmax(-1).max()) < stop_below:
                break  # the draft doubts this guess: let the target check what we have
            if i + 1 < kk:
                logits = draft(g, cache=d_cache)[:, -1]
        kk = len(guesses)
        guess = torch.cat(guesses, dim=1)  # (1, kk)
        # the target checks all kk guesses in one forward
        start = t_cache.pos
        verdict = target(torch.cat([t_next, guess], dim=1), cache=t_cache).argmax(-1)  # (1, kk+1)
        agree = (verdict[0, :kk] == guess[0]).long()
        n_ok = int(agree.cumprod(0).sum())  # length of the agreeing prefix
        correction = verdict[:, n_ok : n_ok + 1]  # the target's own next token
        keep = torch.cat([guess[:, :n_ok], correction], dim=1)
        out.append(keep)
        produced += keep.size(1)
        t_cache.crop(start + 1 + n_ok)  # t_next and the accepted guesses stay in the target's cache
        d_len = d_cache.pos - (kk - 1) + min(n_ok, kk - 1)  # drop the draft's rejected positions
        d_cache.crop(min(d_cache.pos, max(0, d_len)))
        if n_ok == kk:
            last_in_draft = guess[:, -1:]  # the draft never ran its own last guess
        else:
            last_in_draft = None
        t_next = correction
        rounds += 1
        proposed += kk
        accepted += n_ok
    if stats is not None:
        stats.update(rounds=rounds, proposed=proposed, accepted=accepted,
                     acceptance=accepted / proposed if proposed else 0.0)
    return torch.cat(out, dim=1)[:, : idx.size(1) + max_new_tokens]


def held_out_prompts(n: int = 6) -> list[torch.Tensor]:
    """``n`` prompts (1, T) of the kind LabGPT serves: openings (24, 28, 32… characters) of held-out
    documents of its task mixture, from text no checkpoint or draft was trained on."""
    from .tokenizer import CharTokenizer
    from .train import validation_text

    check_int("n", n, 1, 50)  # longer openings outgrow most documents
    tokenizer = CharTokenizer()
    docs = [d for d in validation_text(40_000 + 2_000 * n).split("\n\n") if len(d) > 24 + 4 * n]
    if len(docs) < n:  # not with the shipped generator (checked up to 58); a guard should the corpus change
        raise ValueError(f"only {len(docs)} held-out documents are longer than {24 + 4 * n} characters; ask for fewer")
    return [tokenizer.tensor(d[: 24 + 4 * i]).view(1, -1) for i, d in enumerate(docs[:n])]


def greedy_agreement(target: LabGPT, draft: LabGPT, prompts, new_tokens: int = 128) -> float:
    """The draft's per-token acceptance rate in greedy speculative decoding, measured directly.

    Each prompt (1, T) is continued greedily by the target; the draft then reads that text
    (teacher forcing) and we count the positions where its greedy choice is the target's. A
    proposal is accepted exactly when it is, so this is alpha in Leviathan et al.'s formula.
    """
    check_same_vocabulary(target, draft)
    agree = total = 0
    with torch.no_grad():
        for idx in prompts:
            seq = target.generate(idx, new_tokens, temperature=0.0)
            guess = draft(seq[:, :-1])[:, idx.size(1) - 1 :].argmax(-1)
            agree += int((guess == seq[:, idx.size(1) :]).sum())
            total += guess.numel()
    if total == 0:
        raise ValueError("prompts must hold at least one prompt, and new_tokens must be >= 1")
    return agree / total


def expected_speedup(acceptance: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Leviathan et al. (2023): tokens per round (1 − α^(k+1)) / (1 − α), over the round's cost
    k·c + v in units of one target step (c: draft step / target step; v: the verify pass)."""
    if not 0 <= acceptance <= 1:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance!r}")
    check_int("k (draft tokens per round)", k)
    for name, value in (("cost_ratio", cost_ratio), ("verify_cost", verify_cost)):
        check_number(name, value, strict=False, note=" (in target steps)")
    if k * cost_ratio + verify_cost == 0:
        raise ValueError("cost_ratio and verify_cost are both 0: a round would cost nothing")
    tokens = k + 1 if acceptance == 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (k * cost_ratio + verify_cost)


# -- 4. energy -----------------------------------------------------------------------

RAPL = Path("/sys/class/powercap")


def rapl_domains() -> list[Path]:
    """Package-level RAPL energy counters this process can read (empty when there are none)."""
    if not RAPL.exists():
        return []
    out = []
    for d in sorted(RAPL.glob("intel-rapl:*")):
        f = d / "energy_uj"
        if ":" in d.name and d.name.count(":") == 1 and f.exists() and os.access(f, os.R_OK):
            out.append(f)
    return out


def power_source() -> str:
    """Where joules come from on this machine: "nvml", "rapl", or "estimate"."""
    if torch.cuda.is_available() and importlib.util.find_spec("pynvml") is not None:
        return "nvml"
    return "rapl" if rapl_domains() else "estimate"


def measure_energy(fn, repeat: int = 3) -> dict:
    """Run ``fn`` ``repeat`` times; joules from NVML or RAPL when available, else None."""
    check_int("repeat", repeat)
    source = power_source()
    if source == "nvml":
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ -> J
    elif source == "rapl":
        files = rapl_domains()
        read = lambda: sum(int(f.read_text()) for f in files) / 1e6  # µJ -> J (wraparound ignored: runs are short)
    else:
        read = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    e0, t0 = (read() if read else None), time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeat
    joules = (read() - e0) / repeat if read else None
    return {"source": source, "seconds": seconds, "joules": joules}


def estimated_joules(flops: float, peak_flops: float, watts: float, utilisation: float) -> float:
    """Energy when no counter exists: time at ``utilisation`` of ``peak_flops``, times ``watts``."""
    if not (peak_flops > 0 and watts > 0 and 0 < utilisation <= 1):
        raise ValueError("peak_flops and watts must be > 0 and utilisation in (0, 1]")
    return flops / (peak_flops * utilisation) * watts



def _register() -> None:
    from .bench import compare_rounds, register_suite

    @register_suite("serving")
    def serving_suite(quick: bool = False) -> list[dict]:
        """Speculative decoding of LabGPT tiny with three drafts (k = 4, 8, 16; adaptive) vs tiny alone."""
        from . import load_model

        target, _ = load_model("tiny")
        drafts = {name: load_model(name)[0] for name in ("student-draft", "student-draft-2layer", "student-distilled")}
        prompts, n_new = held_out_prompts(6), 64 if quick else 128
        for name, draft in drafts.items():
            print(f"{name}: alpha = {greedy_agreement(target, draft, prompts, n_new):.4f} on the held-out prompts")
        variants = {f"tiny alone, {len(prompts)} prompts x {n_new} tokens": lambda: [
            target.generate(p, n_new, temperature=0.0) for p in prompts]}  # fmt: skip
        for name, draft in drafts.items():
            for k in (4, 8, 16):
                variants[f"speculative, {name}, k={k}"] = lambda d=draft, k=k: [
                    speculative_generate(target, d, p, n_new, k) for p in prompts]  # fmt: skip
        for name in ("student-draft", "student-draft-2layer"):
            variants[f"speculative, {name}, k<=32, stop below p=0.5"] = lambda d=drafts[name]: [
                speculative_generate(target, d, p, n_new, 32, stop_below=0.5) for p in prompts]  # fmt: skip
        with torch.no_grad():
            return compare_rounds(variants, rounds=1 if quick else 3, repeat=1 if quick else 3, warmup=1, suite="serving")


_register()
