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

import json
import math
import mmap as mmap_module
import os
import struct
import warnings
from pathlib import Path

import torch

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
    data_start = 8 + n
    data_len = file_size - data_start
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{path.name}: entry {name!r} must have dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {info['dtype']!r}; allowed: {sorted(DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path.name}: tensor {name!r} has shape {shape!r}; allowed: a list of non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
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
