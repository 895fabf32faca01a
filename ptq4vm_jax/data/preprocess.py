"""The official Vim / PTQ4VM ImageNet eval transform, reproduced with Pillow (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm / Vim eval: Resize(int(image_size / 0.875)) then CenterCrop(image_size).
EVAL_CROP_PCT = 0.875

# A caller's own transform: one raw image -> one float32 (H, W, C) image.
Preprocess = Callable[[np.ndarray], np.ndarray]


def _to_rgb_pil(image: Any):
    from PIL import Image  # (here: only the image transforms need PIL, not the digits path)

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"imagenet_eval_preprocess expects raw uint8 pixels (0..255); got dtype {arr.dtype}. "
            "Float images are treated as already preprocessed: pass them without preprocess=..."
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(arr, mode="RGB" if arr.shape[-1] == 3 else "RGBA").convert("RGB")
    raise ValueError(
        f"imagenet_eval_preprocess expects one image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
        f"got shape {arr.shape}. Pass single images, not batches."
    )


def imagenet_eval_preprocess(
    image: Any, *, image_size: int = 224, resize_size: int | None = None
) -> np.ndarray:
    """The official Vim / PTQ4VM eval transform, reproduced with Pillow so no torch is needed.

    timm ``Resize(resize_size, bicubic)`` on the shorter side, ``CenterCrop(image_size)``,
    ``ToTensor``, ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``, but returning float32 HWC.
    ``resize_size`` defaults to ``int(image_size / 0.875)`` (256 for 224). Grayscale and RGBA
    inputs become RGB the way the official folder loader does (``PIL.Image.convert("RGB")``).
    """
    from PIL import Image

    if resize_size is None:
        resize_size = int(image_size / EVAL_CROP_PCT)
    if resize_size < image_size:
        raise ValueError(
            f"resize_size ({resize_size}) must be >= image_size ({image_size}) for a center crop"
        )
    pil = _to_rgb_pil(image)
    w, h = pil.size
    # torchvision: the shorter side becomes resize_size, the longer one is truncated, not rounded.
    if w <= h:
        size = (resize_size, int(resize_size * h / w))
    else:
        size = (int(resize_size * w / h), resize_size)
    pil = pil.resize(size, Image.BICUBIC)
    # torchvision CenterCrop offsets use Python's round (half to even).
    top = int(round((size[1] - image_size) / 2.0))
    left = int(round((size[0] - image_size) / 2.0))
    pil = pil.crop((left, top, left + image_size, top + image_size))
    x = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
