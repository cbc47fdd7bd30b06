"""GPU check for the serving lab: LabGPT in the GPT-2-small shape decoding at batch 1 with the
KV cache, replayed from a CUDA graph, against the memory-bandwidth roofline.

    PYTHONPATH=. python3 benchmarks/gpu_check_serving.py --out OUT_DIR [--compile]

The roofline: a decode step must read every weight and the cached keys and values once,
so tokens/s <= measured bandwidth / bytes per token. The bar (issue 10): at least 40%.
Also checks that the graph-replayed step gives the same tokens as ``LabGPT.generate``.
With ``--compile`` the step is also compiled by ``torch.compile`` (Inductor fuses the layer
norms, residual adds, GELU and cache writes into fewer kernels) before the graph is captured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from labkit import hardware, serving
from labkit.model import LabGPT, get_config


def graph_decoding(model, prompt, tokens: int, compile_step: bool, mode: str | None = None) -> dict:
    """Capture one decode step in a CUDA graph, decode ``tokens`` greedily by replaying it;
    tokens/s (median of 5 runs) and agreement with eager ``generate``."""
    cache = serving.SlotCache(model, 1)

    def step(tok):
        return serving.decode_step(model, cache, slice(None), tok, whole_cache=True)

    if compile_step:
        step = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
    t0 = time.perf_counter()
    with torch.no_grad():
        first = cache.admit(model, 0, prompt[0].tolist()).argmax().view(1)
        static_tok = first.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (compilation, allocations, kernel selection)
            for _ in range(3):
                step(static_tok)
        torch.cuda.current_stream().wait_stream(stream)
        cache.length.fill_(prompt.size(1))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = step(static_tok)
        cache.length.fill_(prompt.size(1))  # capture ran one step: rewind
        prepare_s = time.perf_counter() - t0

        def decode(n: int, record: bool) -> list[int]:
            static_tok.copy_(first)
            cache.length.fill_(prompt.size(1))
            out = [int(first)] if record else []
            for _ in range(n - 1):
                graph.replay()
                static_tok.copy_(static_logits.argmax(-1))
                if record:
                    out.append(int(static_tok))  # a copy: static_tok is overwritten next step
            return out

        got = decode(tokens, record=True)
        reference = model.generate(prompt, tokens, temperature=0)[0, prompt.size(1) :].tolist()
        agree = sum(a == b for a, b in zip(got, reference)) / len(reference)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decode(tokens, record=False)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / (tokens - 1))
    return {"tokens_per_s": 1 / statistics.median(times), "agreement_with_generate": agree, "prepare_s": prepare_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also measure the torch.compile'd step")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs "
                        "(Triton GEMV templates with fused epilogues; minutes to tune)")  # fmt: skip
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = LabGPT(get_config("gpt2")).to(dev, torch.bfloat16).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), device=dev)
    bw = hardware.copy_bandwidth(device=dev).value
    mid_context = prompt.size(1) + args.tokens // 2
    ideal_bytes = hardware.decode_step_bytes(cfg, 1, mid_context, bytes_per_element=2)
    roofline = bw / ideal_bytes
    result = {
        "device": torch.cuda.get_device_name(),
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
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(prompt, 64, temperature=0)
            torch.cuda.synchronize()
            eager.append((time.perf_counter() - t0) / 64)
    result["eager_generate_tokens_per_s"] = 1 / statistics.median(eager)
    for name, compiled in (("cuda_graph", False), ("compiled_cuda_graph", True)):
        if compiled and not args.compile:
            continue
        r = graph_decoding(model, prompt, args.tokens, compiled, args.mode if compiled else None)
        r["compile_mode"] = args.mode if compiled else None
        r["fraction_of_roofline"] = r["tokens_per_s"] / roofline
        result[name] = r
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s = {100 * r['fraction_of_roofline']:.1f}% of the roofline "
              f"({roofline:.0f} tokens/s); agreement with generate {r['agreement_with_generate']:.3f}; "
              f"prepared in {r['prepare_s']:.1f} s", flush=True)  # fmt: skip
        (out / "gpu_serving.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    (out / "gpu_serving.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
