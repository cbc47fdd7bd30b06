"""Train the checkpoints shipped in data/ (tiny teacher, plain student, distilled student).

Run on a GPU: it first times a few steps of each model, picks step counts that fit the
time budget, then trains each with the ``python -m labkit.train`` command line (so the
command recorded in each checkpoint is one anyone can rerun, on any device).

    python tools/train_shipped.py --out data --budget 400
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from labkit import data
from labkit.device import get_device, synchronize
from labkit.model import LabGPT, get_config
from labkit.tokenizer import CharTokenizer
from labkit.train import Batches, TrainConfig, make_optimizer
from labkit.train import main as train_main


def seconds_per_step(config: str, batch_size: int, teacher: LabGPT | None = None, steps: int = 12) -> float:
    """Median-free quick estimate: wall time of `steps` steps after 3 warm-up steps."""
    device = get_device()
    model = LabGPT(get_config(config)).to(device)
    opt = make_optimizer(model, TrainConfig(config=config), device)
    batches = Batches(data.corpus(2_000_000, seed=1), CharTokenizer(), model.config.block_size, 1)
    for i in range(steps + 3):
        if i == 3:
            synchronize(device)
            t0 = time.perf_counter()
        x, y = batches(batch_size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                logits = logits + 0 * teacher_logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="data")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds of training in total")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--corpus-chars", type=int, default=50_000_000)
    parser.add_argument("--copy-to", default=None, help="also copy each checkpoint here as soon as it is written")
    parser.add_argument("--check-n", type=int, default=100, help="prompts per cell in the quick check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_teacher = seconds_per_step("tiny", args.batch_size)
    t_student = seconds_per_step("student", args.batch_size)
    t_distill = seconds_per_step("student", args.batch_size, teacher=LabGPT(get_config("tiny")).to(get_device()))
    # 55% of the budget to the teacher; the two students share the rest (same steps each)
    teacher_steps = max(10, int(0.55 * args.budget / t_teacher) // 100 * 100)
    student_steps = max(10, int(0.45 * args.budget / (t_student + t_distill)) // 100 * 100)
    plan = {
        "s_per_step": {"tiny": t_teacher, "student": t_student, "distill": t_distill},
        "teacher_steps": teacher_steps,
        "student_steps": student_steps,
    }
    print(json.dumps(plan, indent=1), flush=True)
    common = ["--batch-size", str(args.batch_size), "--corpus-chars", str(args.corpus_chars), "--seed", "0"]
    runs = [
        ["--config", "tiny", "--steps", str(teacher_steps), *common, "--out", str(out / "tiny.safetensors")],
        ["--config", "student", "--steps", str(student_steps), *common, "--out", str(out / "student.safetensors")],
        [
            "--config",
            "student",
            "--steps",
            str(student_steps),
            *common,
            "--teacher",
            str(out / "tiny.safetensors"),
            "--alpha",
            "0.5",
            "--temperature",
            "2.0",
            "--out",
            str(out / "student-distilled.safetensors"),
        ],
    ]
    for argv in runs:
        name = Path(argv[-1]).stem
        train_main([*argv, "--history", str(out / f"{name}.history.json")])
        if args.copy_to:
            for suffix in (".safetensors", ".history.json"):
                shutil.copy(out / f"{name}{suffix}", Path(args.copy_to) / f"{name}{suffix}")
    quick_check(out, args.check_n)


def quick_check(out: Path, n: int = 100) -> None:
    """A first look at accuracy (the model card's full table is computed on a CPU)."""
    from labkit.evaluation import evaluate
    from labkit.model import load_checkpoint

    tok = CharTokenizer()
    for name in ("tiny", "student", "student-distilled"):
        model = load_checkpoint(out / f"{name}.safetensors", device=get_device())
        rows = {}
        for task in data.tasks():
            rows[task] = [
                round(evaluate(model, tok, task, fmt, k, n=n), 2)
                for fmt, k in (("specific", 0), ("contextual", 0), ("vague", 0), ("vague", 4))
            ]
        print(name, "specific0 contextual0 vague0 vague4", json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
