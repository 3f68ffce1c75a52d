"""File plumbing shared by the image loaders: locating roots, downloading with a checksum,
atomic extraction, reading images from a zip or a folder, and an atomic decode cache.

Nothing here is specific to one data set; ``cifar10.py`` and ``imagenette.py`` use it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nwflow._checks import check_instance
from nwflow._progress import progress_bar
from nwflow.settings import data_dir

# Bump when the layout of cached arrays changes: old cache files then miss and are rebuilt.
CACHE_VERSION = 1
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# -- roots and arguments ----------------------------------------------------------------
def default_root() -> Path:
    """Where loaders look when ``root=None``: ``NWFLOW_DATA_DIR``, else ``~/.cache/nwflow/data``."""
    return data_dir() or _user_cache() / "data"


def resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        return default_root()
    check_instance(root, "root", (str, os.PathLike), "a path or None")
    return Path(root).expanduser()


def to_signed_float(images: np.ndarray, labels: np.ndarray, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> float in [-1, 1] via x / 127.5 - 1 (0 -> -1, 255 -> 1); labels int64."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(dtype).div_(127.5).sub_(1.0)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "nwflow"


def writable(folder: Path) -> bool:
    """A folder we may add files to: it grants write permission and has a write bit set. The
    bits matter for root, whom os.access always lets write: a shared data folder made
    read-only with chmod (r-x) must stay untouched even then."""
    return (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
            and bool(stat.S_IMODE(folder.stat().st_mode) & 0o222))


def work_dir(source_parent: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Where derived files go: ``cache_dir``, else ``NWFLOW_CACHE_DIR``, else beside the source
    when that folder is writable, else ``~/.cache/nwflow`` (``$XDG_CACHE_HOME/nwflow``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("NWFLOW_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return source_parent if writable(source_parent) else _user_cache()


# -- download and extraction ------------------------------------------------------------
def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` (via a temporary file renamed into place) and check its MD5.

    A mismatch removes the partial file and raises ValueError, so a later call starts clean.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                              enabled=progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != md5:
            raise ValueError(f"checksum mismatch for {url}: got MD5 {h.hexdigest()}, expected {md5}; "
                             "the download was discarded")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def extract_tar(archive: Path, member_dir: str, dest_parent: Path, md5: str | None = None) -> Path:
    """Extract the folder ``member_dir`` of a tar archive to ``dest_parent / member_dir``, atomically.

    Extraction goes to a temporary folder beside the target, which is renamed into place
    only when complete: an interrupted run never leaves a half-filled data folder. Member
    paths that would escape the target (absolute or with '..') are refused.
    """
    target = dest_parent / member_dir
    if target.is_dir():
        return target
    if md5 is not None and md5sum(archive) != md5:
        raise ValueError(f"{archive} does not have the published MD5 {md5}: delete it and download again")
    dest_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_parent, prefix=f".{member_dir}.", suffix=".extract"))
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or m.issym() or m.islnk():
                    raise ValueError(f"refusing to extract unsafe member {m.name!r} from {archive}")
            wanted = [m for m in members if Path(m.name).parts[:1] == (member_dir,)]
            if not wanted:
                raise ValueError(f"{archive} holds no folder {member_dir!r}")
            # The "data" filter (Python >= 3.11.4 / 3.12) re-checks what the loop above refused.
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=wanted, **safety)
        try:
            os.replace(tmp / member_dir, target)
        except OSError:
            if not target.is_dir():   # lost a race to another process: its copy is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- image archives ---------------------------------------------------------------------
class ImageFiles:
    """Image files of a zip archive or a folder, named by their '/'-separated relative paths."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._zip is not None:
            self._zip.close()

    def names(self) -> list[str]:
        if self._zip is not None:
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            names = [Path(dirpath, f).relative_to(self.path).as_posix()
                     for dirpath, _, files in os.walk(self.path) for f in files]
        return [n for n in names if n.lower().endswith(_IMAGE_SUFFIXES)]

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()


def split_members(names: list[str], split: str) -> list[tuple[str, str, str]]:
    """(member name, class folder, file name) of every image whose path ends in
    ``<split>/<class>/<file>`` (with or without a leading top folder)."""
    out = []
    for n in names:
        parts = n.split("/")
        if len(parts) >= 3 and parts[-3] == split:
            out.append((n, parts[-2], parts[-1]))
    return out


def labelled_members(files: ImageFiles, split: str, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Member names of one split laid out ``<split>/<class>/<file>``, class-interleaved (see
    :func:`interleave`), and their labels ``classes.index(<class>)`` as int64 (N,).

    Raises ``ValueError`` for a class folder not in ``classes`` or a split with no images.
    """
    found = split_members(files.names(), split)
    unknown = sorted({c for _, c, _ in found} - set(classes))
    if unknown:
        raise ValueError(f"{files.path}: unknown class folder(s) {unknown}; expected {tuple(classes)}")
    if not found:
        raise ValueError(f"{files.path} holds no images under {split}/<class>/")
    order = interleave([(classes.index(c), f) for _, c, f in found])
    names = [found[i][0] for i in order]
    labels = np.array([classes.index(found[i][1]) for i in order], dtype=np.int64)
    return names, labels


@functools.lru_cache(maxsize=32)
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) area-averaging weights: W[i, j] = overlap of input pixel [j, j + 1) with
    output cell [i s, (i + 1) s), s = n_in / n_out, divided by s (rows sum to 1)."""
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(lo + s, j + 1) - np.maximum(lo, j), 0.0, None) / s


def block_mean_u8(a: np.ndarray, f: int, axes: tuple[int, int]) -> np.ndarray:
    """Mean over f x f blocks of the two ``axes`` of a uint8 array, rounded half up, as uint8.

    Integer arithmetic: floor(sum / f^2 + 1/2) = (2 sum + f^2) // (2 f^2), no float temporaries.
    """
    shape = list(a.shape)
    h, w = axes
    blocked = a.reshape(shape[:h] + [shape[h] // f, f] + shape[h + 1:w] + [shape[w] // f, f] + shape[w + 1:])
    total = blocked.sum(axis=(h + 1, w + 2), dtype=np.uint32)
    return ((2 * total + f * f) // (2 * f * f)).astype(np.uint8)


def decode_image(data: bytes, size: int | None, name: str) -> np.ndarray:
    """One image as (H, W, 3) uint8 RGB; with ``size``, the centre square resized to size x size.

    The resize averages areas exactly and rounds once (halves up): for an integer factor f each
    output pixel is the mean of an f x f block; otherwise each input pixel counts by its overlap
    with the output pixel (Pillow's resize rounds after each axis and its box filter weighs whole
    pixels, so neither is used).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            a = np.asarray(im.convert("RGB"))
    except OSError as err:
        raise ValueError(f"cannot decode image {name}: {err}") from None
    h, w = a.shape[:2]
    if size is None or (h, w) == (size, size):
        return a
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top:top + s, left:left + s]
    if s % size == 0:
        return block_mean_u8(a, s // size, (0, 1))
    wts = area_weights(s, size)
    return np.floor(np.einsum("ij,jkc,lk->ilc", wts, a.astype(np.float64), wts) + 0.5).astype(np.uint8)


def decode_many(files: ImageFiles, names: list[str], size: int | None, desc: str, progress: bool,
                check: Callable[[np.ndarray, str], None]) -> np.ndarray:
    """Decode ``names`` in order into one (N, 3, H, W) uint8 array.

    Bytes are read in the calling thread (zip reads share one file handle) and decoded by a
    small thread pool: Pillow releases the GIL while decoding.
    """
    if not names:
        raise ValueError(f"no images to decode in {files.path}")
    workers = max(1, min(8, os.cpu_count() or 1))
    out: np.ndarray | None = None
    block = 512
    with ThreadPoolExecutor(workers) as pool, progress_bar(total=len(names), desc=desc, unit="img",
                                                           enabled=progress) as bar:
        for start in range(0, len(names), block):
            chunk = names[start:start + block]
            blobs = [files.read(n) for n in chunk]
            arrays = list(pool.map(decode_image, blobs, [size] * len(chunk), chunk))
            for a, n in zip(arrays, chunk, strict=True):
                check(a, n)
            if out is None:
                h, w = arrays[0].shape[:2]
                out = np.empty((len(names), 3, h, w), dtype=np.uint8)
            out[start:start + len(chunk)] = np.stack(arrays).transpose(0, 3, 1, 2)
            bar.update(len(chunk))
    return out


def interleave(items: list[tuple[int, str]]) -> list[int]:
    """Order (class index, file name) items class-interleaved: the first file of each class,
    then the second of each, ...; within a class, by file name (numeric stems numerically).

    Any prefix of the result is then (nearly) class-balanced, so ``limit`` gives all classes.
    """
    def stem_key(name: str) -> tuple[int, int | str]:
        stem = name.rsplit(".", 1)[0]
        return (0, int(stem)) if stem.isdigit() else (1, name)

    by_class: dict[int, list[int]] = {}
    for i in sorted(range(len(items)), key=lambda i: stem_key(items[i][1])):
        by_class.setdefault(items[i][0], []).append(i)
    ranked = [(rank, c, i) for c, idx in by_class.items() for rank, i in enumerate(idx)]
    return [i for _, _, i in sorted(ranked)]


# -- decode cache -----------------------------------------------------------------------
def _fingerprint(source: Path) -> str:
    """Size and modification time of the source file, or of every file of a source folder."""
    if source.is_dir():
        count = total = latest = 0
        for dirpath, _, files in os.walk(source):
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                count, total, latest = count + 1, total + st.st_size, max(latest, st.st_mtime_ns)
        return f"dir:{count}:{total}:{latest}"
    st = source.stat()
    return f"file:{st.st_size}:{st.st_mtime_ns}"


class ArrayCache:
    """Decoded arrays of one source, saved as an uncompressed .npz.

    The file name carries a hash of the source's resolved path and a key made of the cache
    version, that path, the source's size and mtime, and ``tag`` (split, resolution); the key
    is also stored inside the file and checked on load. A changed source gives a new key:
    the stale file is ignored and removed when the new one is written. A file that cannot be
    read is removed and rebuilt. Writes go to a temporary file renamed into place, so a
    reader never sees a partial cache.
    """

    def __init__(self, source: Path, tag: str, folder: Path) -> None:
        resolved = str(source.resolve())
        self.key = f"v{CACHE_VERSION}|{resolved}|{_fingerprint(source)}|{tag}"
        where = hashlib.sha256(resolved.encode()).hexdigest()[:8]
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:16]
        self.prefix = f"{source.name}.{where}.{tag}."
        self.path = folder / f"{self.prefix}{digest}.npz"

    def load(self) -> dict[str, np.ndarray] | None:
        """The cached arrays, or None when missing, stale or unreadable (an unreadable file is removed)."""
        if not self.path.is_file():
            return None
        try:
            # Our own handle: np.load leaks its file when a truncated archive fails to open.
            with open(self.path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
                if str(f["key"]) != self.key:
                    raise ValueError("key mismatch")
                return {k: f[k] for k in f.files if k != "key"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            self.discard(f"unreadable ({err})")
            return None

    def discard(self, why: str) -> None:
        warnings.warn(f"rebuilding the cache {self.path}: {why}", stacklevel=3)
        self.path.unlink(missing_ok=True)

    def save(self, **arrays: np.ndarray) -> None:
        """Write atomically; when the folder is not writable, warn and carry on uncached."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as err:
            warnings.warn(f"cannot write the cache {self.path} ({err}); set NWFLOW_CACHE_DIR", stacklevel=3)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(self.key), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)   # mkstemp makes it private; a shared cache should be readable
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in self.path.parent.glob(f"{self.prefix}*.npz"):
            if old != self.path:
                old.unlink(missing_ok=True)


def load_or_decode(source: Path, tag: str, cache_dir: str | os.PathLike | None,
                   items: Callable[[ImageFiles], tuple[list[str], np.ndarray]],
                   size: int | None, hw: int, limit: int | None, desc: str, progress: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, hw, hw) uint8 and labels (N,) of one image source, through the cache.

    ``items(files)`` lists the member names in order with their labels. A full load decodes
    everything and writes the cache; a load with ``limit`` reads the cache when present and
    otherwise decodes only the first ``limit`` images (no cache write).
    """
    cache = ArrayCache(source, tag, work_dir(source.parent, cache_dir))
    cached = cache.load()
    if cached is not None:
        images, labels = cached.get("images"), cached.get("labels")
        if (images is not None and labels is not None and images.dtype == np.uint8
                and images.shape[1:] == (3, hw, hw) and labels.shape == images.shape[:1]):
            return (images, labels) if limit is None else (images[:limit], labels[:limit])
        cache.discard("unexpected contents")

    def check(a: np.ndarray, name: str) -> None:
        if a.shape != (hw, hw, 3):
            raise ValueError(f"{name}: decoded to shape {a.shape}, expected ({hw}, {hw}, 3)")

    with ImageFiles(source) as files:
        names, labels = items(files)
        if limit is not None:
            names, labels = names[:limit], labels[:limit]
        images = decode_many(files, names, size, desc, progress, check)
    if limit is None:
        cache.save(images=images, labels=labels)
    return images, labels
