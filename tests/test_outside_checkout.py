"""A downloaded chapter runs outside the checkout, with nwflow installed from the repository.

The website's download button gives a chapter's notebook; on Colab or a student's laptop it
runs with nwflow installed (not editable) and no ``book/`` beside it. Chapter 5 reads the
committed results of ``book/results`` through ``nwflow.settings.results_dir()``; pyproject.toml
installs that folder as the package data ``nwflow/_results``.

The fixture builds a wheel from a copy of the working tree, installs it (no dependencies, no
index, nothing downloaded) into a throwaway virtual environment that borrows this environment's
packages through a ``.pth`` line (``venv --system-site-packages`` would give the base
interpreter's packages, not this virtual environment's), and runs everything from an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "book" / "results"
CHAPTER_5 = ROOT / "book" / "part2_papers" / "05_kernel_smoothing_failures.ipynb"


def _working_tree_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what a clone (plus local edits) holds."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the repository's files")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NWFLOW_")}
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """A virtual environment with nwflow installed from a wheel, and an empty folder to run in."""
    base = tmp_path_factory.mktemp("outside")
    src, wheels, venv, work = base / "src", base / "wheels", base / "venv", base / "work"
    start = time.perf_counter()
    for rel in _working_tree_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", str(src), "-w", str(wheels)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(python), "-c", purelib], check=True, capture_output=True,
                               text=True).stdout.strip())
    (wheel,) = wheels.glob("nwflow-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(wheel)], check=True, capture_output=True)
    # Appended after the venv's own site-packages, so its nwflow wins; the editable install's
    # finder in this environment is a .pth hook of a site dir and is not run for a .pth path.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_borrowed_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    work.mkdir()
    print(f"install outside the checkout: {time.perf_counter() - start:.1f} s")
    return {"python": python, "site": site, "work": work}


def test_pyproject_lists_every_package():
    """The explicit package list (needed for the mapped results folder) misses no subpackage."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nwflow").rglob("__init__.py")}
    assert set(config["packages"]) == found | {"nwflow._results"}
    assert config["package-dir"] == {"nwflow._results": "book/results"}


def test_installed_results_dir_holds_the_committed_results(installed):
    probe = ("import json, nwflow, nwflow.settings as s; "
             "print(json.dumps([nwflow.__file__, str(s.results_dir())]))")
    out = subprocess.run([str(installed["python"]), "-c", probe], cwd=installed["work"], env=_clean_env(),
                         capture_output=True, text=True, check=True).stdout
    module, results = map(Path, json.loads(out))
    # The installed copy is imported, not the checkout, and its results folder is the packaged one.
    assert module.is_relative_to(installed["site"]), module
    assert results == installed["site"] / "nwflow" / "_results"
    committed = sorted(p.relative_to(RESULTS) for p in RESULTS.rglob("*") if p.is_file())
    assert committed, "book/results holds no committed results"
    for rel in committed:
        assert (results / rel).read_bytes() == (RESULTS / rel).read_bytes(), rel


def test_chapter_5_runs_outside_the_checkout(installed):
    """Chapter 5 copied into an empty folder runs in fast mode on the installed package."""
    notebook = installed["work"] / CHAPTER_5.name
    shutil.copy2(CHAPTER_5, notebook)
    env = _clean_env() | {"NWFLOW_FAST": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    run = subprocess.run([str(installed["python"]), "-m", "nbconvert", "--to", "notebook", "--execute",
                          "--inplace", "--ExecutePreprocessor.timeout=600", notebook.name],
                         cwd=installed["work"], env=env, capture_output=True, text=True)
    print(f"chapter 5 outside the checkout: {time.perf_counter() - start:.1f} s")
    assert run.returncode == 0, run.stderr[-4000:]
    cells = json.loads(notebook.read_text())["cells"]
    errors = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    # Without the packaged results the chapter silently falls back to its own smoke run.
    text = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code"
                   for o in c.get("outputs", []))
    assert "committed result 'cpu'" in text, "chapter 5 did not find book/results' committed CPU result"
