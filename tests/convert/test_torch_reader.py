"""The torch-free reader against torch.load: bit-exact tensors, inert extras, refused globals."""

import argparse
import collections
import io
import pathlib
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from convert import CheckpointError, UnsafeCheckpointError, read_checkpoint, read_torch_checkpoint
from convert.torch_reader import ConfigRecord, TorchDtype


def _raw(t: torch.Tensor) -> tuple[str, tuple, bytes]:
    """(dtype name, shape, bytes) of a torch tensor, through an integer view where numpy has no type."""
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = torch.int16 if t.dtype == torch.bfloat16 else torch.int8
        data = t.view(bits).numpy().tobytes()
    else:
        data = t.numpy().tobytes()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), data


def _ours(a: np.ndarray) -> tuple[str, tuple, bytes]:
    assert a.flags.c_contiguous and a.flags.writeable
    return str(a.dtype), a.shape, a.tobytes()


def _rewrite(path, out, edit) -> None:
    """Copy a zip, passing each (name, bytes) through ``edit`` (None drops the member)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            item = edit(name, src.read(name))
            if item is not None:
                dst.writestr(*item)


TENSORS = {
    "f32": torch.randn(3, 5),
    "f16": torch.randn(4, 2).half(),
    "bf16": torch.randn(7).bfloat16(),
    "f64": torch.randn(2, 2, dtype=torch.float64),
    "i64": torch.arange(-5, 7).reshape(3, 4),
    "i32": torch.arange(6, dtype=torch.int32),
    "i16": torch.arange(-3, 3, dtype=torch.int16),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
    "bool": torch.tensor([[True, False], [False, True]]),
    "c64": torch.randn(3, dtype=torch.complex64),
    "f8": torch.randn(5).to(torch.float8_e4m3fn),
    "f8b": torch.randn(5).to(torch.float8_e5m2),
    "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
}


def test_every_dtype_is_bit_identical(tmp_path):
    torch.save(TENSORS, tmp_path / "t.pth")
    got = read_torch_checkpoint(tmp_path / "t.pth")
    ref = torch.load(tmp_path / "t.pth", weights_only=True)
    assert set(got) == set(ref)
    for k in ref:
        assert _ours(got[k]) == _raw(ref[k]), k
    assert got["bf16"].dtype == ml_dtypes.bfloat16


def test_views_and_shared_storage(tmp_path):
    base = torch.randn(6, 8)
    views = {
        "base": base,
        "t": base.t(),  # non-contiguous strides
        "slice": base[2:5, 3:],  # storage offset
        "step": base[::2, 1::3],
        "narrow": base.view(-1)[11:30],
        "expand": torch.randn(3, 1).expand(3, 4),  # stride 0
        "perm": torch.randn(2, 3, 4).permute(2, 0, 1),
        "half_t": torch.randn(5, 3).half().t(),
        "bf16_slice": torch.randn(4, 6).bfloat16()[1:, ::2],
        "i64_t": torch.arange(20).reshape(4, 5).t()[1:],
    }
    torch.save(views, tmp_path / "v.pth")
    got = read_torch_checkpoint(tmp_path / "v.pth")
    ref = torch.load(tmp_path / "v.pth", weights_only=True)
    assert ref["t"].untyped_storage().data_ptr() == ref["base"].untyped_storage().data_ptr()
    for k in views:
        assert _ours(got[k]) == _raw(ref[k]), k
    got["base"][0, 0] = 1e9  # copies, not aliases of one buffer
    assert got["t"][0, 0] != 1e9


@pytest.mark.slow
def test_training_checkpoint_extras_are_inert_data(tmp_path):
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    args = argparse.Namespace(lr=5e-4, model="vim_tiny", sizes=[1, 2], out=pathlib.Path("/tmp/run"))
    ckpt = {
        "model": model.state_dict(), "optimizer": optim.state_dict(), "epoch": 3, "args": args,
        "param": torch.nn.Parameter(torch.ones(2)), "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1), "size": torch.Size([2, 3]),
        "np_scalar": np.float64(0.75), "np_array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "np_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "np_big": np.arange(3, dtype=">f4"),
        "bytes": b"\x00\xffab", "set": {1, 2}, "conj": torch.randn(2, dtype=torch.complex64).conj(),
    }
    torch.save(ckpt, tmp_path / "c.pth")
    got = read_torch_checkpoint(tmp_path / "c.pth")
    ref = torch.load(tmp_path / "c.pth", weights_only=False)
    assert isinstance(got["model"], collections.OrderedDict)
    for k in ("weight", "bias"):
        assert _ours(got["model"][k]) == _raw(ref["model"][k])
    state = got["optimizer"]["state"][0]
    assert _ours(state["exp_avg"]) == _raw(ref["optimizer"]["state"][0]["exp_avg"])
    assert got["optimizer"]["param_groups"][0]["lr"] == ref["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(got["args"], types.SimpleNamespace)
    assert vars(got["args"]) == {"lr": 5e-4, "model": "vim_tiny", "sizes": [1, 2],
                                 "out": pathlib.PurePosixPath("/tmp/run")}
    assert got["epoch"] == 3 and got["dtype"] == TorchDtype("bfloat16") and got["device"] == "cuda:1"
    assert got["np_scalar"] == 0.75 and got["np_scalar"].dtype == np.float64
    assert got["np_array"].tobytes() == ckpt["np_array"].tobytes() and got["np_array"].shape == (2, 3)
    assert got["np_array"].dtype == np.int32
    assert np.array_equal(got["np_fortran"], ckpt["np_fortran"]) and got["np_fortran"].flags.f_contiguous
    assert np.array_equal(got["np_big"], [0, 1, 2])  # swapped to native order, as pickle.loads does
    assert got["bytes"] == b"\x00\xffab" and got["set"] == {1, 2} and got["size"] == (2, 3)
    assert _ours(got["param"]) == _raw(ref["param"].detach())
    assert _ours(got["conj"]) == _raw(ref["conj"])


def test_tensor_with_python_attributes(tmp_path):
    t = torch.randn(3)
    t.note = "kept by torch, dropped by us"
    p = torch.nn.Parameter(torch.randn(2))
    p.flag = True
    torch.save({"t": t, "p": p}, tmp_path / "a.pth")
    got = read_torch_checkpoint(tmp_path / "a.pth")
    assert _ours(got["t"]) == _raw(t) and _ours(got["p"]) == _raw(p.detach())


def test_yacs_style_config_is_an_inert_dict(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    config_module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config_module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs.config", config_module)
    cfg = CfgNode(MODEL=CfgNode(NAME="vssm", DEPTHS=[2, 2, 9, 2]))
    cfg.__dict__["__immutable__"] = True
    torch.save({"model": {"w": torch.ones(1)}, "config": cfg}, tmp_path / "y.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")
    got = read_torch_checkpoint(tmp_path / "y.pth")["config"]
    assert isinstance(got, ConfigRecord) and got["MODEL"]["DEPTHS"] == [2, 2, 9, 2]
    assert got.__dict__["__immutable__"] is True


def _evil_pickle(marker: pathlib.Path, how: str) -> bytes:
    if how == "exec":
        code = f"open({str(marker)!r}, 'w').write('pwned')"
        return b"\x80\x02cbuiltins\nexec\nX" + len(code).to_bytes(4, "little") + code.encode() + b"\x85R."

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    good = {"model": collections.OrderedDict(w=1.0), "hook": Evil()}
    return pickle.dumps(good, protocol=2)


def test_object_arrays_are_refused(tmp_path):
    torch.save({"w": torch.ones(1), "objs": np.array([1, "a"], dtype=object)}, tmp_path / "o.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused numpy dtype 'O8'"):
        read_torch_checkpoint(tmp_path / "o.pth")


@pytest.mark.parametrize("how, name", [("exec", "builtins.exec"), ("system", "posix.system")])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, how, name):
    marker = tmp_path / "marker"
    evil = _evil_pickle(marker, how)
    if how == "exec":  # prove the payload is live: plain pickle does run it
        pickle.loads(evil)
        assert marker.read_text() == "pwned"
        marker.unlink()
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "good.pth")
    _rewrite(tmp_path / "good.pth", tmp_path / "evil.pth",
             lambda n, b: (n, evil if n.endswith("/data.pkl") else b))
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load.*{name}.*nothing was executed"):
        read_torch_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_archive_prefix_and_big_endian(tmp_path):
    ref = {"a": torch.randn(2, 3), "b": torch.randn(4).bfloat16(), "c": torch.arange(3),
           "d": torch.randn(2).half()}
    torch.save(ref, tmp_path / "r.pth")
    widths = {"0": 4, "1": 2, "2": 8, "3": 2}

    def big_endian(name, data):
        name = "some_other_prefix/" + name.split("/", 1)[1]
        if name.endswith("/byteorder"):
            return name, b"big"
        key = name.rsplit("/", 1)[1]
        if "/data/" in name and key in widths:
            data = np.frombuffer(data, f"<u{widths[key]}").byteswap().tobytes()
        return name, data

    _rewrite(tmp_path / "r.pth", tmp_path / "be.pth", big_endian)
    got = read_torch_checkpoint(tmp_path / "be.pth")
    for k in ref:
        assert _ours(got[k]) == _raw(ref[k]), k


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_torch_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match=r"is a directory, not a .pth file; an Orbax directory from "
                                              r"`ptq4vm convert` is read by load_params \(CLI: --params\)"):
        read_torch_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(tmp_path, keep):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*download the checkpoint again"):
        read_torch_checkpoint(tmp_path / "cut.pth")


def test_corrupted_storage_bytes(tmp_path):
    w = torch.randn(16)
    torch.save({"w": w}, tmp_path / "ok.pth")
    data = bytearray((tmp_path / "ok.pth").read_bytes())
    at = data.find(w.numpy().tobytes())
    data[at] ^= 0xFF  # the zip's CRC no longer matches
    (tmp_path / "bad.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated archive member .*data/0"):
        read_torch_checkpoint(tmp_path / "bad.pth")


def test_missing_storage_and_missing_pickle(tmp_path):
    torch.save({"w": torch.randn(16)}, tmp_path / "ok.pth")
    drop = lambda suffix: lambda n, b: None if n.endswith(suffix) else (n, b)
    _rewrite(tmp_path / "ok.pth", tmp_path / "nodata.pth", drop("/data/0"))
    with pytest.raises(CheckpointError, match="refers to .*data/0, which the archive does not contain"):
        read_torch_checkpoint(tmp_path / "nodata.pth")
    _rewrite(tmp_path / "ok.pth", tmp_path / "nopkl.pth", drop("/data.pkl"))
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint: expected one <archive>/data.pkl"):
        read_torch_checkpoint(tmp_path / "nopkl.pth")


def test_legacy_and_non_zip_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy \(pre-1.6\).*re-save it with a modern torch"):
        read_torch_checkpoint(tmp_path / "old.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        read_torch_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "junk.bin").write_bytes(b"GIF89a not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint .*not a zip archive"):
        read_checkpoint(tmp_path / "junk.bin")


def test_out_of_bounds_view_is_caught(tmp_path):
    torch.save({"w": torch.randn(4)}, tmp_path / "ok.pth")
    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    buf.write(pkl.replace(b"K\x04\x85", b"K\x09\x85", 1))  # size (4,) -> (9,), storage still 4
    _rewrite(tmp_path / "ok.pth", tmp_path / "oob.pth",
             lambda n, b: (n, buf.getvalue() if n.endswith("data.pkl") else b))
    with pytest.raises(CheckpointError, match=r"reaches element 8 of a storage that holds 4"):
        read_torch_checkpoint(tmp_path / "oob.pth")


def _edited_field(path, out, signature: bytes, offset: int, fmt: str, value: int) -> None:
    """Copy ``path`` with one field of every ``signature`` record (zip header) set to ``value``."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(signature)
    while at >= 0:
        struct.pack_into(fmt, data, at + offset, value)
        at = data.find(signature, at + 1)
    out.write_bytes(bytes(data))


@pytest.mark.parametrize("signature, offset, fmt, value, message", [
    # general-purpose flag 0x800 (names are UTF-8) over names that are not UTF-8 after an edit
    (b"PK\x01\x02", 46, "<B", 0xFF, "zip archive's directory is corrupt"),
    (b"PK\x01\x02", 10, "<H", 99, "compression method 99, which torch.save never writes"),
    (b"PK\x01\x02", 24, "<I", 2**32 - 1, "declares 4294967295 bytes"),
    (b"PK\x01\x02", 6, "<H", 0xFF, "zip archive's directory is corrupt"),  # version needed: 25.5
])
def test_edited_zip_fields_are_checkpoint_errors(tmp_path, signature, offset, fmt, value, message):
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pth")
    if offset == 46:
        _edited_field(tmp_path / "ok.pth", tmp_path / "bad.pth", signature, 8, "<H", 0x800)
        _edited_field(tmp_path / "bad.pth", tmp_path / "bad.pth", signature, offset, fmt, value)
    else:
        _edited_field(tmp_path / "ok.pth", tmp_path / "bad.pth", signature, offset, fmt, value)
    with pytest.raises(CheckpointError, match=f"bad.pth.*{message}"):
        read_checkpoint(tmp_path / "bad.pth")


def _with_pickle(path, out, edit) -> None:
    _rewrite(path, out, lambda name, data: (name, edit(data) if name.endswith("data.pkl") else data))


def test_huge_memo_index_is_refused_before_unpickling(tmp_path):
    """A BINPUT turned LONG_BINPUT would make the C unpickler grow its memo to gigabytes."""
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pth")
    _with_pickle(tmp_path / "ok.pth", tmp_path / "bad.pth",
                 lambda data: data.replace(b"q\x00", b"r\xff\xff\xff\x7f", 1))
    with pytest.raises(CheckpointError, match=r"bad.pth: corrupt data.pkl: memo index 2147483647"):
        read_checkpoint(tmp_path / "bad.pth")


def test_stride_zero_blow_up_is_refused(tmp_path):
    torch.save({"w": torch.ones(4).expand(1000, 4)}, tmp_path / "ok.pth")  # a real stride-0 view loads
    assert read_checkpoint(tmp_path / "ok.pth")["w"].shape == (1000, 4)
    _with_pickle(tmp_path / "ok.pth", tmp_path / "bad.pth",
                 lambda data: data.replace(b"M\xe8\x03", b"J\x00\xca\x9a\x3b", 1))  # 1000 -> 10**9 rows
    with pytest.raises(CheckpointError, match=r"bad.pth: .*would repeat its storage of 4 elements"):
        read_checkpoint(tmp_path / "bad.pth")
