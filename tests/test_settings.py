"""nwflow.settings: the environment switches and where runs keep their files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nwflow import settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("value", "fast"), [("1", True), ("true", True), (" YES ", True), ("", False),
                                             ("0", False), ("no", False), ("false", False)])
def test_fast_mode_and_pick(monkeypatch, value, fast):
    monkeypatch.setenv("NWFLOW_FAST", value)
    assert settings.fast_mode() is fast
    assert settings.pick(500, 50_000) == (500 if fast else 50_000)


def test_fast_mode_is_off_when_unset(monkeypatch):
    monkeypatch.delenv("NWFLOW_FAST", raising=False)
    assert settings.fast_mode() is False and settings.pick("fast", "full") == "full"


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NWFLOW_DATA_DIR", str(tmp_path))
    assert settings.data_dir() == tmp_path
    monkeypatch.setenv("NWFLOW_DATA_DIR", "  ")
    assert settings.data_dir() is None


def test_default_device():
    assert settings.default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_results_dir_is_the_checkouts_book_results_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("NWFLOW_RESULTS_DIR", raising=False)
    assert settings.results_dir() == ROOT / "book" / "results"
    assert (settings.results_dir() / "failure_regimes_conditioner_cpu.json").is_file()
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path / "r"))
    assert settings.results_dir() == tmp_path / "r"


def test_cache_dir_in_full_mode_is_kept_under_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("NWFLOW_FAST", raising=False)
    monkeypatch.setenv("NWFLOW_CACHE_DIR", str(tmp_path / "cache"))
    path = settings.cache_dir("ch6")
    assert path == tmp_path / "cache" / "ch6" and path.is_dir()
    monkeypatch.delenv("NWFLOW_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.cache_dir("ch6") == tmp_path / "home" / ".cache" / "nwflow" / "ch6"


@pytest.mark.parametrize("name", ["", "a/b"])
def test_cache_dir_refuses_a_bad_name(name):
    with pytest.raises(ValueError, match=f"^name must be a non-empty folder name, got {name!r}$"):
        settings.cache_dir(name)


@pytest.mark.parametrize("name", [None, 3])
def test_cache_dir_refuses_a_name_that_is_not_a_str(name):
    with pytest.raises(TypeError, match=f"^name must be a str, got {type(name).__name__}$"):
        settings.cache_dir(name)


def test_config_hash_is_stable_order_free_and_sensitive():
    h = settings.config_hash({"steps": 10, "lr": 1e-3})
    assert len(h) == 12 and int(h, 16) >= 0
    assert settings.config_hash({"lr": 1e-3, "steps": 10}) == h           # key order does not matter
    assert settings.config_hash({"steps": 11, "lr": 1e-3}) != h           # a changed run, a new name


def test_checkpoint_path(monkeypatch, tmp_path):
    monkeypatch.delenv("NWFLOW_FAST", raising=False)
    monkeypatch.setenv("NWFLOW_CACHE_DIR", str(tmp_path))
    config = {"steps": 10}
    assert settings.checkpoint_path("ch8", "rf1", config) == (
        tmp_path / "ch8" / f"rf1-{settings.config_hash(config)}.pt")


def test_fast_mode_caches_live_in_one_temporary_folder_removed_at_exit(tmp_path):
    code = ("import json; from nwflow import settings; a = settings.cache_dir('x'); "
            "b = settings.checkpoint_path('y', 'm', {}); print(json.dumps([str(a), str(b)]))")
    env = {"PATH": "/usr/bin:/bin", "NWFLOW_FAST": "1", "NWFLOW_CACHE_DIR": str(tmp_path / "kept"),
           "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    a, b = map(Path, json.loads(out.stdout))
    assert a.parent == b.parent.parent and a.name == "x" and b.parent.name == "y"
    assert not a.parent.is_relative_to(tmp_path)      # not under the full-mode cache root
    assert not a.parent.exists()                      # removed when the process exited


def test_a_killed_process_leaves_no_scratch_folder_behind(tmp_path):
    """A process killed outright (as nbval kills kernels) skips its exit handlers; the next fast-mode
    process removes the folders of processes that no longer run, and keeps those of live ones."""
    env = {**os.environ, "NWFLOW_FAST": "1", "TMPDIR": str(tmp_path)}
    code = ("import os, signal; from nwflow import settings; print(settings.cache_dir('ch'), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    left = Path(killed.stdout.strip()).parent
    assert killed.returncode != 0 and left.is_dir()          # the exit handler did not run
    alive = tmp_path / f"nwflow-scratch-{os.getpid()}-keep"  # this test's own process is alive
    alive.mkdir()
    code = "from nwflow import settings; print(settings.cache_dir('ch'))"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert not left.exists() and alive.is_dir()
