"""Reference solutions for notebooks/00_welcome.ipynb."""

import torch


def count_parameters(config) -> int:
    C, bias = config.n_embd, config.bias
    ln = 2 * C if bias else C
    per_layer = (
        2 * ln  # ln_1, ln_2
        + C * 3 * C
        + (3 * C if bias else 0)  # fused q, k, v projection
        + C * C
        + (C if bias else 0)  # attention output projection
        + C * 4 * C
        + (4 * C if bias else 0)  # MLP up
        + 4 * C * C
        + (C if bias else 0)  # MLP down
    )
    return config.vocab_size * C + config.block_size * C + config.n_layer * per_layer + ln


def kv_cache_bytes(config, batch_size: int, seq_len: int, bytes_per_element: int = 4) -> int:
    return 2 * config.n_layer * batch_size * seq_len * config.n_embd * bytes_per_element


@torch.no_grad()
def greedy_decode(model, idx, n_new: int):
    for _ in range(n_new):
        logits = model(idx)  # (B, T, vocab): the whole sequence again, every step
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, next_token], dim=1)
    return idx
