"""Compile every launch configuration the GPU autotuners can pick, for a Hopper GPU, on this machine.

A GPU session is short (minutes of device time); a kernel config that does not compile with
the GPU machine's Triton costs part of it. Triton's wheel carries NVIDIA's assembler, so the
configs can be built here first, with the same Triton version as the GPU machine:

    python -m venv /tmp/venv36 && /tmp/venv36/bin/pip install torch==2.13.0 numpy triton==3.6.0
    /tmp/venv36/bin/pip install --no-deps -e . && /tmp/venv36/bin/python tools/compile_sweep.py

Covers the fused decode step's kernels (every config of ``DECODE_GEMV_CONFIGS`` in each of the
ways ``serving.fused_decode_step`` launches the GEMV, ``ATTENTION_PROJ_CONFIGS``,
``MLP_CONFIGS``) in GPT-2-small's shape, and the int4 word kernel's configs in
``INT4_GEMV_CONFIGS`` and the K-major kernel's in ``INT4_KMAJOR_CONFIGS``. Prints registers, spills, loop instructions a weight (int4) and the loads on
each side of the PDL wait (decode kernels), and exits non-zero if any config fails to compile or spills.
"""

from __future__ import annotations

import sys

from labkit.kernels import decode_kernels as dk
from labkit.kernels import quant_kernels as qk
from labkit.kernels.ptx import kernel_report

WIDTH, HEADS, HEAD_SIZE = 768, 12, 64  # GPT-2-small


def decode_kernels() -> list[tuple[str, dict]]:
    """(label, kernel) for every config the fused step's autotuners may launch."""
    out = []
    # (use, PROLOGUE, GELU, ACCUMULATE, KV_WRITE, HAS_BIAS, K, split-K allowed): as fused_decode_step launches them
    uses = [("qkv", 1, False, False, True, True, WIDTH, False), ("lm_head", 1, False, False, False, False, WIDTH, False),
            ("lm_head greedy", 1, False, False, False, False, WIDTH, False),  # folds its argmax in (next_tokens=)
            ("proj (5 a layer)", 2, False, True, False, True, WIDTH, True),
            ("fc (5 a layer)", 1, True, False, False, True, WIDTH, False),
            ("mlp proj (5 a layer)", 0, False, True, False, True, 4 * WIDTH, True)]  # fmt: skip
    for use, prologue, gelu, accumulate, kv, bias, k, split in uses:
        for c in dk.DECODE_GEMV_CONFIGS:
            if c.split_k > 1 and not split:
                continue
            out.append((f"{use} {c}", dk.gpu_spec("linear_kernel", c.num_warps,
                C=WIDTH if kv else 1, HS=HEAD_SIZE, SPLITS=8, PROLOGUE=prologue, HAS_BIAS=bias, GELU=gelu,
                ACCUMULATE=accumulate, KV_WRITE=kv, ZERO=kv, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k,
                USE_PDL=True, PREFETCH=c.block_k >= k and c.split_k == 1, ARGMAX=use.endswith("greedy"))))  # fmt: skip
    for c in dk.ATTENTION_PROJ_CONFIGS:
        out.append((f"attention+proj {c}", dk.gpu_spec("attention_proj_kernel", c.num_warps, H=HEADS, HS=HEAD_SIZE,
                    BLOCK_D=HEAD_SIZE, BLOCK_T=c.block_t, BLOCK_N=c.block_n, HAS_BIAS=True, USE_PDL=True)))  # fmt: skip
    for c in dk.MLP_CONFIGS:
        out.append((f"mlp {c}", dk.mlp_spec(c, WIDTH, 4 * WIDTH)))
    return out


def int4_word_kernels(group: int = 128) -> list[tuple[str, dict, int]]:
    """(label, kernel, weights a thread handles per loop iteration) for the word kernel's configs."""
    return [(f"int4 {c}", qk.gpu_spec("int4_gemv_words_kernel", c.num_warps, GROUP=group, BLOCK_N=c.block_n,
                                      BLOCK_W=c.block_k // 8, SPLIT_K=c.split_k, HALVES=c.halves, ASM=True),
             c.block_n * c.block_k // (32 * c.num_warps))
            for c in qk.INT4_GEMV_CONFIGS if c.words]  # fmt: skip


def int4_kmajor_kernels(group: int = 128) -> list[tuple[str, dict, int]]:
    """(label, kernel, weights a thread handles per loop iteration) for the K-major kernel's configs."""
    return [(f"int4 K-major {c}", qk.gpu_spec("int4_gemv_kmajor_words_kernel" if c.words else "int4_gemv_kmajor_kernel",
                                              c.num_warps, GROUP=group, BLOCK_N=c.block_n, BLOCK_J=c.block_k // 2,
                                              SPLIT_K=c.split_k),
             c.block_n * c.block_k // (32 * c.num_warps))
            for c in qk.INT4_KMAJOR_CONFIGS]  # fmt: skip


def sweep(module: str, labelled: list[tuple], batch: int = 8) -> int:
    """Compile in batches (one fresh process each); a failing batch is retried kernel by kernel. Problems found."""
    problems = 0
    for i in range(0, len(labelled), batch):
        chunk = labelled[i : i + batch]
        try:
            reports = kernel_report(module, [item[1] for item in chunk])
        except RuntimeError:
            reports = []
            for item in chunk:
                try:
                    reports += kernel_report(module, [item[1]])
                except RuntimeError as err:
                    reports.append({"error": str(err).strip().splitlines()[-1]})
        for item, report in zip(chunk, reports):
            if "error" in report:
                problems += 1
                print(f"FAILED  {item[0]}: {report['error']}", flush=True)
                continue
            per_weight = f"  {sum(report['loop'].values()) / item[2]:.2f} instructions a weight" if len(item) > 2 else ""
            if report["pdl"]:  # loads before / after the PDL wait, in the code (what overlaps the previous kernel)
                per_weight += f"  loads {report['loads']['before']} before the wait, {report['loads']['after']} after"
            problems += report["spilled"] > 0
            print(f"{report['registers']:4d} registers, {report['spilled']} spilled  {item[0]}{per_weight}", flush=True)
    return problems


def main() -> int:
    import triton

    decode, int4 = decode_kernels(), int4_word_kernels() + int4_kmajor_kernels()
    print(f"Triton {triton.__version__}: {len(decode)} decode-kernel configs, {len(int4)} int4 word- and K-major-kernel "
          f"configs")  # fmt: skip
    problems = sweep("labkit.kernels.decode_triton", decode) + sweep("labkit.kernels.quant_kernels", int4)
    print(f"{problems} configs failed to compile or spilled")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
