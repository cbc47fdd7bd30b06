"""Knowledge distillation (Hinton et al., 2015): a small student learns from a big teacher.

    L = alpha * L_hard + (1 - alpha) * L_soft

``L_hard`` is the usual cross-entropy against the true next token; ``L_soft`` is the KL
divergence from the teacher's temperature-softened distribution to the student's, times
``T^2`` so that its gradients keep their size as T grows (the softened logits shrink
gradients by 1/T^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._args import check_int


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> torch.Tensor:
    """alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)).

    Logits are (..., vocab); targets (...) with -1 for positions to ignore.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.size(-1) != teacher_logits.size(-1):
        raise ValueError(
            f"student and teacher vocabularies differ ({student_logits.size(-1)} vs {teacher_logits.size(-1)} "
            "logits): distillation needs the same vocabulary"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    vocab = student_logits.size(-1)
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    y = targets.reshape(-1)
    keep = y != -1
    if y.numel() != s.size(0) or bool(((y < -1) | (y >= vocab)).any() | ~keep.any()):  # one sync, not two
        raise ValueError(f"targets must be token ids in 0..{vocab - 1} (or -1 to ignore a position), one per position "
                         f"of the logits ({s.size(0)}), at least one not ignored; got shape {tuple(targets.shape)} with "
                         f"values in {int(y.min()) if y.numel() else None}..{int(y.max()) if y.numel() else None}")
    hard = F.cross_entropy(s, y, ignore_index=-1)
    log_p_student = F.log_softmax(s[keep] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t[keep] / temperature, dim=-1)
    # KL(p_t || p_s) summed over the vocabulary, averaged over positions
    soft = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean() * temperature**2
    return alpha * hard + (1 - alpha) * soft


# ---------------------------------------------------------------------------------------
# Distilling a draft for speculative decoding (DistillSpec, Zhou et al., 2023)
# ---------------------------------------------------------------------------------------
def target_continuations(
    target,
    text: str,
    n: int,
    prompt_lengths=(8, 16, 32, 48),
    new_tokens: int = 192,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[tuple[int, torch.Tensor]]:
    """``n`` prompts (document openings of ``text``) continued greedily by ``target``.

    Returns ``(prompt_length, ids)`` batches, ids of shape (b, prompt_length + new_tokens):
    the text a draft must predict in speculative decoding is the target's own output, not the
    corpus, so that is what it trains on (on-policy data).
    """
    from tqdm.auto import tqdm

    from .tokenizer import CharTokenizer
    from .train import Batches

    check_int("n", n)
    check_int("batch_size", batch_size)
    check_int("new_tokens", new_tokens)
    if not prompt_lengths or min(prompt_lengths) < 1 or max(prompt_lengths) + new_tokens > target.config.block_size:
        raise ValueError(
            f"prompt_lengths {tuple(prompt_lengths)} + new_tokens {new_tokens} must fit the context "
            f"(1 .. {target.config.block_size} tokens)"
        )
    tokenizer, device = CharTokenizer(), next(target.parameters()).device
    windows = {length: Batches(text, tokenizer, length, seed + length) for length in prompt_lengths}
    out, made = [], 0
    with torch.no_grad(), tqdm(total=n, desc="target continuations", disable=not progress) as bar:
        while made < n:
            length = prompt_lengths[len(out) % len(prompt_lengths)]
            b = min(batch_size, n - made)
            prompts, _ = windows[length](b, device)
            out.append((length, target.generate(prompts, new_tokens, temperature=0.0)))
            made += b
            bar.update(b)
    return out


def distill_draft(
    draft,
    target,
    data: list[tuple[int, torch.Tensor]],
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 3e-4,
    alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    stats: dict | None = None,
) -> list[float]:
    """Tune ``draft`` (in place) to agree with ``target`` on the target's own greedy text.

    Speculative decoding keeps a draft token when it is the target's greedy choice, so the
    acceptance rate is the draft's top-1 agreement with the target on the target's output. The
    loss is ``distillation_loss`` at temperature 1 on the continuation positions of ``data``
    (from ``target_continuations``): cross-entropy against the target's greedy tokens (weight
    ``alpha``) plus KL from the target's full distribution. AdamW, cosine decay to lr / 10.
    Returns the losses; ``stats`` (a dict), if given, receives the token positions read.
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or not 0 < lr < 1:
        raise ValueError(f"steps and batch_size must be >= 1 and lr in (0, 1); got {steps}, {batch_size}, {lr}")
    if not data:
        raise ValueError("data must hold at least one batch from target_continuations")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft vocabulary ({draft.config.vocab_size}) differs from the target's ({target.config.vocab_size})"
        )
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
    draft.train()
    losses, positions = [], 0
    for step in tqdm(range(steps), desc="distil the draft", disable=not progress, mininterval=1.0):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        length, ids = data[int(torch.randint(len(data), (1,), generator=g))]
        rows = torch.randint(ids.size(0), (min(batch_size, ids.size(0)),), generator=g)
        seq = ids[rows]
        x, targets = seq[:, :-1], seq[:, 1:].clone()
        positions += x.numel()
        targets[:, : length - 1] = -1  # positions inside the prompt predict corpus text, not the target's
        with torch.no_grad():
            teacher = target(x)
        loss = distillation_loss(draft(x), teacher, targets, alpha=alpha, temperature=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    draft.eval()
    if stats is not None:
        stats["tokens"] = positions
    return losses


def keep_layers(model, layers) -> torch.nn.Module:
    """A shallower copy of ``model``: only the transformer blocks listed in ``layers``, in that order.

    Everything else (embeddings, final norm, tied head, swapped modules, training mode) is copied
    as it is; block ``layers[i]`` becomes block ``i``. A good start for a cheaper draft (a draft
    step costs about its share of blocks), which distillation then tunes to agree with the target
    again (``distill_draft``).
    """
    import copy
    from dataclasses import replace

    n = model.config.n_layer
    try:
        kept = None if isinstance(layers, (str, bytes)) else list(layers)
    except TypeError:
        kept = None
    if not kept or len(set(kept)) != len(kept) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in kept):  # fmt: skip
        raise ValueError(f"layers must list distinct block indices in 0..{n - 1} (at least one), got {layers!r}")
    shallow = copy.deepcopy(model)  # the head stays tied to the embedding (deepcopy keeps shared tensors shared)
    shallow.transformer.h = torch.nn.ModuleList(shallow.transformer.h[i] for i in kept)
    shallow.config = replace(model.config, n_layer=len(kept))
    return shallow
