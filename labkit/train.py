"""Training LabGPT on the generated corpus, with progress bars, evaluation and safetensors checkpoints.

The shipped checkpoints were made with this module's command line, e.g.

    python -m labkit.train --config tiny --steps 6000 --out data/tiny.safetensors

(the exact commands, seeds, tokens seen, wall times and machines are in data/MODEL_CARD.md).
With ``--teacher`` it trains by distillation instead (``labkit.distill``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data
from ._args import check_int
from .device import get_device, seed_everything
from .distill import distillation_loss
from .evaluation import evaluate, perplexity
from .model import LabGPT, get_config, load_checkpoint, save_checkpoint
from .tokenizer import CharTokenizer

VALIDATION_SEED = 987_654  # the validation text never shares a seed with training text


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the checkpoint)."""

    config: str = "tiny"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    corpus_chars: int = 20_000_000
    seed: int = 0
    device: str | None = None
    teacher: str | None = None  # path of a checkpoint to distill from
    alpha: float = 0.5
    temperature: float = 2.0
    compile: bool = False
    log_every: int = 50
    overrides: dict = field(default_factory=dict)  # GPTConfig fields to change

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "corpus_chars", "log_every"):
            check_int(name, getattr(self, name))
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (steps), got {self.warmup!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.grad_clip:
            raise ValueError(f"grad_clip must be > 0 (the largest gradient norm; use math.inf for none), got "
                             f"{self.grad_clip}")  # fmt: skip


class Batches:
    """Random windows of the corpus, each starting at a document boundary (as prompts do)."""

    def __init__(self, text: str, tokenizer: CharTokenizer, block_size: int, seed: int) -> None:
        ids = np.frombuffer(bytes(tokenizer.encode(text)), dtype=np.uint8)  # the alphabet fits a byte
        if len(ids) < block_size + 1:
            raise ValueError(f"the text ({len(ids)} characters) is shorter than one window of block_size + 1 = "
                             f"{block_size + 1}: give more text (corpus_chars) or a shorter block_size/seq_len")
        self.ids = torch.from_numpy(ids.copy())
        nl = np.flatnonzero(ids == tokenizer.newline_id)
        starts = nl[1:][np.diff(nl) == 1] + 1  # just after a blank line
        self.starts = torch.from_numpy(np.concatenate([[0], starts[starts + block_size + 1 <= len(ids)]]))
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pick = self.starts[torch.randint(len(self.starts), (batch_size,), generator=self.generator)]
        offsets = pick.unsqueeze(1) + torch.arange(self.block_size + 1)  # (B, T+1)
        window = self.ids[offsets].long()
        return window[:, :-1].to(device, non_blocking=True), window[:, 1:].to(device, non_blocking=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings' positions)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(cfg: TrainConfig, progress: bool = True) -> tuple[LabGPT, dict]:
    """Train a LabGPT from scratch (or by distillation); returns the model and a history."""
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = CharTokenizer()
    model = LabGPT(get_config(cfg.config, **cfg.overrides)).to(device)
    teacher = load_checkpoint(cfg.teacher, device=device) if cfg.teacher else None
    if teacher is not None:
        teacher.requires_grad_(False)
    batches = Batches(data.corpus(cfg.corpus_chars, seed=cfg.seed), tokenizer, model.config.block_size, cfg.seed)
    optimizer = make_optimizer(model, cfg, device)
    step_fn = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    history: dict = {"step": [], "loss": [], "lr": []}
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.config}", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = batches(cfg.batch_size, device)
        with autocast:
            logits = step_fn(x)
            if teacher is None:
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = distillation_loss(logits, teacher_logits, y, cfg.alpha, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            value = loss.item()
            history["step"].append(step)
            history["loss"].append(value)
            history["lr"].append(lr_at(step, cfg))
            bar.set_postfix(loss=f"{value:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    history["wall_time_s"] = time.perf_counter() - t0
    history["tokens_seen"] = cfg.steps * cfg.batch_size * model.config.block_size
    model.eval()
    history["val_perplexity"] = perplexity(model, tokenizer, validation_text())
    # task accuracy with specific zero-shot prompts (the model card has the full table)
    history["task_accuracy"] = {task: evaluate(model, tokenizer, task, "specific", 0, n=50) for task in data.tasks()}
    return model, history


def finetune(
    model: LabGPT,
    steps: int = 50,
    batch_size: int = 8,
    seq_len: int | None = None,
    lr: float = 3e-4,
    seed: int = 1,
    corpus_chars: int = 2_000_000,
    progress: bool = True,
) -> list[float]:
    """A short fine-tune of an existing model (compressed, quantized, pruned...) on fresh corpus text.

    AdamW at a constant small learning rate on every parameter that requires grad; the
    data come from a seed the shipped checkpoints were not trained on. ``seq_len`` defaults
    to 256 or the model's context, whichever is shorter. Returns the losses.
    """
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    block_size = model.config.block_size
    seq_len = min(256, block_size) if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= block_size:
        raise ValueError(f"seq_len must be an int in 1..{block_size} (the model's context), got {seq_len!r}")
    device = next(model.parameters()).device
    batches = Batches(data.corpus(corpus_chars, seed=seed), CharTokenizer(), seq_len, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="fine-tune", disable=not progress, mininterval=1.0):
        x, y = batches(batch_size, device)
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def validation_text(n_chars: int = 200_000) -> str:
    """Held-out text from the same mixture, with a seed training never uses."""
    return data.corpus(n_chars, seed=VALIDATION_SEED)


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train LabGPT on the generated corpus.")
    parser.add_argument("--config", default="tiny", help="a named size: nano, tiny, student, gpt2")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--corpus-chars", type=int, default=20_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--teacher", default=None, help="checkpoint to distill from")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", required=True, help="where to write the safetensors checkpoint")
    parser.add_argument("--history", default=None, help="optional JSON file for the loss curve")
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        config=args.config,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        corpus_chars=args.corpus_chars,
        seed=args.seed,
        device=args.device,
        teacher=args.teacher,
        alpha=args.alpha,
        temperature=args.temperature,
        compile=args.compile,
    )
    model, history = train(cfg)
    command = "python -m labkit.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    metadata = {
        "train_command": command,
        "train_config": json.dumps(asdict(cfg)),
        "seed": str(cfg.seed),
        "steps": str(cfg.steps),
        "tokens_seen": str(history["tokens_seen"]),
        "wall_time_s": f"{history['wall_time_s']:.1f}",
        "machine": machine_name(),
        "torch": torch.__version__,
        "val_perplexity": f"{history['val_perplexity']:.4f}",
        "task_accuracy_specific_0shot": json.dumps(history["task_accuracy"]),
    }
    save_checkpoint(model.to("cpu").float(), args.out, metadata)
    if args.history:
        with open(args.history, "w") as f:
            json.dump({**history, "metadata": metadata}, f)
    print(json.dumps(metadata, indent=1))


if __name__ == "__main__":
    main()
