"""The model a command starts from: --checkpoint / --params / --quantized, with --model and
--model-arg, checked against what the files hold before the library loads them."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ptq4vm_jax.choices import RUNTIME_CHOICES
from ptq4vm_jax.cli.errors import UsageError


def warn_if_scan_interpreted(args: argparse.Namespace) -> None:
    """A Pallas scan backend off the GPU runs in the Pallas interpreter: exact, far too slow for
    real work. Said once, with the flag's name."""
    from ptq4vm_jax import gpu  # (jax: not loaded for the parser)

    if args.scan in ("pallas", "fused") and gpu.interpret_kernels():
        print(f"ptq4vm {args.command}: warning: --scan {args.scan} off the GPU runs its kernels in the "
              "Pallas interpreter: exact but slow, meant for testing (--scan auto is the fast path here)",
              file=sys.stderr)


def model_overrides(pairs: list[str] | None, model: str | None = None) -> dict[str, Any]:
    """``--model-arg embed_dim=64`` -> {"embed_dim": 64} (values parsed as Python literals, else
    kept as strings). With ``model``, each name must be one of that model's size arguments."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. embed_dim=384")
        if key in RUNTIME_CHOICES:  # they would be stored with the params and change every later run
            raise UsageError(f"--model-arg {key}: not a size of the model but a choice of how it runs, "
                             "which checkpoints do not store; use --scan (quantize, eval) or --dtype (eval)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    if model is not None and out:
        accepted = model_arguments(model)
        unknown = [k for k in out if k not in accepted]
        if unknown:
            raise UsageError(f"--model-arg {', '.join(unknown)}: not an argument of {model}; accepted: "
                             f"{', '.join(accepted)}")
    return out


def model_arguments(model: str) -> list[str]:
    """The names ``--model-arg`` accepts for ``model``: its constructor's arguments less the
    ``RUNTIME_CHOICES``, which the library's own list of accepted arguments includes."""
    from ptq4vm_jax.models import create_model

    cfg = create_model(model).cfg
    return sorted(f.name for f in dataclasses.fields(cfg) if f.name not in RUNTIME_CHOICES)


def format_of(directory: str) -> dict[str, Any]:
    """The metadata of a checkpoint directory, or {} where there is none to read (the loader
    then says what is wrong with it)."""
    from ptq4vm_jax.checkpoint import read_metadata

    if not (Path(directory) / "metadata.json").is_file():
        return {}
    try:
        return read_metadata(directory)
    except ValueError:
        return {}


def check_quantized_dir(quantized: str) -> None:
    """--quantized must name a quantized checkpoint, not float params."""
    from ptq4vm_jax.checkpoint import FLOAT_FORMAT

    held = format_of(quantized)
    if held.get("format") == FLOAT_FORMAT:
        raise UsageError(f"--quantized {quantized} holds float params ({held.get('model_name', '?')}); "
                         "give it as --params, or quantize it first with `ptq4vm quantize`")


def load_float(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any, str | None]:
    """(model name, model overrides, float params, the --checkpoint entry read: None for a bare
    state_dict or --params) from --checkpoint or --params."""
    from ptq4vm_jax import load_params
    from ptq4vm_jax.checkpoint import QUANT_FORMAT, load_official_checkpoint
    from ptq4vm_jax.models import canonical_name

    if bool(args.checkpoint) == bool(args.params):
        also = (" (or, for eval, --quantized: a dir written by `ptq4vm quantize`)"
                if args.command == "eval" else "")
        raise UsageError("give exactly one of --checkpoint (official .pth/.safetensors) or --params "
                         f"(an Orbax dir written by `ptq4vm convert`){also}")
    if args.checkpoint:
        if not args.model:
            raise UsageError("--checkpoint needs --model (e.g. vim_tiny)")
        overrides = model_overrides(args.model_arg, args.model)
        return (args.model, overrides,
                *load_official_checkpoint(args.checkpoint, args.model, key=args.key, **overrides))
    if args.model_arg or args.key:
        raise UsageError("--model-arg and --key apply to --checkpoint; --params already records its "
                         "model's sizes and holds one set of weights")
    held = format_of(args.params)
    if held.get("format") == QUANT_FORMAT:
        instead = ("give it as --quantized" if args.command == "eval" else
                   f"{args.command} needs the float model: --params DIR from `ptq4vm convert`, or "
                   "--checkpoint X.pth")
        raise UsageError(f"--params {args.params} is a quantized checkpoint; {instead}")
    if args.model and held.get("model_name") and canonical_name(args.model) != held["model_name"]:
        raise UsageError(f"--params {args.params} holds {held['model_name']}, not {args.model}; pass "
                         f"--model {held['model_name']} (or leave --model out) or convert a "
                         f"{canonical_name(args.model)} checkpoint")
    params, meta = load_params(args.params, model_name=args.model)
    return meta["model_name"], dict(meta.get("model_overrides") or {}), params, None
