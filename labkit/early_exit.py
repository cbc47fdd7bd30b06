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
from ._args import check_int
from .memory import load_safetensors, save_safetensors
from .tokenizer import CharTokenizer
from .train import Batches


class ExitHeads(nn.Module):
    """One (LayerNorm, C x C linear) per layer but the last; the last layer uses the model's own final norm."""

    def __init__(self, model) -> None:
        super().__init__()
        C, L = model.config.n_embd, model.config.n_layer
        self.norms = nn.ModuleList([nn.LayerNorm(C, bias=model.config.bias) for _ in range(L - 1)])
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


def kl_per_token(logits: torch.Tensor, target_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) averaged over every position of a (B, T, vocab) batch."""
    kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), target_log_probs, log_target=True, reduction="batchmean")
    return kl / logits.size(1)  # "batchmean" divides by B only: the T positions of a row are summed


def exits_loss(model, heads: ExitHeads, hidden: list[torch.Tensor], target_log_probs: torch.Tensor) -> torch.Tensor:
    """The mean over the exits (every layer but the last) of their per-token KL to the target distribution."""
    return sum(kl_per_token(heads.logits(model, h, k), target_log_probs) for k, h in enumerate(hidden[:-1])) / (
        len(hidden) - 1
    )


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
        loss = exits_loss(model, heads, hidden, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return heads.eval(), losses


def tune_for_exits(model, heads: ExitHeads | None = None, steps: int = 300, lr: float = 3e-4, heads_lr: float = 1e-3,
                   batch_size: int = 8, seq_len: int = 256, final_weight: float = 1.0, seed: int = 11,
                   progress: bool = True) -> tuple:  # fmt: skip
    """Lightly tune a copy of ``model`` together with its exit heads, so that early layers predict well.

    Frozen-model exit heads can only read what the early layers happen to compute. Here the
    layers learn too (as in LayerSkip, Elhoushi et al., 2024): every exit and the final layer
    are pulled toward the *original* model's final distribution (self-distillation, KL), so
    the tuned model keeps the original's behaviour while its early layers become confident
    sooner. ``final_weight`` weighs the final layer's term against the mean of the exits'.
    Returns (tuned copy, heads, losses); ``model`` itself is not modified.
    """
    import copy

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if final_weight < 0:
        raise ValueError(f"final_weight must be >= 0, got {final_weight}")
    device = next(model.parameters()).device
    original = copy.deepcopy(model).requires_grad_(False).eval()
    tuned = copy.deepcopy(model).requires_grad_(True).train()
    heads = copy.deepcopy(heads) if heads is not None else ExitHeads(tuned).to(device)
    heads.requires_grad_(True).train()
    batches = Batches(data.corpus(2_000_000, seed=seed), CharTokenizer(), seq_len, seed)
    optimizer = torch.optim.AdamW(
        [{"params": tuned.parameters(), "lr": lr}, {"params": heads.parameters(), "lr": heads_lr}], weight_decay=0.0
    )
    torch.manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="tune for exits", disable=not progress, mininterval=1.0):
        x, _ = batches(batch_size, device)
        with torch.no_grad():
            target = F.log_softmax(original(x).float(), dim=-1)
        final, hidden = tuned(x, return_hidden=True)
        loss = exits_loss(tuned, heads, hidden, target) + final_weight * kl_per_token(final, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return tuned.requires_grad_(False).eval(), heads.requires_grad_(False).eval(), losses


def save_tuned(model, heads: ExitHeads, path) -> None:
    """A tuned model and its heads: the heads at ``path``, the model beside it (``<stem>.model.safetensors``)."""
    from pathlib import Path

    from .model import save_checkpoint

    path = Path(path)
    save_exit_heads(heads, path)
    save_checkpoint(model, path.with_name(path.stem + ".model.safetensors"), {"tuned_for": "early exit"})


def load_tuned(path, device=None) -> tuple:
    """(model, heads) written by ``save_tuned``; a missing or foreign file is a ValueError."""
    from pathlib import Path

    from .model import load_checkpoint

    path = Path(path)
    model_path = path.with_name(path.stem + ".model.safetensors")
    if not path.is_file() or not model_path.is_file():
        raise ValueError(f"a tuned exit model needs {path.name} and {model_path.name} in {path.parent}")
    model = load_checkpoint(model_path, device=device).eval()
    return model, load_exit_heads(model, path)


def save_exit_heads(heads: ExitHeads, path) -> None:
    save_safetensors(
        {k: v.detach().cpu() for k, v in heads.state_dict().items()}, path, {"format": "labkit-exit-heads"}
    )


def load_exit_heads(model, path) -> ExitHeads:
    tensors, meta = load_safetensors(path, with_metadata=True)
    if meta.get("format") != "labkit-exit-heads":
        raise ValueError(f"{path} is not a labkit exit-heads file (metadata lacks format=labkit-exit-heads)")
    heads = ExitHeads(model)
    expected = {name: tuple(t.shape) for name, t in heads.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise ValueError(f"{path} holds exit heads for another model ({len(found)} tensors, e.g. "
                         f"{next(iter(found.items()), None)}); this model's ({model.config.n_layer} layers, width "
                         f"{model.config.n_embd}) need {len(expected)} tensors, e.g. {next(iter(expected.items()))}")
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


class FoldedExits:
    """The exit heads and the skipped layers' key/value projections, folded into plain matrices.

    Everything an exit head does after normalising, n(h) = (h - mean) / sqrt(var + eps), is
    affine: its LayerNorm scale γ and shift β, the map (A, a), the tied LM head W. So
    logits_k = (W A diag γ) n(h) + W (A β + a): one matrix and one bias per exit, instead of a
    norm, two linears and their temporaries. Likewise each layer's keys and values computed
    from the exit state are (W_kv diag γ₁) n(h) + (W_kv β₁ + b_kv), and since every skipped
    layer takes the *same* exit state, the fills of all of them are one matmul against the
    layers' folded projections stacked side by side. Equal to the unfolded computation up to
    float rounding (tests: same tokens, same exits). At batch 1 on a CPU each operator costs
    tens of microseconds whatever its size, so fewer operators is what makes exits pay.
    """

    def __init__(self, model, heads: ExitHeads) -> None:
        C, L = model.config.n_embd, model.config.n_layer
        W = model.lm_head.weight.detach().float()
        self.eps = heads.norms[0].eps if len(heads.norms) else 1e-5
        self.exit_w, self.exit_b = [], []
        for norm, lin in zip(heads.norms, heads.maps):
            gamma, beta = _affine(norm, C, W.device)
            A = lin.weight.detach().float()
            a = lin.bias.detach().float() if lin.bias is not None else torch.zeros(C, device=A.device)
            self.exit_w.append((W @ (A * gamma[None, :])).t().contiguous())  # (C, vocab): n @ this
            self.exit_b.append(W @ (A @ beta + a))
        kv_w, kv_b = [], []
        for block in model.transformer.h:
            gamma, beta = _affine(block.ln_1, C, W.device)
            w = block.attn.c_attn.weight.detach().float()[C:]  # (2C, C): the key and value rows
            b = block.attn.c_attn.bias
            b = b.detach().float()[C:] if b is not None else torch.zeros(2 * C, device=w.device)
            kv_w.append(w * gamma[None, :])
            kv_b.append(w @ beta + b)
        self.kv_w = torch.cat(kv_w).t().contiguous()  # (C, L·2C): layer l's keys, then values, at l·2C
        self.kv_b = torch.cat(kv_b)
        self.n_head, self.head_size, self.n_layer, self.n_embd = model.config.n_head, C // model.config.n_head, L, C

    @staticmethod
    def applies(model, heads: ExitHeads) -> bool:
        """Plain blocks only (no pruned heads, no quantized projections) and one eps everywhere."""
        eps = {norm.eps for norm in heads.norms} | {block.ln_1.eps for block in model.transformer.h}
        return len(eps) <= 1 and all(
            type(block.attn.c_attn) is nn.Linear
            and getattr(block.attn, "n_head", None) == model.config.n_head
            and isinstance(block.ln_1, nn.LayerNorm)
            for block in model.transformer.h
        )

    def normalise(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h.float(), (self.n_embd,), eps=self.eps)

    def exit_logits(self, n: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.addmm(self.exit_b[layer], n, self.exit_w[layer])

    def fill(self, cache, n: torch.Tensor, first: int, start: int) -> None:
        """Keys and values of layers first.. for position ``start``, from the normalised exit state (batch 1)."""
        width = 2 * self.n_embd
        kv = torch.addmm(self.kv_b[first * width :], n, self.kv_w[:, first * width :])  # (1, skipped · 2C)
        kv = kv.view(self.n_layer - first, 2, self.n_head, self.head_size)
        if hasattr(cache, "all_k"):  # KVCache: every layer in one tensor, so one copy for all of them
            cache.all_k[first:, 0, :, start] = kv[:, 0]
            cache.all_v[first:, 0, :, start] = kv[:, 1]
            return
        for j, layer in enumerate(range(first, self.n_layer)):
            cache.k[layer][0, :, start] = kv[j, 0]
            cache.v[layer][0, :, start] = kv[j, 1]


def _affine(norm: nn.LayerNorm, C: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's scale and shift (ones and zeros where it has none)."""
    gamma = norm.weight.detach().float() if norm.weight is not None else torch.ones(C, device=device)
    beta = norm.bias.detach().float() if norm.bias is not None else torch.zeros(C, device=device)
    return gamma, beta


def _check_generate_args(model, heads, idx, max_new_tokens, stop_token=None) -> None:
    from .model import _check_token_ids, check_stop_token

    check_stop_token(stop_token, model.config.vocab_size)

    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) < 1:
        raise ValueError(f"early-exit generation takes one non-empty sequence, shape (1, T); got "
                         f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")  # fmt: skip
    check_int("max_new_tokens", max_new_tokens, 0)
    if idx.size(1) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt + max_new_tokens exceeds the context of {model.config.block_size}")
    _check_token_ids("idx", idx, model.config.vocab_size)
    maps = getattr(heads, "maps", None)
    if maps is not None and (len(maps) != model.config.n_layer - 1
                             or (len(maps) and maps[0].in_features != model.config.n_embd)):  # fmt: skip
        width = maps[0].in_features if len(maps) else "?"
        raise ValueError(f"the exit heads were made for {len(maps) + 1} layers of width {width}; this model has "
                         f"{model.config.n_layer} layers of width {model.config.n_embd}")  # fmt: skip


@torch.no_grad()
def generate(model, heads: ExitHeads, idx: torch.Tensor, max_new_tokens: int, threshold: float = 1.0,
             stop_token: int | None = None, folded: FoldedExits | bool | None = None, timings: dict | None = None,
             ) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """Greedy decoding with confidence-based early exit; returns (tokens, layers used per new token).

    Batch 1. The prompt (but its last token) is prefilled by every layer; then each step runs
    the newest token up the stack and stops at the first layer k with max(p_k) >= threshold.
    ``folded``: the exits as ``FoldedExits`` (built here when None and the model allows it;
    pass one to reuse it across calls, or False for the plain heads: the readable version).
    ``timings``: a dict that receives ``prefill_s`` (the prompt, every layer) and ``decode_s``
    (the token-by-token loop, where exits act).
    """
    import time

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold τ must be in (0, 1], got {threshold}")
    _check_generate_args(model, heads, idx, max_new_tokens, stop_token)
    L = model.config.n_layer
    if folded is None:
        folded = threshold < 1.0 and FoldedExits.applies(model, heads)
    if folded is True:
        folded = FoldedExits(model, heads)
    t0 = time.perf_counter()
    cache = model.new_cache(1)
    if idx.size(1) > 1:
        model(idx[:, :-1], cache=cache)
    token = idx[:, -1:]
    positions = torch.arange(model.config.block_size, device=idx.device)
    t1 = time.perf_counter()
    out, layers_used = [idx], []
    for _ in range(max_new_tokens):
        start = cache.pos
        x = model.transformer.wte(token) + model.transformer.wpe(positions[start : start + 1])
        exit_logits = None
        for layer, block in enumerate(model.transformer.h):
            x = block(x, cache, layer, start)
            if layer == L - 1 or threshold >= 1.0:
                continue
            if folded:
                n = folded.normalise(x[:, -1])
                logits = folded.exit_logits(n, layer)
                if torch.softmax(logits, dim=-1).max() >= threshold:
                    folded.fill(cache, n, layer + 1, start)
                    exit_logits = logits
                    break
            else:
                logits = heads.logits(model, x[:, -1], layer)
                if F.softmax(logits.float(), dim=-1).max() >= threshold:
                    _fill_skipped(model, cache, x, layer + 1, start)
                    exit_logits = logits
                    break
        layers_used.append(layer + 1)
        cache.pos = start + 1
        if exit_logits is None:
            exit_logits = heads.logits(model, x[:, -1], L - 1)
        token = exit_logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        out.append(token)
        if stop_token is not None and token.item() == stop_token:
            break
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
    return torch.cat(out, dim=1), layers_used


@torch.no_grad()
def generate_recomputed(model, heads: ExitHeads, idx: torch.Tensor, max_new_tokens: int,
                        threshold: float = 1.0) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """The oracle for ``generate``'s cache fill: no cache at all. Every step runs the whole
    sequence again, and each earlier token stops at the layer where it exited, its hidden
    state carried unchanged through the layers above (state copying, which the fill stands
    for: a skipped layer's keys and values come from that carried state). O(n²) and slow;
    the same tokens and exit layers as ``generate`` up to float rounding."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold τ must be in (0, 1], got {threshold}")
    _check_generate_args(model, heads, idx, max_new_tokens)
    L = model.config.n_layer
    seq, last_layer, layers_used = idx, [L - 1] * (idx.size(1) - 1), []  # the prompt but its last token: every layer
    for _ in range(max_new_tokens):
        T = seq.size(1)
        x = model.transformer.wte(seq) + model.transformer.wpe(torch.arange(T, device=seq.device))
        logits = None
        for layer, block in enumerate(model.transformer.h):
            runs = torch.tensor([e >= layer for e in last_layer] + [True], device=seq.device)
            x = torch.where(runs[None, :, None], block(x), x)  # tokens that exited below keep their state
            if layer < L - 1 and threshold < 1.0:
                candidate = heads.logits(model, x[:, -1], layer)
                if F.softmax(candidate.float(), dim=-1).max() >= threshold:
                    logits = candidate
                    break
        last_layer.append(layer)
        layers_used.append(layer + 1)
        if logits is None:
            logits = heads.logits(model, x[:, -1], L - 1)
        seq = torch.cat([seq, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return seq, layers_used


def evaluate_threshold(model, heads: ExitHeads, tokenizer: CharTokenizer, threshold: float, tasks=None,
                       n: int = 40, fmt: str = "specific", seed: int = 1234) -> dict:  # fmt: skip
    """Task accuracy, mean layers per generated token, and time: ``seconds_per_token`` of the
    decode loop (where exits act) and ``seconds_per_answer`` (prompt prefill included)."""
    correct = total = tokens = layer_sum = 0
    decode = answer = 0.0
    device = next(model.parameters()).device
    folded = FoldedExits(model, heads) if threshold < 1.0 and FoldedExits.applies(model, heads) else False
    for task in tasks or data.tasks():
        for ex in data.examples(task, fmt, 0, n=n, seed=seed):
            idx = tokenizer.tensor(ex.prompt, device=device)
            timings = {}
            out, layers = generate(model, heads, idx, len(ex.answer) + 2, threshold, tokenizer.newline_id, folded,
                                   timings)  # fmt: skip
            decode += timings["decode_s"]
            answer += timings["prefill_s"] + timings["decode_s"]
            correct += tokenizer.decode(out[0, idx.size(1) :]) == f" {ex.answer}\n"
            total += 1
            tokens += len(layers)
            layer_sum += sum(layers)
    return {"threshold": threshold, "accuracy": correct / total, "mean_layers": layer_sum / tokens,
            "seconds_per_token": decode / tokens, "seconds_per_answer": answer / total}  # fmt: skip


def compare_thresholds(entries, tokenizer: CharTokenizer, n: int = 30, rounds: int = 3, progress: bool = True,
                       **kwargs) -> list[dict]:  # fmt: skip
    """``evaluate_threshold`` for each (label, model, heads, threshold) of ``entries``, side by side:
    ``rounds`` passes over all of them in turn, each time taken as the median of its rounds (the
    machine drifts; ratios of interleaved medians do not). Accuracy and layers are deterministic.
    ``progress`` shows a bar over the rounds."""
    import statistics

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs = [[] for _ in entries]
    for _ in tqdm(range(rounds), desc="rounds", disable=rounds == 1 or not progress, mininterval=1.0):
        for i, (_, model, heads, threshold) in enumerate(entries):
            runs[i].append(evaluate_threshold(model, heads, tokenizer, threshold, n=n, **kwargs))
    out = []
    for (label, *_), rs in zip(entries, runs):
        row = dict(rs[0], label=label)
        for key in ("seconds_per_token", "seconds_per_answer"):
            row[key] = statistics.median(r[key] for r in rs)
        out.append(row)
    return out
