import json

import pytest

from nwflow._io import write_json_atomic
from nwflow.provenance import provenance


def test_provenance_record_is_json_and_complete(tmp_path):
    rec = provenance({"n": 5}, wall_time_s=1.5)
    for key in ("git_commit", "created_utc", "device", "versions", "config", "wall_time_s"):
        assert key in rec
    assert rec["config"] == {"n": 5} and rec["versions"]["torch"]
    path = write_json_atomic(tmp_path / "sub" / "r.json", {"provenance": rec})
    assert json.loads(path.read_text())["provenance"]["config"] == {"n": 5}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"bad": float("nan")})  # NaN is refused before anything is written
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
