"""CIFAR-10 loader: every source on small files written here, the decode cache, bad input,
and the real copies in NWFLOW_DATA_DIR (or ../shared/data) when present."""

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nwflow.data import CIFAR10_CLASSES, _archive, cifar10, load_cifar10
from nwflow.settings import data_dir

RNG = np.random.default_rng(0)


def _expected_float(u8_nchw):
    """The promised conversion, re-derived in float64: x / 127.5 - 1."""
    return torch.from_numpy(u8_nchw.astype(np.float64) / 127.5 - 1.0)


# -- official python batches ------------------------------------------------------------------
def _write_batches(folder: Path, per_batch=4, n_test=3):
    """A tiny cifar-10-batches-py: 5 training batches and a test batch of random rows."""
    folder.mkdir(parents=True)
    rows, labels = {}, {}
    for split, names, n in (("train", [f"data_batch_{i}" for i in range(1, 6)], per_batch),
                            ("test", ["test_batch"], n_test)):
        rows[split], labels[split] = [], []
        for name in names:
            data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            lab = [int(v) for v in RNG.integers(0, 10, size=n)]
            with open(folder / name, "wb") as f:
                # Byte-string keys, as the official Python 2 pickles load with encoding="bytes".
                pickle.dump({b"data": data, b"labels": lab, b"batch_label": name.encode()}, f)
            rows[split].append(data)
            labels[split] += lab
    return {s: (np.concatenate(rows[s]), np.array(labels[s])) for s in rows}


def test_batches_order_layout_and_range(tmp_path):
    truth = _write_batches(tmp_path / "cifar-10-batches-py")
    for split, n in (("train", 20), ("test", 3)):
        x, y = load_cifar10(tmp_path, split=split, progress=False)
        rows, labels = truth[split]
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        # Row layout: 1024 red values, then green, then blue, each row-major 32 x 32.
        ref = _expected_float(rows.reshape(n, 3, 32, 32))
        torch.testing.assert_close(x.double(), ref, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(y.numpy(), labels)
        assert x.min() >= -1 and x.max() <= 1
    # root may also be the batches folder itself; limit keeps the first images.
    x5, y5 = load_cifar10(tmp_path / "cifar-10-batches-py", limit=5, dtype=torch.float64)
    torch.testing.assert_close(x5, _expected_float(truth["train"][0][:5].reshape(5, 3, 32, 32)))
    np.testing.assert_array_equal(y5.numpy(), truth["train"][1][:5])


def test_pixel_extremes_map_to_plus_minus_one(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder)
    data = np.zeros((2, 3072), np.uint8)
    data[1] = 255
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 9]}, f)
    x, _ = load_cifar10(tmp_path, split="test")
    assert (x[0] == -1).all() and (x[1] == 1).all()


def _make_tar(path: Path, folder: Path, arcname: str):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_official_archive_is_checked_and_extracted_atomically(tmp_path, monkeypatch):
    src = tmp_path / "src"
    truth = _write_batches(src / "cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    md5 = _make_tar(root / "cifar-10-python.tar.gz", src / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(ValueError, match="MD5"):
        load_cifar10(root)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]   # nothing half-made
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5)
    x, y = load_cifar10(root, split="test")
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    np.testing.assert_array_equal(y.numpy(), truth["test"][1])


def test_download_checks_md5_and_leaves_nothing_on_mismatch(tmp_path, monkeypatch):
    src = tmp_path / "server"
    truth = _write_batches(src / "cifar-10-batches-py")
    md5 = _make_tar(src / "cifar-10-python.tar.gz", src / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setattr(cifar10, "CIFAR10_URL", (src / "cifar-10-python.tar.gz").as_uri())
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_cifar10(root)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", "f" * 32)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_cifar10(root, download=True, progress=False)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5)
    x, y = load_cifar10(root, download=True, progress=False)
    np.testing.assert_array_equal(y.numpy(), truth["train"][1])
    assert hashlib.md5((root / "cifar-10-python.tar.gz").read_bytes()).hexdigest() == md5


def test_unsafe_archive_member_is_refused(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ValueError, match="unsafe member"):
        _archive.extract_tar(bad, "cifar-10-batches-py", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


# -- JPEG zip layout -------------------------------------------------------------------------
def _smooth_image(seed):
    """A smooth random 32 x 32 RGB image (JPEG keeps such images at high PSNR)."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    chans = [r.uniform(40, 215) + r.uniform(-40, 40) * np.sin(r.uniform(1, 3) * xx + r.uniform(0, 3) * yy)
             for _ in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _jpeg_bytes(img, size=None):
    buf = io.BytesIO()
    im = Image.fromarray(img)
    if size is not None:
        im = im.resize((size, size))
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_jpeg_zip(path: Path, counts, split="train", seed=0, top="cifar10-jpeg", extra=()):
    """Class c gets counts[c] images NNNN.jpg; returns {(c, NNNN): original array, jpeg bytes}."""
    truth = {}
    with zipfile.ZipFile(path, "w") as z:
        for c, n in enumerate(counts):
            for j in range(n):
                img = _smooth_image(seed + 100 * c + j)
                data = _jpeg_bytes(img)
                z.writestr(f"{top}/{split}/{CIFAR10_CLASSES[c]}/{j:04d}.jpg", data)
                truth[(c, j)] = (img, data)
        for name, data in extra:
            z.writestr(name, data)
    return truth


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_jpeg_zip_interleaved_order_and_pixels(tmp_path):
    counts = [3, 1, 2, 3, 1, 2, 3, 1, 2, 12]   # unequal, and 12 > 10 exercises numeric NNNN
    truth = _write_jpeg_zip(tmp_path / "cifar10-jpeg.zip", counts)
    x, y = load_cifar10(tmp_path, split="train", cache_dir=tmp_path / "cache", progress=False)
    # Expected order: by (index within class, class).
    order = sorted(truth, key=lambda cj: (cj[1], cj[0]))
    assert x.shape == (sum(counts), 3, 32, 32)
    np.testing.assert_array_equal(y.numpy(), [c for c, _ in order])
    ref = np.stack([_decode(truth[k][1]) for k in order]).transpose(0, 3, 1, 2)
    torch.testing.assert_close(x.double(), _expected_float(ref), atol=1e-6, rtol=0)
    # And the JPEG copy is close to the original pixels.
    orig = np.stack([truth[k][0] for k in order]).astype(float)
    mse = ((ref.transpose(0, 2, 3, 1) - orig) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 35
    with pytest.raises(ValueError, match="no images under test"):
        load_cifar10(tmp_path, split="test", cache_dir=tmp_path / "cache")


def test_jpeg_folder_layout_and_limit(tmp_path):
    truth = _write_jpeg_zip(tmp_path / "a.zip", [2] * 10, split="test")
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        z.extractall(tmp_path / "root")          # -> root/cifar10-jpeg/test/<class>/NNNN.jpg
    x, y = load_cifar10(tmp_path / "root", split="test", limit=13, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(y.numpy(), list(range(10)) + [0, 1, 2])
    first = np.stack([_decode(truth[(c, 0)][1]) for c in range(10)]).transpose(0, 3, 1, 2)
    torch.testing.assert_close(x[:10].double(), _expected_float(first), atol=1e-6, rtol=0)
    assert not (tmp_path / "c").exists()   # a limited, uncached load writes no cache


def test_jpeg_bad_contents(tmp_path):
    (tmp_path / "a").mkdir()
    _write_jpeg_zip(tmp_path / "a" / "cifar10-jpeg.zip", [1] * 10,
                    extra=[("cifar10-jpeg/train/zebra/0000.jpg", _jpeg_bytes(_smooth_image(1)))])
    with pytest.raises(ValueError, match="unknown class folder"):
        load_cifar10(tmp_path / "a", cache_dir=tmp_path / "c")
    (tmp_path / "b").mkdir()
    _write_jpeg_zip(tmp_path / "b" / "cifar10-jpeg.zip", [1] * 10,
                    extra=[("cifar10-jpeg/train/cat/0001.jpg", _jpeg_bytes(_smooth_image(1), size=16))])
    with pytest.raises(ValueError, match="32 x 32|expected \\(32, 32, 3\\)"):
        load_cifar10(tmp_path / "b", cache_dir=tmp_path / "c")
    (tmp_path / "d").mkdir()
    _write_jpeg_zip(tmp_path / "d" / "cifar10-jpeg.zip", [1] * 10,
                    extra=[("cifar10-jpeg/train/cat/0001.jpg", b"not a jpeg")])
    with pytest.raises(ValueError, match="cannot decode"):
        load_cifar10(tmp_path / "d", cache_dir=tmp_path / "c")


# -- the decode cache ----------------------------------------------------------------------
def _cache_files(folder: Path):
    return sorted(folder.glob("*.npz")) if folder.exists() else []


def test_cache_written_once_and_reused(tmp_path, monkeypatch):
    _write_jpeg_zip(tmp_path / "cifar10-jpeg.zip", [2] * 10)
    cache = tmp_path / "cache"
    x1, y1 = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    files = _cache_files(cache)
    assert len(files) == 1 and files[0].name.startswith("cifar10-jpeg.zip.")
    assert not [p for p in cache.iterdir() if p.suffix != ".npz"]   # no temporary files left

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(_archive, "decode_many", no_decode)
    x2, y2 = load_cifar10(tmp_path, cache_dir=cache)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = load_cifar10(tmp_path, cache_dir=cache, limit=4)   # limited loads read the cache too
    assert torch.equal(x3, x1[:4]) and torch.equal(y3, y1[:4])


def test_stale_cache_is_rebuilt_when_the_source_changes(tmp_path):
    zpath = tmp_path / "cifar10-jpeg.zip"
    _write_jpeg_zip(zpath, [1] * 10, seed=0)
    cache = tmp_path / "cache"
    x1, _ = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    old = _cache_files(cache)
    _write_jpeg_zip(zpath, [1] * 10, seed=7)            # new pixels, new size/mtime
    os.utime(zpath, ns=(1, 1))
    x2, _ = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    assert not torch.equal(x1, x2)
    ref = np.stack([_decode(_jpeg_bytes(_smooth_image(7 + 100 * c))) for c in range(10)])
    torch.testing.assert_close(x2.double(), _expected_float(ref.transpose(0, 3, 1, 2)), atol=1e-6, rtol=0)
    new = _cache_files(cache)
    assert len(new) == 1 and new != old                  # the stale file was replaced


def test_corrupt_cache_is_rebuilt(tmp_path):
    _write_jpeg_zip(tmp_path / "cifar10-jpeg.zip", [1] * 10)
    cache = tmp_path / "cache"
    x1, y1 = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    (path,) = _cache_files(cache)
    path.write_bytes(path.read_bytes()[:1000])           # truncated
    with pytest.warns(UserWarning, match="rebuilding the cache"):
        x2, y2 = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    np.savez(path, key=np.array("someone else's key"), images=np.zeros(1), labels=np.zeros(1))
    with pytest.warns(UserWarning, match="rebuilding the cache"):
        x3, _ = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    assert torch.equal(x1, x3)
    with np.load(_cache_files(cache)[0]) as f:                 # right key, wrong contents
        key = str(f["key"])
    np.savez(path, key=np.array(key), images=np.zeros((10, 3, 8, 8), np.uint8), labels=np.zeros(10))
    with pytest.warns(UserWarning, match="unexpected contents"):
        x4, _ = load_cifar10(tmp_path, cache_dir=cache, progress=False)
    assert torch.equal(x1, x4)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    _write_jpeg_zip(tmp_path / "cifar10-jpeg.zip", [1] * 10)
    cache = tmp_path / "cache"

    def failing_savez(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(_archive.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        load_cifar10(tmp_path, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []                   # neither a partial file nor a temporary


def test_cache_location(tmp_path, monkeypatch):
    src = tmp_path / "data"
    src.mkdir()
    _write_jpeg_zip(src / "cifar10-jpeg.zip", [1] * 10)
    monkeypatch.delenv("NWFLOW_CACHE_DIR", raising=False)
    load_cifar10(src, split="train", progress=False)
    assert len(_cache_files(src)) == 1                  # beside a writable source
    monkeypatch.setenv("NWFLOW_CACHE_DIR", str(tmp_path / "env-cache"))
    load_cifar10(src, progress=False)
    assert len(_cache_files(tmp_path / "env-cache")) == 1
    monkeypatch.delenv("NWFLOW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # A read-only data folder (like the shared copies) stays untouched, even for root, whom
    # the permission bits do not stop.
    before = sorted(src.iterdir())
    src.chmod(0o555)
    try:
        load_cifar10(src, progress=False)
    finally:
        src.chmod(0o755)
    assert len(_cache_files(tmp_path / "xdg" / "nwflow")) == 1
    assert sorted(src.iterdir()) == before


# -- lossless subset and arguments ----------------------------------------------------------
def test_lossless_subset(tmp_path):
    xs = RNG.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10-lossless-subset.npz", x_train=xs, y_train=np.arange(6) % 10,
             x_test=xs[:2], y_test=np.array([3, 4]), y_test_full=np.zeros(10, np.int64))
    x, y = load_cifar10(tmp_path, source="lossless")
    torch.testing.assert_close(x.double(), _expected_float(xs.transpose(0, 3, 1, 2)), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(y.numpy(), np.arange(6))
    xt, yt = load_cifar10(tmp_path, split="test", source="lossless", limit=1)
    assert xt.shape == (1, 3, 32, 32) and yt.tolist() == [3]
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 found"):
        load_cifar10(tmp_path)                      # the subset is only used when asked for


def test_bad_arguments(tmp_path, monkeypatch):
    _write_batches(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, split="val")
    with pytest.raises(ValueError, match="limit"):
        load_cifar10(tmp_path, limit=0)
    with pytest.raises(TypeError, match="limit"):
        load_cifar10(tmp_path, limit=2.0)
    with pytest.raises(ValueError, match="source"):
        load_cifar10(tmp_path, source="png")
    with pytest.raises(TypeError, match="root"):
        load_cifar10(123)
    with pytest.raises(TypeError, match="dtype"):
        load_cifar10(tmp_path, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="source='lossless' needs"):
        load_cifar10(tmp_path, source="lossless")
    with pytest.raises(FileNotFoundError, match="looked for: .*cifar10-jpeg.zip"):
        load_cifar10(tmp_path / "empty")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)
    # root=None reads NWFLOW_DATA_DIR.
    monkeypatch.setenv("NWFLOW_DATA_DIR", str(tmp_path))
    x, _ = load_cifar10(split="test")
    assert x.shape == (3, 3, 32, 32)


# -- the real copies ------------------------------------------------------------------------
REAL = data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data"
needs_real = pytest.mark.skipif(
    not (REAL / "cifar10-jpeg.zip").is_file() or not (REAL / "cifar10-lossless-subset.npz").is_file(),
    reason=f"real CIFAR-10 copies not found in {REAL} (set NWFLOW_DATA_DIR)")


@pytest.fixture(scope="module")
def lossless():
    with np.load(REAL / "cifar10-lossless-subset.npz") as f:
        return {k: f[k] for k in f.files}


def _psnr(a_u8, b_u8):
    mse = ((a_u8.astype(float) - b_u8.astype(float)) ** 2).reshape(len(a_u8), -1).mean(1)
    return 10 * np.log10(255**2 / mse)


@needs_real
def test_real_lossless_pixels_are_exact(lossless):
    for split in ("train", "test"):
        x, y = load_cifar10(REAL, split=split, source="lossless")
        u8 = lossless[f"x_{split}"].transpose(0, 3, 1, 2)
        assert x.shape == u8.shape and x.shape[0] == {"train": 5170, "test": 1017}[split]
        back = ((x.double() + 1) * 127.5).round().numpy()
        np.testing.assert_array_equal(back, u8)
        np.testing.assert_array_equal(y.numpy(), lossless[f"y_{split}"])
    np.testing.assert_array_equal(lossless["y_test"], lossless["y_test_full"][:1017])


@needs_real
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_jpeg_counts_and_pairing_with_lossless(split, lossless, tmp_path):
    with _archive.ImageFiles(REAL / "cifar10-jpeg.zip") as files:
        names, labels = _archive.labelled_members(files, split, cifar10.CIFAR10_CLASSES)
    per_class = {"train": 5000, "test": 1000}[split]
    assert len(names) == 10 * per_class
    np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
    # The lossless subset is the head of the original batches: its i-th image is the r-th of
    # its class, r = count of that class before i, which the interleaved order puts at 10 r + c.
    ys = lossless[f"y_{split}"][:300]
    ranks = np.array([(ys[:i] == c).sum() for i, c in enumerate(ys)])
    pos = 10 * ranks + ys
    x, y = load_cifar10(REAL, split=split, limit=int(pos.max()) + 2, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(y.numpy()[pos], ys)
    jpeg_u8 = ((x[pos].double() + 1) * 127.5).round().numpy().astype(np.uint8)
    psnr = _psnr(jpeg_u8, lossless[f"x_{split}"][:300].transpose(0, 3, 1, 2))
    assert 28 < psnr.mean() < 34 and psnr.min() > 20      # the README's "about 30 dB"
    # A wrong pairing (shifted by one class) is far worse: the check can fail.
    wrong = _psnr(((x[pos + 1].double() + 1) * 127.5).round().numpy().astype(np.uint8),
                  lossless[f"x_{split}"][:300].transpose(0, 3, 1, 2))
    assert wrong.mean() < 20
