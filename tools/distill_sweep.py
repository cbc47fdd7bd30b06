"""A short-run sweep of the distillation loss's alpha and temperature (results for notebook 10).

Each of four runs trains the `student` shape from scratch on the same data for the same steps, with
the `tiny` teacher's soft targets weighted by (1 - alpha) at temperature T (alpha = 1 is
plain training). Writes data/distill_sweep.json.

    python tools/distill_sweep.py            # about 15 minutes on a 2-core CPU
"""

import argparse
import json
import platform
import time

import torch

import labkit
from labkit import data
from labkit.evaluation import evaluate, perplexity
from labkit.train import TrainConfig, train, validation_text

RUNS = [(1.0, 1.0), (0.5, 2.0), (0.5, 4.0), (0.0, 2.0)]

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--out", default=str(labkit.DATA_DIR / "distill_sweep.json"))
args = parser.parse_args()
val = validation_text(60_000)
rows = []
for alpha, temperature in RUNS:
    t0 = time.perf_counter()
    cfg = TrainConfig(config="student", steps=args.steps, batch_size=args.batch_size, lr=2e-3, warmup=30,
                      corpus_chars=5_000_000, seed=0, device="cpu", log_every=10,
                      teacher=None if alpha == 1.0 else str(labkit.DATA_DIR / "tiny.safetensors"),
                      alpha=alpha, temperature=temperature, overrides={"block_size": 512})  # fmt: skip
    model, history = train(cfg, progress=False)
    tok = labkit.CharTokenizer()
    row = {
        "alpha": alpha,
        "temperature": temperature,
        "val_perplexity": perplexity(model, tok, val),
        "accuracy_specific": {t: evaluate(model, tok, t, "specific", 0, n=100) for t in data.tasks()},
        "loss_curve": {"step": history["step"], "loss": history["loss"]},
        "seconds": time.perf_counter() - t0,
    }
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)
meta = {"command": f"python tools/distill_sweep.py --steps {args.steps} --batch-size {args.batch_size}",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "tokens_per_run": args.steps * args.batch_size * 512}  # fmt: skip
with open(args.out, "w") as f:
    json.dump({"meta": meta, "runs": rows}, f, indent=1)
