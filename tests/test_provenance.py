"""nwflow.provenance: every field of the record, with values that would be wrong if the code were."""

import ast
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nwflow import provenance as P
from nwflow._io import write_json_atomic
from nwflow._version import __version__

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(repo), "PATH": os.environ["PATH"]})


@pytest.fixture
def repo(tmp_path):
    """A git repository with one committed file, clean."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def test_record_is_json_and_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["runner.py", "--preset", "smoke"])
    monkeypatch.setenv("NWFLOW_FAST", "1")
    rec = P.provenance(wall_time_s=1.5)
    assert rec["command"] == ["runner.py", "--preset", "smoke"]
    assert rec["wall_time_s"] == 1.5 and rec["fast_mode"] is True
    assert rec["versions"] == {"nwflow": __version__, "torch": torch.__version__,
                               "numpy": __import__("numpy").__version__}
    assert rec["device"] == "cpu" and rec["device_name"] == rec["cpu_model"] == P.cpu_model()
    assert rec["python"] == platform.python_version() and rec["cpu_threads"] == torch.get_num_threads()
    assert "config" not in rec   # stored once: by the caller, at the top level of its file
    path = write_json_atomic(tmp_path / "sub" / "r.json", {"provenance": rec})
    assert json.loads(path.read_text())["provenance"] == rec


def test_config_is_stored_when_passed(monkeypatch):
    monkeypatch.delenv("NWFLOW_FAST", raising=False)
    config = {"n": 5}
    rec = P.provenance(config)
    config["n"] = 6                       # a copy: later edits do not change the record
    assert rec["config"] == {"n": 5} and rec["fast_mode"] is False and "wall_time_s" not in rec


@needs_git
def test_commit_and_dirty_flag(repo):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True).stdout.strip()
    assert P.git_commit(repo) == head and len(head) == 40
    assert P.git_dirty(repo) is False
    (repo / "new.txt").write_text("untracked\n")
    assert P.git_dirty(repo) is True
    (repo / "new.txt").unlink()
    assert P.git_dirty(repo) is False
    (repo / "a.txt").write_text("changed\n")      # a modified tracked file is dirty too
    assert P.git_dirty(repo) is True


def test_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert P.git_commit(tmp_path) is None and P.git_dirty(tmp_path) is None


def test_cpu_model_reads_proc_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.split(":", 1)[0].strip() == "model name"]
        if names:
            assert P.cpu_model() == names[0]
    # Elsewhere (no /proc/cpuinfo): platform.processor(), else the architecture.
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(platform, "processor", lambda: "Test CPU 9000")
    assert P.cpu_model() == "Test CPU 9000"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert P.cpu_model() == platform.machine()


def test_imports_no_package_module_but_the_floors():
    """provenance sits on the low floors: it names _version and settings, not the package."""
    tree = ast.parse((ROOT / "nwflow" / "provenance.py").read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert {n for n in names if n.split(".")[0] == "nwflow"} == {"nwflow._version", "nwflow.settings"}


def test_old_results_with_config_in_both_places_still_read():
    """The committed chapter 5 result predates the rule: its provenance holds the same config."""
    data = json.loads((ROOT / "book" / "results" / "failure_regimes_conditioner_cpu.json").read_text())
    assert data["provenance"]["config"] == data["config"]
