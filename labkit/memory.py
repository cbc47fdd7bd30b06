"""Memory optimisation. This file starts with the safetensors format, written from scratch.

A safetensors file is three things back to back:

    [8 bytes: N, little-endian u64][N bytes: JSON header][data buffer]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets into the data buffer) plus an optional ``"__metadata__"`` dict of strings.
Because the layout is that plain, a reader can ``mmap`` the file and hand out tensors
that are *views* of the mapping, ``W_mapped = mmap(file, offset, length)``: nothing is
read from disk until a tensor is touched. No pickle anywhere, so a file from a stranger
can at worst be rejected, never run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap as mmap_module
import os
import struct
import warnings
import weakref
from pathlib import Path

import torch

from ._args import check_int

# safetensors dtype names <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format.

    Tensors are laid out largest dtype first (then by name) so every tensor starts at an
    offset that is a multiple of its element size: a reader can then map it in place.
    """
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError("tensors must be a dict mapping names (str) to torch.Tensor")
    if not all(isinstance(name, str) for name in tensors) or "__metadata__" in tensors:
        raise ValueError("tensor names must be str, and not '__metadata__' (the format keeps that key for metadata)")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must be a dict of str -> str (the format stores only strings)")
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; allowed: {sorted(DTYPE_NAMES.values(), key=str)}")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name


def read_safetensors_header(path) -> tuple[dict, dict[str, str], int]:
    """Parse and validate the header: returns (entries, metadata, data_start).

    Every way a file can lie (truncated, absurd header length, offsets past the end,
    sizes that do not match the shape) becomes a ValueError here, before any tensor is
    allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint path {str(path)!r} is not a file")
    file_size = path.stat().st_size
    if file_size < 8:
        raise ValueError(f"{path.name}: file is {file_size} bytes, too short for a safetensors header (needs >= 8)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > file_size - 8:
            raise ValueError(
                f"{path.name}: header length {n} is impossible for a file of {file_size} bytes "
                f"(allowed 1..{min(MAX_HEADER_BYTES, file_size - 8)}); the file is truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path.name}: header is not valid JSON ({err}); the file is corrupt or not safetensors"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path.name}: __metadata__ must be a JSON object of strings to strings (the format stores "
                         f"only strings), got {json.dumps(metadata)[:80]}")  # fmt: skip
    data_start = 8 + n
    data_len = file_size - data_start
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{path.name}: entry {name!r} must have dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {info['dtype']!r}; allowed: {sorted(DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path.name}: tensor {name!r} has shape {shape!r}; allowed: a list of non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{path.name}: tensor {name!r} has data_offsets {offsets!r}; allowed: [begin, end]")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if not 0 <= begin <= end <= data_len:
            raise ValueError(
                f"{path.name}: tensor {name!r} spans bytes {begin}..{end} but the data buffer holds {data_len} "
                "bytes; the file is truncated or its header lies"
            )
        if end - begin != nbytes:
            raise ValueError(f"{path.name}: tensor {name!r} has {end - begin} bytes but shape {shape} needs {nbytes}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{path.name}: tensors {a!r} and {b!r} overlap in the data buffer")
    return header, metadata, data_start


def load_safetensors(path, mmap: bool = True, with_metadata: bool = False):
    """Read a safetensors file into ``{name: tensor}`` (and its metadata if asked).

    ``mmap=True``: tensors are views of a copy-on-write memory map of the file; pages are
    read from disk when a tensor is first touched. ``mmap=False``: the whole file is read
    into memory first (the eager baseline).
    """
    header, metadata, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        if mmap:
            buffer = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_COPY) if header else b""
        else:
            buffer = bytearray(f.read())
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns about sharing memory; sharing is the point
        for name, info in header.items():
            dtype, shape = DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            count = math.prod(shape)
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=data_start + begin)
                tensors[name] = flat.view(shape)
    return (tensors, metadata) if with_metadata else tensors


# ---------------------------------------------------------------------------------------
# Loading big files: mmap vs eager, measured in a fresh process.
# ---------------------------------------------------------------------------------------
def make_weight_file(path, total_mb: int = 256, n_tensors: int = 16, seed: int = 0) -> dict[str, int]:
    """Write a safetensors file of ``n_tensors`` float32 matrices, about ``total_mb`` MB in all."""
    if total_mb < 1 or n_tensors < 1:
        raise ValueError(f"total_mb and n_tensors must be >= 1, got {total_mb} and {n_tensors}")
    if n_tensors > total_mb * 2**20 // 4:
        raise ValueError(f"n_tensors must be in 1..{total_mb * 2**20 // 4} (one float32 each at least) for "
                         f"total_mb={total_mb}, got {n_tensors}")  # fmt: skip
    per_tensor = total_mb * 2**20 // 4 // n_tensors  # float32 elements per tensor
    side = int(per_tensor**0.5)
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i:02d}.weight": torch.randn(side, side, generator=g) for i in range(n_tensors)}
    save_safetensors(tensors, path, {"made_by": "labkit.memory.make_weight_file"})
    return {name: t.numel() * 4 for name, t in tensors.items()}


_PROFILE_SCRIPT = r"""
import json, sys, time
from labkit.bench import current_rss_bytes
from labkit.memory import load_safetensors
import torch
path, mmap, touch = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
float(torch.ones(1 << 16).sum())  # the first op starts torch's thread pool: count that before, not after
rss0 = current_rss_bytes()
t0 = time.perf_counter()
tensors = load_safetensors(path, mmap=mmap)
t_load = time.perf_counter() - t0
rss_loaded = current_rss_bytes()
names = sorted(tensors)
trace = []
for i in range(touch):
    float(tensors[names[i]].sum())  # touching reads every byte of the tensor
    trace.append({"touched": i + 1, "seconds": time.perf_counter() - t0, "rss": current_rss_bytes() - rss0})
print(json.dumps({"load_s": t_load, "rss_after_load": rss_loaded - rss0, "trace": trace, "n_tensors": len(names)}))
"""


def load_profile(path, mmap: bool, touch: int = 1) -> dict:
    """Load ``path`` in a fresh Python process and report time and RSS growth as tensors are touched.

    A fresh process, so that nothing this notebook already holds muddies the numbers. Returns
    ``{load_s, rss_after_load, trace: [{touched, seconds, rss}], n_tensors}`` (RSS in bytes,
    relative to the process before loading; Linux only).
    """
    import subprocess
    import sys

    if touch < 0:
        raise ValueError(f"touch must be >= 0, got {touch}")
    out = subprocess.run(
        [sys.executable, "-c", _PROFILE_SCRIPT, str(path), "1" if mmap else "0", json.dumps(touch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Activation checkpointing: keep a segment's inputs, recompute its insides in backward.
# ---------------------------------------------------------------------------------------
class CheckpointFunction(torch.autograd.Function):
    """Forward without saving activations; backward re-runs the forward with grad enabled.

    Memory: only the segment's inputs are kept, instead of every intermediate tensor. Cost:
    one more forward of the segment during backward (about +33% compute for a whole model).
    The RNG state is saved and restored so that dropout masks are the same both times, and the
    recompute runs under the autocast the forward ran under, so it computes the same numbers.
    ``anchor`` is an empty tensor that requires grad: it puts the output in the autograd graph
    even when no input requires grad (the segment's parameters still need their gradients).
    """

    @staticmethod
    def forward(ctx, fn, anchor, *args):
        ctx.fn = fn
        ctx.rng_state = torch.get_rng_state()
        ctx.cuda_rng_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        ctx.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        ctx.non_tensors = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = iter(ctx.saved_tensors)
        inputs = []
        for is_tensor, value in zip(ctx.is_tensor, ctx.non_tensors):
            if is_tensor:
                t = next(saved)
                inputs.append(t.detach().requires_grad_(t.requires_grad))
            else:
                inputs.append(value)
        devices = [torch.device("cuda", i) for i in range(len(ctx.cuda_rng_state))] if ctx.cuda_rng_state else []
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as autocast:
            torch.set_rng_state(ctx.rng_state)
            if ctx.cuda_rng_state:
                torch.cuda.set_rng_state_all(ctx.cuda_rng_state)
            for device_type, dtype in ctx.autocast:
                autocast.enter_context(torch.autocast(device_type, dtype=dtype))
            with torch.enable_grad():
                outputs = ctx.fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])  # fills parameter .grad too
        grads = tuple(x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs)
        return (None, None, *grads)


def checkpoint(fn, *args):
    """``fn(*args)`` that keeps only ``args`` for backward and recomputes the rest (like torch.utils.checkpoint)."""
    if not callable(fn):
        raise ValueError("fn must be callable")
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
    return CheckpointFunction.apply(fn, anchor, *args)


def checkpoint_sequential(blocks, segments: int, x: torch.Tensor) -> torch.Tensor:
    """Run ``blocks`` (a list of modules) on ``x`` in ``segments`` checkpointed chunks.

    With n blocks and s segments, memory holds s segment inputs plus one segment's
    activations during its recompute: about s + n/s blocks' worth, smallest at s = sqrt(n).
    """
    blocks = list(blocks)
    if not isinstance(segments, int) or not 1 <= segments <= len(blocks):
        raise ValueError(f"segments must be an int in 1..{len(blocks)} (the number of blocks), got {segments!r}")
    bounds = [round(i * len(blocks) / segments) for i in range(segments + 1)]

    def run(chunk):
        def fn(h):
            for block in chunk:
                h = block(h)
            return h

        return fn

    for start, end in zip(bounds, bounds[1:]):
        x = checkpoint(run(blocks[start:end]), x)
    return x


def peak_activation_bytes(step, exclude=()) -> int:
    """Peak bytes of tensors held for backward while ``step()`` runs forward and backward.

    Counted exactly with ``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's
    storage is added when autograd saves it and removed when autograd lets it go, so the
    peak includes a checkpointed segment's activations while it is recomputed. Tensors
    sharing a storage with ``exclude`` (pass the model's parameters) are not activations and
    are not counted. Unlike process RSS, the count is the same on every machine.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    refs: dict[int, int] = {}
    state = {"live": 0, "peak": 0}

    def release(key: int, nbytes: int) -> None:
        refs[key] -= 1
        if refs[key] == 0:
            del refs[key]
            state["live"] -= nbytes

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in skip or t.device.type == "meta":
            return t
        if key not in refs:
            refs[key] = 0
            state["live"] += storage.nbytes()
            state["peak"] = max(state["peak"], state["live"])
        refs[key] += 1
        weakref.finalize(t, release, key, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return state["peak"]


# ---------------------------------------------------------------------------------------
# Gradient accumulation: g_acc = sum of the micro-batches' gradients.
# ---------------------------------------------------------------------------------------
def accumulate_gradients(
    model: torch.nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int
):
    """Backward over ``inputs`` in ``micro_batches`` pieces, leaving the full batch's gradient in ``.grad``.

    ``loss_fn`` returns a *mean* over its examples, so each piece's loss is weighted by its
    share of the batch (size_i / B): the sum of the weighted gradients is then exactly the
    gradient of the mean over the whole batch. Returns the full batch's mean loss.
    """
    batch = inputs.shape[0]
    if not isinstance(micro_batches, int) or not 1 <= micro_batches <= batch:
        raise ValueError(f"micro_batches must be an int in 1..{batch} (the batch size), got {micro_batches!r}")
    total = 0.0
    for x, y in zip(inputs.tensor_split(micro_batches), targets.tensor_split(micro_batches)):
        loss = loss_fn(model(x), y) * (x.shape[0] / batch)
        loss.backward()  # .grad accumulates: g_acc += g_i
        total += loss.item()
    return total


def _ddp_accumulation_worker(rank: int, world_size: int, micro_batches: int, no_sync: bool):
    """Runs in each process that ``labkit.parallel.launch`` starts (the process group is set up)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = DistributedDataParallel(model)
    calls = [0]

    def counting_hook(state, bucket):
        calls[0] += 1  # one all-reduce per gradient bucket
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    x, y = _ddp_data(rank)
    pieces = list(zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)))
    for i, (xb, yb) in enumerate(pieces):
        last = i == len(pieces) - 1
        context = ddp.no_sync() if no_sync and not last else contextlib.nullcontext()
        with context:  # inside no_sync, gradients only accumulate locally
            (torch.nn.functional.mse_loss(ddp(xb), yb) * xb.shape[0] / x.shape[0]).backward()
    return rank, calls[0], [p.grad.clone() for p in model.parameters()]


def _ddp_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)


def ddp_accumulation(world_size: int = 2, micro_batches: int = 4, no_sync: bool = True, timeout: float = 120.0) -> dict:
    """Gradient accumulation under DistributedDataParallel on ``world_size`` CPU processes (gloo).

    With ``no_sync``, micro-batches before the last accumulate locally and only the last
    backward all-reduces; without it, every micro-batch pays an all-reduce. Returns the
    all-reduce count per rank and whether the result equals one process's full-batch gradient.
    """
    from .parallel.launch import launch

    check_int("world_size", world_size)
    if not isinstance(micro_batches, int) or not 1 <= micro_batches <= 32:
        raise ValueError(f"micro_batches must be an int in 1..32 (the per-rank batch), got {micro_batches!r}")
    gathered = launch(_ddp_accumulation_worker, world_size, micro_batches, no_sync, timeout=timeout)
    # the oracle: one process, all ranks' data as one batch, mean loss
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    data = [_ddp_data(r) for r in range(world_size)]
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    torch.nn.functional.mse_loss(model(x), y).backward()
    expected = [p.grad for p in model.parameters()]
    equal = all(
        torch.allclose(g, e, atol=1e-6, rtol=1e-5)
        for _, _, grads in gathered
        for g, e in zip(grads, expected)
    )
    return {"allreduce_calls": [calls for _, calls, _ in gathered], "equals_full_batch": equal}


# ---------------------------------------------------------------------------------------
# The allocator: fresh memory costs page faults.
# ---------------------------------------------------------------------------------------
def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or None where the OS does not say.

    A minor fault is the kernel mapping a page of memory on its first touch: it zeroes
    4 KiB and updates the page table, about a microsecond each.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def page_faults_per_call(fn, repeat: int = 10, warmup: int = 2) -> float | None:
    """Average minor page faults of one call of ``fn()`` (after ``warmup`` calls), None where unknown."""
    check_int("repeat", repeat)
    for _ in range(warmup):
        fn()
    before = minor_page_faults()
    if before is None:
        return None
    for _ in range(repeat):
        fn()
    return (minor_page_faults() - before) / repeat


def keep_freed_memory(threshold_bytes: int = 32 * 2**20) -> bool:
    """Ask glibc's malloc to keep freed blocks up to ``threshold_bytes`` for reuse; True if it took effect.

    By default glibc hands blocks of more than 128 KiB to the kernel with ``mmap`` and gives
    them back on ``free``, and it trims freed memory at the top of its heap: a model that
    allocates the same activations at every call then faults in every page of them again,
    every call. Raising the mmap and trim thresholds keeps that memory in the process. The
    setting is process-wide, lasts for the rest of the process, and makes the process hold
    on to memory it freed (its RSS no longer shrinks). False where the C library is not
    glibc (macOS, Windows, musl), where nothing changes.
    """
    if not isinstance(threshold_bytes, int) or not 2**17 <= threshold_bytes <= 32 * 2**20:
        raise ValueError(f"threshold_bytes must be an int in 128 KiB .. 32 MiB (glibc's limit), got {threshold_bytes!r}")
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes)) and bool(libc.mallopt(m_trim_threshold, 4 * threshold_bytes))


_ALLOCATOR_EXPERIMENT = """
import json, sys, time
import torch
import labkit
from labkit import memory
torch.set_num_threads({threads})
model, _ = labkit.load_model({model!r})
tokens = torch.randint(0, 100, ({batch}, {length}), generator=torch.Generator().manual_seed(0))

def forward():
    with torch.no_grad():
        model(tokens)

def seconds():
    times = []
    for _ in range({repeat}):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

result = {{"faults_before": memory.page_faults_per_call(forward, {repeat}), "seconds_before": seconds()}}
result["kept"] = memory.keep_freed_memory()
result["faults_after"] = memory.page_faults_per_call(forward, {repeat})
result["seconds_after"] = seconds()
print(json.dumps(result))
"""


def allocator_experiment(model: str = "tiny", batch: int = 4, length: int = 256, repeat: int = 10) -> dict:
    """Page faults and time of one forward pass of ``model`` with glibc's default thresholds, then with
    ``keep_freed_memory()``, in a fresh Python process (the setting is process-wide and permanent; and
    a process that has freed big blocks before has already moved glibc's adaptive threshold).

    Returns ``faults_before``, ``seconds_before``, ``kept`` (False where not glibc), ``faults_after``,
    ``seconds_after``; faults are None where the OS does not report them.
    """
    import subprocess
    import sys

    from . import available_models

    if model not in available_models():
        raise ValueError(f"model must be one of {available_models()}, got {model!r}")
    for name, value in (("batch", batch), ("length", length), ("repeat", repeat)):
        check_int(name, value)
    code = _ALLOCATOR_EXPERIMENT.format(model=model, batch=batch, length=length, repeat=repeat,
                                        threads=torch.get_num_threads())  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the allocator experiment failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
