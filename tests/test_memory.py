import struct

import pytest
import torch

from labkit.memory import load_safetensors, save_safetensors

TENSORS = {
    "a": torch.randn(3, 4),
    "b": torch.arange(5, dtype=torch.int8),
    "c": torch.randn(7).bfloat16(),
    "d": torch.randn(2, 2).half(),
    "e": torch.zeros(0, 3),
    "f": torch.tensor([True, False]),
}


@pytest.mark.parametrize("mmap", [True, False])
def test_compatible_with_the_safetensors_package_both_ways(tmp_path, mmap):
    st = pytest.importorskip("safetensors.torch")
    ours = tmp_path / "ours.safetensors"
    save_safetensors(TENSORS, ours, {"k": "v"})
    theirs = st.load_file(ours)
    assert all(torch.equal(theirs[k], TENSORS[k]) for k in TENSORS)
    other = tmp_path / "theirs.safetensors"
    st.save_file(TENSORS, other, metadata={"k": "v"})
    loaded, meta = load_safetensors(other, mmap=mmap, with_metadata=True)
    assert meta == {"k": "v"}
    assert all(torch.equal(loaded[k], TENSORS[k]) and loaded[k].dtype == TENSORS[k].dtype for k in TENSORS)


def _header(path, header_len):
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", header_len)
    path.write_bytes(bytes(raw))


def test_lies_and_truncation_are_value_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(TENSORS, path)
    raw = path.read_bytes()
    (tmp_path / "short").write_bytes(raw[:5])
    with pytest.raises(ValueError, match="too short"):
        load_safetensors(tmp_path / "short")
    (tmp_path / "cut").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_safetensors(tmp_path / "cut")
    absurd = tmp_path / "absurd"
    absurd.write_bytes(raw)
    _header(absurd, 2**62)
    with pytest.raises(ValueError, match="header length"):
        load_safetensors(absurd)
    lying = tmp_path / "lying"
    lying.write_bytes(raw.replace(b'"shape":[3,4]', b'"shape":[3,5]'))
    with pytest.raises(ValueError, match="needs"):
        load_safetensors(lying)
    with pytest.raises(ValueError, match="dtype"):
        save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z")


@pytest.mark.parametrize("mmap", [True, False])
def test_tensors_are_views_of_one_buffer_not_copies(tmp_path, mmap):
    from labkit.memory import read_safetensors_header

    path = tmp_path / "x.safetensors"
    save_safetensors({"v": torch.arange(10.0), "w": torch.arange(1000, dtype=torch.float32)}, path)
    loaded = load_safetensors(path, mmap=mmap)
    header, _, _ = read_safetensors_header(path)
    gap = header["w"]["data_offsets"][0] - header["v"]["data_offsets"][0]
    # both tensors point into the same mapped (or read) buffer, at their file offsets
    assert loaded["w"].data_ptr() - loaded["v"].data_ptr() == gap
    assert loaded["w"][999] == 999
