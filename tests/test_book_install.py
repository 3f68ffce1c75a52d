"""The install cell: a notebook downloaded from the website installs nwflow when it is missing.

A chapter (or an assignment) downloaded from the website runs on Colab, a laptop or a
JupyterHub where nwflow may not be importable. Its first code cell installs nwflow from the
book's repository, the one setting ``repository.url`` (and ``repository.branch``) of
``_config.yml`` that also drives the launch buttons, and does nothing when nwflow imports.
A notebook cannot read ``_config.yml`` (on Colab it is not there), so the URL is written into
the cell; these tests keep every copy equal to :func:`install_cell` of the current setting.
While the URL is empty (no public repository yet) the cell cannot install anything: it
stops with a message that says how to install nwflow by hand.

The assignments' cell also installs otter-grader (``grader.check`` needs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

INSTALL_CELL = '''\
# On Colab, a laptop or a JupyterHub without nwflow this cell installs it from the book's
# repository; where nwflow imports (the book's own environment) it does nothing.
import importlib
import importlib.util
import subprocess
import sys

REPOSITORY_URL = "{url}"  # _config.yml: repository.url
BRANCH = "{branch}"  # _config.yml: repository.branch
if importlib.util.find_spec("nwflow") is None:
    if not REPOSITORY_URL:
        raise ModuleNotFoundError(
            "nwflow is not installed, and this copy of the book names no repository to install it "
            "from: run `pip install .` in a checkout of the book's repository, then restart the kernel")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet",
                           f"nwflow @ git+{{REPOSITORY_URL}}@{{BRANCH}}"])
    importlib.invalidate_caches()'''

OTTER_LINES = '''
if importlib.util.find_spec("otter") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "otter-grader"])
    importlib.invalidate_caches()'''


def repository() -> tuple[str, str]:
    """``repository.url`` and ``repository.branch`` of ``_config.yml`` (url stripped, branch main)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text()).get("repository") or {}
    return str(config.get("url") or "").strip(), str(config.get("branch") or "main").strip()


def install_cell(url: str, branch: str, assignment: bool = False) -> str:
    """The first code cell of every chapter (and, with otter-grader, of every assignment)."""
    if '"' in url or '"' in branch or "\\" in url + branch:
        raise ValueError(f"repository url and branch must hold no quotes or backslashes: {url!r}, {branch!r}")
    return INSTALL_CELL.format(url=url, branch=branch) + (OTTER_LINES if assignment else "")


def _run_cell(source: str, nwflow_importable: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the cell in a fresh interpreter where pip is replaced by a recorder (nothing installs)."""
    log = tmp_path / "pip-calls.json"
    prelude = f'''
import importlib.util, json, subprocess
calls = []
def check_call(args, **kw):
    calls.append(list(args))
    json.dump(calls, open({str(log)!r}, "w"))
    return 0
subprocess.check_call = check_call
real = importlib.util.find_spec
hide = not {nwflow_importable!r}
importlib.util.find_spec = lambda name, *a: None if hide and name == "nwflow" else real(name, *a)
'''
    return subprocess.run([sys.executable, "-c", prelude + "\n" + source], capture_output=True, text=True,
                          cwd=tmp_path)


def _pip_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "pip-calls.json"
    return json.loads(log.read_text()) if log.exists() else []


def test_cell_does_nothing_where_nwflow_imports(tmp_path):
    run = _run_cell(install_cell("https://github.com/owner/nwflow", "main"), True, tmp_path)
    assert run.returncode == 0, run.stderr
    assert _pip_calls(tmp_path) == []


def test_cell_installs_from_the_repository_setting(tmp_path):
    run = _run_cell(install_cell("https://github.com/owner/nwflow", "dev"), False, tmp_path)
    assert run.returncode == 0, run.stderr
    (call,) = _pip_calls(tmp_path)
    assert call[-1] == "nwflow @ git+https://github.com/owner/nwflow@dev"
    assert call[1:4] == ["-m", "pip", "install"]


def test_cell_stops_with_instructions_without_a_repository(tmp_path):
    run = _run_cell(install_cell("", "main"), False, tmp_path)
    assert run.returncode != 0
    assert "ModuleNotFoundError" in run.stderr and "pip install ." in run.stderr
    assert _pip_calls(tmp_path) == []


def test_assignment_cell_also_installs_otter_only_when_missing(tmp_path):
    source = install_cell("https://github.com/owner/nwflow", "main", assignment=True)
    missing, present = tmp_path / "missing", tmp_path / "present"
    missing.mkdir(), present.mkdir()
    run = _run_cell(source.replace('find_spec("otter")', 'find_spec("no_such_module_here")'), True, missing)
    assert run.returncode == 0, run.stderr
    assert _pip_calls(missing) == [[sys.executable, "-m", "pip", "install", "--quiet", "otter-grader"]]
    run = _run_cell(source, True, present)   # otter-grader is installed here (the test extra)
    assert run.returncode == 0, run.stderr
    assert _pip_calls(present) == []


def test_bad_repository_setting_is_refused():
    with pytest.raises(ValueError, match="quotes"):
        install_cell('https://x"; import os', "main")


def _chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node and (ROOT / f"{node['file']}.ipynb").is_file():
                files.append(ROOT / f"{node['file']}.ipynb")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc.get("parts", []))
    return [p for p in files if p.relative_to(ROOT).parts[1].startswith("part")]


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.name)
def test_chapter_first_code_cell_is_the_install_cell(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    source = "".join(cells[0]["source"])
    assert source == install_cell(*repository()), (
        f"{path.name}: the first code cell must be exactly this (repository.url of _config.yml):\n"
        + install_cell(*repository()))
