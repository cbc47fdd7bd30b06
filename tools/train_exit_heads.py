"""Train the early-exit heads shipped in data/ (self-distillation on a frozen shipped model).

python tools/train_exit_heads.py --steps 1500                              # tiny: about 3 minutes on a 2-core CPU
python tools/train_exit_heads.py --model student-distilled --steps 1500    # the capstone's student: about 2 minutes
python tools/train_exit_heads.py --tune --steps 1500 --lr 3e-4            # tiny and its heads tuned together (LayerSkip-style):
                                                                          # data/exit_heads/tiny-tuned{,.model}.safetensors, ~10 minutes
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
parser.add_argument("--out", default=None, help="default: data/exit_heads/<model>.safetensors (-tuned with --tune)")
parser.add_argument("--tune", action="store_true", help="tune the model too, starting from its shipped heads")
args = parser.parse_args()
name = f"{args.model}-tuned" if args.tune else args.model
out = args.out or str(labkit.DATA_DIR / "exit_heads" / f"{name}.safetensors")
torch.manual_seed(0)
model, _ = labkit.load_model(args.model)
t0 = time.perf_counter()
if args.tune:
    shipped = early_exit.load_exit_heads(model, labkit.DATA_DIR / "exit_heads" / f"{args.model}.safetensors")
    tuned, heads, losses = early_exit.tune_for_exits(model, shipped, steps=args.steps, lr=args.lr)
    early_exit.save_tuned(tuned, heads, out)
else:
    heads, losses = early_exit.train_exit_heads(model, steps=args.steps, lr=args.lr)
    early_exit.save_exit_heads(heads, out)
print(json.dumps({"model": args.model, "tuned": args.tune, "steps": args.steps, "lr": args.lr, "seconds": round(time.perf_counter() - t0, 1),
                  "first_loss": losses[0], "last_loss": sum(losses[-20:]) / 20}))  # fmt: skip
