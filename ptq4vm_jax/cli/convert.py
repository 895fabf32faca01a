"""``ptq4vm convert``: an official .pth/.safetensors -> an Orbax float-params directory."""

from __future__ import annotations

import argparse

from ptq4vm_jax.cli.loading import model_overrides
from ptq4vm_jax.cli.paths import check_out


def cmd_convert(args: argparse.Namespace) -> None:
    from ptq4vm_jax.checkpoint import FLOAT_FORMAT, convert_checkpoint

    check_out(args.out, format=FLOAT_FORMAT, model=args.model, inputs={"--checkpoint": args.checkpoint})
    meta = convert_checkpoint(args.checkpoint, args.model, args.out, key=args.key,
                              **model_overrides(args.model_arg, args.model))
    print(f"wrote {args.out}: {meta['model_name']} from {meta['source']} (sha256 {meta['source_sha256']})")
