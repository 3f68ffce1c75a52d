"""Cheap static checks of the book's sources (no build, no execution).

- every file named in _toc.yml exists; notebooks in the toc are committed without outputs
  and import nwflow; chapter notebooks end with at least 3 exercises, each with a solution;
- chapter hygiene: all imports in the first code cell (imports first, then set-up), no
  warning filters, nwflow modules under their own names (no single-letter or ad-hoc
  aliases, no ``nwflow.module.name`` chains), solvers given a field built once
  (``field.velocity``), not ``lambda x, t: nwflow.velocity(x, t, support)``;
- every {cite} key exists in book/references.bib, which has no duplicate keys;
- the references page holds a bibliography; the API reference documents every public
  nwflow module;
- the launch buttons follow the one repository URL setting (book/_ext/nwflow_site.py).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from test_book_install import install_cell, repository

INSTALL = install_cell(*repository())

ROOT = Path(__file__).resolve().parents[1]
EXERCISE = re.compile(r"^(`{3,}|:{3,})\{exercise\}[^\n]*\n(?::[a-z-]+:[^\n]*\n)*?:label:\s*(\S+)", re.M)
SOLUTION = re.compile(r"^(`{3,}|:{3,})\{solution\}\s+(\S+)", re.M)
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\s*\{\s*([^,\s]+)\s*,", re.M)
AUTOMODULE = re.compile(r"^\s*(?:\.\. automodule::|```\{automodule\})\s+(nwflow[\w.]*)", re.M)


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc.get("parts", toc.get("chapters", [])))
    return files


def _resolve(entry: str) -> Path | None:
    for suffix in ("", ".md", ".ipynb"):
        path = ROOT / f"{entry}{suffix}"
        if path.is_file():
            return path
    return None


TOC = _toc_files()
NOTEBOOKS = [p for p in map(_resolve, TOC) if p is not None and p.suffix == ".ipynb"]
CHAPTERS = [p for p in NOTEBOOKS if p.relative_to(ROOT).parts[1].startswith("part")]
PAGES = [p for p in map(_resolve, TOC) if p is not None]


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _markdown(path: Path) -> str:
    if path.suffix == ".md":
        return path.read_text()
    return "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")


def test_toc_has_a_root_and_chapters():
    assert TOC[0] == "book/intro"
    assert len(TOC) >= 3


@pytest.mark.parametrize("entry", TOC)
def test_toc_file_exists(entry):
    assert _resolve(entry) is not None, f"_toc.yml names {entry}, but no {entry}(.md|.ipynb) exists"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_committed_without_outputs(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), f"cell {i} has outputs: run nbconvert --clear-output"
        assert cell.get("execution_count") is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_imports_nwflow(path):
    code = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "code")
    assert re.search(r"^\s*(import nwflow|from nwflow[\w.]* import)", code, re.M), "no `import nwflow`"


def _code_cells(path: Path) -> list[tuple[int, str]]:
    """A chapter's code cells, without its install cell (tests/test_book_install.py checks that)."""
    return [(i, _source(c)) for i, c in enumerate(_cells(path))
            if c["cell_type"] == "code" and _source(c) != INSTALL]


def _imports(source: str) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a code cell, nested ones (inside if, def, try) included."""
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import | ast.ImportFrom)]


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_chapter_imports_live_in_its_first_code_cell(path):
    (first, head), *rest = _code_cells(path)
    assert _imports(head), f"the first code cell (cell {first}) holds no imports"
    late = {i: [ast.unparse(n) for n in _imports(src)] for i, src in rest if _imports(src)}
    assert not late, f"imports outside the first code cell (move them there): {late}"
    body = ast.parse(head).body
    kinds = [isinstance(node, ast.Import | ast.ImportFrom) for node in body]
    assert kinds == sorted(kinds, reverse=True), "the first code cell imports first, then sets up"


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_chapter_filters_no_warnings(path):
    found = [i for i, src in _code_cells(path) if re.search(r"\b(filterwarnings|simplefilter)\(", src)]
    assert not found, f"warning filters in cells {found}: fix the cause (nwflow._progress prevents tqdm's)"


AD_HOC_ALIASES = {"S", "C", "FR", "dv", "nwot", "prox", "rf"}


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_chapter_names_modules_by_their_names(path):
    bad = []
    for i, src in _code_cells(path):
        for node in _imports(src):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                if alias.asname is None:
                    continue
                first_party = (module or alias.name).split(".")[0] == "nwflow"
                if first_party or len(alias.asname) == 1 or alias.asname in AD_HOC_ALIASES:
                    bad.append(f"cell {i}: {ast.unparse(node)}")
        # nwflow.settings.pick(...) beside `from nwflow.settings import ...`: one way per module
        bad += [f"cell {i}: {ast.unparse(node)}" for node in ast.walk(ast.parse(src))
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "nwflow"]
    assert not bad, f"import nwflow modules as `from nwflow import <module>` (or names from them): {bad}"


REBUILT_FIELD = re.compile(r"lambda\s+\w+\s*,\s*\w+\s*:\s*nwflow\.(velocity|posterior_mean|score)\(")


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_chapter_builds_a_field_once_for_the_solvers(path):
    text = "\n".join(_source(c) for c in _cells(path))
    found = REBUILT_FIELD.findall(text)
    assert not found, ("a lambda around nwflow.velocity rebuilds the field at every step: "
                       "field = nwflow.EmpiricalField(support); integrate(field.velocity, x0, ...)")


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_chapter_has_exercises_with_solutions(path):
    text = _markdown(path)
    exercises = [m.group(2) for m in EXERCISE.finditer(text)]
    solutions = {m.group(2) for m in SOLUTION.finditer(text)}
    assert len(exercises) >= 3, f"{len(exercises)} labelled exercises, want at least 3"
    missing = [label for label in exercises if label not in solutions]
    assert not missing, f"exercises without a solution: {missing}"


DIRECTIVE_FENCE = re.compile(r"^(`{3,})\{(exercise|solution)\}")


def _broken_fences(text: str) -> list[str]:
    """Exercise/solution blocks whose own fence is closed early by a nested code block.

    Inside a block opened with N backticks, a line of N or more backticks followed by a
    language (```python) is content, so the nested block's closing ``` ends the OUTER
    block and the rest of the page is misparsed. The outer fence needs more backticks.
    """
    lines, broken = text.splitlines(), []
    for i, line in enumerate(lines):
        m = DIRECTIVE_FENCE.match(line)
        if not m:
            continue
        n = len(m.group(1))
        for inner in lines[i + 1:]:
            if inner.strip() == "`" * n:
                break
            if re.match(rf"^`{{{n},}}\w", inner):
                broken.append(line.strip())
                break
    return broken


@pytest.mark.parametrize("path", PAGES, ids=_ids(PAGES))
def test_exercise_fences_survive_nested_code(path):
    broken = _broken_fences(_markdown(path))
    assert not broken, f"use a longer outer fence (````) for blocks holding code: {broken}"


def _labels(path: Path) -> list[str]:
    """Cross-reference targets a page defines: figures, equations, directive labels, MyST targets."""
    text = _markdown(path)
    found = re.findall(r"\$\$\s*\(([\w:-]+)\)", text)                  # $$ ... $$ (eq-name)
    found += re.findall(r"^\s*:(?:label|name):\s*(\S+)", text, re.M)      # directive options
    found += re.findall(r"^\(([\w:-]+)\)=\s*$", text, re.M)              # (target)=
    if path.suffix == ".ipynb":
        for cell in _cells(path):
            figure = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
            if "name" in figure:
                found.append(figure["name"])
    return found


def test_cross_reference_labels_are_unique_across_the_book():
    seen: dict[str, list[str]] = {}
    for page in PAGES:
        for label in _labels(page):
            seen.setdefault(label, []).append(page.relative_to(ROOT).as_posix())
    duplicates = {k: v for k, v in seen.items() if len(v) > 1}
    assert not duplicates, f"labels defined more than once (Sphinx warns, -W fails): {duplicates}"


def test_exercise_labels_are_unique():
    labels = [m.group(2) for p in PAGES for m in EXERCISE.finditer(_markdown(p))]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    assert not duplicates, f"exercise labels used twice: {duplicates}"


def _bib_keys() -> list[str]:
    return BIB_KEY.findall((ROOT / "book" / "references.bib").read_text())


def test_bibliography_has_no_duplicate_keys():
    keys = _bib_keys()
    assert len(keys) >= 8
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicate BibTeX keys: {duplicates}"


def test_the_four_papers_are_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    for arxiv in ("2605.13386", "2506.03719", "2602.12683", "2510.18118"):
        assert arxiv in bib, f"arXiv {arxiv} missing from references.bib"


def test_cited_keys_exist():
    keys = set(_bib_keys())
    missing = {}
    for page in PAGES:
        for group in CITE.findall(_markdown(page)):
            for key in (k.strip() for k in group.split(",")):
                if key not in keys:
                    missing.setdefault(key, []).append(page.relative_to(ROOT).as_posix())
    assert not missing, f"cited but not in references.bib: {missing}"


def test_references_page_has_the_bibliography():
    assert "book/references" in TOC
    assert re.search(r"^```\{bibliography\}", (ROOT / "book" / "references.md").read_text(), re.M)


def _library_files() -> list[Path]:
    """nwflow's .py files; only the committed ones inside a git checkout (work in progress is not yet API)."""
    try:
        out = subprocess.run(["git", "ls-files", "nwflow"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return sorted((ROOT / "nwflow").rglob("*.py"))
    return sorted(ROOT / f for f in out if f.endswith(".py"))


def test_api_reference_documents_every_public_module():
    documented = set()
    for page in (ROOT / "book" / "api").glob("*.md"):
        documented.update(AUTOMODULE.findall(page.read_text()))
    # Every public module file (inside packages too, e.g. nwflow/data/toy.py -> nwflow.data.toy).
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in _library_files()
               if not any(part.startswith("_") for part in p.relative_to(ROOT / "nwflow").parts)}
    missing = sorted(modules - documented)
    assert not missing, f"add an automodule block for {missing} to book/api/index.md"
    gone = sorted(m for m in documented if not (ROOT / (m.replace(".", "/") + ".py")).is_file())
    assert not gone, f"book/api documents modules that do not exist: {gone}"
    assert any(_resolve(e) == ROOT / "book" / "api" / "index.md" for e in TOC)


def _site_module():
    path = ROOT / "book" / "_ext" / "nwflow_site.py"
    spec = importlib.util.spec_from_file_location("nwflow_site", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_buttons_follow_the_repository_url():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "nwflow_site" in config["sphinx"]["local_extensions"]
    launch = config["launch_buttons"]
    assert launch["binderhub_url"] and launch["colab_url"]
    assert "url" in config["repository"]
    options = {"launch_buttons": launch, "repository_url": config["repository"]["url"]}
    policy = _site_module().launch_options
    off = policy({**options, "repository_url": ""})
    assert not any(off["launch_buttons"].get(k) for k in ("binderhub_url", "colab_url"))
    assert "repository_url" not in off and off["use_download_button"] is True
    on = policy({**options, "repository_url": "https://github.com/someone/nwflow"})
    assert on["launch_buttons"]["binderhub_url"] == launch["binderhub_url"]
    assert on["launch_buttons"]["colab_url"] == launch["colab_url"]
    assert on["use_repository_button"] is True and on["use_download_button"] is True


def test_inline_scripts_are_emitted_once():
    from sphinx.builders.html._assets import _JavaScript

    site = _site_module()
    body = "const A = 1"
    scripts = [_JavaScript("a.js"), _JavaScript(None, body=body), _JavaScript("", body=body),
               _JavaScript("b.js")]
    assert [js.filename for js in site.unique_scripts(scripts)] == ["a.js", None, "b.js"]
