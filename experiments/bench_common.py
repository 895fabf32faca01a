"""What every GPU benchmark script here shares: timing, table rows, the run's settings and
command line, and the loop that runs sections within a time budget.

Timing (kernels): one jitted call runs the op once on each of 2..4 distinct input sets
(together larger than the 50 MB L2 where 4 suffice; several ops per call also amortise host
dispatch, which would otherwise dominate few-microsecond kernels). After compile + warm-up
(>= 0.1 s of calls, so that the clock has left its idle state; the SM clock is printed at the
start and end), ``repeats`` samples of ``inner`` back-to-back calls, block_until_ready per
sample; median seconds per op. XLA may fuse small elementwise passes of different sets
horizontally, which can only flatter the XLA variants. Model forwards are timed per call.
Every kernel is checked against its reference on the first input set before it is timed (the
``check`` column: int32 accumulators exact, float outputs as max |err| / max |ref|); a row whose
check fails makes the script exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import numpy as np
from numpy.typing import ArrayLike

SEQ = 197  # Vim tokens at 224 px (196 patches + the class token)
L2_BYTES = 50e6
# device_kind substring -> (dense bf16 TFLOPS, dense int8 TOPS, HBM TB/s): datasheet values.
PEAKS = {"H200": (989.4, 1978.9, 4.8), "H100 PCIe": (756.0, 1513.0, 2.0), "H100": (989.4, 1978.9, 3.35)}
EXP_PEAK = 3.9e12  # special-function (exp) rate of H100/H200, an estimate (FA3 paper)
VIM_DIMS = {"vim_t": 192, "vim_s": 384, "vim_b": 768, "smoke": 64}  # embed dim D
VMAMBA_SCANS = [(3136, 96), (784, 192), (196, 384), (49, 768)]  # VMamba-T stages: (L, d_inner)


@dataclasses.dataclass
class Row:
    section: str
    shape: str
    variant: str
    seconds: float | None
    rate: str = "-"  # achieved TOPS / TFLOPS / T exp/s / img/s
    rate_pct: str = "-"  # of the matching peak
    gbs: str = "-"  # effective GB/s over the minimum bytes the op must move
    hbm_pct: str = "-"
    check: str = "-"

    @property
    def failed(self) -> bool:
        return any(word in self.check for word in ("FAIL", "MISMATCH", "ERROR"))


def peaks(device_kind: str) -> tuple[float, float, float] | None:
    for key, value in PEAKS.items():
        if key in device_kind:
            return value
    return None


def sm_clocks() -> str:
    """Current / max SM clock from nvidia-smi (to tell a throttled or idle-clocked card apart)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    return out.splitlines()[0] if out else "unknown"


def warm(call: Callable[[], object], seconds: float) -> None:
    """Keep the device busy for ``seconds`` before sampling: a GPU that idled while the row
    compiled runs at its idle clock until load ramps it up."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(call())


def time_ops(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int, inner: int,
             warm_s: float = 0.1) -> float:
    """Median seconds per op: each timed call runs ``fn`` once per input set inside one jit.

    Kernels of a few microseconds would otherwise measure host dispatch; ``inner`` calls are
    queued back to back and ``block_until_ready`` closes each of the ``repeats`` samples.
    """
    batched = jax.jit(lambda sets: [fn(*args) for args in sets])
    sets = [tuple(args) for args in arg_sets]
    jax.block_until_ready(batched(sets))  # compile + warm every set
    warm(lambda: batched(sets), warm_s)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = batched(sets)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (inner * len(sets)))
    return statistics.median(samples)


def time_call(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int, inner: int,
              warm_s: float = 0.1) -> float:
    """Median seconds per call of a jitted ``fn`` (for millisecond-scale model forwards)."""
    for args in arg_sets:  # compile, then warm every input set once
        jax.block_until_ready(fn(*args))
    warm(lambda: fn(*arg_sets[0]), warm_s)
    samples, i = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
            i += 1
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def n_input_sets(set_bytes: float) -> int:
    """Distinct input sets that together overflow L2 where 4 can (2..4: each set is compiled into
    the timed program, and compile time is what a short GPU loan runs short of)."""
    return int(min(4, max(2, math.ceil(2 * L2_BYTES / max(set_bytes, 1)))))


def rel_err(y: ArrayLike, ref: ArrayLike) -> float:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def rate_cells(work: float, seconds: float, peak: float | None,
               unit_scale: float = 1e12) -> tuple[str, str]:
    rate = work / seconds / unit_scale
    return f"{rate:.3g}", (f"{100 * rate * unit_scale / peak:.0f}%" if peak else "-")


def bw_cells(nbytes: float, seconds: float, hbm: float | None) -> tuple[str, str]:
    gbs = nbytes / seconds / 1e9
    return f"{gbs:.3g}", (f"{100 * gbs / (hbm * 1e3):.0f}%" if hbm else "-")


def vim_layers(d: int, n_state: int = 16) -> list[tuple[str, int, int]]:
    """(name, K, N) of the four quantized linears of a Vim block with embed dim d."""
    e, r = 2 * d, math.ceil(d / 16)
    return [("in_proj", d, 2 * e), ("x_proj", e, r + 2 * n_state), ("dt_proj", r, e), ("out_proj", e, d)]


@dataclasses.dataclass
class RunConfig:
    """One run's settings: its parsed command line, timing, time budget and the device's peaks."""

    args: argparse.Namespace
    interpret: bool
    quick: bool
    repeats: int
    inner: int
    budget_s: float
    peaks: tuple[float, float, float] | None
    start: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def timing(self) -> dict:
        return {"repeats": self.repeats, "inner": self.inner, "warm_s": 0.0 if self.interpret else 0.1}

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        return time.perf_counter() - self.start > self.budget_s - reserve_s

    @staticmethod
    def emit(row: Row) -> None:
        t = "-" if row.seconds is None else f"{row.seconds * 1e6:.1f}"
        print(f"  {row.section:4s} {row.shape:38s} {row.variant:34s} {t:>10s} us  {row.check}", flush=True)


def run_row(cfg: RunConfig, section: str, shape: str, variant: str, body: Callable[[], Row]) -> Row:
    """One table row; a row that raises (e.g. a kernel that fails to compile) is recorded, not fatal."""
    if cfg.out_of_time():
        row = Row(section, shape, variant, None, check="skipped: time budget")
    else:
        try:
            row = body()
        except Exception as err:  # one GPU call must still report every other row
            traceback.print_exc()
            row = Row(section, shape, variant, None, check=f"ERROR {type(err).__name__}: {str(err)[:80]}")
    cfg.emit(row)
    return row


def markdown_table(rows: Sequence[Row]) -> str:
    head = ("| section | shape | variant | median us | TOPS / T exp/s / img/s | % peak | GB/s | % HBM "
            "| check |\n|---|---|---|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        t = "-" if r.seconds is None else f"{r.seconds * 1e6:.1f}"
        lines.append(f"| {r.section} | {r.shape} | {r.variant} | {t} | {r.rate} | {r.rate_pct} | {r.gbs} "
                     f"| {r.hbm_pct} | {r.check} |")
    return "\n".join(lines)


def model_batch(text: str) -> tuple[str, int]:
    """argparse type for NAME:BATCH."""
    name, sep, batch = text.partition(":")
    if not sep or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:BATCH such as vim_small:256, got {text!r}")
    return name, int(batch)


Section = Callable[[RunConfig], list[Row]]
Options = Callable[[argparse.ArgumentParser], None]  # adds a script's own flags
Check = Callable[[argparse.ArgumentParser, argparse.Namespace], None]  # ap.error()s on bad values


def parse_args(argv: Sequence[str] | None, doc: str, sections: Sequence[str],
               options: Sequence[Options] = (), checks: Sequence[Check] = ()) -> argparse.Namespace:
    """The common flags (``--quick``, ``--interpret``, ``--sections``, ``--budget-s``) and each
    script's own; every value is checked before anything compiles (a typo in the prepared GPU call
    should cost nothing)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller shapes and fewer timing samples (see each section)")
    ap.add_argument("--interpret", action="store_true",
                    help="run the Pallas kernels in interpret mode with tiny shapes (CPU smoke test)")
    ap.add_argument("--sections", nargs="+", choices=sections, metavar="SECTION",
                    help=f"run only these sections, in this order (choices: {', '.join(sections)})")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new rows after this many seconds (default 420)")
    for add in options:
        add(ap)
    args = ap.parse_args(argv)
    for check in checks:
        check(ap, args)
    return args


def run(args: argparse.Namespace, script: str, sections: dict[str, Section],
        default: Callable[[RunConfig], list[Row]]) -> int:
    """Run ``args.sections`` in order (``default`` without ``--sections``), print the table;
    0 when every check passed, 1 when one failed, 2 without a GPU (and without ``--interpret``)."""
    dev = jax.devices()[0]
    kind = dev.device_kind
    if dev.platform != "gpu" and not args.interpret:
        print(f"{script}: error: no GPU (found {dev.platform}: {kind}); use --interpret for "
              "the CPU smoke test", file=sys.stderr)
        return 2
    pk = None if args.interpret else peaks(kind)
    quick = args.quick or args.interpret
    # The interpreter's timings mean nothing: one sample runs each row's code path.
    cfg = RunConfig(args, args.interpret, quick, repeats=1 if args.interpret else (10 if quick else 20),
                    inner=1 if args.interpret else (5 if quick else 10), budget_s=args.budget_s, peaks=pk)
    print(f"# {script}\n\n- device: {kind} ({dev.platform}), peaks (bf16 TFLOPS, int8 TOPS, "
          f"HBM TB/s): {pk or 'unknown'}\n- jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"argv: {' '.join(sys.argv[1:]) or '(full run)'}", flush=True)
    if not args.interpret:
        print(f"- SM clock (current, max) at start: {sm_clocks()}", flush=True)
    print(flush=True)
    if args.sections:
        rows = [row for name in args.sections for row in sections[name](cfg)]
    else:
        rows = default(cfg)
    print(f"\n{markdown_table(rows)}\n\ntotal {time.perf_counter() - cfg.start:.0f} s", flush=True)
    if not args.interpret:
        print(f"SM clock (current, max) at the end: {sm_clocks()}", flush=True)
    failed = [r for r in rows if r.failed]
    if failed:
        print(f"{len(failed)} correctness check(s) failed", file=sys.stderr)
    return 1 if failed else 0
