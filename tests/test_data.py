"""Real data loaders: Fashion-MNIST splits, the 20 ImageNet photos, scikit-image photo crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_compress import data
from tvm_compress.errors import UserError

SIZES = {"train": 55_000, "val": 5_000, "calib": 1_000, "test": 10_000}


@pytest.mark.parametrize("split", list(SIZES))
def test_fashion_mnist_shapes_and_dtypes(split: str) -> None:
    images, labels = data.fashion_mnist(split)
    assert images.shape == (SIZES[split], 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (SIZES[split],) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))


def test_fashion_mnist_normalization() -> None:
    images, _ = data.fashion_mnist("train")
    assert abs(float(images.mean())) < 0.01 and abs(float(images.std()) - 1.0) < 0.01
    # Pixel 0 and 255 map to the ends of the normalized range.
    assert np.isclose(images.min(), -0.2860 / 0.3530, atol=1e-5)
    assert np.isclose(images.max(), (1 - 0.2860) / 0.3530, atol=1e-5)


def test_fashion_mnist_test_split_is_balanced_official_set() -> None:
    _, labels = data.fashion_mnist("test")
    assert np.bincount(labels).tolist() == [1000] * 10


def test_splits_partition_the_official_training_set() -> None:
    train, val, calib = (data._split_indices(s) for s in ("train", "val", "calib"))
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(60_000))
    assert not set(val) & set(train)
    assert np.array_equal(calib, train[:1000])
    train_images, train_labels = data.fashion_mnist("train")
    calib_images, calib_labels = data.fashion_mnist("calib")
    assert np.array_equal(calib_images, train_images[:1000])
    assert np.array_equal(calib_labels, train_labels[:1000])


def test_fashion_mnist_is_deterministic_and_returns_fresh_arrays() -> None:
    a, la = data.fashion_mnist("val")
    a[:] = 0  # callers may modify what they get without corrupting the cache
    b, lb = data.fashion_mnist("val")
    c, _ = data.fashion_mnist("val")
    assert np.array_equal(b, c) and np.array_equal(la, lb)
    assert float(np.abs(b).sum()) > 0


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(UserError, match="train, val, calib, test"):
        data.fashion_mnist("training")


def test_missing_files_tell_how_to_install(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    data._official.cache_clear()
    try:
        with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
            data.fashion_mnist("test")
    finally:
        data._official.cache_clear()


def test_preprocess_imagenet_resizes_crops_and_normalizes() -> None:
    from PIL import Image

    image = Image.new("RGB", (300, 200), (255, 0, 128))
    out = data.preprocess_imagenet(image)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    expected = (np.array([1.0, 0.0, 128 / 255]) - data.IMAGENET_MEAN) / data.IMAGENET_STD
    assert np.allclose(out.mean((1, 2)), expected, atol=1e-5)
    assert data.preprocess_imagenet(image.convert("L"), size=64).shape == (3, 64, 64)


def test_imagenet_photos(imagenet_photos) -> None:  # noqa: ANN001
    images, labels = imagenet_photos
    assert images.shape == (20, 3, 224, 224) and images.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist()[:3] == [243, 559, 438]
    assert np.all(np.abs(images.mean((0, 2, 3))) < 0.3)


def test_imagenet_preprocessing_matches_the_published_weights(imagenet_photos,  # noqa: ANN001
                                                              mobilenet_v2_torch) -> None:
    images, labels = imagenet_photos
    with torch.no_grad():
        predicted = mobilenet_v2_torch(torch.from_numpy(images)).argmax(1).numpy()
    # REFERENCE.md: the fp32 model gets 18 of the 20 right with standard preprocessing.
    assert int((predicted == labels).sum()) >= 17


def test_real_photo_sets_are_disjoint() -> None:
    calib, evaluation = (set(data.PHOTO_SETS[s]) for s in ("calib", "eval"))
    assert not calib & evaluation
    # "cat" is the same picture as "chelsea": it must not hide in the other set.
    assert not {"cat", "chelsea"} <= calib | evaluation


def test_real_photos_shapes_determinism_and_seeds() -> None:
    a = data.real_photos("calib", n=6, seed=3, size=64)
    b = data.real_photos("calib", n=6, seed=3, size=64)
    c = data.real_photos("calib", n=6, seed=4, size=64)
    assert a.shape == (6, 3, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.isfinite(a)) and float(a.std()) > 0.2


def test_real_photos_splits_differ_and_reject_unknown() -> None:
    calib = data.real_photos("calib", n=4, size=32)
    evaluation = data.real_photos("eval", n=4, size=32)
    assert not np.allclose(calib, evaluation)
    with pytest.raises(UserError, match="calib, eval"):
        data.real_photos("test", n=1)
    with pytest.raises(UserError, match="n >= 1"):
        data.real_photos("eval", n=0)
