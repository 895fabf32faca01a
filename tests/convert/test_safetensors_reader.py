"""Our .safetensors parser against the safetensors package, and its errors on damaged files."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from convert import CheckpointError, read_checkpoint, read_safetensors


def _write(path, header: dict, buffer: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + buffer)


def test_dtypes_match_the_safetensors_package(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(-4, 4).reshape(2, 4), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 2),
    }
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    got = read_safetensors(path)
    ref = safetensors.torch.load_file(str(path))
    assert set(got) == set(ref)
    for k, t in ref.items():
        want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got[k].shape == tuple(t.shape) and got[k].tobytes() == want.tobytes(), k
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["i64"].dtype == np.int64


def test_content_sniffing_reads_a_misnamed_file(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "weights.bin"))
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "weights.bin")["w"], np.ones(2, np.float32))


@pytest.mark.parametrize("header, buffer, message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated or corrupt"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "do not hold 12 bytes"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16, "lacks dtype/shape/data_offsets"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "bad shape"),
])
def test_corrupt_headers(tmp_path, header, buffer, message):
    _write(tmp_path / "bad.safetensors", header, buffer)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors(tmp_path / "bad.safetensors")


def test_truncated_and_garbage_files(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="header length .* exceeds the file"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="shorter than the 8-byte header length"):
        read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "json.safetensors").write_bytes((6).to_bytes(8, "little") + b"{nope}")
    with pytest.raises(CheckpointError, match="unreadable JSON header"):
        read_safetensors(tmp_path / "json.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_safetensors(tmp_path / "missing.safetensors")
