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
import tempfile

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


def kernel_spec(signatures: dict, name: str, num_warps: int = 4, **constexprs) -> dict:
    """One kernel as ``kernel_report`` takes it: its name, its argument types (``signatures[name]``, a module's
    ``GPU_SIGNATURES``), the given constexprs (launch constants) and warps."""
    if name not in signatures:
        raise ValueError(f"name must be one of {sorted(signatures)}, got {name!r}")
    return dict(name=name, signature=signatures[name], constexprs=constexprs, num_warps=num_warps)


def memory_instructions(kernel) -> dict[str, int]:
    """How many of each global-memory instruction the kernel's PTX holds (cache hints left out), and of the
    grid-dependency controls of programmatic dependent launch (``griddepcontrol.wait``, ``.launch_dependents``)."""
    ptx = kernel.asm["ptx"]
    found = re.findall(r"\b((?:ld|st|red|atom)\.global[\w.:]*|griddepcontrol\.\w+)", ptx)
    return dict(collections.Counter(re.sub(r"\.L[12]::[\w]+", "", f) for f in found))


def loads_around_wait(kernel) -> dict[str, int]:
    """Global loads in the kernel's PTX before and after its ``griddepcontrol.wait`` (``before`` 0 without one):
    with programmatic dependent launch, what a kernel loads before the wait overlaps the previous kernel."""
    lines = kernel.asm["ptx"].splitlines()
    wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), 0)
    count = lambda part: sum(bool(re.search(r"\bld\.global", line)) for line in part)  # noqa: E731
    return {"before": count(lines[:wait]), "after": count(lines[wait:])}


def grid_dependency_order(kernel) -> list[str]:
    """The kernel's ``griddepcontrol`` instructions in the order its PTX holds them: ``["wait",
    "launch_dependents"]`` for a kernel that lets its successor launch only once it has waited itself (so that
    when a kernel starts, the one two before it has finished), ``[]`` without programmatic dependent launch."""
    return re.findall(r"griddepcontrol\.(\w+)", kernel.asm["ptx"])


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _on_cubin(kernel, tool: str, *args: str) -> str:
    """Run one of the wheel's NVIDIA tools on the kernel's cubin; its standard output."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([_nvidia_tool(tool), *args, path], capture_output=True, text=True, check=True).stdout


def _opcodes(lines) -> list[str]:
    ops = (re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", line) for line in lines)
    return [m.group(1) for m in ops if m]


def _sass(kernel) -> str:
    return _on_cubin(kernel, "nvdisasm", "-c")


def sass_instructions(kernel, sass: str | None = None) -> dict[str, int]:
    """Every machine instruction (SASS) of the kernel, by opcode with its modifiers (``REDG.E.ADD.F32...``):
    what the GPU runs. ptxas may rewrite the PTX (an ``atom`` whose result is unused becomes a ``RED``).
    ``sass``: the kernel's disassembly, if already at hand."""
    return dict(collections.Counter(_opcodes((sass or _sass(kernel)).splitlines())).most_common())


def loop_instructions(kernel, sass: str | None = None) -> dict[str, int]:
    """The machine instructions (SASS) of the kernel's longest loop, by opcode: what one iteration costs.

    Divide the total by the elements one thread handles per iteration to get instructions per
    element, the number that says whether a kernel can keep up with memory.
    """
    lines = (sass or _sass(kernel)).splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    best = None
    for i, line in enumerate(lines):  # a loop: a branch back to a label above it
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            if best is None or i - labels[m.group(1)] > best[1] - best[0]:
                best = (labels[m.group(1)], i)
    if best is None:
        return {}
    ops = (op.split(".")[0] for op in _opcodes(lines[best[0] : best[1] + 1]))
    return dict(collections.Counter(ops).most_common())


def registers(kernel) -> dict[str, int]:
    """Registers per thread and bytes spilled to local memory, as ptxas allocated them."""
    out = _on_cubin(kernel, "cuobjdump", "-res-usage")
    return {"registers": int(re.search(r"REG:(\d+)", out).group(1)), "spilled": int(re.search(r"LOCAL:(\d+)", out).group(1))}


def memory_report(module: str, kernels: list[dict], arch: int = 90) -> list[dict[str, int]]:
    """``memory_instructions`` of kernels of ``module`` (a module name), compiled in a fresh Python process
    without the interpreter. Each entry of ``kernels``: ``name``, ``signature``, ``constexprs`` and
    optionally ``num_warps``."""
    return [r["memory"] for r in kernel_report(module, kernels, arch)]


def kernel_report(module: str, kernels: list[dict], arch: int = 90) -> list[dict]:
    """For each kernel (as in ``memory_report``): ``memory`` (its global-memory instructions), ``sass`` (all its
    machine instructions), ``loop`` (the SASS of its main loop, by opcode), ``loads`` (``loads_around_wait``),
    ``pdl`` (``grid_dependency_order``) and ``registers``, compiled in a fresh process."""
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
    # kernels are module attributes, or built by the module's _kernels() (labkit's modules that keep Triton lazy)
    built_by_module = {getattr(f, "__name__", None): f for f in (mod._kernels() if hasattr(mod, "_kernels") else ())}
    report = []
    for k in request["kernels"]:
        fn = getattr(mod, k["name"], None) or built_by_module[k["name"]]
        built = compile_for_gpu(fn, k["signature"], k["constexprs"], request["arch"], k.get("num_warps", 4))
        sass = _sass(built)  # disassembled once, read twice
        report.append({"memory": memory_instructions(built), "sass": sass_instructions(built, sass),
                       "loop": loop_instructions(built, sass), "loads": loads_around_wait(built),
                       "pdl": grid_dependency_order(built), **registers(built)})  # fmt: skip
    print(json.dumps(report))
