"""``ptq4vm``: demo, convert, quantize, eval, report.

This module builds the parser, runs the chosen command, and turns what stops it into one line
on stderr and an exit status: 2 for a mistake in the input, 1 for a failed calibration, 130 for
Ctrl-C and 143 for SIGTERM. ``PTQ4VM_DEBUG=1`` shows the tracebacks instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from ptq4vm_jax import __version__
from ptq4vm_jax.assets import bundled_models
from ptq4vm_jax.calibrate.report import CalibrationError
from ptq4vm_jax.choices import GEMM_BACKENDS, MODES, SCAN_BACKENDS
from ptq4vm_jax.cli.convert import cmd_convert
from ptq4vm_jax.cli.demo import cmd_demo
from ptq4vm_jax.cli.errors import UsageError, argument_of, for_the_command_line
from ptq4vm_jax.cli.evaluation import DTYPES, cmd_eval
from ptq4vm_jax.cli.paths import kept_blocks, resume_hint, user_path
from ptq4vm_jax.cli.quantize import cmd_quantize
from ptq4vm_jax.cli.report import cmd_report
from ptq4vm_jax.cli.signals import Terminated, stop_on_signals
from ptq4vm_jax.quant.config import ACT_GRIDS, FAMILY_DEFAULTS, LOSS_AXES, LOSSES, METHODS

#: Packages only some inputs import (import name -> pip name): digits data, tfds data, grain sources.
#: The project depends on them, but an environment installed without its dependencies may lack one.
OPTIONAL_PACKAGES = {"sklearn": "scikit-learn", "tensorflow_datasets": "tensorflow-datasets",
                     "grain": "grain"}


def _scan_arg(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--scan", default="auto", choices=SCAN_BACKENDS,
                    help=f"the selective scan's backend {what} (default auto: the Pallas scan per "
                         "direction on GPU, lax.scan elsewhere); fused: Vim's and VMamba's fused "
                         "kernels (opt-in, GPU); pallas: a Pallas scan per direction; ref: lax.scan. "
                         "Off the GPU the Pallas kernels run in the interpreter: exact but slow")


# One wording for every command's --key (the library's key=None: 'model', else 'state_dict').
KEY_HELP = ("the entry of the checkpoint file holding the weights, e.g. model_ema (default: model, "
            "else state_dict, else the file's bare state dict)")


def _recipe(field: str) -> str:
    """The families' defaults of a recipe field, e.g. "(default: Vim and LocalVim 0.5, VMamba and
    LocalVMamba 0.65)"."""
    names = {"vim": "Vim", "local_vim": "LocalVim", "vmamba": "VMamba", "local_vmamba": "LocalVMamba"}
    by_value: dict[float, list[str]] = {}
    for family, name in names.items():
        by_value.setdefault(FAMILY_DEFAULTS[family][field], []).append(name)
    shown = (f"{' and '.join(fams)} {f'{v:.0e}'.replace('e-0', 'e-') if v < 0.1 else f'{v:g}'}"
             for v, fams in by_value.items())
    return f"(default: {', '.join(shown)})"


def _source_args(sp: argparse.ArgumentParser) -> None:
    """Where quantize and eval read the float model from."""
    sp.add_argument("--model", help="model name (required with --checkpoint)")
    sp.add_argument("--checkpoint", type=user_path, help="official .pth/.safetensors")
    sp.add_argument("--params", type=user_path, help="Orbax float params dir (ptq4vm convert)")
    sp.add_argument("--key", default=None, help=f"for --checkpoint: {KEY_HELP}")
    sp.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                    help="official constructor size argument for --checkpoint (repeatable)")
    sp.add_argument("--data-dir", type=user_path, default=None, help="tfds data_dir")


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="quantize the built-in micro model on digits and print a table")
    d.add_argument("--model", default="vim_micro", choices=bundled_models(), help="a bundled micro model")
    d.add_argument("--out", type=user_path, default="ptq4vm_demo_out",
                   help="where the quantized checkpoints go (in a directory named after the model)")
    d.add_argument("--epochs", type=int, default=None,
                   help="JLSS epochs over the 256 images (default: 12 in batches of 32 for Vim, the "
                        "official recipe for VMamba; 0: PTQ4VM's initialisation alone, shown as PTS)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or per-block log, only the table")
    d.set_defaults(func=cmd_demo)


def _add_convert(sub: Any) -> None:
    c = sub.add_parser("convert", help="official .pth/.safetensors -> Orbax float params")
    c.add_argument("--model", required=True, help="e.g. vim_tiny, vim_small, vim_base, vmamba_tiny")
    c.add_argument("--checkpoint", type=user_path,
                   required=True, help="official .pth/.safetensors (read without torch)")
    c.add_argument("--out", type=user_path, required=True, help="new Orbax directory for the float params")
    c.add_argument("--key", default=None, help=KEY_HELP)
    c.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="official constructor size argument, e.g. embed_dim=384 (repeatable)")
    c.set_defaults(func=cmd_convert)


def _add_quantize(sub: Any) -> None:
    q = sub.add_parser("quantize", help="PTQ4VM-quantize a model and save an Orbax checkpoint")
    _source_args(q)
    q.add_argument("--calib", default="tfds:imagenet2012:train",
                   help="calibration data: tfds:NAME:SPLIT (prepared under --data-dir) or digits:train|test "
                        "(default: tfds:imagenet2012:train)")
    q.add_argument("--num-calib", type=int, default=256, help="calibration images (default: 256)")
    q.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8 (default: 8)")
    q.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..8 (default: 8)")
    q.add_argument("--method", default="ptq4vm", choices=METHODS,
                   help="ptq4vm (default: PTS + SmoothQuant init, then JLSS); pts_only (the "
                        "initialisation alone); rtn (min-max baseline); per_token_dynamic (baseline)")
    q.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the calibration set per block {_recipe('epochs')}")
    q.add_argument("--train-batch", type=int, default=None,
                   help=f"JLSS mini-batch {_recipe('train_batch')}")
    q.add_argument("--alpha", type=float, default=None,
                   help=f"SmoothQuant migration strength {_recipe('alpha')}")
    q.add_argument("--act-grid", default="fixed", choices=ACT_GRIDS,
                   help="activation grid search: fixed (default, includes the full range) or "
                        "official (the released grid)")
    q.add_argument("--loss", default="cosine", choices=LOSSES,
                   help="block loss: cosine (the paper) or relative MSE")
    q.add_argument("--loss-axis", default="channel", choices=LOSS_AXES,
                   help="VMamba only: the axis of the cosine loss; width reproduces the released "
                        "VMamba code (cosine along the image width)")
    q.add_argument("--lr-w", type=float, default=None,
                   help=f"weight-step learning rate {_recipe('lr_w')}")
    q.add_argument("--lr-a", type=float, default=None,
                   help=f"activation-step learning rate {_recipe('lr_a')}")
    q.add_argument("--lr-s", type=float, default=None,
                   help=f"smoothing-scale learning rate {_recipe('lr_s')}")
    q.add_argument("--official-inner-proj", action="store_true",
                   help="train only in_proj/out_proj like the released Vim code")
    q.add_argument("--keep-learned", action="store_true",
                   help="keep the learned scales of a block even where learning raised its loss, like "
                        "the released code (default: keep that block's initial scales)")
    _scan_arg(q, "calibration runs through (not saved: evaluation picks its own)")
    q.add_argument("--resume", type=user_path, default=None, help="directory for per-block resume state")
    q.add_argument("--out", type=user_path,
                   required=True, help="new Orbax directory for the quantized checkpoint")
    q.set_defaults(func=cmd_quantize)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="top-1/top-5 of a float or quantized model")
    _source_args(e)
    e.add_argument("--quantized", type=user_path,
                   help="Orbax dir written by `ptq4vm quantize` (instead of a float "
                        "--checkpoint / --params)")
    e.add_argument("--mode", default=None, choices=MODES, help="for --quantized: fp32 fake-quant "
                                                                "(default) or integer arithmetic (not "
                                                                "for per_token_dynamic checkpoints)")
    e.add_argument("--gemm", default=None, choices=GEMM_BACKENDS,
                   help="integer GEMM of --mode int (auto: wgmma on Hopper, XLA elsewhere; pallas: the "
                        "Triton kernel; xla-bf16: XLA's bf16 dot on the integer codes, exact; mixed: "
                        "Hopper, wgmma for in_proj/out_proj and xla-bf16 for x_proj/dt_proj)")
    _scan_arg(e, "of the evaluated model")
    e.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of the projections (norms, residual stream and scan stay "
                        "float32): bfloat16 is the float model's fast variant and, with --mode int, "
                        "the integer mode's (its activations reach the quantizers in bf16)")
    e.add_argument("--data", default="tfds:imagenet2012:validation",
                   help="evaluation data: tfds:NAME:SPLIT (prepared under --data-dir) or digits:train|test "
                        "(default: tfds:imagenet2012:validation)")
    e.add_argument("--batch-size", type=int, default=64,
                   help="images per step, split over the local devices (default: 64)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    e.set_defaults(func=cmd_eval)


def _add_report(sub: Any) -> None:
    r = sub.add_parser("report", help="figures (PNG + index.html + report.json) of what calibration "
                                      "learned and where a quantized model's error is")
    r.add_argument("--quantized", type=user_path, required=True,
                   help="Orbax dir written by `ptq4vm quantize` / `ptq4vm demo`")
    r.add_argument("--out", type=user_path,
                   required=True, help="directory for the report (new, empty, or an earlier "
                                       "report, which is replaced)")
    r.add_argument("--params", type=user_path,
                   help="float params of the checkpoint's model (Orbax dir from `ptq4vm "
                        "convert`; default for the bundled micro models: the bundled asset)")
    r.add_argument("--checkpoint", type=user_path,
                   help="the float model as an official .pth/.safetensors instead")
    r.add_argument("--key", default=None, help=f"for --checkpoint: {KEY_HELP}")
    r.add_argument("--data", default=None,
                   help="images for the data figures and the float-vs-quantized metrics: tfds:NAME:SPLIT "
                        "(prepared under --data-dir) or digits:train|test (default: none)")
    r.add_argument("--data-dir", type=user_path, default=None, help="tfds data_dir")
    r.add_argument("--limit", type=int, default=None, help="use the first N images of --data (default: 256)")
    r.add_argument("--batch-size", type=int, default=None, help="images per step of --data (default: 64)")
    r.add_argument("--layers", default=None,
                   help="regex over the quantized layers' paths choosing the profiled layers (default: the "
                        "last out_proj among the blocks with the most tokens; in VMamba and the LocalMamba "
                        "models also that block's per-direction x_proj_k)")
    r.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The ``ptq4vm`` parser: one sub-command per ``_add_<command>``."""
    p = argparse.ArgumentParser(prog="ptq4vm", description="PTQ4VM post-training quantization of Visual "
                                "Mamba models: demo, convert, quantize, eval, report.")
    p.add_argument("--version", action="version", version=f"ptq4vm-jax {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_convert, _add_quantize, _add_eval, _add_report):
        add(sub)
    for parser in (p, *sub.choices.values()):
        parser.allow_abbrev = False  # a prefix such as --epoch must not stand for --epochs silently
    return p


#: What to lower when a command runs out of device memory.
MEMORY_FLAGS = {"eval": "--batch-size", "report": "--batch-size or --limit",
                "quantize": "--train-batch (images per learning step) or --num-calib"}


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA failing to allocate device memory (its RESOURCE_EXHAUSTED status;
    jax's runtime error is recognised by name, so that the parser never loads jax)."""
    runtime = type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
    return runtime and "RESOURCE_EXHAUSTED" in str(error)


def main(argv: list[str] | None = None) -> None:
    """Run ``ptq4vm``; errors a user can act on print as one line."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while parsing, before the command holds signals
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        print("ptq4vm: interrupted", file=sys.stderr)
        raise SystemExit(130) from None

    def one_line(message: Warning | str, category: Any, *rest: Any, **kw: Any) -> None:
        # a user's warning, not a source location; one the command already said is left out
        if argument_of(message) in getattr(args, "warned_about", ()):
            return
        print(f"ptq4vm {args.command}: warning: {for_the_command_line(message)}", file=sys.stderr)

    try:
        with warnings.catch_warnings(), stop_on_signals():
            warnings.showwarning = one_line
            args.func(args)
    except UsageError as e:
        print(f"ptq4vm {args.command}: error: {e}", file=sys.stderr)
        raise
    except ModuleNotFoundError as e:
        package = OPTIONAL_PACKAGES.get((e.name or "").partition(".")[0])
        if package is None or os.environ.get("PTQ4VM_DEBUG"):
            raise
        print(f"ptq4vm {args.command}: error: this needs {package}, which is not installed here: "
              f"pip install {package}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        more = "" if isinstance(e, ValueError) else " (PTQ4VM_DEBUG=1 shows the traceback)"
        if kept_blocks(args) and argument_of(e) != "resume_dir":  # e.g. the final save failed
            more += resume_hint(args.resume, "fix this and rerun")
        print(f"ptq4vm {args.command}: error: {for_the_command_line(e)}{more}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        hint = resume_hint(args.resume, "rerun") if args.command == "quantize" else ""  # (has --resume)
        killed = isinstance(e, Terminated)
        print(f"ptq4vm {args.command}: {'terminated (SIGTERM)' if killed else 'interrupted'}{hint}",
              file=sys.stderr)
        raise SystemExit(143 if killed else 130) from None  # (the shell's codes: 128 + the signal)
    except CalibrationError as e:
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        print(f"ptq4vm {args.command}: calibration failed: {for_the_command_line(e)}"
              f"{resume_hint(getattr(args, 'resume', None), 'after a transient fault, rerun')}",
              file=sys.stderr)
        raise SystemExit(1) from None
    except RuntimeError as e:
        if not out_of_memory(e) or os.environ.get("PTQ4VM_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        lower = f"; lower {MEMORY_FLAGS[args.command]}" if args.command in MEMORY_FLAGS else ""
        if kept_blocks(args):  # (those flags are part of what a resume directory continues)
            lower += (f" (a new run: the blocks completed so far in --resume {args.resume} continue "
                      "only a rerun with the same settings)")
        print(f"ptq4vm {args.command}: error: the device ran out of memory ({first[:200]}){lower}",
              file=sys.stderr)
        raise SystemExit(1) from None
