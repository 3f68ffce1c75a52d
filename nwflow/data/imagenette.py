r"""Imagenette 2 (Howard 2019): ten easy ImageNet classes, 9,469 training and 3,925 validation images.

Book: Part II, chapters 5 (DINOv2 features) and 6 (dimension sweeps: the same images at 8, 16,
32 and 64 pixels a side); the planned Part III runs the sweeps at full size.

``load_imagenette(root, split, size)`` returns ``(images, labels)``: images float
(N, 3, size, size) in [-1, 1] (x / 127.5 - 1 of the uint8 pixels), labels int64 (N,)
indexing :data:`IMAGENETTE_WNIDS` / :data:`IMAGENETTE_NAMES`. Every image is centre-cropped
to a square and resized to ``size`` by exact area averaging, rounded once to uint8: when the
square's side is a multiple of ``size`` (64 -> 32, 16, 8) each output pixel is the mean of its
block; otherwise input pixels count by their overlap with the output pixel.

Sources under ``root``, the first found wins; each is a folder or a .zip laid out
``{train,val}/<wnid>/<file>`` (with or without one top folder):
``imagenette-64`` (a 64 x 64 copy), ``imagenette2-160``, ``imagenette2-320``, ``imagenette2``
(the official releases; their .tgz archives are extracted atomically on first use).
``download=True`` fetches https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz,
checked against the MD5 listed for it by torchvision's ``Imagenette`` data set.

Order: the official layout has no order beyond file names, so images come class-interleaved
(the first file of each class, then the second, ...; file names sorted within a class), and
any ``limit`` prefix holds all classes. Decoded images are cached per (split, size) exactly
as for CIFAR-10 (see :mod:`nwflow.data.cifar10`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nwflow._checks import check_choice, check_float_dtype, check_int, check_optional_positive_int
from nwflow.data import _archive as A

__all__ = ["IMAGENETTE_WNIDS", "IMAGENETTE_NAMES", "IMAGENETTE_URL", "IMAGENETTE_MD5", "load_imagenette"]

IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")
IMAGENETTE_NAMES = ("tench", "English springer", "cassette player", "chain saw", "church",
                    "French horn", "garbage truck", "gas pump", "golf ball", "parachute")
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
IMAGENETTE_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"

_VARIANTS = ("imagenette-64", "imagenette2-160", "imagenette2-320", "imagenette2")


def _find(root: Path, download: bool, cache_dir: str | os.PathLike | None, progress: bool) -> Path:
    """The first folder or zip of a known variant under ``root`` (extracting a .tgz if needed)."""
    looked = []
    for variant in _VARIANTS:
        for path in (root / variant, root / f"{variant}.zip"):
            looked.append(str(path))
            if path.exists():
                return path
        archive = root / f"{variant}.tgz"
        looked.append(str(archive))
        if archive.is_file():
            dest = root if A.writable(root) else A.work_dir(root, cache_dir)
            md5 = IMAGENETTE_MD5 if archive.name == Path(IMAGENETTE_URL).name else None
            return A.extract_tar(archive, variant, dest, md5=md5)
    if download:
        archive = A.download(IMAGENETTE_URL, root / Path(IMAGENETTE_URL).name, IMAGENETTE_MD5, progress)
        return A.extract_tar(archive, "imagenette2-160", root)
    raise FileNotFoundError(
        f"no Imagenette found; looked for: {', '.join(looked)}. Pass download=True to fetch "
        f"{IMAGENETTE_URL}, or point root / NWFLOW_DATA_DIR at a folder holding one of these.")


def load_imagenette(
    root: str | os.PathLike | None = None,
    split: str = "train",
    size: int = 64,
    limit: int | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Imagenette as ``(images (N, 3, size, size) in [-1, 1], labels (N,) int64)``.

    - ``root``: folder holding one of the sources in the module docstring; None means
      ``NWFLOW_DATA_DIR``, or ``~/.cache/nwflow/data`` when that is unset.
    - ``split``: ``"train"`` (9,469 images) or ``"val"`` (3,925).
    - ``size``: side length after the centre crop and box-filter resize (e.g. 8, 16, 32, 64).
    - ``limit``: keep the first ``limit`` images (class-interleaved order); without a cache
      only those are decoded.
    - ``download``: fetch imagenette2-160.tgz (MD5-checked) when no source is found.
    - ``cache_dir``: where decoded images are cached when not beside the source.
    - ``progress``: tqdm bars while downloading or decoding.

    Class names: ``IMAGENETTE_WNIDS[label]`` and ``IMAGENETTE_NAMES[label]``.
    """
    root = A.resolve_root(root)
    split = check_choice(split, "split", ("train", "val"))
    limit = check_optional_positive_int(limit, "limit")
    dtype = check_float_dtype(dtype)
    size = check_int(size, "size", 1, 1024)
    source = _find(root, download, cache_dir, progress)
    # The 64 px copy is square, so a divisor size is the block mean of the (cached) 64 px
    # images: the same numbers as decoding again at that size, without decoding again.
    native = 64 if source.name.startswith("imagenette-64") and 64 % size == 0 else size
    images, labels = A.load_or_decode(
        source, f"imagenette-{split}-{native}", cache_dir,
        lambda files: A.labelled_members(files, split, IMAGENETTE_WNIDS), native, native, limit,
        f"decode Imagenette {split} at {native}px", progress)
    if native != size:
        images = A.block_mean_u8(images, native // size, (2, 3))
    if labels.size and (labels.min() < 0 or labels.max() >= len(IMAGENETTE_WNIDS)):
        raise ValueError(f"{source}: labels outside 0..9")
    return A.to_signed_float(images, labels, dtype)
