"""Seeded mutation fuzzing of every checkpoint reader: a damaged or hostile file ends in the
checkpoint error family (with the file named), or, only where the mutation changed no data,
loads exactly what was written. Never another exception, a hang or a memory blow-up.

Mutations: byte flips, truncations, edited zip directory / local headers / end record, edited
pickle fields (CRC fixed up, so the unpickler sees them), edited safetensors headers, edited
``metadata.json`` and damaged Orbax array files. ``run_*`` take the case count, so the same code
runs a larger campaign outside the suite (``python tests/test_reader_fuzz.py 3000``).
"""

from __future__ import annotations

import collections
import json
import random
import shutil
import signal
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from convert import CheckpointError, read_checkpoint

SECONDS_PER_CASE = 20  # a case that takes longer counts as a hang

# ---------------------------------------------------------------------------------------- outcomes


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def hang(signum: int, frame: Any) -> None:
        raise TimeoutError(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every array (and scalar leaf) of a loaded checkpoint by path, for an exact comparison."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    if hasattr(value, "__dict__") and not isinstance(value, np.ndarray):
        return _flat(dict(vars(value)), prefix)
    if isinstance(value, np.ndarray) or hasattr(value, "dtype"):
        array = np.asarray(value)
        return {prefix: (array.dtype.str, array.shape, array.tobytes())}
    return {prefix: repr(value)}


def _outcome(load: Callable[[Path], Any], path: Path, want: dict[str, Any]) -> str:
    """"error" (checkpoint family, file named), "equal" (loads what was written) or "changed";
    anything else (another exception, a hang) raises AssertionError."""
    try:
        with _deadline(SECONDS_PER_CASE):
            got = load(path)
    except CheckpointError as e:
        assert path.name in str(e), f"the error does not name {path}: {e}"
        return "error"
    except Exception as e:
        raise AssertionError(f"{path}: escaped the checkpoint error family: {type(e).__name__}: {e}") from e
    return "equal" if _flat(got) == want else "changed"


# --------------------------------------------------------------------------------- .pth (zip)

def _zip_records(data: bytes) -> list[tuple[bytes, int]]:
    """(signature, offset) of every zip record header in ``data``."""
    out = []
    for sig in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            out.append((sig, i))
            start = i + 1
    return out


# the fields of each record a careless tool or a hostile user may edit: (offset, struct format)
_ZIP_FIELDS = {
    b"PK\x03\x04": [(6, "<H"), (8, "<H"), (14, "<I"), (18, "<I"), (22, "<I"), (26, "<H"), (28, "<H")],
    b"PK\x01\x02": [(8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"), (30, "<H"),
                    (32, "<H"), (34, "<H"), (42, "<I")],
    b"PK\x05\x06": [(4, "<H"), (6, "<H"), (8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")],
    b"PK\x06\x06": [(24, "<Q"), (32, "<Q"), (40, "<Q"), (48, "<Q")],
    b"PK\x06\x07": [(8, "<Q"), (16, "<I")],
}


def _edge_value(rng: random.Random, fmt: str, old: int) -> int:
    top = (1 << (8 * struct.calcsize(fmt))) - 1
    return rng.choice([0, 1, 8, 12, 14, 99, top, top - 1, top // 2 + 1, old + 1, max(old - 1, 0),
                       old ^ 0x800, rng.randrange(top + 1)]) & top


def _edit_zip_field(rng: random.Random, data: bytearray) -> None:
    records = [(s, i) for s, i in _zip_records(bytes(data)) if s in _ZIP_FIELDS]
    sig, at = rng.choice(records)
    offset, fmt = rng.choice(_ZIP_FIELDS[sig])
    if at + offset + struct.calcsize(fmt) <= len(data):
        (old,) = struct.unpack_from(fmt, data, at + offset)
        struct.pack_into(fmt, data, at + offset, _edge_value(rng, fmt, old))


def _members(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, local header offset, data offset, size) of each member, from the central directory
    (torch's writer leaves the local headers' sizes to data descriptors)."""
    out = []
    for sig, at in _zip_records(data):
        if sig != b"PK\x01\x02":
            continue
        csize, _, nlen = struct.unpack_from("<IIH", data, at + 20)
        local = struct.unpack_from("<I", data, at + 42)[0]
        name = data[at + 46: at + 46 + nlen].decode("utf-8", "replace")
        lnlen, lxlen = struct.unpack_from("<HH", data, local + 26)
        out.append((name, local, local + 30 + lnlen + lxlen, csize))
    return out


def _fix_crc(data: bytearray, name: str, local: int, begin: int, size: int) -> None:
    """Rewrite a member's CRC-32 in its local header and its central directory entry."""
    crc = zlib.crc32(bytes(data[begin:begin + size]))
    struct.pack_into("<I", data, local + 14, crc)
    for sig, at in _zip_records(bytes(data)):
        if sig == b"PK\x01\x02":
            nlen = struct.unpack_from("<H", data, at + 28)[0]
            if bytes(data[at + 46: at + 46 + nlen]).decode("utf-8", "replace") == name:
                struct.pack_into("<I", data, at + 16, crc)


def _edit_pickle(rng: random.Random, data: bytearray) -> None:
    """Change one byte (or one int argument) of data.pkl and fix its CRC: the unpickler must cope."""
    name, local, begin, size = next(m for m in _members(bytes(data)) if m[0].endswith("data.pkl"))
    at = begin + rng.randrange(size)
    if rng.random() < 0.5:
        data[at] = rng.randrange(256)
    else:  # an opcode's int argument: BININT1 'K', BININT2 'M', BININT 'J'
        spots = [begin + i for i in range(size - 4) if data[begin + i] in b"KMJ"]
        at = rng.choice(spots) + 1 if spots else at
        data[at] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF])
    _fix_crc(data, name, local, begin, size)


def _flip(rng: random.Random, data: bytearray) -> None:
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)


def _truncate(rng: random.Random, data: bytearray) -> None:
    del data[rng.randrange(len(data)):]


PTH_MUTATIONS: dict[str, Callable[[random.Random, bytearray], None]] = {
    "flip": _flip, "truncate": _truncate, "zip_field": _edit_zip_field, "pickle": _edit_pickle,
}
# mutations that fix the integrity check up (pickle edits re-CRC'd): a valid, different pickle may load
PTH_MAY_CHANGE = {"pickle"}


def write_pth(path: Path) -> None:
    """A tiny torch.save checkpoint with what real ones hold: a state_dict of several dtypes
    (one tensor a strided view), an EMA copy and the training args."""
    import argparse

    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    model = collections.OrderedDict(
        [("a.weight", base[:, ::2]), ("a.bias", torch.randn(3, generator=g).to(torch.bfloat16)),
         ("b.weight", torch.randn(2, 3, generator=g).half()), ("steps", torch.tensor([7, 8]))])
    torch.save({"model": model, "model_ema": {"a.weight": base.T.contiguous()},
                "args": argparse.Namespace(lr=0.1, model="vim_tiny"), "epoch": 3}, path)


def run_pth(source: Path, work: Path, cases: int, seed: int = 0) -> collections.Counter:
    original = source.read_bytes()
    want = _flat(read_checkpoint(source))
    rng, counts = random.Random(seed), collections.Counter()
    for i in range(cases):
        kind = list(PTH_MUTATIONS)[i % len(PTH_MUTATIONS)]
        data = bytearray(original)
        PTH_MUTATIONS[kind](rng, data)
        path = work / f"m{i}.pth"
        path.write_bytes(bytes(data))
        result = _outcome(read_checkpoint, path, want)
        assert result != "changed" or kind in PTH_MAY_CHANGE, f"case {i} ({kind}) loaded changed tensors"
        counts[kind, result] += 1
        path.unlink()
    return counts


# -------------------------------------------------------------------------------- .safetensors

def write_safetensors(path: Path) -> None:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]},
              "c": {"dtype": "I64", "shape": [1], "data_offsets": [32, 40]}}
    body = json.dumps(header).encode()
    buffer = np.arange(6, dtype=np.float32).tobytes() + b"\x80\x3f" * 3 + b"\0\0" + np.int64(9).tobytes()
    path.write_bytes(len(body).to_bytes(8, "little") + body + buffer)


def _edit_header(rng: random.Random, data: bytearray) -> None:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "entry", "length", "bytes"])
    huge = rng.choice([2**31, 2**63, 2**64 + 5, 10**30, -1, -(2**63)])
    if field == "dtype":
        header[name]["dtype"] = rng.choice(["F64", "F16", "I8", "U8", "BOOL", "XX", 3, None, "C64"])
    elif field == "shape":
        header[name]["shape"] = rng.choice([[huge], [0], [2, 3, huge], [1.5], "3", [], [-2, -3],
                                            [2**32, 2**32, 0], [10**6] * 8])
    elif field == "data_offsets":
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[begin, huge], [huge, end], [end, begin], [begin],
                                                   [begin + 1, end + 1], [0, 0], [True, end], None])
    elif field == "drop":
        header[name].pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif field == "entry":
        header[name] = rng.choice([None, 1, "x", [], {"__metadata__": 1}])
    body = json.dumps(header).encode()
    if field == "bytes":  # non-UTF-8 or broken JSON inside a header of the same length
        body = bytearray(data[8:8 + n])
        body[rng.randrange(len(body))] = rng.choice([0xFF, 0xC3, 0x80, ord("{"), ord('"'), 0])
    length = len(body)
    if field == "length":
        length = rng.choice([0, 7, huge % 2**64, len(body) + 1, len(body) - 1])
    data[:] = length.to_bytes(8, "little") + bytes(body) + data[8 + n:]


ST_MUTATIONS = {"flip": _flip, "truncate": _truncate, "header": _edit_header}
# safetensors carries no checksum: a flipped data byte or a consistent header edit loads changed data
ST_MAY_CHANGE = {"flip", "header"}


def run_safetensors(source: Path, work: Path, cases: int, seed: int = 0) -> collections.Counter:
    original = source.read_bytes()
    want = _flat(read_checkpoint(source))
    rng, counts = random.Random(seed), collections.Counter()
    for i in range(cases):
        kind = list(ST_MUTATIONS)[i % len(ST_MUTATIONS)]
        data = bytearray(original)
        ST_MUTATIONS[kind](rng, data)
        path = work / f"m{i}.safetensors"
        path.write_bytes(bytes(data))
        result = _outcome(read_checkpoint, path, want)
        assert result != "changed" or kind in ST_MAY_CHANGE, f"case {i} ({kind}) loaded changed tensors"
        counts[kind, result] += 1
        path.unlink()
    return counts


# --------------------------------------------------------------------- Orbax checkpoint directories

def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _edit_metadata_json(rng: random.Random, root: Path) -> None:
    path = root / "metadata.json"
    meta = json.loads(path.read_text())
    key = rng.choice(sorted(meta))
    meta[key] = rng.choice([None, 0, -1, 2**70, "x", [], {}, 1.5, True, {"a": [1, 2]}])
    if rng.random() < 0.5:  # re-sealed, as a careful forger would: each field must still be checked
        from ptq4vm_jax.checkpoint.store import metadata_digest

        meta.pop("metadata_sha256", None)
        meta["metadata_sha256"] = metadata_digest(meta)
    path.write_text(json.dumps(meta))


def _flip_file(rng: random.Random, root: Path) -> None:
    path = rng.choice([p for p in _files(root) if p.stat().st_size])
    data = bytearray(path.read_bytes())
    _flip(rng, data)
    path.write_bytes(bytes(data))


def _flip_array_file(rng: random.Random, root: Path) -> None:
    """A flipped byte in an Orbax data file (``d/<hash>``): where the arrays' bytes live."""
    path = rng.choice([p for p in _files(root) if p.parent.name == "d"])
    data = bytearray(path.read_bytes())
    _flip(rng, data)
    path.write_bytes(bytes(data))


def _truncate_file(rng: random.Random, root: Path) -> None:
    path = rng.choice(_files(root))
    data = bytearray(path.read_bytes())
    if data:
        _truncate(rng, data)
    path.write_bytes(bytes(data))


def _delete_file(rng: random.Random, root: Path) -> None:
    rng.choice(_files(root)).unlink()


DIR_MUTATIONS = {"metadata_json": _edit_metadata_json, "flip": _flip_file, "array_file": _flip_array_file,
                 "truncate": _truncate_file, "delete": _delete_file}


def run_directory(source: Path, work: Path, cases: int, load: Callable[[Path], Any],
                  seed: int = 0) -> collections.Counter:
    """Mutate one file of a saved checkpoint per case; the digests leave no room for "changed"."""
    want = _flat(load(source))
    rng, counts = random.Random(seed), collections.Counter()
    for i in range(cases):
        kind = list(DIR_MUTATIONS)[i % len(DIR_MUTATIONS)]
        path = work / f"m{i}"
        shutil.copytree(source, path)
        DIR_MUTATIONS[kind](rng, path)
        result = _outcome(load, path, want)
        assert result != "changed", f"case {i} ({kind}): a damaged checkpoint loaded changed arrays"
        counts[kind, result] += 1
        shutil.rmtree(path)
    return counts


def _quantized_tree(path: Path) -> dict[str, Any]:
    from ptq4vm_jax import load_quantized

    q = load_quantized(path)
    return {"params": q.params, "qlayers": q.qlayers, "config": q.config.to_json(), "model": q.model_name}


def _float_tree(path: Path) -> dict[str, Any]:
    from ptq4vm_jax import load_params

    params, meta = load_params(path)
    return {"params": params, "model": meta["model_name"], "overrides": meta["model_overrides"]}


def write_quantized(path: Path) -> None:
    """A small W4A8 quantized vim_nano (RTN: no calibration compute)."""
    import jax

    from ptq4vm_jax import QuantConfig, create_model, quantize_params, save_quantized

    model = create_model("vim_nano", depth=1)
    images = np.asarray(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    params = jax.jit(model.init)(jax.random.key(1), images[:1])["params"]  # one program, not op by op
    q = quantize_params(params, images, model="vim_nano", model_overrides={"depth": 1}, progress=False,
                        config=QuantConfig(w_bits=4, a_bits=8, method="rtn", num_calib=2), log=lambda _: None)
    save_quantized(path, q)


def write_float(path: Path) -> None:
    import jax

    from ptq4vm_jax import create_model, save_params

    model = create_model("vim_nano", depth=1)
    params = jax.jit(model.init)(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))["params"]
    save_params(path, params, model_name="vim_nano", model_overrides={"depth": 1})


# ------------------------------------------------------------------------------------------ tests

def _report(counts: collections.Counter) -> str:
    return ", ".join(f"{k}/{r}: {n}" for (k, r), n in sorted(counts.items()))


def test_pth_reader_fuzz(tmp_path: Path) -> None:
    write_pth(tmp_path / "source.pth")
    counts = run_pth(tmp_path / "source.pth", tmp_path, 400)
    assert sum(n for (_, r), n in counts.items() if r == "error") > 200, _report(counts)


def test_safetensors_reader_fuzz(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "source.safetensors")
    counts = run_safetensors(tmp_path / "source.safetensors", tmp_path, 300)
    assert sum(n for (k, r), n in counts.items() if k == "header" and r == "error") > 80, _report(counts)


def test_quantized_checkpoint_fuzz(tmp_path: Path) -> None:
    write_quantized(tmp_path / "source")
    counts = run_directory(tmp_path / "source", tmp_path, 15, _quantized_tree)
    # Which bytes a mutation hits varies from run to run (each save names its data files at random
    # and spreads the arrays over them differently, so their number and sizes vary), so only
    # a bound that a working fuzzer passes with near certainty: about half the cases are refused.
    assert sum(n for (_, r), n in counts.items() if r == "error") >= 2, _report(counts)


def test_float_checkpoint_fuzz(tmp_path: Path) -> None:
    write_float(tmp_path / "source")
    counts = run_directory(tmp_path / "source", tmp_path, 15, _float_tree, seed=1)
    assert sum(n for (_, r), n in counts.items() if r == "error") >= 2, _report(counts)  # (as above)


if __name__ == "__main__":  # a larger campaign: python tests/test_reader_fuzz.py CASES [SEED]
    import tempfile
    import time

    cases, seed = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pth(root / "s.pth")
        write_safetensors(root / "s.safetensors")
        write_quantized(root / "q")
        write_float(root / "f")
        for name, run in (("pth", lambda: run_pth(root / "s.pth", root, cases, seed)),
                          ("safetensors", lambda: run_safetensors(root / "s.safetensors", root, cases, seed)),
                          ("quantized dir", lambda: run_directory(root / "q", root, cases // 5,
                                                                  _quantized_tree, seed)),
                          ("float dir", lambda: run_directory(root / "f", root, cases // 10,
                                                              _float_tree, seed))):
            start = time.perf_counter()
            counts = run()
            print(f"{name}: {sum(counts.values())} cases in {time.perf_counter() - start:.1f} s: "
                  f"{_report(counts)}", flush=True)
