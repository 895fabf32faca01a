"""Data specs of the command line (``tfds:NAME:SPLIT``, ``digits:SPLIT``) -> data sources the
library reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ptq4vm_jax.cli.errors import UsageError

SPEC_FORMS = "tfds:NAME:SPLIT or digits:train|test"


def data_source(spec: str, data_dir: str | None, image_size: int, flag: str) -> Any:
    """``tfds:NAME:SPLIT`` (array_record data source, no TensorFlow, nothing downloaded) or
    ``digits:SPLIT`` (built in, made at the model's ``image_size``: an (images, labels) pair);
    ``flag`` names the option in errors."""
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        from ptq4vm_jax.data import load_digits_dataset

        if rest not in ("train", "test"):
            raise UsageError(f"{flag} {spec}: give the split, digits:train or digits:test (calibrate on "
                             "train, evaluate on test)")
        if data_dir is not None:
            raise UsageError(f"--data-dir is where prepared tfds datasets are found, and {flag} {spec} is "
                             "built in: drop --data-dir")
        return load_digits_dataset(rest, image_size=image_size)
    if kind == "tfds":
        name, _, split = rest.partition(":")
        if not name or not split:
            raise UsageError(f"{flag} {spec!r}: expected tfds:NAME:SPLIT, e.g. "
                             "tfds:imagenet2012:validation")
        if data_dir is not None and not Path(data_dir).is_dir() and "://" not in data_dir:
            what = "is a file" if Path(data_dir).exists() else "does not exist"
            raise UsageError(f"--data-dir {data_dir} {what}; give the directory that holds the prepared "
                             "tfds datasets (e.g. ~/tensorflow_datasets)")
        import tensorflow_datasets as tfds

        absl = logging.getLogger("absl")  # (its warnings about the folders it tried precede our error)
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises many types; the user needs the path advice
            where = data_dir_of(spec, data_dir)
            folder = Path(where) / name.split("/")[0]
            # (tfds's own message for a missing local dataset blames the file format)
            if "://" in where or (folder.is_dir() and any(folder.rglob("dataset_info.json"))):
                cause = str(e)
            elif folder.is_dir():
                cause = f"{folder} holds no prepared dataset (no dataset_info.json in it)"
            else:
                cause = f"there is no prepared {name} under {folder.parent}"
            raise UsageError(
                f"could not open {spec} (data_dir={data_dir}): {cause}\nPrepare the dataset with tfds "
                "(array_record format) under --data-dir; nothing is downloaded at run time."
            ) from None
        finally:
            absl.setLevel(level)
    raise UsageError(f"{flag} {spec!r}: unknown data spec; use {SPEC_FORMS}")


def data_dir_of(spec: str, data_dir: str | None) -> str | None:
    """The directory a spec's data is read from, absolute (tfds: ``--data-dir``, else
    ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``); None for built-in data."""
    if not spec.startswith("tfds:"):
        return None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return where if "://" in where else os.path.abspath(os.path.expanduser(where))


def images_in(source: Any) -> int | None:
    """How many images a source from ``data_source`` holds (None where it cannot tell)."""
    if isinstance(source, tuple):
        return len(source[0])
    try:
        return len(source)
    except TypeError:
        return None
