"""Imagenette loader: layouts, order, box-filter resizing against numpy block means, crop,
archives, cache, bad input, and the real 64 px copy when present."""

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nwflow.data import IMAGENETTE_NAMES, IMAGENETTE_WNIDS, _archive, imagenette, load_imagenette
from nwflow.settings import data_dir


def _png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")    # lossless, so pixels can be compared exactly
    return buf.getvalue()


def _image(seed, h=64, w=64):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _layout(counts, split="train", h=64, w=64):
    """{member path below the top folder: array}; class c gets counts[c] files with sortable names."""
    files = {}
    for c, n in enumerate(counts):
        for j in range(n):
            files[f"{split}/{IMAGENETTE_WNIDS[c]}/{IMAGENETTE_WNIDS[c]}_{j:05d}.png"] = _image(
                1000 * c + j + (0 if split == "train" else 500), h, w)
    return files


def _write_zip(path, top, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, img in files.items():
            z.writestr(f"{top}/{name}", _png(img))


def _write_folder(folder, files):
    for name, img in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(img))


def _interleaved(files, split):
    """The promised order: (index within class by file name, class)."""
    keys = [k for k in files if k.startswith(split + "/")]
    rank = {k: sorted(x for x in keys if x.split("/")[1] == k.split("/")[1]).index(k) for k in keys}
    return sorted(keys, key=lambda k: (rank[k], IMAGENETTE_WNIDS.index(k.split("/")[1])))


def _block_mean(u8_hwc, f):
    h, w, _ = u8_hwc.shape
    return u8_hwc.reshape(h // f, f, w // f, f, 3).astype(np.float64).mean(axis=(1, 3))


def _as_u8_nhwc(x):
    return ((x.double() + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)


def test_zip_order_labels_and_native_pixels(tmp_path):
    counts = [3, 1, 2, 2, 1, 3, 1, 2, 1, 2]
    files = _layout(counts)
    _write_zip(tmp_path / "imagenette-64.zip", "imagenette-64", files)
    x, y = load_imagenette(tmp_path, split="train", size=64, cache_dir=tmp_path / "c", progress=False)
    order = _interleaved(files, "train")
    assert x.shape == (sum(counts), 3, 64, 64) and x.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), [IMAGENETTE_WNIDS.index(k.split("/")[1]) for k in order])
    ref = np.stack([files[k] for k in order]).astype(np.float64) / 127.5 - 1
    torch.testing.assert_close(x.double(), torch.from_numpy(ref.transpose(0, 3, 1, 2)), atol=1e-6, rtol=0)
    assert IMAGENETTE_NAMES[IMAGENETTE_WNIDS.index("n01440764")] == "tench"


@pytest.mark.parametrize("size", [32, 16, 8])
def test_box_resize_is_block_mean(tmp_path, size):
    files = _layout([1] * 10, split="val")
    _write_zip(tmp_path / "imagenette-64.zip", "imagenette-64", files)
    x, y = load_imagenette(tmp_path, split="val", size=size, cache_dir=tmp_path / "c", progress=False)
    assert x.shape == (10, 3, size, size) and y.tolist() == list(range(10))
    ref = np.stack([_block_mean(files[k], 64 // size) for k in _interleaved(files, "val")])
    np.testing.assert_array_equal(_as_u8_nhwc(x), np.floor(ref + 0.5))   # block mean, rounded once


def test_non_integer_factor_is_area_average(tmp_path):
    files = _layout([1] * 10, split="val")
    _write_zip(tmp_path / "imagenette-64.zip", "imagenette-64", files)
    x, _ = load_imagenette(tmp_path, split="val", size=24, cache_dir=tmp_path / "c", progress=False)
    # Area averaging by another route: replicate each pixel 3 x 3 (64 -> 192 = 24 * 8), then
    # average 8 x 8 blocks.
    ref = np.stack([_block_mean(np.repeat(np.repeat(files[k], 3, axis=0), 3, axis=1), 8)
                    for k in _interleaved(files, "val")])
    assert np.abs(_as_u8_nhwc(x) - ref).max() <= 0.5 + 1e-9      # exact area average, rounded once


def test_non_square_official_layout_is_centre_cropped(tmp_path):
    files = _layout([1] * 10, split="val", h=40, w=50)        # landscape, like imagenette2-160
    _write_folder(tmp_path / "imagenette2-160", files)
    x, _ = load_imagenette(tmp_path, split="val", size=8, cache_dir=tmp_path / "c", progress=False)
    ref = np.stack([_block_mean(files[k][:, 5:45], 5) for k in _interleaved(files, "val")])
    assert np.abs(_as_u8_nhwc(x) - ref).max() <= 0.5 + 1e-9
    # Portrait images are cropped top and bottom.
    files_p = _layout([1] * 10, split="train", h=50, w=40)
    _write_folder(tmp_path / "imagenette2-160", files_p)
    xp, _ = load_imagenette(tmp_path, split="train", size=8, cache_dir=tmp_path / "c", progress=False)
    ref_p = np.stack([_block_mean(files_p[k][5:45], 5) for k in _interleaved(files_p, "train")])
    assert np.abs(_as_u8_nhwc(xp) - ref_p).max() <= 0.5 + 1e-9


def test_variant_priority_and_limit(tmp_path):
    _write_folder(tmp_path / "imagenette2-160", _layout([1] * 10, h=80, w=80))
    small = _layout([2] * 10)
    _write_zip(tmp_path / "imagenette-64.zip", "imagenette-64", small)
    x, y = load_imagenette(tmp_path, size=64, limit=12, cache_dir=tmp_path / "c", progress=False)
    assert x.shape == (12, 3, 64, 64) and y.tolist() == list(range(10)) + [0, 1]   # the 64 px copy won
    first = _interleaved(small, "train")[:12]
    np.testing.assert_array_equal(_as_u8_nhwc(x), np.stack([small[k] for k in first]))
    assert not (tmp_path / "c").exists()        # limited load without a cache writes none


def _tgz(path, folder, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_official_archive_and_download(tmp_path, monkeypatch):
    server = tmp_path / "server"
    files = _layout([1] * 10, split="val", h=48, w=48)
    _write_folder(server / "imagenette2-160", files)
    md5 = _tgz(server / "imagenette2-160.tgz", server / "imagenette2-160", "imagenette2-160")
    monkeypatch.setattr(imagenette, "IMAGENETTE_URL", (server / "imagenette2-160.tgz").as_uri())
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_imagenette(root, split="val")
    monkeypatch.setattr(imagenette, "IMAGENETTE_MD5", "0" * 32)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_imagenette(root, split="val", download=True, progress=False)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(imagenette, "IMAGENETTE_MD5", md5)
    x, y = load_imagenette(root, split="val", size=16, download=True, cache_dir=tmp_path / "c",
                           progress=False)
    assert (root / "imagenette2-160" / "val").is_dir() and y.tolist() == list(range(10))
    ref = np.stack([_block_mean(files[k], 3) for k in _interleaved(files, "val")])
    assert np.abs(_as_u8_nhwc(x) - ref).max() <= 0.5 + 1e-9
    # An archive already present is MD5-checked before extraction.
    root2 = tmp_path / "root2"
    root2.mkdir()
    (root2 / "imagenette2-160.tgz").write_bytes((server / "imagenette2-160.tgz").read_bytes()[:-10])
    with pytest.raises(ValueError, match="MD5"):
        load_imagenette(root2, split="val")


def test_cache_per_size(tmp_path, monkeypatch):
    files = _layout([1] * 10)
    (tmp_path / "a").mkdir()
    _write_zip(tmp_path / "a" / "imagenette-64.zip", "imagenette-64", files)
    _write_folder(tmp_path / "b" / "imagenette2-160", files)
    cache_a, cache_b = tmp_path / "ca", tmp_path / "cb"
    # The 64 px copy caches 64 px once and derives divisor sizes from it ...
    a32, _ = load_imagenette(tmp_path / "a", size=32, cache_dir=cache_a, progress=False)
    a16, _ = load_imagenette(tmp_path / "a", size=16, cache_dir=cache_a, progress=False)
    assert [p.name.split(".")[-3] for p in cache_a.glob("*.npz")] == ["imagenette-train-64"]
    # ... other sources decode and cache each size; both routes give the same pixels.
    b32, _ = load_imagenette(tmp_path / "b", size=32, cache_dir=cache_b, progress=False)
    b16, _ = load_imagenette(tmp_path / "b", size=16, cache_dir=cache_b, progress=False)
    assert sorted(p.name.split(".")[-3] for p in cache_b.glob("*.npz")) == ["imagenette-train-16",
                                                                          "imagenette-train-32"]
    assert torch.equal(a32, b32) and torch.equal(a16, b16)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(_archive, "decode_many", no_decode)
    assert load_imagenette(tmp_path / "a", size=8, cache_dir=cache_a)[0].shape == (10, 3, 8, 8)
    assert torch.equal(load_imagenette(tmp_path / "b", size=16, cache_dir=cache_b)[0], b16)


def test_bad_arguments(tmp_path):
    files = _layout([1] * 10)
    _write_zip(tmp_path / "imagenette-64.zip", "imagenette-64", files)
    for bad in (0, 2000):
        with pytest.raises(ValueError, match="size"):
            load_imagenette(tmp_path, size=bad)
    for bad in (16.0, True):
        with pytest.raises(TypeError, match="size"):
            load_imagenette(tmp_path, size=bad)
    with pytest.raises(ValueError, match="split"):
        load_imagenette(tmp_path, split="test")
    with pytest.raises(ValueError, match="no images under val"):
        load_imagenette(tmp_path, split="val", cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="looked for"):
        load_imagenette(tmp_path / "nothing")
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    _write_zip(bad_root / "imagenette-64.zip", "imagenette-64", {"train/n99999999/a.png": _image(0)})
    with pytest.raises(ValueError, match="unknown class folder"):
        load_imagenette(bad_root, cache_dir=tmp_path / "c")


# -- the real 64 px copy -------------------------------------------------------------------
REAL = data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data"
needs_real = pytest.mark.skipif(not (REAL / "imagenette-64.zip").is_file(),
                                reason=f"imagenette-64.zip not found in {REAL} (set NWFLOW_DATA_DIR)")


@needs_real
def test_real_counts_classes_and_downsampling(tmp_path):
    with _archive.ImageFiles(REAL / "imagenette-64.zip") as files:
        counts = {s: np.bincount(_archive.labelled_members(files, s, imagenette.IMAGENETTE_WNIDS)[1],
                                 minlength=10) for s in ("train", "val")}
    assert counts["train"].sum() == 9469 and counts["val"].sum() == 3925
    assert (counts["train"] > 800).all() and (counts["val"] > 300).all()   # all ten wnids present
    x64, y64 = load_imagenette(REAL, split="val", size=64, limit=30, cache_dir=tmp_path, progress=False)
    x16, y16 = load_imagenette(REAL, split="val", size=16, limit=30, cache_dir=tmp_path, progress=False)
    assert y64.tolist()[:10] == list(range(10)) and torch.equal(y64, y16)
    assert x64.min() >= -1 and x64.max() <= 1 and x64.std() > 0.2
    ref = np.stack([_block_mean(img, 4) for img in _as_u8_nhwc(x64)])
    assert np.abs(_as_u8_nhwc(x16) - ref).max() <= 0.5 + 1e-9
