"""Compile a Triton kernel for an NVIDIA GPU on a machine without one, and read the PTX it becomes.

Triton's compiler and NVIDIA's ``ptxas`` ship inside the triton wheel, so a kernel can be
built for Hopper (sm_90) anywhere. That checks what the CPU interpreter cannot (the kernel
lowers to GPU code at all, with these block sizes) and shows how it will read memory: a
decode GEMV only reaches the bandwidth it is written for if its weights arrive in 16-byte
vector loads (``ld.global.v4.b32``), and reductions into shared outputs should be
fire-and-forget ``red`` instructions, not ``atom`` ones that wait for an answer.

    kernel = compile_for_gpu(fn, {"x_ptr": "*fp32", "N": "i32"}, {"BLOCK": 128})
    memory_instructions(kernel)  # {'ld.global.v4.b32': 4, 'red.global.gpu.relaxed.add.v2.f32': 1, ...}

In a process where kernels have run under ``TRITON_INTERPRET=1``, the interpreter has patched
``triton.language``: ``memory_report`` compiles in a fresh process instead.

Like Triton's JIT at run time, arguments are marked divisible by 16 (pointers, and integers
named as strides or sizes in ``aligned``): the compiler vectorizes only what it can prove.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys

ALIGNED_INTS = ("N", "K", "C", "Z", "HIDDEN")


def compile_for_gpu(fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                    aligned: tuple = ALIGNED_INTS):  # fmt: skip
    """``fn`` (a ``@triton.jit`` function) compiled for CUDA compute capability ``arch`` (90: Hopper).

    ``signature`` maps every non-constexpr argument to its Triton type ("*bf16", "*fp32", "i32",
    "fp32"); ``constexprs`` gives the rest.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = [a for a in fn.arg_names if a not in signature and a not in constexprs]
    if missing:
        raise ValueError(f"signature or constexprs must name every argument of {fn.__name__}; missing {missing}")
    full = {a: "constexpr" if a in constexprs else signature[a] for a in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(fn.arg_names)
        if a not in constexprs and (full[a].startswith("*") or a.startswith("stride") or a in aligned)
    }
    src = ASTSource(fn, full, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def memory_instructions(kernel) -> dict[str, int]:
    """How many of each global-memory instruction the kernel's PTX holds (cache hints left out), and of the
    grid-dependency controls of programmatic dependent launch (``griddepcontrol.wait``, ``.launch_dependents``)."""
    ptx = kernel.asm["ptx"]
    found = re.findall(r"\b((?:ld|st|red|atom)\.global[\w.:]*|griddepcontrol\.\w+)", ptx)
    return dict(collections.Counter(re.sub(r"\.L[12]::[\w]+", "", f) for f in found))


def memory_report(module: str, kernels: list[dict], arch: int = 90) -> list[dict[str, int]]:
    """``memory_instructions`` of kernels of ``module`` (a module name), compiled in a fresh Python process
    without the interpreter. Each entry of ``kernels``: ``name``, ``signature``, ``constexprs`` and
    optionally ``num_warps``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"module": module, "kernels": kernels, "arch": arch})
    done = subprocess.run([sys.executable, "-m", "labkit.kernels.ptx"], input=payload, capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"compiling for sm_{arch} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the worker of memory_report
    request = json.loads(sys.stdin.read())
    mod = importlib.import_module(request["module"])
    report = [
        memory_instructions(compile_for_gpu(getattr(mod, k["name"]), k["signature"], k["constexprs"], request["arch"],
                                            k.get("num_warps", 4)))  # fmt: skip
        for k in request["kernels"]
    ]
    print(json.dumps(report))
