"""Fashion-MNIST from the original idx files (Xiao et al., 2017), read without torchvision.

The four files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, gzip-compressed (``.gz``, as
Debian's ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``)
or not. idx format: big-endian magic ``0x0000 <dtype> <ndim>``, ``ndim`` big-endian uint32
sizes, then the data.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DATA = "DFPGEN_FASHION_MNIST"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and standard deviation of the 60000 training images scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataNotFoundError(FileNotFoundError):
    """The Fashion-MNIST idx files are not in the directory; the message says how to get them."""


def how_to_get(directory: str) -> str:
    return (f"Fashion-MNIST idx files not found in {directory!r}. Install them with "
            f"'apt-get install dataset-fashion-mnist' (Debian/Ubuntu, as root; files land in "
            f"{DEFAULT_DIR}), or download the four *-ubyte.gz files from "
            f"https://github.com/zalandoresearch/fashion-mnist and pass --data DIR "
            f"(or set ${ENV_DATA}).")


def default_dir() -> str:
    return os.environ.get(ENV_DATA) or DEFAULT_DIR


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataNotFoundError(how_to_get(directory))


def read_idx(path: str) -> np.ndarray:
    """Read one idx file (``.gz`` or plain) into a numpy array of its stored dtype and shape.

    Raises ``ValueError`` if the header is malformed or the payload is truncated.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    payload = data[4 + 4 * ndim:]
    if len(payload) < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated ({len(payload)} bytes for {dims} x {dtype})")
    return np.frombuffer(payload, dtype=dtype, count=count).reshape(dims)


def load_split(split: str, directory: str | None = None, limit: int | None = None,
               normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of Fashion-MNIST as tensors.

    Returns ``images`` float32 ``(N, 1, 28, 28)`` (scaled to [0, 1], then standardised with the
    training set's mean and std when ``normalize``) and ``labels`` int64 ``(N,)``; ``limit``
    keeps the first N images. Raises :class:`DataNotFoundError` (with how to get the data) if
    the files are missing, ``ValueError`` for an unknown split or mismatched files.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = directory or default_dir()
    if not os.path.isdir(directory):
        raise DataNotFoundError(how_to_get(directory))
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: {split} images {images.shape} and labels "
                         f"{labels.shape} do not match")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def available(directory: str | None = None) -> bool:
    """True if all four files are present in ``directory``."""
    directory = directory or default_dir()
    try:
        for stems in _FILES.values():
            for stem in stems:
                _find(directory, stem)
    except DataNotFoundError:
        return False
    return True
