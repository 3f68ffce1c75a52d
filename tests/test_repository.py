"""Repository wiring: the conda environment follows pyproject.toml; the entry points exist."""

import ast
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_package_with_its_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert "pip" in conda and len(pip_lists) == 1
    python = [d for d in conda if d.split("=")[0].split(">")[0].split("<")[0].strip() == "python"]
    assert len(python) == 1, conda
    # The pinned python satisfies requires-python (a lower bound ">=X.Y").
    version = re.search(r"(\d+)\.(\d+)", python[0])
    lower = re.fullmatch(r">=\s*(\d+)\.(\d+)", _pyproject()["project"]["requires-python"].strip())
    assert version and lower
    assert tuple(map(int, version.groups())) >= tuple(map(int, lower.groups()))
    # Everything else comes from pyproject.toml, through pip, as an editable install with extras.
    assert set(conda) == {"pip", python[0]}, "conda installs python and pip only"
    installs = [p for p in pip_lists[0] if re.match(r"-e\s+\.\[", p)]
    assert len(installs) == 1 and len(pip_lists[0]) == 1, pip_lists[0]
    extras = set(re.search(r"\[(.*)\]", installs[0]).group(1).replace(" ", "").split(","))
    declared = set(_pyproject()["project"]["optional-dependencies"])
    assert extras == {"book", "test"} and extras <= declared


def _make_targets():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))
    phony = set()
    for line in re.findall(r"^\.PHONY\s*:(.*)$", text, flags=re.M):
        phony.update(line.split())
    return text, targets, phony


def test_makefile_has_book_and_test_targets():
    text, targets, phony = _make_targets()
    assert {"book", "test"} <= targets and {"book", "test"} <= phony
    book = re.search(r"^book\s*:.*\n((?:\t.*\n)+)", text, flags=re.M).group(1)
    assert "jupyter-book build" in book
    test = re.search(r"^test\s*:.*\n((?:\t.*\n)+)", text, flags=re.M).group(1)
    # `make test` runs the unit tests (directly or through a sub-target that calls pytest).
    called = set(re.findall(r"\b([a-z-]+)\b", test)) & targets
    recipes = test + "".join(re.search(rf"^{t}\s*:.*\n((?:\t.*\n)+)", text, flags=re.M).group(1)
                             for t in called)
    assert "pytest" in recipes and "tests" in recipes


def test_ci_entry_point_runs_make_test():
    run = ROOT / ".ci" / "run"
    assert run.is_file() and os.access(run, os.X_OK)
    lines = [line.strip() for line in run.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any(re.fullmatch(r"(exec\s+)?make\s+test", line) for line in lines), lines


# Distributions whose import name is not their name, lower-cased with "-" as "_".
_IMPORT_NAMES = {"pillow": "PIL", "pot": "ot"}


def test_every_runtime_dependency_is_imported_by_the_library():
    """A declared dependency that nwflow/ never imports is dead weight for every install."""
    sources = "\n".join(p.read_text() for p in (ROOT / "nwflow").rglob("*.py"))
    unused = []
    for spec in _pyproject()["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
        module = _IMPORT_NAMES.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", sources, flags=re.M):
            unused.append(spec)
    assert not unused, f"declared in pyproject.toml but never imported in nwflow/: {unused}"


def _nwflow_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Which of ``modules`` the module ``module`` (at ``path``) imports, lazy imports included.

    ``from a import b`` imports the module ``a.b`` when there is one, else the module ``a``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return (found & modules) - {module}


def test_import_graph_has_at_most_five_layers_and_no_cycle():
    """CONTRIBUTING.md's layers: floors, path/_stream, empirical, paper modules, experiments.

    The package's own ``__init__`` (the re-exports) is left out: no module may import it.
    """
    files = {}
    for p in (ROOT / "nwflow").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: _nwflow_imports(p, m, set(files)) for m, p in files.items()}
    importers = sorted(m for m, deps in graph.items() if "nwflow" in deps)
    assert not importers, f"these modules import the nwflow package itself: {importers}"
    del graph["nwflow"]
    depth: dict[str, int] = {}

    def layer(m: str, chain: tuple[str, ...]) -> int:
        assert m not in chain, f"import cycle: {' -> '.join(chain + (m,))}"
        if m not in depth:
            depth[m] = 1 + max((layer(d, chain + (m,)) for d in graph[m]), default=0)
        return depth[m]

    for m in graph:
        layer(m, ())
    top = max(depth.values())
    assert top <= 5, f"{top} layers: {sorted(m for m, d in depth.items() if d == top)}"


_PATH_SUFFIXES = (".py", ".ipynb", ".md", ".json", ".yml", ".yaml", ".toml", ".txt", ".cfg")


def test_every_path_in_contributing_exists():
    """A file or folder written in backticks in CONTRIBUTING.md (outside code blocks) exists;
    placeholders (``<name>``, ``*``, ``~``) and code with spaces or calls are not paths."""
    text = re.sub(r"^```.*?^```", "", (ROOT / "CONTRIBUTING.md").read_text(), flags=re.M | re.S)
    paths = [s for s in re.findall(r"`([^`\s]+)`", text)
             if ("/" in s or s.endswith(_PATH_SUFFIXES)) and not set(s) & set("<>*~()=")]
    assert len(paths) > 40, paths       # the chapter map alone names more
    missing = sorted({p for p in paths if not (ROOT / p).exists()})
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"


def test_readme_links_contributing():
    assert re.search(r"\]\(CONTRIBUTING\.md\)", (ROOT / "README.md").read_text())
