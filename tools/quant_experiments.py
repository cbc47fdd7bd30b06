"""The quantization lab's long runs (results for notebooks 08 and 09): PTQ table, fine-tune mitigation, QAT.

1. Post-training quantization of LabGPT `tiny`: perplexity (on 100k held-out characters), task
   accuracy (200 specific zero-shot prompts per task) and weight bytes of every scheme.
2. The mitigation the survey names, a short fine-tune of the quantized model on fresh training
   text: the 4-bit per-tensor model (the scheme with a real gap) trains its float parameters
   (biases, LayerNorms, embeddings) while its 4-bit weights stay frozen.
3. Quantization-aware training at 4 bits: the fp32 master weights train through fake
   quantization (straight-through estimator), then are quantized for real; per-tensor scales
   (also with a quarter of the steps) and per-channel scales.
4. The control: the fp32 model fine-tuned the same way (does training alone lower perplexity?).

Writes data/quant_results.json.

    python tools/quant_experiments.py            # about 20 minutes on a 2-core CPU
"""

import argparse
import copy
import json
import platform
import time

import torch

import labkit
from labkit import data, quant
from labkit.evaluation import evaluate, perplexity
from labkit.train import finetune, validation_text

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--n-task", type=int, default=200)
parser.add_argument("--val-chars", type=int, default=100_000)
parser.add_argument("--out", default=str(labkit.DATA_DIR / "quant_results.json"))
args = parser.parse_args()

labkit.seed_everything(0)
val = validation_text(args.val_chars)
base, tokenizer = labkit.load_model("tiny")


def quality(model) -> dict:
    accuracy = {t: evaluate(model, tokenizer, t, "specific", 0, n=args.n_task) for t in data.tasks()}
    return {"perplexity": perplexity(model, tokenizer, val), "accuracy": sum(accuracy.values()) / len(accuracy),
            "accuracy_by_task": accuracy}  # fmt: skip


def tune(model, steps: int | None = None) -> list[float]:
    """labkit.train.finetune: AdamW at a constant lr, on fresh corpus text (seed 1)."""
    return finetune(model, steps=steps or args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                    progress=False)  # fmt: skip


t0 = time.perf_counter()
results = {"ptq": []}
for label, arguments in quant.PTQ_VARIANTS.items():
    model = copy.deepcopy(base)
    if arguments is not None:
        quant.quantize_model(model, **arguments)
    row = {"variant": label, **quality(model), "weight_bytes": quant.weight_bytes(model)}
    results["ptq"].append(row)
    print(f"PTQ {label}: perplexity {row['perplexity']:.4f}, accuracy {row['accuracy']:.3f}", flush=True)

runs = {}
print("fp32 control fine-tune", flush=True)
control = copy.deepcopy(base)
runs["fp32 fine-tuned (control)"] = {"losses": tune(control), **quality(control)}

print("PTQ int4 per tensor, fine-tune of the float parameters", flush=True)
ptq = quant.quantize_model(copy.deepcopy(base), "int4_weight_only", granularity="tensor")
runs["int4 per tensor, PTQ + fine-tune of float parameters"] = {"losses": tune(ptq), **quality(ptq)}

for granularity, steps in (("tensor", args.steps), ("tensor", args.steps // 4), ("channel", args.steps)):
    print(f"QAT int4 per {granularity}, {steps} steps", flush=True)
    model = quant.prepare_qat(copy.deepcopy(base), granularity=granularity)
    losses = tune(model, steps)
    quant.quantize_model(model, "int4_weight_only", granularity=granularity)
    runs[f"int4 per {granularity}, QAT {steps} steps"] = {"losses": losses, **quality(model)}
for label, run in runs.items():
    print(f"{label}: perplexity {run['perplexity']:.4f}, accuracy {run['accuracy']:.3f}", flush=True)
results["finetune"] = runs
results["meta"] = {
    "command": "python tools/quant_experiments.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    "torch": torch.__version__,
    "tokens_per_run": args.steps * args.batch_size * args.seq_len,
    "seconds": time.perf_counter() - t0,
}  # fmt: skip
with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
print(f"wrote {args.out} in {results['meta']['seconds']:.0f} s")
