"""One check of the images a model is given, shared by every architecture."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_torch(value: Any) -> bool:
    return type(value).__module__.partition(".")[0] == "torch"


def from_torch(images: Any) -> Any:
    """A torch tensor as a numpy array (off the autograd graph and the GPU; a float tensor as
    float32, since bf16 has no numpy twin); anything else as it is."""
    if not _is_torch(images):
        return images
    tensor = images.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def check_images(images: jax.Array, want: tuple[int, int, int], arch: str) -> None:
    """Refuse images the model would silently misread: wrong layout or size, raw integer pixels,
    an empty batch, and (outside jit, where values are known) NaN/inf pixels."""
    if not hasattr(images, "shape"):
        hint = ("take the images out of the batch: images = batch['image']" if isinstance(images, dict)
                else "stack them into one array first: np.stack(images)")
        raise TypeError(f"{arch} expects one array of NHWC images (batch, {want[0]}, {want[1]}, {want[2]}), "
                        f"got a {type(images).__name__}; {hint}")
    shape = tuple(images.shape)
    size = want[0]
    if len(shape) != 4 or shape[1:] != want:
        if len(shape) == 4 and shape[1:] == (want[2], want[0], want[1]):
            hint = "They look channels-first (NCHW): transpose to NHWC, e.g. x.transpose(0, 2, 3, 1)."
        elif len(shape) == 3 and shape == want:
            hint = "That is one image: add a batch axis, e.g. x[None]."
        elif len(shape) == 1:
            hint = "A 1-D array looks like labels, not images."
        elif len(shape) == 4 and shape[1:3] == want[:2]:
            hint = f"They have {shape[3]} channels and the model takes {want[2]}."
        else:
            hint = (f"Resize/crop to {size}px (see ptq4vm_jax.data.imagenet_eval_preprocess) or "
                    "build the model with img_size=...")
        raise ValueError(f"{arch} expects NHWC images of shape (batch, {want[0]}, {want[1]}, "
                         f"{want[2]}); got {shape}. {hint}")
    if _is_torch(images):
        raise TypeError(f"{arch} got a torch tensor; jax takes numpy or jax arrays: pass "
                        "images.detach().cpu().numpy() (quantized_apply converts one itself)")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{arch} expects normalised float images, got dtype {images.dtype}; preprocess raw "
            "pixels first (ptq4vm_jax.data.imagenet_eval_preprocess: resize, crop, ImageNet "
            "mean/std)"
        )
    if shape[0] == 0:
        raise ValueError(f"{arch} got an empty batch (0 images)")
    try:
        if not getattr(images, "is_fully_addressable", True):  # other hosts hold part of it
            return
        if bool(jnp.isfinite(images).all()):  # on the device: one boolean comes back
            return
    except jax.errors.ConcretizationTypeError:  # under jit: values unknown until run time
        return
    finite = np.isfinite(np.asarray(images, np.float32)).reshape(shape[0], -1).all(axis=1)
    raise ValueError(f"{arch}: image(s) #{np.flatnonzero(~finite)[:10].tolist()} of the batch hold "
                     "NaN/inf pixels; fix the preprocessing or drop them")
