"""Any calibration / evaluation source -> validated float32 NHWC images in fixed-shape batches.

Accepted sources (for both ``calibration_images`` and ``eval_batches``):

* a numpy / jax array of images ``(N, H, W, C)``, a ``(images, labels)`` pair of arrays, or a
  dict ``{"image": images, "label": labels}``;
* an iterable of batches or of single examples: arrays, ``(image, label)`` tuples or dicts with
  ``"image"`` (and ``"label"``);
* a random-access source: ``tfds.data_source(...)``, a ``grain.MapDataset`` (anything with
  ``__len__`` and ``__getitem__`` that is not a list/tuple/array/dict);
* a ``grain.IterDataset`` (read as an iterable).

Pixels: integer (uint8) images are raw pixels and go through ``preprocess`` or, when none is
given, the official Vim eval transform ``imagenet_eval_preprocess`` at ``image_size``. Float
images are taken as already preprocessed (``preprocess``, when given, is applied to them too).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ptq4vm_jax.data.labels import class_labels
from ptq4vm_jax.data.preprocess import Preprocess, imagenet_eval_preprocess
from ptq4vm_jax.models.inputs import from_torch

logger = logging.getLogger(__name__)

# Largest random-access source whose index permutation we materialise (ImageNet train: 1.28M).
_MAX_PERMUTATION = 1 << 31


def is_array(x: Any) -> bool:
    """A numpy array or an array-like with a shape and dtype (jax, torch): one block of images."""
    return isinstance(x, np.ndarray) or (
        hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype")
    )


def is_random_access(x: Any) -> bool:
    """A source read by index (tfds data source, grain MapDataset), not a container of batches."""
    return (
        hasattr(x, "__len__")
        and hasattr(x, "__getitem__")
        and not isinstance(x, (list, tuple, str, bytes, Mapping))
        and not is_array(x)
    )


def is_pair(x: Any) -> bool:
    """An ``(images, labels)`` pair of arrays."""
    return isinstance(x, tuple) and len(x) == 2 and is_array(x[0])


def split_element(elem: Any) -> tuple[Any, Any]:
    """One element of a source -> (image or batch of images, label(s) or None)."""
    if isinstance(elem, Mapping):
        if "image" not in elem:
            raise ValueError(
                f"dict examples need an 'image' key; got keys {sorted(map(str, elem))}. "
                "Rename the image field to 'image' (and the class field to 'label')."
            )
        return elem["image"], elem.get("label")
    if isinstance(elem, tuple) and len(elem) == 2:
        return elem
    if is_array(elem) or type(elem).__module__.startswith("PIL"):
        return elem, None
    raise TypeError(
        f"cannot read images from an element of type {type(elem).__name__}; elements must be "
        "arrays, (image, label) tuples or dicts with an 'image' key"
    )


def _pixel_kind(dtype: np.dtype, where: str) -> str:
    if dtype.kind in "ui":
        return "int"
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return "float"
    raise TypeError(
        f"{where}: images of dtype {dtype} are not image data; expected uint8 pixels or float "
        "images (already normalised)"
    )


def _prepare(
    images: Any, labels: Any, *, image_size: int, preprocess: Preprocess | None, where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images of one element (single image or batch) -> float32 NHWC batch and its labels."""
    if type(images).__module__.startswith("PIL"):
        images = np.asarray(images)
    images = from_torch(images)  # (off the graph and the GPU; bf16 has no numpy twin)
    arr = images if is_array(images) else np.asarray(images)
    try:
        dtype = np.dtype(arr.dtype)
    except TypeError:  # an array type whose dtype numpy cannot name (e.g. a TensorFlow tensor)
        arr = np.asarray(arr)
        dtype = arr.dtype
    kind = _pixel_kind(dtype, where)
    single = arr.ndim in (2, 3)
    if not single and arr.ndim != 4:
        raise ValueError(
            f"{where}: expected one image (H, W, C) or a batch (N, H, W, C); got shape "
            f"{tuple(arr.shape)}"
        )
    batch = [arr] if single else arr
    if len(batch) == 0:
        out = np.zeros(arr.shape, np.float32)
    elif preprocess is None and kind == "int":
        out = np.stack([imagenet_eval_preprocess(np.asarray(im), image_size=image_size)
                        for im in batch])
    elif preprocess is not None:
        out = np.stack([np.asarray(preprocess(np.asarray(im)), np.float32) for im in batch])
    else:
        out = np.asarray(np.asarray(arr), np.float32)
        out = out[None] if single else out
    if labels is not None:
        labels = class_labels(labels, where)
        if labels.shape[0] != out.shape[0]:
            raise ValueError(
                f"{where}: {out.shape[0]} image(s) but {labels.shape[0]} label(s)"
            )
    return out, labels


def _check_images(images: np.ndarray, *, image_size: int, channels: int, offset: int,
                  where: str) -> None:
    want = (image_size, image_size, channels)
    got = tuple(images.shape[1:])
    if got != want:
        if images.ndim == 4 and got[0] == channels and got[1:] == (image_size, image_size):
            hint = "they look channels-first (NCHW): transpose to NHWC, e.g. x.transpose(0, 2, 3, 1)"
        elif images.ndim == 4 and got[:2] == want[:2]:
            hint = (f"convert them to {channels} channels (grayscale -> RGB: np.repeat(x, 3, -1)) "
                    "or build the model for this channel count")
        else:
            hint = (f"resize/crop them to {image_size}x{image_size} (e.g. preprocess="
                    f"functools.partial(imagenet_eval_preprocess, image_size={image_size})) or "
                    "pass the image_size your model expects")
        raise ValueError(
            f"{where}: expected images of shape (H, W, C) = {want}, got {got} "
            f"(image #{offset}); {hint}"
        )
    finite = np.isfinite(images)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(images.shape[0], -1).all(axis=1)) + offset
        raise ValueError(
            f"{where}: {int((~finite).sum())} non-finite (NaN/inf) pixel value(s) in image(s) "
            f"#{bad[:10].tolist()}; fix the preprocessing or drop those images"
        )


def _check_batch_axes(images: Any, where: str) -> None:
    """A whole-dataset array is (N, H, W, C); anything else would be cut into wrong "images"."""
    shape = tuple(np.shape(images))
    if len(shape) == 4:
        return
    if len(shape) == 3:
        hint = ("one image (H, W, C)? add a batch axis: x[None]. A batch of single-channel images "
                "(N, H, W)? add a channel axis: x[..., None]")
    elif len(shape) == 1:
        hint = "a 1-D array looks like labels; for an (images, labels) pair put the images first"
    else:
        hint = "pass the images as one (N, H, W, C) array"
    raise ValueError(f"{where}: expected images as an array (N, H, W, C); got shape {shape}: {hint}")


def _empty(source: Any, where: str) -> ValueError:
    consumed = isinstance(source, Iterator)
    return ValueError(f"{where}: the dataset is empty (no images found)" + (
        "; an iterator or generator can be read once: was it used up by an earlier call? Pass a list "
        "or a fresh generator" if consumed else ""))


def _elements(source: Any, order: Iterable[int] | None, *, chunk: int, where: str) -> Iterator[Any]:
    """Elements of any accepted source; arrays are cut into slices of ``chunk`` images."""
    if is_array(source) or is_pair(source) or isinstance(source, Mapping):
        images, labels = source if is_pair(source) else split_element(source)
        _check_batch_axes(images, where)
        n = len(images)
        if labels is not None and len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")
        for s in range(0, n, chunk):
            yield (images[s:s + chunk], None if labels is None else labels[s:s + chunk])
    elif is_random_access(source):
        for i in order if order is not None else range(len(source)):
            yield source[int(i)]
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        yield from source
    else:
        spec = (" (a data spec such as 'tfds:NAME:SPLIT' is for the command line; in Python pass "
                "tfds.data_source(NAME, split=SPLIT, data_dir=...) or load_digits_dataset(SPLIT))"
                if isinstance(source, str) else "")
        raise TypeError(
            f"unsupported data source of type {type(source).__name__}; pass an array, an "
            "(images, labels) pair, an iterable of batches/examples, a tfds data source or a grain "
            f"dataset{spec}"
        )


def calibration_images(
    calib_ds: Any,
    num_images: int,
    *,
    image_size: int,
    channels: int = 3,
    preprocess: Preprocess | None = None,
    seed: int | None = 0,
    count_name: str = "num_images",
    batch: int = 1,
) -> np.ndarray:
    """The calibration set as one float32 ``(num_images, H, W, C)`` array, validated.

    Order: arrays and iterables give their first ``num_images`` images in order. Random-access
    sources (tfds data sources, grain MapDatasets) are read along a fixed permutation drawn with
    ``np.random.default_rng(seed)`` (``seed=None``: indices 0, 1, 2, ...), like the official
    code's shuffled train loader but reproducible; the indices used are logged at INFO.
    ``count_name`` is what the caller's user sets for ``num_images``, named when data runs short,
    with the largest count that is a multiple of ``batch`` (the calibration batch) and fits.
    """
    where = "calibration data"
    if int(num_images) != num_images or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    order = None
    if is_random_access(calib_ds):
        total = len(calib_ds)
        if total == 0:
            raise ValueError(f"{where}: the dataset is empty (len 0)")
        if seed is None:
            order = range(total)
        elif total > _MAX_PERMUTATION:
            raise ValueError(
                f"{where}: the source reports {total} elements (a repeated/infinite dataset?), too "
                "many to permute; pass seed=None to read it in order, or a finite dataset"
            )
        else:
            order = np.random.default_rng(seed).permutation(total)
    got: list[np.ndarray] = []
    count = 0
    used: list[int] = []
    for k, elem in enumerate(_elements(calib_ds, order, chunk=num_images, where=where)):
        images, _ = split_element(elem)
        x, _ = _prepare(images, None, image_size=image_size, preprocess=preprocess, where=where)
        if order is not None:
            used.append(int(order[k]))
        if x.shape[0] == 0:
            continue
        _check_images(x, image_size=image_size, channels=channels, offset=count, where=where)
        got.append(x)
        count += x.shape[0]
        if count >= num_images:
            break
    if count == 0:
        raise _empty(calib_ds, where)
    if count < num_images:
        fit = count if count % batch == 0 or count < batch else (
            f"{count // batch * batch} (a multiple of train_batch={batch})")
        raise ValueError(
            f"{where}: asked for {num_images} calibration images but the dataset has only "
            f"{count}; pass {count_name}<={fit} or a larger dataset"
        )
    if used:
        logger.info("calibration images read from source indices %s (seed=%s)", used, seed)
    out = np.concatenate(got)[:num_images]
    if out.min() >= 0.0:
        warnings.warn(
            f"{where}: every pixel value is >= 0 (range {out.min():.3g}..{out.max():.3g}): these look "
            "like raw pixels (0..1 or 0..255), not normalised images, and calibrating on them sets "
            "wrong activation ranges. Normalise them as the model was trained (ImageNet: "
            "ptq4vm_jax.data.imagenet_eval_preprocess, which uint8 pixels get automatically when no "
            "preprocess is given)",
            stacklevel=3,
        )
    return out


def eval_batches(
    source: Any,
    batch_size: int,
    *,
    image_size: int,
    channels: int = 3,
    preprocess: Preprocess | None = None,
    allow_empty: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Labelled source -> ``(images, labels, mask)`` batches of one fixed shape.

    A fixed shape means one compilation of a jitted model; the last batch is zero-padded and
    ``mask`` marks its real rows. Random-access sources are read in index order. An empty source
    is an error unless ``allow_empty`` (one host's share of a tiny multi-host evaluation).
    """
    where = "eval data"
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    buf_x: list[np.ndarray] = []
    buf_y: list[np.ndarray] = []
    pending = 0
    seen = 0
    for elem in _elements(source, None, chunk=batch_size, where=where):
        images, labels = split_element(elem)
        if labels is None:
            raise ValueError(
                f"{where}: evaluation needs labels; got an element without one. Pass "
                "(images, labels), dicts with 'image' and 'label', or a tfds/grain source"
            )
        x, y = _prepare(images, labels, image_size=image_size, preprocess=preprocess, where=where)
        if x.shape[0] == 0:
            continue
        _check_images(x, image_size=image_size, channels=channels, offset=seen, where=where)
        buf_x.append(x)
        buf_y.append(y.astype(np.int32))
        pending += x.shape[0]
        seen += x.shape[0]
        while pending >= batch_size:
            xs, ys = np.concatenate(buf_x), np.concatenate(buf_y)
            yield xs[:batch_size], ys[:batch_size], np.ones(batch_size, bool)
            buf_x, buf_y = [xs[batch_size:]], [ys[batch_size:]]
            pending -= batch_size
    if seen == 0 and not allow_empty:
        raise _empty(source, where)
    if pending:
        xs, ys = np.concatenate(buf_x), np.concatenate(buf_y)
        pad = batch_size - pending
        yield (
            np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), np.float32)]),
            np.concatenate([ys, np.zeros(pad, np.int32)]),
            np.arange(batch_size) < pending,
        )
