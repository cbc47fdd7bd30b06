"""Distil the speculative-decoding draft shipped in data/ (DistillSpec-style, on the target's own text).

python tools/train_draft.py                  # student-distilled tuned to agree with tiny: about 8 minutes on a 2-core CPU
python tools/train_draft.py --draft student-draft --layers 0,2 --steps 2000 \
    --out data/student-draft-2layer.safetensors  # a 2-block draft cut from it, tuned again: about 9 minutes

The draft starts from ``student-distilled`` (notebook 10) and learns the target's greedy choices on
the target's own continuations of training-mixture prompts (a corpus seed that neither the
shipped checkpoints nor the validation text use). It is written to data/student-draft.safetensors,
with its losses and the agreement (acceptance rate) before and after in data/student-draft.history.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

import labkit
from labkit import data, distill, serving
from labkit.memory import load_safetensors
from labkit.model import save_checkpoint
from labkit.train import machine_name

parser = argparse.ArgumentParser()
parser.add_argument("--target", default="tiny")
parser.add_argument("--draft", default="student-distilled")
parser.add_argument("--sequences", type=int, default=2048, help="target continuations to train on")
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=3e-4)
parser.add_argument("--layers", default=None, help="keep only these blocks of the draft, e.g. 0,2 (default: all)")
DEFAULT_OUT = labkit.DATA_DIR / "student-draft.safetensors"
parser.add_argument("--out", default=str(DEFAULT_OUT))
args = parser.parse_args()

torch.manual_seed(0)
target, _ = labkit.load_model(args.target)
draft, _ = labkit.load_model(args.draft)
if args.layers is not None:
    draft = distill.keep_layers(draft, [int(i) for i in args.layers.split(",")]).eval()
held_out = serving.held_out_prompts(20)  # the workload notebook 16 and the serving bench measure on
before = serving.greedy_agreement(target, draft, held_out)
t0 = time.perf_counter()
continuations = distill.target_continuations(target, data.corpus(3_000_000, seed=7), args.sequences)
t_data = time.perf_counter() - t0
stats = {}
losses = distill.distill_draft(draft, target, continuations, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               stats=stats)  # fmt: skip
seconds = time.perf_counter() - t0
after = serving.greedy_agreement(target, draft, held_out)
command = "python tools/train_draft.py " + " ".join(
    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None
)
if Path(args.out).resolve() != DEFAULT_OUT.resolve():  # the command must write where this file was written
    command += f" --out {os.path.relpath(Path(args.out).resolve(), labkit.DATA_DIR.parent)}"
_, start_meta = load_safetensors(labkit.DATA_DIR / f"{args.draft}.safetensors", with_metadata=True)
tokens_seen = int(start_meta.get("tokens_seen", 0)) + stats["tokens"]  # the start's training, then this tuning
start = args.draft + (f" (blocks {args.layers})" if args.layers else "")
meta = {"train_command": command, "teacher": args.target, "initialised_from": start, "seed": "0",
        "tokens_seen": str(tokens_seen), "tuning_tokens": str(stats["tokens"]),
        "steps": str(args.steps), "wall_time_s": f"{seconds:.1f}", "machine": machine_name(), "torch": torch.__version__}  # fmt: skip
save_checkpoint(draft, args.out, meta)
history = {"step": list(range(len(losses))), "loss": losses, "agreement_before": before, "agreement_after": after,
           "data_seconds": round(t_data, 1), "wall_time_s": round(seconds, 1), "metadata": meta}  # fmt: skip
with open(args.out.replace(".safetensors", ".history.json"), "w") as f:
    json.dump(history, f, indent=1)
print(json.dumps({"agreement_before": round(before, 4), "agreement_after": round(after, 4),
                  "first_loss": losses[0], "last_loss": sum(losses[-20:]) / 20, "seconds": round(seconds, 1)}))  # fmt: skip
