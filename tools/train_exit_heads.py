"""Train the early-exit heads shipped in data/ (self-distillation on a frozen shipped model).

python tools/train_exit_heads.py --steps 1500                              # tiny: about 3 minutes on a 2-core CPU
python tools/train_exit_heads.py --model student-distilled --steps 1500    # the capstone's student: about 2 minutes
"""

import argparse
import json
import time

import torch

import labkit
from labkit import early_exit

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1500)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--model", default="tiny", help="a shipped checkpoint: " + ", ".join(labkit.available_models()))
parser.add_argument("--out", default=None, help="default: data/exit_heads/<model>.safetensors")
args = parser.parse_args()
out = args.out or str(labkit.DATA_DIR / "exit_heads" / f"{args.model}.safetensors")
torch.manual_seed(0)
model, _ = labkit.load_model(args.model)
t0 = time.perf_counter()
heads, losses = early_exit.train_exit_heads(model, steps=args.steps, lr=args.lr)
early_exit.save_exit_heads(heads, out)
print(json.dumps({"model": args.model, "steps": args.steps, "lr": args.lr, "seconds": round(time.perf_counter() - t0, 1),
                  "first_loss": losses[0], "last_loss": sum(losses[-20:]) / 20}))  # fmt: skip
