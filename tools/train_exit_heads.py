"""Train the early-exit heads shipped in data/ (self-distillation on the frozen `tiny` teacher).

python tools/train_exit_heads.py --steps 1500      # about 3 minutes on a 2-core CPU
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
parser.add_argument("--out", default=str(labkit.DATA_DIR / "exit_heads" / "tiny.safetensors"))
args = parser.parse_args()
torch.manual_seed(0)
model, _ = labkit.load_model("tiny")
t0 = time.perf_counter()
heads, losses = early_exit.train_exit_heads(model, steps=args.steps, lr=args.lr)
early_exit.save_exit_heads(heads, args.out)
print(json.dumps({"steps": args.steps, "lr": args.lr, "seconds": round(time.perf_counter() - t0, 1),
                  "first_loss": losses[0], "last_loss": sum(losses[-20:]) / 20}))  # fmt: skip
