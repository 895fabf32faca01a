"""Data for calibration and evaluation.

``sources``: any calibration / evaluation source (arrays, iterables, tfds data sources, grain
datasets) -> validated float32 NHWC images in fixed-shape batches; ``preprocess``: the official
ImageNet eval transform; ``labels``: class indices; ``sharding``: per-process shares of a source;
``digits``: the built-in digits data.
"""

from ptq4vm_jax.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits_dataset
from ptq4vm_jax.data.labels import class_labels
from ptq4vm_jax.data.preprocess import (
    EVAL_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    imagenet_eval_preprocess,
)
from ptq4vm_jax.data.sharding import process_share
from ptq4vm_jax.data.sources import calibration_images, eval_batches

__all__ = [
    "DIGITS_MEAN", "DIGITS_STD", "EVAL_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess",
    "calibration_images", "class_labels", "eval_batches", "imagenet_eval_preprocess",
    "load_digits_dataset", "process_share",
]
