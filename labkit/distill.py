"""Knowledge distillation (Hinton et al., 2015): a small student learns from a big teacher.

    L = alpha * L_hard + (1 - alpha) * L_soft

``L_hard`` is the usual cross-entropy against the true next token; ``L_soft`` is the KL
divergence from the teacher's temperature-softened distribution to the student's, times
``T^2`` so that its gradients keep their size as T grows (the softened logits shrink
gradients by 1/T^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    hard = F.cross_entropy(s, y, ignore_index=-1)
    log_p_student = F.log_softmax(s[keep] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t[keep] / temperature, dim=-1)
    # KL(p_t || p_s) summed over the vocabulary, averaged over positions
    soft = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean() * temperature**2
    return alpha * hard + (1 - alpha) * soft
