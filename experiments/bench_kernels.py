"""Benchmark the Pallas kernels against XLA on one GPU: every section of bench_gemm.py,
bench_scan.py and bench_e2e.py in one run, one markdown table.

    python experiments/bench_kernels.py --budget-s 360   # rows in priority order until the budget
    python experiments/bench_kernels.py --quick    # Vim-S at batch 64: GEMMs, scans, e2e; ~minutes
    python experiments/bench_kernels.py --quick --interpret   # CPU smoke test, tiny shapes
    python experiments/bench_kernels.py --sections sweep-wgmma scan e2e --scan-shapes vim_b:256 \\
        --e2e-models vim_small:256 --e2e-variants bf16 int-wgmma   # chosen sections, in order

Sections (rows stream to stdout as they finish; the full table is printed at the end): gemm,
sweep-wgmma, sweep-gemm, sweep-codes (bench_gemm.py); scan, scan-train, sweep-scan
(bench_scan.py); e2e, int-vs-fake (bench_e2e.py); each script's docstring describes its rows.
Without ``--sections``: the GEMM target row (in_proj of the first model), the first end-to-end
model, the scans, the scan gradients, the other GEMM rows, the other end-to-end models, in
this order, so that a tight ``--budget-s`` drops the least informative rows (the run is
compile-bound). bench_common.py describes the timing and the checks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
import bench_common as bc  # noqa: E402
import bench_e2e  # noqa: E402
import bench_gemm  # noqa: E402
import bench_scan  # noqa: E402
from bench_common import Row, RunConfig  # noqa: E402

SECTIONS: dict[str, bc.Section] = {**bench_gemm.SECTIONS, **bench_scan.SECTIONS, **bench_e2e.SECTIONS}


def priority_rows(cfg: RunConfig) -> list[Row]:
    """The default run: most informative rows first (see the module docstring)."""
    jobs = bench_gemm.gemm_jobs(cfg)
    models = [] if cfg.args.no_e2e else bench_e2e.e2e_models(cfg)
    rows = bench_gemm.gemm_rows(jobs[:1], cfg)
    rows += bench_e2e.e2e_rows(models[:1], cfg)
    rows += bench_scan.scan_rows(bench_scan.scan_shapes(cfg), cfg)
    rows += bench_scan.scan_train_rows(bench_scan.train_scan_shapes(cfg), cfg)
    rows += bench_gemm.gemm_rows(jobs[1:], cfg)
    return rows + bench_e2e.e2e_rows(models[1:], cfg)


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model rows")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    modules = (bench_gemm, bench_scan, bench_e2e)
    return bc.parse_args(argv, __doc__, list(SECTIONS), [add_options, *(m.add_options for m in modules)],
                         [m.check_options for m in modules])


def main(argv: Sequence[str] | None = None) -> int:
    return bc.run(parse_args(argv), "bench_kernels.py", SECTIONS, priority_rows)


if __name__ == "__main__":
    sys.exit(main())
