"""nwflow._io: writes are atomic (a temporary file, then a rename) and leave nothing behind."""

import json
import os

import pytest
import torch

from nwflow._io import save_torch_atomic, write_bytes_atomic, write_json_atomic


def test_bytes_are_written_and_parents_created(tmp_path):
    path = write_bytes_atomic(tmp_path / "a" / "b" / "f.bin", b"\x00\x01abc")
    assert path == tmp_path / "a" / "b" / "f.bin" and path.read_bytes() == b"\x00\x01abc"
    write_bytes_atomic(path, b"new")            # replaces the old file whole
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["f.bin"]


def test_json_is_indented_and_nan_is_refused_before_any_write(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"ok": [1, 2.5]})
    assert json.loads(path.read_text()) == {"ok": [1, 2.5]} and path.read_text().endswith("\n")
    assert "\n  " in path.read_text()          # indented, readable in a diff
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            write_json_atomic(path, {"bad": bad})
    assert json.loads(path.read_text()) == {"ok": [1, 2.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = write_bytes_atomic(tmp_path / "f.bin", b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_torch_objects_round_trip(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    path = save_torch_atomic(tmp_path / "ck.pt", obj)
    back = torch.load(path, weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], obj["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
