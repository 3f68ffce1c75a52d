r"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test images, 32 x 32 RGB, 10 classes.

Book: Part II, chapter 6 (the closed form's alignment with the conditional target, memorisation);
the planned Part III runs it at CIFAR-10 scale.

``load_cifar10(root, split)`` returns ``(images, labels)``: images float (N, 3, 32, 32) in
[-1, 1] (x / 127.5 - 1 of the uint8 pixels), labels int64 (N,) indexing
:data:`CIFAR10_CLASSES`. Sources under ``root``, tried in this order (``source="auto"``):

1. ``cifar-10-batches-py/`` - the official python batches (or ``root`` itself when it holds
   ``data_batch_1``); original order, bit-exact pixels.
2. ``cifar-10-python.tar.gz`` - the official archive, checked against its published MD5 and
   extracted atomically beside it (or into the cache folder when ``root`` is read-only).
   ``download=True`` fetches it from https://www.cs.toronto.edu/~kriz/ when nothing is found.
3. ``cifar10-jpeg.zip`` or ``cifar10-jpeg/`` - a JPEG copy laid out
   ``{train,test}/<class>/NNNN.jpg`` (NNNN = the image's order within its class in the
   original batches). Pixels are JPEG-compressed (about 30 dB PSNR), and the layout does not
   record how the classes interleave in the batches, so images come class-interleaved:
   airplane 0, automobile 0, ..., truck 0, airplane 1, ... (within a class, the original
   order). Decoded once and cached as uint8 (see below).

``source="lossless"`` reads ``cifar10-lossless-subset.npz`` instead: 5,170 training and 1,017
test images of the batches, bit-exact. They are not the first 5,170: paired with the JPEG copy
(chapter 10), the first 1,102 are the batches' first training images and the rest come from
deeper in the batches.

Cache: decoded JPEGs are saved as an .npz beside the source, or, when that folder is
read-only, in ``cache_dir`` / ``NWFLOW_CACHE_DIR`` / ``~/.cache/nwflow``; its key includes
the source's path, size and mtime, so a changed source is decoded again. A load with
``limit`` uses the cache when present and otherwise decodes only the first ``limit``
images (and writes no cache).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from nwflow._checks import check_choice, check_float_dtype, check_optional_positive_int
from nwflow.data import _archive as A

__all__ = ["CIFAR10_CLASSES", "CIFAR10_URL", "CIFAR10_MD5", "load_cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"   # published on the CIFAR home page

_BATCH_DIR = "cifar-10-batches-py"
_ARCHIVE = "cifar-10-python.tar.gz"
_JPEG = "cifar10-jpeg"
_LOSSLESS = "cifar10-lossless-subset.npz"
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_SOURCES = ("auto", "batches", "jpeg", "lossless")


def _read_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official pickled batches: rows of 3072 bytes, the R, G, B planes of 32 x 32 each."""
    images, labels = [], []
    for name in _BATCHES[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch {path} is missing (the folder is incomplete)")
        with open(path, "rb") as f:
            # The official files are Python 2 pickles of dicts; with encoding="bytes" their
            # keys come back as bytes. Only load pickles you trust: this is the published format.
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        lab = batch.get(b"labels", batch.get("labels"))
        if data is None or lab is None:
            raise ValueError(f"{path} is not a CIFAR-10 batch (no data/labels entries)")
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != data.shape[0]:
            raise ValueError(f"{path}: expected (N, 3072) uint8 data and N labels, "
                             f"got {data.shape} and {len(lab)}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(lab, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _read_lossless(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    key = "train" if split == "train" else "test"
    with np.load(path, allow_pickle=False) as f:
        x, y = f[f"x_{key}"], f[f"y_{key}"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != x.shape[:1]:
        raise ValueError(f"{path}: expected x_{key} (N, 32, 32, 3) uint8 and y_{key} (N,), "
                         f"got {x.shape} {x.dtype} and {y.shape}")
    return x.transpose(0, 3, 1, 2), y.astype(np.int64)


def _find(root: Path, source: str, download: bool, cache_dir: str | os.PathLike | None,
          progress: bool) -> tuple[str, Path]:
    """(kind, path) of the first usable source under ``root``."""
    if source == "lossless":
        path = root / _LOSSLESS
        if not path.is_file():
            raise FileNotFoundError(f"source='lossless' needs {path}, which does not exist")
        return "lossless", path
    looked = []
    if source in ("auto", "batches"):
        for folder in (root / _BATCH_DIR, root):
            looked.append(str(folder / "data_batch_1"))
            if (folder / "data_batch_1").is_file():
                return "batches", folder
        archive = root / _ARCHIVE
        looked.append(str(archive))
        if not archive.is_file() and download:
            A.download(CIFAR10_URL, archive, CIFAR10_MD5, progress)
        if archive.is_file():
            dest = root if A.writable(root) else A.work_dir(root, cache_dir)
            return "batches", A.extract_tar(archive, _BATCH_DIR, dest, md5=CIFAR10_MD5)
    if source in ("auto", "jpeg"):
        for path in (root / f"{_JPEG}.zip", root / _JPEG):
            looked.append(str(path))
            if path.exists():
                return "jpeg", path
    hint = "" if download or source == "jpeg" else " Pass download=True to fetch the official archive,"
    raise FileNotFoundError(
        f"no CIFAR-10 found (source={source!r}); looked for: {', '.join(looked)}.{hint} "
        "or point root / NWFLOW_DATA_DIR at a folder holding one of these.")


def load_cifar10(
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    limit: int | None = None,
    source: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as ``(images (N, 3, 32, 32) in [-1, 1], labels (N,) int64)``.

    - ``root``: folder holding one of the sources listed in the module docstring; None means
      ``NWFLOW_DATA_DIR``, or ``~/.cache/nwflow/data`` when that is unset.
    - ``split``: ``"train"`` (50,000) or ``"test"`` (10,000).
    - ``download``: fetch the official archive (MD5-checked) when no source is found.
    - ``limit``: keep the first ``limit`` images (in the source's order).
    - ``source``: ``"auto"``, ``"batches"``, ``"jpeg"`` or ``"lossless"`` (the bit-exact subset).
    - ``cache_dir``: where decoded JPEGs are cached when not beside the source.
    - ``progress``: tqdm bars while downloading or decoding.
    """
    root = A.resolve_root(root)
    split = check_choice(split, "split", ("train", "test"))
    limit = check_optional_positive_int(limit, "limit")
    dtype = check_float_dtype(dtype)
    check_choice(source, "source", _SOURCES)
    kind, path = _find(root, source, download, cache_dir, progress)
    if kind == "batches":
        images, labels = _read_batches(path, split)
    elif kind == "lossless":
        images, labels = _read_lossless(path, split)
    else:
        images, labels = A.load_or_decode(path, f"cifar10-{split}", cache_dir,
                                          lambda files: A.labelled_members(files, split, CIFAR10_CLASSES),
                                          None, 32, limit, f"decode CIFAR-10 {split}", progress)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{path}: labels outside 0..9")
    return A.to_signed_float(images, labels, dtype)
