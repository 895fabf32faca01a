"""The prepared GPU call, ``experiments/device_check.sh``, must not waste a lent GPU on a typo or
a broken code path: every command in it parses, the files it names exist, and its kernel and
end-to-end benchmark rows run on the CPU (Pallas interpreter, tiny shapes) with exact checks."""

from __future__ import annotations

import importlib.util
import pathlib
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow  # benchmark rows end to end in the interpreters
ROOT = pathlib.Path(__file__).resolve().parents[1]


def error_line(err: str) -> str:
    """The one line argparse's ``error()`` writes (``prog: error: message``). The usage text above
    it names every flag, so a flag found anywhere in stderr says nothing about what was refused."""
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    return line


def load_script(name: str) -> ModuleType:
    """An ``experiments/`` script as a module (the folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    return module


def device_check_steps() -> dict[str, list[str]]:
    """step name -> its command words, from ``step NAME SECONDS CMD...`` lines."""
    text = (ROOT / "experiments" / "device_check.sh").read_text().replace("\\\n", " ")
    steps = {}
    for line in text.splitlines():
        if line.startswith("step "):
            words = shlex.split(line)
            steps[words[1]] = words[3:]
    return steps


def without(args: Sequence[str], *options: str) -> list[str]:
    """``args`` with each of ``options`` and the values that follow it removed."""
    kept, dropping = [], False
    for word in args:
        if word.startswith("--"):
            dropping = word in options
        if not dropping:
            kept.append(word)
    return kept


def test_device_check_runs_every_step_it_documents():
    steps = device_check_steps()
    header = (ROOT / "experiments" / "device_check.sh").read_text().split("set -u")[0]
    assert list(steps) == ["env", "kernels", "e2e", "hopper", "itests", "ktests", "mixer", "mtests", "calib"]
    for name in steps:
        assert f"#   {name} " in header, f"step {name!r} is not described in the script's header"


@pytest.mark.parametrize("name", ["kernels", "e2e", "hopper", "itests", "ktests", "mixer", "mtests", "calib"])
def test_device_check_commands_parse_and_name_existing_files(name):
    words = device_check_steps()[name]
    assert words[0] == "$PY", words
    if words[1] == "-m":
        assert words[2] == "pytest"
        paths = [w for w in words[3:] if not w.startswith("-") and w not in ("no:cacheprovider", "line")]
        assert paths and all((ROOT / p).is_file() for p in paths), paths
        return
    script = pathlib.Path(words[1])
    assert (ROOT / script).is_file(), script
    args = load_script(script.stem).parse_args(words[2:])
    if script.stem.startswith("bench_") and script.stem != "bench_calibration":
        assert args.sections, "each GPU step should name its sections"



def readme_commands() -> list[str]:
    """The indented commands of experiments/README.md that run a script (the prepared calls)."""
    text = (ROOT / "experiments" / "README.md").read_text()
    return [line.split("#")[0].strip() for line in text.splitlines()
            if line.startswith("    ") and "experiments/" in line]


def test_experiments_readme_commands_parse():
    """The prepared GPU calls experiments/README.md gives to copy: each script's own
    parser takes them, and ``STEPS`` names steps device_check.sh has."""
    commands = readme_commands()
    assert len(commands) >= 5, commands
    steps = device_check_steps()
    for command in commands:
        words = shlex.split(command)
        env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
        words = [w for w in words if not ("=" in w and not w.startswith("-"))]
        if words[0] == "bash":
            assert words[1] == "experiments/device_check.sh" and words[2].isdigit(), command
            assert set(env.get("STEPS", "").split()) <= set(steps), command
            continue
        assert words[0] == "python", command
        script = pathlib.Path(words[1])
        assert (ROOT / script).is_file(), command
        load_script(script.stem).parse_args(words[2:])

@pytest.mark.parametrize("script", ["bench_kernels", "bench_gemm", "bench_scan", "bench_e2e"])
def test_bench_parsers_reject_typos_before_compiling(script, capsys):
    bench = load_script(script)
    cases = {"bench_gemm": [(["--gemm-shapes", "vim_x:256"], "vim_x"),
                            (["--gemm-variants", "wgmma-1pass"], "'wgmma-1pass'")],
             "bench_scan": [(["--scan-shapes", "vmamba-stage9:64"], "'vmamba-stage9'")],
             "bench_e2e": [(["--e2e-models", "vim_smal:256"], "did you mean 'vim_small'"),
                           (["--e2e-variants", "bf16-tile-scan"], "'bf16-tile-scan'")]}
    cases["bench_kernels"] = [case for group in cases.values() for case in group]
    # a typo after a section the script has (its first)
    sections = (["--sections", next(iter(bench.SECTIONS)), "e2e-x"], "'e2e-x'")
    for argv, says in [*cases[script], sections]:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        line = error_line(capsys.readouterr().err)
        assert argv[0] in line and says in line, line


def test_bench_calibration_rejects_typos(capsys):
    calib = load_script("bench_calibration")
    with pytest.raises(SystemExit):
        calib.parse_args(["--model", "vim_tinny"])
    line = error_line(capsys.readouterr().err)
    assert "--model" in line and "did you mean 'vim_tiny'" in line, line


def test_device_check_kernel_and_e2e_rows_run_in_the_interpreter(capsys):
    """The ``kernels`` and ``e2e`` steps' scripts with their variants at the smoke shapes
    (vim_micro end to end); main() returns 1 when a row's exactness check fails or a row raises.
    ``int-wgmma`` end to end is left out: the Mosaic GPU interpreter takes seconds per linear
    there, and tests/test_int_mode.py checks gemm="wgmma" on the same model."""
    steps = device_check_steps()
    kernels = without(steps["kernels"][2:], "--gemm-shapes", "--budget-s", "--quick")
    e2e = without(steps["e2e"][2:], "--e2e-models", "--budget-s", "--quick")
    e2e_variants = [v for v in e2e[e2e.index("--e2e-variants") + 1:] if v != "int-wgmma"]
    e2e = e2e[:e2e.index("--e2e-variants") + 1] + e2e_variants
    rows = []
    for words, args in ((steps["kernels"], kernels), (steps["e2e"], e2e)):
        assert load_script(pathlib.Path(words[1]).stem).main(["--interpret", *args]) == 0, words
        out = capsys.readouterr().out
        table = out[out.index("| section |"):]
        rows += [line for line in table.splitlines() if line.startswith(("| gemm", "| e2e"))]
    assert len(rows) == 4 * 3 + len(e2e_variants), rows
    assert sum("int32 exact" in row for row in rows) >= 2  # in_proj and out_proj's accumulators
    assert all("ERROR" not in row and "MISMATCH" not in row for row in rows)


def test_wgmma_sweep_runs_both_schedules_in_the_interpreter(capsys):
    """bench_gemm's wgmma tile sweep: one small config per schedule (one tile per CTA, and the
    persistent loop), each row's int32 accumulator checked exactly before it is timed."""
    from pallas_kernels.qmatmul_hopper import WGMMA_SWEEP

    bench = load_script("bench_gemm")
    assert bench.parse_args(["--sweep-layers", "out_proj"]).sweep_layers == ["out_proj"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sweep-layers", "x_proj"])  # K, N not multiples of 64
    line = error_line(capsys.readouterr().err)
    assert "--sweep-layers" in line and "'x_proj'" in line, line
    argv = ["--interpret", "--sections", "sweep-wgmma", "--sweep-layers", "in_proj", "out_proj"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out[out.index("| section |"):].splitlines() if line.startswith("| sweep")]
    wgmma = [row for row in rows if "mosaic wgmma" in row]
    assert len(rows) == 8 and len(wgmma) == 4, rows
    assert ["in_proj" in row for row in rows] == [True] * 4 + [False] * 4, rows
    assert all("int32 exact" in row for row in wgmma), wgmma
    assert ["persistent" in row for row in wgmma] == [False, True] * 2, wgmma
    assert len(set(WGMMA_SWEEP)) == len(WGMMA_SWEEP), "a configuration is swept twice"
    assert bench.wgmma_label(WGMMA_SWEEP[-1]) == "128x128x64 s2 persistent"


def test_driver_runs_the_split_scripts_sections():
    """bench_kernels.py offers every section of the split scripts, under the same names."""
    driver = load_script("bench_kernels")
    parts = [load_script(name) for name in ("bench_gemm", "bench_scan", "bench_e2e")]
    assert driver.SECTIONS == {k: v for part in parts for k, v in part.SECTIONS.items()}
    args = driver.parse_args(["--sections", "scan", "gemm", "int-vs-fake", "--interpret"])
    assert args.sections == ["scan", "gemm", "int-vs-fake"]


def test_device_check_mixer_rows_run_in_the_interpreter(capsys):
    """The ``mixer`` step's script: its per-block, add + norm and cross-scan sections at the smoke
    shape, every variant checked against the reference (codes against the quantized value they
    encode); its end-to-end section is the next test's. Typos in its options fail before
    anything compiles."""
    bench = load_script("bench_mixer")
    for argv, says in ((["--mixer-shapes", "vim_x:256"], "'vim_x'"),
                       (["--e2e-models", "local_vim_tiny:64"], "local_vim_tiny is not a Vim or VMamba model"),
                       (["--e2e-variants", "bf16-fusedd"], "'bf16-fusedd'")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        line = error_line(capsys.readouterr().err)
        assert argv[0] in line and says in line, line
    words = device_check_steps()["mixer"]
    args = without(words[2:], "--mixer-shapes", "--e2e-models", "--budget-s", "--quick", "--sections")
    assert "e2e-mixer" in words
    assert bench.parse_args(words[2:]).e2e_models == [("vim_small", 256), ("vim_base", 256)]
    assert "norm" in words and "cross-scan" in words
    assert bench.main(["--interpret", *args, "--sections", "mixer", "norm", "cross-scan"]) == 0, words
    out = capsys.readouterr().out
    table = out[out.index("| section |"):].splitlines()
    rows = [line for line in table if line.startswith("| mixer")]
    assert len(rows) == 7, rows
    assert sum("fp32 rel" in row for row in rows) == 4 and sum("codes exact" in row for row in rows) == 2
    norm = [line for line in table if line.startswith("| norm")]
    assert len(norm) == 4
    assert sum("fp32 rel" in r for r in norm) == 2 and sum("codes exact" in r for r in norm) == 2
    cross = [line for line in table if line.startswith("| cross-scan")]
    assert len(cross) == 3 and all("fp32 rel" in r for r in cross)
    bad = ("ERROR", "FAIL", "MISMATCH")
    assert not [row for row in rows + norm + cross if any(word in row for word in bad)]


def test_device_check_mixer_end_to_end_rows_run_in_the_interpreter(capsys):
    """The ``mixer`` step's first section, end to end (vim_nano at batch 1 in the interpreter):
    the baseline bf16 forward, the fused one and W8A8 integer inference through the fused
    kernels (RTN scales) each run, and the last two agree with the first on top-1."""
    bench = load_script("bench_mixer")
    assert bench.main(["--interpret", "--sections", "e2e-mixer"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out[out.index("| section |"):].splitlines() if line.startswith("| e2e")]
    assert len(rows) == 3, rows
    assert "baseline" in rows[0] and all("top-1 agrees 100%" in r for r in rows[1:]), rows
    assert "fused kernels (gemm=" in rows[2]


def test_bench_mixer_sweep_rows_run_in_the_interpreter(capsys):
    """The three kernels' tuning sweeps (every fourth configuration in the interpreter), each row
    checked against its reference."""
    from pallas_kernels.add_norm import NORM_SWEEP
    from pallas_kernels.cross_scan import CROSS_SCAN_SWEEP
    from pallas_kernels.vim_mixer import MIXER_SWEEP

    bench = load_script("bench_mixer")
    assert bench.main(["--interpret", "--sections", "sweep"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out[out.index("| section |"):].splitlines() if line.startswith("| sweep")]
    want = len(MIXER_SWEEP[::4]) + len(NORM_SWEEP[::4]) + len(CROSS_SCAN_SWEEP[::4])
    assert len(rows) == want and all("fp32 rel" in row and "FAIL" not in row for row in rows), rows
    for sweep in (MIXER_SWEEP, NORM_SWEEP, CROSS_SCAN_SWEEP):
        assert len(set(sweep)) == len(sweep), "a configuration is swept twice"
