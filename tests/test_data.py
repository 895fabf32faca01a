import hashlib
import logging

import grain
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ptq4vm_jax.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    calibration_images,
    eval_batches,
    imagenet_eval_preprocess,
    load_digits_dataset,
)
from ptq4vm_jax.data.digits import _digits_pixels

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)


def normalize(uint8_hwc):
    return (uint8_hwc.astype(np.float32) / np.float32(255.0) - MEAN) / STD


@pytest.fixture
def imagenet_src():
    """The tfds ImageNet train split, mocked: 10 random uint8 images of random sizes."""
    with tfds.testing.mock_data(num_examples=10):
        yield tfds.data_source("imagenet2012", split="train")


# ------------------------------------------------------------------ imagenet_eval_preprocess


def test_preprocess_crops_center_of_256_image_and_normalizes_exactly():
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = imagenet_eval_preprocess(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, normalize(img[16:240, 16:240]))


def test_preprocess_crop_offset_rounds_half_to_even_like_torchvision():
    # Shorter side already 256 -> no resampling; (341 - 224) / 2 = 58.5 -> round() = 58.
    img = np.random.default_rng(1).integers(0, 256, (256, 341, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imagenet_eval_preprocess(img), normalize(img[16:240, 58:282]))


def test_preprocess_resizes_shorter_side_and_keeps_constants():
    img = np.full((300, 500, 3), (10, 128, 250), np.uint8)
    out = imagenet_eval_preprocess(img, image_size=32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out, np.broadcast_to(normalize(img[:1, :1]), out.shape), atol=1e-6)


def test_preprocess_resize_uses_bicubic_on_the_shorter_side():
    from PIL import Image

    img = np.random.default_rng(2).integers(0, 256, (100, 60, 3), dtype=np.uint8)
    # Shorter side (width 60) -> 256, height int(256 * 100 / 60) = 426, crop rows 101..325.
    big = np.asarray(Image.fromarray(img).resize((256, 426), Image.BICUBIC))
    np.testing.assert_array_equal(imagenet_eval_preprocess(img), normalize(big[101:325, 16:240]))


@pytest.mark.parametrize("shape", [(40, 40), (40, 40, 1)])
def test_preprocess_grayscale_becomes_rgb(shape):
    img = np.full(shape, 77, np.uint8)
    out = imagenet_eval_preprocess(img, image_size=32)
    np.testing.assert_allclose(out, np.broadcast_to((77 / 255 - MEAN) / STD, (32, 32, 3)), atol=1e-6)


def test_preprocess_rgba_drops_alpha():
    rgb = np.random.default_rng(3).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((50, 40, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(
        imagenet_eval_preprocess(rgba, image_size=32), imagenet_eval_preprocess(rgb, image_size=32)
    )


def test_preprocess_errors():
    with pytest.raises(ValueError, match="expects raw uint8 pixels.*got dtype float32"):
        imagenet_eval_preprocess(np.zeros((40, 40, 3), np.float32))
    with pytest.raises(ValueError, match="Pass single images, not batches"):
        imagenet_eval_preprocess(np.zeros((2, 40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"resize_size \(20\) must be >= image_size \(32\)"):
        imagenet_eval_preprocess(np.zeros((40, 40, 3), np.uint8), image_size=32, resize_size=20)


# ------------------------------------------------------------------ calibration_images


def test_calibration_from_numpy_and_jax_arrays_takes_first_images():
    x = np.random.default_rng(0).normal(size=(10, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(calibration_images(x, 4, image_size=32), x[:4])
    np.testing.assert_array_equal(calibration_images(jnp.asarray(x), 10, image_size=32), x)


def test_calibration_from_a_torch_tensor():
    import torch  # a dev dependency (pyproject.toml [dev])
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(calibration_images(torch.from_numpy(x), 3, image_size=8), x)
    grad = torch.from_numpy(x).requires_grad_(True)  # np.asarray alone refuses these two
    np.testing.assert_array_equal(calibration_images(grad, 3, image_size=8), x)
    half = torch.from_numpy(x).bfloat16()
    np.testing.assert_array_equal(calibration_images(half, 3, image_size=8), half.float().numpy())


def test_calibration_warns_about_raw_pixels_but_not_normalised_images():
    rng = np.random.default_rng(0)
    for raw in (rng.uniform(0, 1, (4, 8, 8, 3)), rng.uniform(0, 255, (4, 8, 8, 3))):
        with pytest.warns(UserWarning, match="look like raw pixels"):
            calibration_images(raw.astype(np.float32), 4, image_size=8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_images(rng.normal(size=(4, 8, 8, 3)).astype(np.float32), 4, image_size=8)
        calibration_images(rng.integers(0, 256, (4, 300, 260, 3)).astype(np.uint8), 4, image_size=224)


def test_calibration_from_iterables_of_batches_and_dicts():
    x = np.random.default_rng(0).normal(size=(10, 8, 8, 3)).astype(np.float32)
    batches = [x[:3], x[3:6], x[6:]]
    np.testing.assert_array_equal(calibration_images(batches, 5, image_size=8), x[:5])
    gen = ({"image": b, "label": np.zeros(len(b))} for b in batches)
    np.testing.assert_array_equal(calibration_images(gen, 7, image_size=8), x[:7])
    singles = [(im, 0) for im in x]
    np.testing.assert_array_equal(calibration_images(singles, 2, image_size=8), x[:2])


def test_calibration_from_tfds_source_uses_seeded_permutation(imagenet_src, caplog):
    order = np.random.default_rng(0).permutation(len(imagenet_src))[:4]
    with caplog.at_level(logging.INFO, logger="ptq4vm_jax.data"):
        got = calibration_images(imagenet_src, 4, image_size=32)
    want = np.stack([imagenet_eval_preprocess(imagenet_src[int(i)]["image"], image_size=32)
                     for i in order])
    assert got.shape == (4, 32, 32, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert str(order.tolist()) in caplog.text
    first = calibration_images(imagenet_src, 2, image_size=32, seed=None)
    np.testing.assert_array_equal(first[1], imagenet_eval_preprocess(imagenet_src[1]["image"],
                                                                     image_size=32))


def test_calibration_custom_preprocess(imagenet_src):
    pre = lambda im: np.full((16, 16, 3), -im.shape[0], np.float32)  # (negative: normalised-looking)
    got = calibration_images(imagenet_src, 3, image_size=16, preprocess=pre, seed=None)
    heights = [imagenet_src[i]["image"].shape[0] for i in range(3)]
    np.testing.assert_array_equal(-got[:, 0, 0, 0], heights)


def test_calibration_from_grain_map_and_iter_datasets(imagenet_src):
    ds = grain.MapDataset.source(imagenet_src)
    np.testing.assert_array_equal(
        calibration_images(ds, 3, image_size=32), calibration_images(imagenet_src, 3, image_size=32)
    )
    it = ds.to_iter_dataset()
    want = np.stack([imagenet_eval_preprocess(imagenet_src[i]["image"], image_size=32)
                     for i in range(3)])
    np.testing.assert_array_equal(calibration_images(it, 3, image_size=32), want)
    x = np.random.default_rng(0).normal(size=(7, 8, 8, 3)).astype(np.float32)
    batched = grain.MapDataset.source(list(x)).batch(3)  # elements are batches of 3, 3, 1
    got = calibration_images(batched, 7, image_size=8, seed=None)
    np.testing.assert_array_equal(got, x)


def test_calibration_repeated_grain_dataset_needs_seed_none():
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    ds = grain.MapDataset.source(list(x)).repeat()  # len() is huge
    with pytest.raises(ValueError, match="repeated/infinite dataset.*seed=None"):
        calibration_images(ds, 2, image_size=8)
    np.testing.assert_array_equal(calibration_images(ds, 5, image_size=8, seed=None),
                                  np.concatenate([x, x[:2]]))


def test_calibration_skips_empty_batches():
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    batches = [np.zeros((0, 8, 8, 3), np.uint8), x[:1], np.zeros((0, 5, 5, 3), np.float32), x[1:]]
    np.testing.assert_array_equal(calibration_images(batches, 3, image_size=8), x)


def test_calibration_too_few_images():
    with pytest.raises(ValueError, match="asked for 8 calibration images but the dataset has only 5"):
        calibration_images(np.zeros((5, 8, 8, 3), np.float32), 8, image_size=8)
    with pytest.raises(ValueError, match="only 6"):
        calibration_images([np.zeros((3, 8, 8, 3), np.float32)] * 2, 7, image_size=8)


def test_calibration_too_few_images_in_tfds_source(imagenet_src):
    with pytest.raises(ValueError, match="asked for 11 calibration images .* only 10"):
        calibration_images(imagenet_src, 11, image_size=16)


@pytest.mark.parametrize("source", [np.zeros((0, 8, 8, 3), np.float32), [], iter(()),
                                    grain.MapDataset.source([])])
def test_calibration_empty_dataset(source):
    with pytest.raises(ValueError, match="empty"):
        calibration_images(source, 1, image_size=8)


def test_calibration_wrong_size_says_expected_and_how_to_fix():
    with pytest.raises(ValueError, match=r"expected images of shape \(H, W, C\) = \(32, 32, 3\), "
                                         r"got \(28, 28, 3\).*resize/crop.*image_size"):
        calibration_images(np.zeros((4, 28, 28, 3), np.float32), 2, image_size=32)


def test_calibration_channels_first_and_wrong_channel_count():
    with pytest.raises(ValueError, match="channels-first"):
        calibration_images(np.zeros((4, 3, 32, 32), np.float32), 2, image_size=32)
    with pytest.raises(ValueError, match=r"got \(32, 32, 1\).*convert them to 3 channels"):
        calibration_images(np.zeros((4, 32, 32, 1), np.float32), 2, image_size=32)


def test_calibration_non_finite_pixels_are_located():
    x = np.full((6, 8, 8, 3), -0.5, np.float32)
    x[4, 1, 2, 0] = np.nan
    x[5, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite .* image\(s\) #\[4, 5\]"):
        calibration_images(x, 6, image_size=8)
    # A bad image after the ones requested is never read.
    np.testing.assert_array_equal(calibration_images(x, 4, image_size=8), x[:4])


@pytest.mark.parametrize("dtype", [bool, np.complex64, object])
def test_calibration_non_image_dtype(dtype):
    with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype)} are not image data"):
        calibration_images(np.zeros((2, 8, 8, 3), dtype), 1, image_size=8)


def test_calibration_raw_uint8_gets_imagenet_transform_by_default():
    x = np.random.default_rng(0).integers(0, 256, (2, 36, 36, 3), dtype=np.uint8)
    got = calibration_images(x, 2, image_size=32)
    np.testing.assert_array_equal(got[1], normalize(x[1, 2:34, 2:34]))


def test_calibration_bad_arguments_and_elements():
    with pytest.raises(ValueError, match="positive integer"):
        calibration_images(np.zeros((2, 8, 8, 3), np.float32), 0, image_size=8)
    with pytest.raises(ValueError, match="need an 'image' key; got keys \\['img'\\]"):
        calibration_images([{"img": np.zeros((8, 8, 3), np.float32)}], 1, image_size=8)
    with pytest.raises(TypeError, match="unsupported data source of type int"):
        calibration_images(5, 1, image_size=8)
    with pytest.raises(TypeError, match=r"is for the command line; in Python pass tfds\.data_source"):
        calibration_images("tfds:imagenet2012:train", 1, image_size=8)
    with pytest.raises(TypeError, match="element of type str"):
        calibration_images(["a.jpg"], 1, image_size=8)


# ------------------------------------------------------------------ eval_batches


def test_eval_batches_pad_last_batch_with_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 5, 10)
    batches = list(eval_batches((x, y), 4, image_size=8))
    assert len(batches) == 3
    for images, labels, mask in batches:
        assert images.shape == (4, 8, 8, 3) and labels.shape == (4,) and mask.shape == (4,)
        assert labels.dtype == np.int32 and mask.dtype == bool
    assert batches[-1][2].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(batches[-1][0][2:], 0)
    images = np.concatenate([b[0][b[2]] for b in batches])
    labels = np.concatenate([b[1][b[2]] for b in batches])
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


def test_eval_batches_exact_multiple_has_no_padding():
    x = np.zeros((8, 8, 8, 3), np.float32)
    batches = list(eval_batches({"image": x, "label": np.arange(8)}, 4, image_size=8))
    assert len(batches) == 2 and all(b[2].all() for b in batches)


def test_eval_batches_from_tfds_and_grain_in_index_order(imagenet_src):
    labels = [int(imagenet_src[i]["label"]) for i in range(10)]
    for source in (imagenet_src, grain.MapDataset.source(imagenet_src),
                   grain.MapDataset.source(imagenet_src).to_iter_dataset()):
        batches = list(eval_batches(source, 4, image_size=32))
        assert [b[0].shape for b in batches] == [(4, 32, 32, 3)] * 3
        got = np.concatenate([b[1][b[2]] for b in batches])
        np.testing.assert_array_equal(got, labels)
        np.testing.assert_array_equal(
            batches[1][0][0], imagenet_eval_preprocess(imagenet_src[4]["image"], image_size=32)
        )


def test_eval_batches_errors():
    x = np.zeros((3, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="evaluation needs labels"):
        list(eval_batches(x, 2, image_size=8))
    with pytest.raises(ValueError, match="empty"):
        list(eval_batches((x[:0], np.zeros(0)), 2, image_size=8))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        list(eval_batches((x, np.zeros(2)), 2, image_size=8))
    with pytest.raises(ValueError, match=r"2 image\(s\) but 3 label\(s\)"):
        list(eval_batches([{"image": x[:2], "label": np.zeros(3)}], 2, image_size=8))
    with pytest.raises(ValueError, match=r"= \(16, 16, 3\), got \(8, 8, 3\)"):
        list(eval_batches((x, np.zeros(3)), 2, image_size=16))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(eval_batches((x, np.zeros(3)), 0, image_size=8))


# ------------------------------------------------------------------ digits


def test_digits_split_is_fixed():
    x_tr, y_tr = load_digits_dataset("train")
    x_te, y_te = load_digits_dataset("test")
    assert x_tr.shape == (1442, 32, 32, 3) and x_te.shape == (355, 32, 32, 3)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    digest = lambda y: hashlib.sha256(y.astype("<i4").tobytes()).hexdigest()[:16]
    assert digest(y_tr) == "bec3b788b6434874"
    assert digest(y_te) == "63e8dadd68cb18c9"
    assert np.bincount(y_te).tolist() == [35, 36, 35, 36, 36, 36, 36, 35, 34, 36]


def test_digits_pixels_are_pinned_and_each_call_gets_its_own_arrays():
    """The images every bundled model and logged result was made with (SHA-256 of the bytes);
    scikit-learn's digits are read once per process, so a caller that writes into its arrays
    must not change what the next caller gets."""
    digest = lambda a: hashlib.sha256(a.tobytes()).hexdigest()[:16]
    x, y = load_digits_dataset("test")
    assert digest(x) == "5fb6d9a546473947"
    assert digest(load_digits_dataset("train")[0]) == "e20687ca42442f38"
    assert digest(load_digits_dataset("test", image_size=16)[0]) == "c1cda219fae83df0"
    x[:] = 0.0
    y[:] = -1
    again_x, again_y = load_digits_dataset("test")
    assert digest(again_x) == "5fb6d9a546473947" and again_y.min() == 0


def test_digits_splits_partition_sklearn_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ids = {img.tobytes(): i for i, img in enumerate(raw.images)}
    found = {}
    for split in ("train", "test"):
        # At 8 px the bilinear matrix is the identity: the pixels are sklearn's, divided by 16.
        pixels, labels = _digits_pixels(split, 8)
        found[split] = [ids[(p * 16).tobytes()] for p in pixels]
        np.testing.assert_array_equal(raw.target[found[split]], labels)
    assert not set(found["train"]) & set(found["test"])
    assert len(found["train"]) + len(found["test"]) == len(ids) == 1797


def test_digits_normalisation_and_channels():
    x, _ = load_digits_dataset("train")
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_array_equal(x, load_digits_dataset("train")[0])
    assert load_digits_dataset("test", image_size=16)[0].shape == (355, 16, 16, 3)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_digits_dataset("val")
    with pytest.raises(ValueError, match="image_size must be an integer >= 8"):
        load_digits_dataset("train", image_size=4)


def test_process_shares_are_disjoint_and_cover_the_source():
    from ptq4vm_jax.data import process_share

    x = np.arange(11 * 2, dtype=np.float32).reshape(11, 2)
    y = np.arange(11)

    class RandomAccess:  # a tfds/grain-like source: len + getitem of examples
        def __len__(self):
            return 11

        def __getitem__(self, i):
            return {"image": x[i], "label": y[i]}

    for limit in (None, 7):
        want = list(y[:limit])
        for source, labels_of in [
            (x, lambda share: [int(r[0]) // 2 for r in share]),
            ((x, y), lambda share: list(share[1])),
            ({"image": x, "label": y}, lambda share: list(share[1])),
            (RandomAccess(), lambda share: [share[i]["label"] for i in range(len(share))]),
            ([{"image": x[i], "label": y[i]} for i in range(11)], lambda share: [e["label"] for e in share]),
        ]:
            shares = [labels_of(process_share(source, i, 3, limit=limit)) for i in range(3)]
            assert sorted(v for s in shares for v in s) == want, (type(source), limit)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match=r"process index 3 is not in \[0, 3\)"):
        process_share(x, 3, 3)
