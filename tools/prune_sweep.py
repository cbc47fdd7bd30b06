"""Accuracy vs sparsity for every pruning structure, with and without fine-tuning (results for notebook 07).

Prunes LabGPT `tiny` with each structure at several sparsities, evaluates perplexity on
held-out text and task accuracy (specific zero-shot prompts), then repeats with
iterative pruning and fine-tuning (3 rounds of 20 steps, 8 x 256 tokens each). A dense
model fine-tuned the same way is the control, and one one-shot run shows what the
gradual schedule adds. Writes data/prune_sweep.json.

    python tools/prune_sweep.py            # about 40 minutes on a 2-core CPU
"""

import argparse
import json
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import labkit
from labkit import data, prune
from labkit.evaluation import evaluate, perplexity
from labkit.train import finetune, validation_text

NO_FINETUNE = {
    ("unstructured", "layer"): [0.3, 0.5, 0.6, 0.7, 0.8, 0.9],
    ("unstructured", "global"): [0.3, 0.5, 0.6, 0.7, 0.8, 0.9],
    ("neurons", "layer"): [0.25, 0.5, 0.75],
    ("heads", "layer"): [1 / 6, 2 / 6, 3 / 6, 4 / 6],
    ("2:4", "layer"): [0.5],
}
FINETUNE = {
    ("unstructured", "layer"): [0.5, 0.7, 0.8, 0.9],
    ("neurons", "layer"): [0.25, 0.5, 0.75],
    ("heads", "layer"): [2 / 6, 3 / 6, 4 / 6],
    ("2:4", "layer"): [0.5],
}

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--steps-per-round", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--n-eval", type=int, default=60, help="prompts per task")
parser.add_argument("--out", default=str(labkit.DATA_DIR / "prune_sweep.json"))
args = parser.parse_args()
torch.manual_seed(0)
base, tok = labkit.load_model("tiny")
validation = validation_text(60_000)
tune = dict(batch_size=args.batch_size, seq_len=args.seq_len)


def forward_flops(model) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros((1, 256), dtype=torch.long))
    return counter.get_total_flops()


def record(model, structure, scope, sparsity, finetuned, t0) -> dict:
    row = {
        "structure": structure,
        "scope": scope,
        "sparsity": sparsity,
        "finetune": finetuned,
        "weight_sparsity": prune.weight_sparsity(model),
        "params": sum(p.numel() for p in model.parameters()),
        "flops_256_tokens": forward_flops(model),
        "perplexity": perplexity(model, tok, validation),
        "accuracy": {t: evaluate(model, tok, t, "specific", 0, n=args.n_eval) for t in data.tasks()},
        "seconds": time.perf_counter() - t0,
    }
    row["mean_accuracy"] = sum(row["accuracy"].values()) / len(row["accuracy"])
    print(json.dumps({k: v for k, v in row.items() if k != "accuracy"}), flush=True)
    return row


schedule = f"iterative {args.rounds}x{args.steps_per_round}"
total_steps = args.rounds * args.steps_per_round
rows = [record(base, "dense", "layer", 0.0, "none", time.perf_counter())]
t0 = time.perf_counter()
control = labkit.load_model("tiny")[0]
finetune(control, steps=total_steps, progress=False, seed=1, **tune)
rows.append(record(control, "dense", "layer", 0.0, f"{total_steps} steps", t0))
for (structure, scope), levels in NO_FINETUNE.items():
    for sparsity in levels:
        t0 = time.perf_counter()
        rows.append(record(prune.prune_model(base, sparsity, structure, scope), structure, scope, sparsity, "none", t0))
for (structure, scope), levels in FINETUNE.items():
    for sparsity in levels:
        t0 = time.perf_counter()
        model, _ = prune.iterative_prune(base, sparsity, structure, args.rounds, args.steps_per_round, scope, **tune)
        rows.append(record(model, structure, scope, sparsity, schedule, t0))
t0 = time.perf_counter()
one_shot = prune.prune_model(base, 0.5, "neurons")
finetune(one_shot, steps=total_steps, progress=False, seed=1, **tune)
rows.append(record(one_shot, "neurons", "layer", 0.5, f"one-shot + {total_steps} steps", t0))
meta = {
    "command": f"python tools/prune_sweep.py --rounds {args.rounds} --steps-per-round {args.steps_per_round} "
    f"--batch-size {args.batch_size} --seq-len {args.seq_len} --n-eval {args.n_eval}",
    "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    "torch": torch.__version__,
    "validation_chars": len(validation),
    "prompts_per_task": args.n_eval,
    "finetune": f"AdamW lr 3e-4, {args.batch_size} x {args.seq_len} tokens per step",
}
with open(args.out, "w") as f:
    json.dump({"meta": meta, "runs": rows}, f, indent=1)
print(f"wrote {len(rows)} runs to {args.out}")
