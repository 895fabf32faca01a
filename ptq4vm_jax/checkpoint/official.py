"""Official checkpoints (``.pth``/``.safetensors``) -> our params tree, checked against the model.

``convert`` reads the file and maps key names (no jax); this module builds the Flax params tree
for ``create_model(model_name, **overrides)``, reports every mismatch in one error with a hint at
the model or overrides the checkpoint's shapes point to, and checks what the checkpoint records
about its training. ``convert_checkpoint`` also saves the result as a float-params checkpoint.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Any

from convert.mapping import FamilySpec, Mismatch, map_state_dict
from convert.reading import family_spec, name_coverage, read_checkpoint, state_dict_entry
from ptq4vm_jax.checkpoint.checks import abstract_params, nonfinite_report
from ptq4vm_jax.checkpoint.float_params import save_params
from ptq4vm_jax.checkpoint.store import file_sha256
from ptq4vm_jax.errors import CheckpointError, CheckpointMismatchError
from ptq4vm_jax.models import create_model, list_models, model_family
from ptq4vm_jax.trees import flatten_tree, unflatten_tree


def _recorded(spec: FamilySpec, checkpoint: Any) -> dict[str, Any]:
    """What the checkpoint records beside its weights, for a hint: unreadable records give ``{}``."""
    try:
        return spec.recorded_overrides(checkpoint) if spec.recorded_overrides is not None else {}
    except CheckpointError:
        return {}


def _pairs(sizes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _flags(sizes: Mapping[str, Any]) -> str:
    """``sizes`` as the ``--model-arg`` flags that pass them (a tuple as its comma-separated items)."""
    return " ".join(
        "--model-arg " + shlex.quote(f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}")
        for k, v in sizes.items())


def _either(options: list[dict[str, Any]], show: Any) -> str:
    return "either " + " or ".join(show(o) for o in options)


def _size_hint(spec: FamilySpec, checkpoint: Any, state_dict: Mapping[str, Any], model_name: str,
               overrides: dict, mismatch: Mismatch) -> str:
    """Which model (or overrides) the checkpoint's shapes, and the training args it records, point to.

    Each hint names the keyword arguments to pass and, after "CLI:", the exact flags that pass them.
    """
    own = name_coverage(spec, state_dict)
    if own < 1.0:
        for family in sorted({model_family(n) for n in list_models()} - {spec.family}):
            other = name_coverage(family_spec(family), state_dict)
            # Related families share many key names: one knowing every key wins over a partial fit.
            if other >= 0.9 and (own < 0.5 or other == 1.0):
                models = ", ".join(n for n in list_models() if model_family(n) == family)
                return (f"hint: the parameter names are those of a {family} checkpoint, not a "
                        f"{spec.family} one: convert it as a {family} model ({models}: model_name=, "
                        "CLI: --model)")
    inferred = spec.infer_overrides(state_dict)
    if not inferred:
        return (f"hint: none of the {spec.family} parameter names were found: is this a {spec.family} "
                "checkpoint, and is key= (CLI: --key) the entry holding its weights?")
    options: list[dict[str, Any]] = []
    recorded = _recorded(spec, checkpoint)
    if spec.settle_sizes is not None:
        inferred, options = spec.settle_sizes(inferred, recorded, create_model(model_name, **overrides).cfg)
    else:  # the recorded args add what shapes cannot show (VMamba: the input size); shapes win
        inferred = {**inferred, **{k: v for k, v in recorded.items() if k not in inferred}}
    said = "the shapes and the checkpoint's training args say" if recorded else "the shapes say"
    sizes = _pairs(inferred)
    # the pairs the token count fits: the caller must pass one (kwargs, then its flags)
    pair_kw = _either(options, _pairs) if options else ""
    pair_cli = _either(options, _flags) if options else ""
    why = (" (the token count fits each pair and the checkpoint records no input size: pass the pair it "
           "was trained with)") if options else ""

    def differing(name: str, extra: dict) -> dict[str, Any]:
        cfg = create_model(name, **extra).cfg
        return {k: v for k, v in inferred.items() if getattr(cfg, k, v) != v}

    own = differing(model_name, overrides)
    if not own:
        if options:
            return (f"hint: {said} {sizes}, as {model_name} has, but not its image size and stride: pass "
                    f"{pair_kw} (CLI: {pair_cli}){why}")
        if mismatch.missing and not (mismatch.unexpected or mismatch.wrong):
            keys = ", ".join(official or ours for ours, official in mismatch.missing[:3])
            more = f" and {len(mismatch.missing) - 3} more" if len(mismatch.missing) > 3 else ""
            return (f"hint: {said} {sizes}, as {model_name} has, and only lacks some tensors ({keys}{more}): "
                    "a partial export, e.g. a backbone without its classifier head? Converting needs every "
                    "weight of the model")
        renamed = bool(mismatch.missing or mismatch.unexpected)
        differ = {(True, False): "only key names differ", (False, True): "only tensor shapes/dtypes differ",
                  (True, True): "key names and tensor shapes/dtypes differ"}[renamed, bool(mismatch.wrong)]
        return (f"hint: {said} {sizes}, as {model_name} has; {differ}: is this an "
                f"official {spec.family} checkpoint of this architecture?")
    candidates = sorted((len(d), n, d) for n in list_models() if model_family(n) == spec.family
                        for d in [differing(n, {})])
    count, best, diff = candidates[0]
    stale = [k for k in overrides if k in inferred]
    drop = f" without the overrides {', '.join(stale)}" if stale else ""
    drop_cli = f" without {' '.join(f'--model-arg {k}' for k in stale)}" if stale else ""
    also_kw = f", plus {pair_kw}" if options else ""
    also_cli = f", plus {pair_cli}" if options else ""
    if count == 0:
        return (f"hint: {said} {sizes}: that is {best}; pass model_name={best!r}{drop}{also_kw} "
                f"(CLI: --model {best}{drop_cli}{also_cli}){why}")
    if count <= 2:
        return (f"hint: {said} {sizes}: closest is {best} with {_pairs(diff)} (pass model_name={best!r}"
                f"{drop} and {_pairs(diff)}{also_kw}; CLI: --model {best}{drop_cli} {_flags(diff)}{also_cli})"
                f"{why}")
    return (f"hint: {said} {sizes}; no registered model has them: keep {model_name} and pass "
            f"{_pairs(own)}{also_kw} (CLI: {_flags(own)}{also_cli}){why}")


def load_torch_checkpoint(
    path: str | os.PathLike, model_name: str, *, key: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Official checkpoint -> our float32 param tree for ``create_model(model_name, **overrides)``.

    Strict: every missing, unexpected or mis-shaped parameter is reported in one error.
    ``key``: the checkpoint's entry holding the weights ('model', 'model_ema', ...), which must be
    there; None (the default) reads the entry 'model', else 'state_dict' (LocalMamba's tools save
    ``{'state_dict': ...}``), else a bare state_dict.
    """
    return load_official_checkpoint(path, model_name, key=key, **overrides)[0]


def load_official_checkpoint(path: str | os.PathLike, model_name: str, *, key: str | None = None,
                             **overrides: Any) -> tuple[dict[str, Any], str | None]:
    """``load_torch_checkpoint``'s params from an official ``.pth``/``.safetensors``, and the entry
    they were read from (None: the file is a bare state_dict), for a record of where a model came
    from."""
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    key = state_dict_entry(checkpoint, key, path)
    state_dict = checkpoint if key is None else checkpoint[key]
    spec = family_spec(model_family(model_name))
    expected = {p: tuple(s.shape) for p, s in flatten_tree(abstract_params(model_name, **overrides)).items()}
    mapped, mismatch = map_state_dict(spec.preprocess(state_dict), spec.rules, expected)
    if mismatch:
        shown = model_name + (f"({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
        raise CheckpointMismatchError(
            f"{path} does not fit {shown}:\n{mismatch.describe()}\n"
            f"{_size_hint(spec, checkpoint, state_dict, model_name, overrides, mismatch)}"
        )
    bad = nonfinite_report(state_dict)
    if bad:
        where = "the state_dict" if key is None else f"entry {key!r}"
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CheckpointError(
            f"{path}: NaN or infinite weights in {len(bad)} tensor(s) of {where} (float64 values beyond "
            "float32's range count as inf), so the converted model would compute garbage:\n  "
            + "\n  ".join(bad[:10]) + more
            + "\nconvert a checkpoint of a healthy run, or another entry of this one (key=, CLI: --key)")
    recorded = spec.recorded_overrides(checkpoint) if spec.recorded_overrides is not None else {}
    if recorded and spec.settle_sizes is not None:  # what the recorded args imply for the rest
        settled, _ = spec.settle_sizes(spec.infer_overrides(state_dict), recorded,
                                       create_model(model_name, **overrides).cfg)
        recorded = {**settled, **recorded}
    _check_training_config(recorded, model_name, overrides, path)
    return unflatten_tree(mapped), key


def _check_training_config(official: Mapping[str, Any], model_name: str, overrides: dict[str, Any],
                           path: str) -> None:
    """What the checkpoint records about its training must describe the model we convert into.

    Shapes cannot tell every setting apart (an activation, a forward type, the image size and
    stride behind a token count), so the settings a checkpoint records (``official``, from
    ``FamilySpec.recorded_overrides``, which refuses ones the port lacks) are also checked against
    ``create_model(model_name, **overrides)``.
    """
    ours = create_model(model_name, **overrides).cfg
    differ = {k: v for k, v in official.items() if getattr(ours, k) != v}
    if differ:
        given = ", ".join(f"{k}={getattr(ours, k)!r}" for k in differ)
        wanted = " ".join(f"--model-arg {shlex.quote(f'{k}={v!r}')}" for k, v in differ.items())
        trained = ", ".join(f"{k}={v!r}" for k, v in differ.items())
        raise CheckpointMismatchError(
            f"{path} was trained with {trained}, but {model_name} has {given}; pass those as overrides "
            f"({trained}; CLI: {wanted})"
        )


def convert_checkpoint(checkpoint_path: str | os.PathLike, model_name: str, out_dir: str | os.PathLike, *,
                       key: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Official ``.pth``/``.safetensors`` -> float-params checkpoint in ``out_dir``; returns its metadata.

    ``key`` as for ``load_torch_checkpoint``; the metadata's ``extra["key"]`` is the entry read, or
    None where the file is a bare state_dict.
    """
    params, entry = load_official_checkpoint(checkpoint_path, model_name, key=key, **overrides)
    return save_params(out_dir, params, model_name=model_name, model_overrides=overrides,
                       source=os.path.basename(os.fspath(checkpoint_path)),
                       source_sha256=file_sha256(checkpoint_path), extra={"key": entry})
