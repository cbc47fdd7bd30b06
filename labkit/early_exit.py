"""Early exit: stop computing layers for a token once an intermediate prediction is confident.

After every layer k an *exit head* turns the residual stream into next-token
probabilities p_k. Decoding exits at the first layer where ``max(p_k) >= τ`` and emits that
layer's argmax; the layers above are skipped for this token.

Exit heads here: a LayerNorm and a small linear map per layer (initialised to the
identity), followed by the model's own frozen LM head. A norm alone cannot line up an early
layer's residual stream with the vocabulary; the linear correction can (the "tuned lens" of
Belrose et al., 2023), for 37K parameters a layer. They are trained cheaply by
self-distillation: each exit learns to match the final layer's distribution on the frozen
model.

The KV cache stays consistent by copying the exit state forward (as CALM does, Schuster
et al., 2022): for every skipped layer, this token's keys and values are computed from the
hidden state at the exit, so later tokens attend to a complete cache.

``threshold=1.0`` means "never exit early", and reproduces ordinary greedy decoding exactly
(a float softmax can round to exactly 1.0, so 1.0 is treated as a switch, not a comparison).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data
from .memory import load_safetensors, save_safetensors
from .tokenizer import CharTokenizer
from .train import Batches


class ExitHeads(nn.Module):
    """One (LayerNorm, C x C linear) per layer but the last; the last layer uses the model's own final norm."""

    def __init__(self, model) -> None:
        super().__init__()
        C, L = model.config.n_embd, model.config.n_layer
        self.norms = nn.ModuleList([nn.LayerNorm(C) for _ in range(L - 1)])
        self.maps = nn.ModuleList([nn.Linear(C, C) for _ in range(L - 1)])
        with torch.no_grad():
            for norm, lin in zip(self.norms, self.maps):
                norm.load_state_dict(model.transformer.ln_f.state_dict())  # start from the final norm
                lin.weight.copy_(torch.eye(C))
                lin.bias.zero_()

    def logits(self, model, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Next-token logits from the residual stream after block ``layer`` (0-based)."""
        if layer == len(self.norms):
            return model.lm_head(model.transformer.ln_f(hidden))
        return model.lm_head(self.maps[layer](self.norms[layer](hidden)))


def train_exit_heads(model, steps: int = 200, batch_size: int = 8, seq_len: int = 256, lr: float = 1e-3, seed: int = 3,
                     progress: bool = True) -> tuple[ExitHeads, list[float]]:  # fmt: skip
    """Self-distillation on the frozen model: every exit matches the last layer's distribution (KL)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.requires_grad_(False).eval()
    heads = ExitHeads(model).to(next(model.parameters()).device)
    batches = Batches(data.corpus(2_000_000, seed=seed), CharTokenizer(), seq_len, seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc="exit heads", disable=not progress, mininterval=1.0):
        x, _ = batches(batch_size, next(model.parameters()).device)
        with torch.no_grad():
            final, hidden = model(x, return_hidden=True)
            target = F.log_softmax(final.float(), dim=-1)
        loss = (
            sum(
                F.kl_div(
                    F.log_softmax(heads.logits(model, h, k).float(), dim=-1),
                    target,
                    log_target=True,
                    reduction="batchmean",
                )
                for k, h in enumerate(hidden[:-1])
            )
            / (len(hidden) - 1)
            / seq_len
        )  # per token
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return heads.eval(), losses


def save_exit_heads(heads: ExitHeads, path) -> None:
    save_safetensors(
        {k: v.detach().cpu() for k, v in heads.state_dict().items()}, path, {"format": "labkit-exit-heads"}
    )


def load_exit_heads(model, path) -> ExitHeads:
    tensors, meta = load_safetensors(path, with_metadata=True)
    if meta.get("format") != "labkit-exit-heads":
        raise ValueError(f"{path} is not a labkit exit-heads file (metadata lacks format=labkit-exit-heads)")
    heads = ExitHeads(model)
    heads.load_state_dict(tensors)
    return heads.to(next(model.parameters()).device).eval()


def _fill_skipped(model, cache, hidden: torch.Tensor, first: int, start: int) -> None:
    """Keys and values of the skipped layers first.. for this position, computed from the exit state.

    A block may have fewer heads than the config (head pruning): it fills the first of its cache slots.
    """
    B, T, C = hidden.shape
    hs = C // model.config.n_head  # head pruning removes heads, never shrinks one
    for layer in range(first, model.config.n_layer):
        block = model.transformer.h[layer]
        nh = block.attn.n_head
        if nh == 0:
            continue  # every head of this layer removed: nothing is cached
        _, k, v = block.attn.c_attn(block.ln_1(hidden)).split(nh * hs, dim=2)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        cache.k[layer][:, :nh, start : start + T] = k
        cache.v[layer][:, :nh, start : start + T] = v


@torch.no_grad()
def generate(model, heads: ExitHeads, idx: torch.Tensor, max_new_tokens: int, threshold: float = 1.0,
             stop_token: int | None = None) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """Greedy decoding with confidence-based early exit; returns (tokens, layers used per new token).

    Batch 1. The prompt (but its last token) is prefilled by every layer; then each step runs
    the newest token up the stack and stops at the first layer k with max(p_k) >= threshold.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold τ must be in (0, 1], got {threshold}")
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"early-exit generation takes one sequence, shape (1, T); got {tuple(idx.shape)}")
    L = model.config.n_layer
    if idx.size(1) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt + max_new_tokens exceeds the context of {model.config.block_size}")
    cache = model.new_cache(1)
    if idx.size(1) > 1:
        model(idx[:, :-1], cache=cache)
    token = idx[:, -1:]
    out, layers_used = [idx], []
    for _ in range(max_new_tokens):
        start = cache.pos
        x = model.transformer.wte(token) + model.transformer.wpe(torch.tensor([start], device=idx.device))
        for layer, block in enumerate(model.transformer.h):
            x = block(x, cache, layer, start)
            if layer == L - 1:
                break
            if threshold < 1.0:
                p = F.softmax(heads.logits(model, x[:, -1], layer).float(), dim=-1)
                if p.max() >= threshold:
                    _fill_skipped(model, cache, x, layer + 1, start)
                    break
        layers_used.append(layer + 1)
        cache.pos = start + 1
        token = heads.logits(model, x[:, -1], layer).argmax(dim=-1, keepdim=True)  # (1, 1)
        out.append(token)
        if stop_token is not None and token.item() == stop_token:
            break
    return torch.cat(out, dim=1), layers_used


def evaluate_threshold(model, heads: ExitHeads, tokenizer: CharTokenizer, threshold: float, tasks=None,
                       n: int = 40, fmt: str = "specific", seed: int = 1234) -> dict:  # fmt: skip
    """Task accuracy, mean layers per generated token and seconds per token of early-exit decoding."""
    import time

    correct = total = tokens = layer_sum = 0
    seconds = 0.0
    device = next(model.parameters()).device
    for task in tasks or data.tasks():
        for ex in data.examples(task, fmt, 0, n=n, seed=seed):
            idx = tokenizer.tensor(ex.prompt, device=device)
            t0 = time.perf_counter()
            out, layers = generate(model, heads, idx, len(ex.answer) + 2, threshold, stop_token=tokenizer.newline_id)
            seconds += time.perf_counter() - t0
            correct += tokenizer.decode(out[0, idx.size(1) :]) == f" {ex.answer}\n"
            total += 1
            tokens += len(layers)
            layer_sum += sum(layers)
    return {"threshold": threshold, "accuracy": correct / total, "mean_layers": layer_sum / tokens,
            "seconds_per_token": seconds / tokens}  # fmt: skip
