"""The long run of notebook 17's architecture search, written to data/nas_results.json.

Evolutionary search over LabGPT shapes (``labkit.capstone.SEARCH_SPACE``) for the lowest
perplexity under a decode-latency budget: the latency of the distilled student's shape,
measured on this machine. Each accepted candidate trains from scratch for ``--steps``.

    python tools/nas_search.py                 # about 11 minutes on a 2-core CPU
"""

import argparse
import itertools
import json
import platform
import time
from functools import partial

import torch

import labkit
from labkit import capstone, evaluation, train

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=250)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--block-size", type=int, default=256, help="every candidate's context (training windows)")
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--population", type=int, default=6)
parser.add_argument("--generations", type=int, default=3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=str(labkit.DATA_DIR / "nas_results.json"))
args = parser.parse_args()

text = train.validation_text(16 * 512 + 1)
student, tokenizer = labkit.load_model("student-distilled")
t0 = time.perf_counter()
# Latency is cheap to measure: measure every shape of the space up front, in three passes, and keep
# each shape's fastest median. Another process taking the cores for a moment (2-thread matmuls slow
# down many times over when they must wait for a core) then cannot reject a shape by accident.
shapes = [dict(zip(capstone.SEARCH_SPACE, c)) for c in itertools.product(*capstone.SEARCH_SPACE.values())]
shapes = [s for s in shapes if s["n_embd"] % s["n_head"] == 0]
latency: dict[tuple, float] = {}
for _ in range(3):
    for shape in shapes:
        seconds = capstone.decode_latency(capstone.candidate_config(shape, args.block_size), new_tokens=64, repeat=5)
        latency[tuple(shape.values())] = min(seconds, latency.get(tuple(shape.values()), float("inf")))
budget = latency[(3, 6, 192)]  # the distilled student's shape
print(f"budget: {1e3 * budget:.3f} ms/token (student-distilled's shape on this machine)")
score = partial(capstone.train_and_score, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                text=text)  # fmt: skip
result = capstone.search(budget, method="evolution", population=args.population, generations=args.generations,
                         latency_fn=lambda c: latency[(c.n_layer, c.n_head, c.n_embd)], score_fn=score,
                         block_size=args.block_size, seed=args.seed)  # fmt: skip
wall = time.perf_counter() - t0
summary = {
    "command": "python tools/nas_search.py "
    + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    "machine": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
    "torch": torch.__version__,
    "wall_time_s": round(wall, 1),
    "budget_ms": 1e3 * budget,
    "space": capstone.SEARCH_SPACE,
    "latency_ms": {"x".join(map(str, k)): 1e3 * v for k, v in latency.items()},  # layers x heads x width
    "settings": vars(args),
    # the shipped student, trained for minutes on a GPU, scored on the same text (512-character windows)
    "student_distilled_perplexity": evaluation.perplexity(student, tokenizer, text),
    "best": result["best"],
    "history": result["history"],
}
with open(args.out, "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps({k: summary[k] for k in ("wall_time_s", "budget_ms", "best", "student_distilled_perplexity")}))
