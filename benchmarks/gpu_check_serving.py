"""GPU check for the serving lab: LabGPT in the GPT-2-small shape decoding at batch 1 with the
KV cache, replayed from a CUDA graph, against the memory-bandwidth roofline.

    PYTHONPATH=. python3 benchmarks/gpu_check_serving.py --out OUT_DIR

The roofline: a decode step must read every weight and the cached keys and values once,
so tokens/s <= measured bandwidth / bytes per token. The bar (issue 10): at least 40%.
Also checks that the graph-replayed step gives the same tokens as ``LabGPT.generate``.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = LabGPT(get_config("gpt2")).to(dev, torch.bfloat16).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), device=dev)

    cache = serving.SlotCache(model, 1)
    with torch.no_grad():
        first = cache.admit(model, 0, prompt[0].tolist()).argmax().view(1)
        static_tok = first.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (allocations, kernel selection)
            for _ in range(3):
                serving.decode_step(model, cache, slice(None), static_tok, whole_cache=True)
        torch.cuda.current_stream().wait_stream(stream)
        cache.length.fill_(prompt.size(1))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = serving.decode_step(model, cache, slice(None), static_tok, whole_cache=True)
        cache.length.fill_(prompt.size(1))  # capture ran one step: rewind

        def decode(n: int) -> list[int]:
            static_tok.copy_(first)
            cache.length.fill_(prompt.size(1))
            out = [int(first)]
            for _ in range(n - 1):
                graph.replay()
                static_tok.copy_(static_logits.argmax(-1))
                out.append(int(static_tok))  # a copy: static_tok is overwritten next step
            return out

        tokens = decode(args.tokens)
        reference = model.generate(prompt, args.tokens, temperature=0)[0, prompt.size(1):].tolist()
        agree = sum(a == b for a, b in zip(tokens, reference)) / len(reference)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            static_tok.copy_(first)
            cache.length.fill_(prompt.size(1))
            for _ in range(args.tokens - 1):
                graph.replay()
                static_tok.copy_(static_logits.argmax(-1))
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / (args.tokens - 1))
        eager = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(prompt, 64, temperature=0)
            torch.cuda.synchronize()
            eager.append((time.perf_counter() - t0) / 64)
    step = statistics.median(times)
    bw = hardware.copy_bandwidth(device=dev).value
    mid_context = prompt.size(1) + args.tokens // 2
    ideal_bytes = hardware.decode_step_bytes(cfg, 1, mid_context, bytes_per_element=2)
    read_bytes = hardware.weight_bytes(cfg, 2) + 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * 2
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tokens_per_s": 1 / step,
        "eager_generate_tokens_per_s": 1 / statistics.median(eager),
        "bandwidth_gbs": bw / 1e9,
        "roofline_tokens_per_s": bw / ideal_bytes,
        "fraction_of_roofline": (1 / step) / (bw / ideal_bytes),
        "bytes_per_token_ideal": ideal_bytes,
        "bytes_per_token_whole_cache": read_bytes,
        "greedy_agreement_with_generate_bf16": agree,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_serving.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
