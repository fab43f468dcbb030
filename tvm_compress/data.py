"""Real data, all available offline: Fashion-MNIST, 20 labelled ImageNet photos, unlabelled photos.

* Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (gzip IDX files). The
  official 60,000 training images are split once, by a permutation seeded with 0, into 55,000
  "train" and 5,000 "val"; "calib" is the first 1,000 of "train" (used to calibrate quantizers, so
  it never overlaps the images accuracy is measured on); "test" is the official 10,000.
* ``imagenet_photos`` reads the 20 labelled ImageNet photos shipped in the PyPI package foolbox
  (located on disk, never imported: importing foolbox needs packages we do not install).
* ``real_photos`` cuts random crops from scikit-image's bundled photos. The photos are divided into
  two disjoint sets so that quantization calibrated on "calib" is judged on photos it never saw.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

from tvm_compress.errors import UserError

# the Debian package dataset-fashion-mnist; TVM_COMPRESS_FASHION_MNIST_DIR points elsewhere
FASHION_MNIST_DIR = Path(os.environ.get("TVM_COMPRESS_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_SPLITS = ("train", "val", "calib", "test")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_VAL_SIZE = 5_000
_CALIB_SIZE = 1_000
_SPLIT_SEED = 0

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def pixel_range(task: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (low, high) of a zoo task's normalized inputs: pixels 0..1 after normalizing.

    None for an unknown task (an imported model's preprocessing is not known).
    """
    if task == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif task == "fashion_mnist":
        mean = np.array([FASHION_MNIST_MEAN], np.float32)
        std = np.array([FASHION_MNIST_STD], np.float32)
    else:
        return None
    return (-mean / std).astype(np.float32), ((1 - mean) / std).astype(np.float32)


# scikit-image photos that ship inside the wheel (no network). "cat" is the same picture as
# "chelsea", so only one of them is used; for stereo_motorcycle only the left view is used.
# The sets are disjoint by source photo and mix people/objects/animals/scientific images alike.
PHOTO_SETS: dict[str, tuple[str, ...]] = {
    "calib": ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry"),
    "eval": ("coffee", "chelsea", "stereo_motorcycle", "retina"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzip IDX file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file: reinstall dataset-fashion-mnist")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: reinstall dataset-fashion-mnist")
    return data.reshape(shape)


@functools.lru_cache(maxsize=2)
def _official(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalized images (N,1,28,28) and labels of the official "train" or "t10k" set, read-only."""
    paths = [FASHION_MNIST_DIR / f"{kind}-{what}-idx{n}-ubyte.gz"
             for what, n in (("images", 3), ("labels", 1))]
    for path in paths:
        if not path.is_file():
            raise UserError(f"Fashion-MNIST file {path} is missing: run "
                            "`sudo apt-get install dataset-fashion-mnist`")
    raw_images, raw_labels = (_read_idx(p) for p in paths)
    images = raw_images.astype(np.float32)[:, None] / np.float32(255.0)
    images = (images - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)
    labels = raw_labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _split_indices(split: str) -> np.ndarray:
    order = np.random.default_rng(_SPLIT_SEED).permutation(60_000)
    if split == "val":
        return order[:_VAL_SIZE]
    if split == "train":
        return order[_VAL_SIZE:]
    return order[_VAL_SIZE:_VAL_SIZE + _CALIB_SIZE]  # calib: head of the train split


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of Fashion-MNIST, normalized.

    Parameters
    ----------
    split
        "train" (55,000), "val" (5,000 held out of the official training set), "calib" (the
        first 1,000 images of "train") or "test" (the official 10,000).

    Returns
    -------
    images, labels
        float32 (N, 1, 28, 28) normalized with mean 0.2860 and std 0.3530; int64 (N,). Fresh
        arrays: callers may modify them.
    """
    if split not in FASHION_MNIST_SPLITS:
        raise UserError(f"unknown Fashion-MNIST split {split!r}: use one of "
                        f"{', '.join(FASHION_MNIST_SPLITS)}")
    if split == "test":
        images, labels = _official("t10k")
        return images.copy(), labels.copy()
    images, labels = _official("train")
    index = _split_indices(split)
    return images[index], labels[index]


def preprocess_imagenet(image, *, size: int = 224, resize: int | None = None) -> np.ndarray:
    """Standard ImageNet preprocessing of one PIL image.

    Resizes the shorter side to ``resize`` (bilinear; default ``size * 256 / 224``, i.e. 256 for
    224), center-crops ``size`` x ``size``, scales to [0, 1] and normalizes with the ImageNet mean
    and std. Returns float32 (3, size, size).
    """
    from PIL import Image

    resize = round(size * 256 / 224) if resize is None else resize
    image = image.convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    new_w, new_h = (resize, max(resize, round(h * scale))) if w <= h else \
        (max(resize, round(w * scale)), resize)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return ((array - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def _foolbox_data_dir() -> Path:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package foolbox is not installed (it ships the 20 ImageNet photos): "
                        "run `pip install --no-deps foolbox==3.3.4`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def imagenet_photos() -> tuple[np.ndarray, np.ndarray]:
    """The 20 labelled ImageNet photos shipped by foolbox 3.3.4, preprocessed for ImageNet CNNs.

    Returns
    -------
    images, labels
        float32 (20, 3, 224, 224) and int64 (20,) ImageNet class indices, in file order.
    """
    from PIL import Image

    files = sorted(_foolbox_data_dir().glob("imagenet_*_*.jpg"))
    if len(files) != 20:
        raise UserError(f"expected 20 ImageNet photos in {_foolbox_data_dir()}, found {len(files)}:"
                        " run `pip install --no-deps --force-reinstall foolbox==3.3.4`")
    images, labels = [], []
    for path in files:
        with Image.open(path) as image:
            images.append(preprocess_imagenet(image))
        labels.append(int(path.stem.split("_")[2]))
    return np.stack(images), np.array(labels, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    photo = getattr(skimage.data, name)()
    if isinstance(photo, tuple):  # stereo pairs: keep the left view only
        photo = photo[0]
    photo = np.asarray(photo)
    photo.flags.writeable = False
    return photo


def real_photos(split: str, *, n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """Unlabelled random crops of real photos, normalized like ImageNet inputs.

    Parameters
    ----------
    split
        "calib" or "eval"; the two draw from disjoint sets of source photos (``PHOTO_SETS``).
    n
        Number of crops (>= 1).
    seed
        Seeds the choice of photo, crop scale (30-100% of the shorter side) and position, and
        the horizontal flip; the same seed gives the same crops.
    size
        Output height and width.

    Returns
    -------
    float32 (n, 3, size, size)
    """
    from PIL import Image

    if split not in PHOTO_SETS:
        raise UserError(f"unknown photo split {split!r}: use one of {', '.join(PHOTO_SETS)}")
    if n < 1 or size < 1:
        raise UserError(f"real_photos needs n >= 1 and size >= 1, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    names = PHOTO_SETS[split]
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        photo = _skimage_photo(names[i % len(names)] if i < len(names) else
                               names[rng.integers(len(names))])
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = preprocess_imagenet(crop, size=size, resize=size)
    return out
