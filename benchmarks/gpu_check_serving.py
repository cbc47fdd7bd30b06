"""GPU check for the serving lab: LabGPT in the GPT-2-small shape decoding at batch 1 with the
KV cache, replayed from a CUDA graph, against the memory-bandwidth roofline.

    PYTHONPATH=. python3 benchmarks/gpu_check_serving.py --out OUT_DIR [--variants ...] [--mode ...]

The roofline: a decode step must read every weight and the cached keys and values once,
so tokens/s <= measured bandwidth / bytes per token. The bar (issue 10): at least 40%.
Also checks that the graph-replayed step gives the same tokens as ``LabGPT.generate``, and
profiles each variant's token (``bench.kernel_profile``): the time its kernels are busy, the
gaps between them, and the kernels that take longest.
Variants (``--variants``, comma-separated):

- ``cuda_graph``: ``serving.decode_step`` (eager PyTorch ops, about 14 kernels a layer) in a graph;
- ``compiled_cuda_graph``: the same step compiled by ``torch.compile`` first (Inductor fuses the
  layer norms, residual adds, GELU and cache writes), ``--mode`` picks its mode;
- ``fused_cuda_graph``: ``serving.fused_decode_step``, the kit's own Triton kernels, 3 a layer
  (LayerNorm + qkv GEMV writing the cache; attention fused with the output projection; the
  whole MLP in one kernel), autotuned per shape during the warm-up, then captured;
- ``fused_tuned_cuda_graph``: the same after ``serving.tune_fused_decode_step`` chose each kernel's
  launch configuration by timing whole steps replayed from a graph (each kernel's own autotuner
  times it alone, launched from Python: at a few microseconds a kernel that measures the launch);
- ``fused_nopdl_cuda_graph``: the same without programmatic dependent launch (on Hopper the
  fused kernels are launched with it by default: each starts while the previous finishes);
- ``fused5_cuda_graph``: 5 kernels a layer (split attention merged in the output projection's
  prologue, the MLP's two linears apart). Its activations are fp32 where eager ones are
  bf16, so its greedy tokens may part from ``generate``'s on a random model's near-ties; the
  check also runs both steps teacher-forced on the same tokens and reports how often their
  argmax agrees and how far the logits are apart. ``fused_nopdl_tuned_cuda_graph`` and
  ``fused5_tuned_cuda_graph``: those two, tuned. ``fused_tuned_greedy_cuda_graph``: tuned, and the greedy
  choice made by the kernels (``fused_decode_step(next_tokens=)``: the lm_head GEMV folds each block's
  largest logit into one int64 by atomic max, one small kernel unpacks it into the next token).
  ``fused_tuned_greedy_x4_cuda_graph``: the same, four steps a graph (a step feeds the next on the GPU:
  no graph launch between them, and programmatic dependent launch across them).

``--device cpu`` is a dry run: the nano model, the kernels' PyTorch references (or the Triton
interpreter with ``TRITON_INTERPRET=1``), no graphs; it checks this script, not the GPU.

The greedy choice (argmax of the logits, copied into the next step's token) is captured in
the graph with the step: a token is one replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from labkit import bench, hardware, serving
from labkit.device import synchronize
from labkit.kernels import decode_kernels
from labkit.model import LabGPT, get_config

VARIANTS = ("fused_cuda_graph", "fused_tuned_cuda_graph", "fused_tuned_greedy_cuda_graph", "fused_nopdl_cuda_graph",
            "fused_nopdl_tuned_cuda_graph", "compiled_cuda_graph", "cuda_graph", "fused5_cuda_graph",
            "fused5_tuned_cuda_graph", "fused_tuned_greedy_x4_cuda_graph")  # fmt: skip
# name: (kernels a layer, programmatic dependent launch (None: where supported), tuned on whole steps, greedy
# choice in the kernels[, steps a graph: default 1])
FUSED = {"fused_cuda_graph": (3, None, False, False), "fused_tuned_cuda_graph": (3, None, True, False),
         "fused_tuned_greedy_cuda_graph": (3, None, True, True),
         "fused_tuned_greedy_x4_cuda_graph": (3, None, True, True, 4),
         "fused_nopdl_cuda_graph": (3, False, False, False), "fused_nopdl_tuned_cuda_graph": (3, False, True, False),
         "fused5_cuda_graph": (5, None, False, False), "fused5_tuned_cuda_graph": (5, None, True, False)}  # fmt: skip


class Replayable:
    """``body()`` captured in a CUDA graph (``bench.capture_graph``), replayed by ``replay()``; on a CPU
    (``--device cpu``, a dry run of this script) ``replay()`` simply calls ``body()``."""

    def __init__(self, body, device: torch.device) -> None:
        self.body, self.graph = body, None
        if device.type == "cuda":
            self.graph, _ = bench.capture_graph(body, device)

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()


def graph_decoding(model, prompt, tokens: int, variant: str, mode: str | None = None) -> dict:
    """Capture one decode step and its greedy choice in a CUDA graph (or several steps: with the greedy
    choice in the kernels a step feeds the next on the GPU), decode ``tokens`` greedily by replaying
    it; tokens/s (median of 5 runs) and agreement with eager ``generate``."""
    cache = serving.SlotCache(model, 1)
    tuning = None

    greedy = variant in FUSED and FUSED[variant][3]
    per_graph = FUSED[variant][4] if variant in FUSED and len(FUSED[variant]) > 4 else 1

    def step(tok, next_tokens=None):
        if variant in FUSED:
            per_layer, pdl, *_ = FUSED[variant]
            return serving.fused_decode_step(model, cache, tok, per_layer, pdl=pdl, next_tokens=next_tokens)
        return serving.decode_step(model, cache, slice(None), tok, whole_cache=True)

    if variant == "compiled_cuda_graph":
        step = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
    t0 = time.perf_counter()
    with torch.no_grad():
        first = cache.admit(model, 0, prompt[0].tolist()).argmax().view(1)
        if variant in FUSED and FUSED[variant][2]:
            tuning = serving.tune_fused_decode_step(model, cache, FUSED[variant][0], pdl=FUSED[variant][1],
                                                    length=prompt.size(1) + tokens // 2)  # mid-context, as below
        static_tok = first.clone()
        device = static_tok.device
        bench.warm_up(lambda: step(static_tok, torch.empty_like(static_tok) if greedy else None), device)
        history = torch.empty(per_graph, dtype=torch.long, device=device)

        def capture(record: bool) -> Replayable:
            def body():
                for i in range(per_graph):
                    if greedy:
                        step(static_tok, next_tokens=static_tok)  # the kernels write the next token over this one
                    else:
                        static_tok.copy_(step(static_tok).argmax(-1))
                    if record:  # each step's token, for the agreement check (the timed graph has no copies)
                        history[i].copy_(static_tok[0])

            cache.length.fill_(prompt.size(1))
            graph = Replayable(body, device)
            cache.length.fill_(prompt.size(1))
            return graph

        graph, recording = capture(False), capture(True)
        prepare_s = time.perf_counter() - t0
        replays = (tokens - 1) // per_graph  # each replay decodes per_graph tokens

        def decode(record: bool) -> list[int]:
            static_tok.copy_(first)
            cache.length.fill_(prompt.size(1))
            out = [int(first)] if record else []
            for _ in range(replays):
                if record:
                    recording.replay()
                    out.extend(history.tolist())
                else:
                    graph.replay()
            return out

        got = decode(record=True)
        reference = model.generate(prompt, tokens, temperature=0)[0, prompt.size(1) :].tolist()
        agree = sum(a == b for a, b in zip(got, reference)) / len(got)
        times = []
        for _ in range(5):
            synchronize(device)
            t0 = time.perf_counter()
            decode(record=False)
            synchronize(device)
            times.append((time.perf_counter() - t0) / (replays * per_graph))

        def one_token():
            graph.replay()

        try:  # where a token's time goes: kernels, their overlap, and the gaps between them
            static_tok.copy_(first)
            cache.length.fill_(prompt.size(1) + tokens // 2)  # mid-context, like the roofline's bytes
            profile = bench.kernel_profile(one_token, steps=32, device=device, top=10)
        except Exception as err:  # the profile is for reading; it must not cost the measurement
            profile = {"error": f"{type(err).__name__}: {err}"}
    result = {"tokens_per_s": 1 / statistics.median(times), "agreement_with_generate": agree, "prepare_s": prepare_s,
              "profile": profile, "steps_per_graph": per_graph}  # fmt: skip
    if tuning is not None:
        result["tuning"] = {"before_s": tuning["before_s"], "after_s": tuning["after_s"], "passes": tuning["passes"],
                            "chosen": {str(k): str(c) for k, c in tuning["chosen"].items()},
                            "kernels": {str(k): [[str(c), t] for c, t in v] for k, v in tuning["kernels"].items()}}  # fmt: skip
    return result


def profile_lines(name: str, profile: dict, per_graph: int = 1) -> str:
    """The profile of one variant (one graph replay: ``per_graph`` tokens), as text for the log."""
    if "error" in profile:
        return f"  {name} profile: {profile['error']}"
    unit = "per token" if per_graph == 1 else f"per replay ({per_graph} tokens)"
    lines = [f"  {name} {unit}: wall {profile['wall_s'] * 1e6:.1f} us, kernels busy {profile['busy_s'] * 1e6:.1f} us "
             f"(sum of kernel times {profile['kernel_s'] * 1e6:.1f} us), idle {profile['idle_s'] * 1e6:.1f} us, "
             f"{profile['launches']:.0f} kernels"]  # fmt: skip
    for k in profile["kernels"][:6]:
        lines.append(f"    {k['seconds'] * 1e6:7.1f} us  x{k['calls']:.0f}  {k['name'][:90]}")
    return "\n".join(lines)


def serving_pdl(model) -> bool:
    return decode_kernels.pdl_supported(model.transformer.wte.weight)


def teacher_forced(model, prompt, tokens: int, kernels_per_layer: int = 3, pdl: bool | None = None) -> dict:
    """Eager ``decode_step`` and ``fused_decode_step`` fed the same tokens (eager greedy's): how often their
    argmax agrees, and the largest logit difference relative to the largest logit."""
    caches = [serving.SlotCache(model, 1) for _ in range(2)]
    with torch.no_grad():
        first = [c.admit(model, 0, prompt[0].tolist()) for c in caches][0].argmax().view(1)
        tok, same, worst = first, 0, 0.0
        for _ in range(tokens):
            ref = serving.decode_step(model, caches[0], slice(None), tok).float()
            got = serving.fused_decode_step(model, caches[1], tok, kernels_per_layer, pdl=pdl)
            same += int(ref.argmax(-1) == got.argmax(-1))
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
            tok = ref.argmax(-1)
    return {"argmax_agreement": same / tokens, "max_relative_logit_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, default=None, help="tokens to decode (default 256; on a CPU, as many as "
                        "the nano model's context holds after the prompt, up to 64)")  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs "
                        "(Triton GEMV templates with fused epilogues; minutes to tune)")  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (the nano model, no "
                        "graphs, the kernels' references or the Triton interpreter), to check it before a GPU session")  # fmt: skip
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu for a dry run)")
    torch.manual_seed(0)
    model = LabGPT(get_config("gpt2" if dev.type == "cuda" else "nano"))
    model = model.to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    if args.tokens is None:
        args.tokens = 256 if dev.type == "cuda" else min(64, model.config.block_size - 32 - 1)
    if not 9 <= args.tokens <= model.config.block_size - 32 - 1:
        raise SystemExit(f"--tokens must be in 9..{model.config.block_size - 33} (after the 32-token prompt)")
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), device=dev)
    bw = hardware.copy_bandwidth(device=dev).value
    mid_context = prompt.size(1) + args.tokens // 2
    ideal_bytes = hardware.decode_step_bytes(cfg, 1, mid_context, bytes_per_element=2)
    roofline = bw / ideal_bytes
    result = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (a dry run)",
        "torch": torch.__version__,
        "bandwidth_gbs": bw / 1e9,
        "roofline_tokens_per_s": roofline,
        "bytes_per_token_ideal": ideal_bytes,
        "bytes_per_token_whole_cache": hardware.weight_bytes(cfg, 2) + 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * 2,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        eager = []
        for _ in range(3):
            synchronize(dev)
            t0 = time.perf_counter()
            model.generate(prompt, 64, temperature=0)
            synchronize(dev)
            eager.append((time.perf_counter() - t0) / 64)
    result["eager_generate_tokens_per_s"] = 1 / statistics.median(eager)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}")
        compiled = name == "compiled_cuda_graph"
        chosen = dict(decode_kernels._tuned)  # a tuned variant's choices must not carry into the next variant
        try:
            r = graph_decoding(model, prompt, args.tokens, name, args.mode if compiled else None)
            if name in FUSED:
                per_layer, pdl, *_ = FUSED[name]
                r.update(teacher_forced(model, prompt, 64, per_layer, pdl))
                r["kernels_per_token"] = per_layer * cfg.n_layer + 2
                r["pdl"] = serving_pdl(model) if pdl is None else pdl
                print(f"{name} vs the eager step, teacher-forced: argmax agreement {r['argmax_agreement']:.3f}, "
                      f"largest logit difference {r['max_relative_logit_difference']:.2e} of the largest logit")
        except Exception as err:  # one variant failing must not cost the others their measurement
            print(f"{name}: FAILED: {type(err).__name__}: {err}", flush=True)
            result[name] = {"error": f"{type(err).__name__}: {err}"}
            decode_kernels._tuned.clear()
            decode_kernels._tuned.update(chosen)
            continue
        r["compile_mode"] = args.mode if compiled else None
        r["fraction_of_roofline"] = r["tokens_per_s"] / roofline
        result[name] = r
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s = {100 * r['fraction_of_roofline']:.1f}% of the roofline "
              f"({roofline:.0f} tokens/s); agreement with generate {r['agreement_with_generate']:.3f}; "
              f"prepared in {r['prepare_s']:.1f} s", flush=True)  # fmt: skip
        print(profile_lines(name, r["profile"], r["steps_per_graph"]), flush=True)
        if "tuning" in r:
            t = r["tuning"]
            us = [f"{v * 1e6:.1f} us" if v is not None else "wrong or failed" for v in (t["before_s"], t["after_s"])]
            print(f"  {name} tuned on whole steps: {us[0]} -> {us[1]} a step", flush=True)
            for key, config in t["chosen"].items():
                print(f"    {key[:60]}: {config}", flush=True)
        (out / "gpu_serving.json").write_text(json.dumps(result, indent=2))
        decode_kernels._tuned.clear()
        decode_kernels._tuned.update(chosen)

    result["decode_autotune"] = {str(k): [[str(c), t] for c, t in v] for k, v in decode_kernels.autotune_log.items()}
    print(json.dumps(result, indent=2))
    (out / "gpu_serving.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
