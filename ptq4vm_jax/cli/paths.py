"""Safety checks of the paths a command writes (--out, --resume), made before any long work, so
that a run never fails or destroys something at its end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ptq4vm_jax.cli.errors import UsageError
from ptq4vm_jax.dirs import RESUME_FILES, foreign_files, nearest_existing, probe_writable


def user_path(text: str) -> str:
    """A path argument with a leading ``~`` expanded, once, at parsing: the shell leaves it
    unexpanded in ``--out=~/x``, and the checks and the writers must all see the same path
    (so the commands and their checks take paths as parsed and expand nothing themselves)."""
    return os.path.expanduser(text)


def check_out(out: str, *, format: str, model: str | None, inputs: dict[str, str | None],
              announce: bool = True) -> None:
    """Refuse an --out that would fail or destroy something at the end: one of the run's inputs
    or a place inside one, a file, anything ``write_checkpoint`` would refuse to replace, or a
    place that cannot be written (tried in its nearest existing ancestor, leaving nothing behind).
    Paths are compared resolved, through symlinks and "..". A checkpoint it will replace is named
    (``announce``) once the model is known."""
    from ptq4vm_jax.checkpoint import check_replaceable, read_metadata

    target = Path(out).resolve()
    for flag, path in inputs.items():
        if path and Path(path).resolve() == target:
            raise UsageError(f"--out {out} is the same path as {flag}: writing the result would "
                             f"destroy {flag}; choose another --out")
        if path and target.is_relative_to(Path(path).resolve()):
            raise UsageError(f"--out {out} lies inside {flag} {path}: replacing or deleting {flag} would "
                             "delete the result; give it a directory of its own, outside every input")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a directory path")
    if target.exists():
        check_replaceable(str(target), {"format": format, "model_name": model})
        if announce and model is not None and os.listdir(target):
            held = read_metadata(str(target))
            what = held.get("model_name", "?")
            if held.get("config"):
                c = held["config"]
                what += f" {c.get('method')} W{c.get('w_bits')}A{c.get('a_bits')}"
            print(f"note: --out {out} holds a checkpoint ({what}, written {held.get('created', '?')}); "
                  "it will be replaced at the end", file=sys.stderr)
    parent = target.parent  # the result is written beside --out first, then renamed into place
    existing = nearest_existing(parent)
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so no directory can be made under it")
    try:
        probe_writable(parent)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write in {parent} ({e.strerror or e}); choose a "
                         "writable place") from None


def check_resume(resume: str | None, paths: dict[str, str | None]) -> None:
    """--resume must be a directory of its own: not a file, not a checkpoint, not inside the
    output or an input (writing --out replaces its tree; compared resolved, through symlinks and
    ".."), not holding other files, and creatable and writable (tried without leaving anything
    behind)."""
    if not resume:
        return
    if Path(resume).is_symlink() and not Path(resume).exists():
        raise UsageError(f"--resume {resume} is a broken symlink (to {os.readlink(resume)}); give a "
                         "directory, or make the link's target first")
    where = Path(resume).resolve()
    if where.exists() and not where.is_dir():
        raise UsageError(f"--resume {resume} is a file; give a directory for the resume state")
    if (where / "metadata.json").exists():
        raise UsageError(f"--resume {resume} is a checkpoint directory; give the resume state a "
                         "directory of its own")
    for flag, path in paths.items():
        if path and where.is_relative_to(Path(path).resolve()):
            raise UsageError(f"--resume {resume} lies inside {flag} {path}; give the resume state a "
                             "directory of its own")
    shown = foreign_files(where, RESUME_FILES)
    if shown:
        raise UsageError(f"--resume {resume} holds other files ({shown}) and no resume state; give a "
                         "new or empty directory, so that the resume state is never mixed with (or "
                         "deleted along with) other files")
    try:
        probe_writable(where)
    except OSError as e:
        raise UsageError(f"--resume {resume} cannot be created or written ({e.strerror or e}); choose a "
                         "writable directory") from None


def kept_blocks(args: object) -> bool:
    """Whether a quantize run's --resume holds completed blocks (worth naming in any error)."""
    resume = getattr(args, "resume", None)
    if getattr(args, "command", None) != "quantize" or not resume:
        return False
    return (Path(resume) / "state.npz").exists()


def resume_hint(resume: str | None, action: str) -> str:
    """What a stopped or failed quantize run kept, and how to continue it (``action``: what the
    user should do first, e.g. "rerun")."""
    if not resume:
        return "; rerun with --resume DIR to keep completed blocks across attempts"
    if not (Path(resume) / "state.npz").exists():
        return f"; no block had completed, so {resume} holds nothing to continue from"
    return (f"; the blocks completed so far are saved in {resume}: {action} with the same --resume to "
            "continue (it continues only the same run: other settings or params need a new --resume)")
