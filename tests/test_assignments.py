"""The course's auto-graded assignments (book/assignments), graded offline with otter-grader.

Each master ``book/assignments/<name>/<name>.ipynb`` (otter's raw-cell assign format) goes
through ``otter assign`` once per session; its autograder then grades four notebooks with
``otter run`` (no Docker): the solution (full marks), the untouched student copy (zero), the
solution with one typical mistake planted in every question (each question must lose points on
a hidden test) and the solution with a cell that raises (that question gets zero, the others
full marks). The questions of an assignment are independent (checked below), so one notebook
carries every planted mistake and each question's score reflects its own.

Static checks: the structure of each master, no solution or hidden test text in the student
copy, the committed student copy (the website's page) equals a fresh ``otter assign``, and the
book's toc and configuration show the student copies unexecuted and never the masters.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book" / "assignments"
OTTER = Path(sys.executable).with_name("otter")
ASSIGNMENTS = sorted(p.name for p in BOOK.iterdir() if (p / f"{p.name}.ipynb").is_file())

_spec = importlib.util.spec_from_file_location("test_book_install", ROOT / "tests" / "test_book_install.py")
book_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(book_install)

# One typical mistake per question: (text of the solution, the mistaken text), applied inside
# that question's solution cells of the autograder's solution notebook.
MISTAKES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "a1_flow_matching": {
        "q1": [("return (1 - t) * x0 + t * x1", "return t * x0 + (1 - t) * x1")],       # ends swapped
        "q2": [("return (x1 - x) / (1 - t)", "return x1 - x")],                         # forgets 1/sigma_t
        "q3": [("steps + 1, dtype", "steps, dtype")],                                   # off-by-one grid
        "q4": [("torch.tensor(k * h,", "torch.tensor((k + 1) * h,")],                   # field at t_{k+1}
    },
    "a2_closed_form": {
        "q1": [("(2 * (1 - t) ** 2)", "(2 * (1 - t))")],                          # sigma_t, not sigma_t^2
        "q2": [("return (mean - x) / (1 - t)", "return mean - x")],                     # forgets 1/sigma_t
        "q3": [("/ sum(kernels) - x) / (1 - t)", "/ sum(kernels)) / (1 - t)")],         # the mean, not u
        "q4": [("return (1 - t) / t", "return 1 - t")],                                 # sigma_t, not h(t)
    },
    "a3_streaming_softmax": {
        "q1": [("torch.exp(logits - logits.amax(dim=-1, keepdim=True))", "torch.exp(logits)")],  # no shift
        "q2": [("torch.logaddexp(total, part)", "total + part")],                       # sums chunk LSEs
        "q3": [("norm = norm * scale +", "norm = norm +"),                            # no rescaling
               ("num = num * scale +", "num = num +")],
        "q4": [(" - (t**2 / (2 * s2)) * Y.square().sum(dim=1)", "")],                   # drops the key bias
    },
    "a4_sampling_memorisation": {
        "q1": [("x, h = x0, 1.0 / steps", "x, h = x0, 1.0 / (steps + 1)")],             # off-by-one grid
        "q2": [("d = torch.cdist(samples, Y)\n", "d = torch.cdist(samples, Y).square()\n")],  # squared
        "q3": [("(d[:, 0] < ratio * d[:, 1])", "(d[:, 0] < d[:, 1] / ratio)")],         # ratio inverted
        "q4": [("return 1.0 / w.square().sum(dim=1)", "return w.square().sum(dim=1)")],  # forgets 1/...
    },
    "a6_empirical_flow_matching": {
        "q1": [("torch.cat([x1[:, None, :], refs[None].expand(x.shape[0], -1, -1)], dim=1)",
                "refs[None].expand(x.shape[0], -1, -1)")],                              # leaves out b^(1)
        "q2": [("torch.randint(0, n, (k,), generator=generator)",
                "(torch.rand(k, generator=generator) * (n - 1)).round().long()")],      # biased uniform
        "q3": [("torch.multinomial(w, 1, generator=generator).squeeze(1)",
                "torch.randint(0, Y.shape[0], (x.shape[0],), generator=generator)")],   # uniform b^(1)
    },
    "a8_pair_field": {
        "q1": [("centres = (1 - t) * x0 + t * x1", "centres = t * x1")],                # Part I's centres
        "q2": [("return w @ (x1 - x0)", "return (w @ x1 - x) / (1 - t)")],              # Part I's target
        "q3": [("for k in range(steps):", "for k in range(steps - 1):")],               # off-by-one grid
    },
}
RAISE = 'raise RuntimeError("a student cell that raises")\n'
CHECK = re.compile(r'^grader\.check\("(\w+)"\)$')
CASE = re.compile(r"(\w+) - (\d+) result:\n\s*(\S+) Test case (passed|failed)")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def master(name: str) -> Path:
    return BOOK / name / f"{name}.ipynb"


def _questions(name: str) -> dict[str, dict]:
    """Per question of a master: points, solution sources, public and hidden test sources."""
    questions, current, block = {}, None, None
    for cell in _cells(master(name)):
        src = _source(cell)
        if cell["cell_type"] == "raw":
            head = src.strip().splitlines()[0] if src.strip() else ""
            if head == "# BEGIN QUESTION":
                config = yaml.safe_load("\n".join(src.splitlines()[1:]))
                current = questions.setdefault(config["name"], {
                    "points": config.get("points"), "solution": [], "public": [], "hidden": [], "text": []})
            elif head == "# END QUESTION":
                current = None
            elif head in ("# BEGIN SOLUTION", "# BEGIN TESTS"):
                block = head.split()[-1].lower()
            elif head in ("# END SOLUTION", "# END TESTS"):
                block = None
        elif current is not None and cell["cell_type"] == "markdown":
            current["text"].append(src)
        elif current is not None and block == "solution":
            current["solution"].append(src)
        elif current is not None and block == "tests":
            hidden = src.lstrip().startswith("#") and re.search(r"\bhidden\b", src.splitlines()[0], re.I)
            current["hidden" if hidden else "public"].append(src)
    return questions


def _segments(cells: list[dict]) -> dict[str, list[int]]:
    """Code cells answering each question of a generated notebook: those after the preamble (the
    cell that creates the grader) or the previous ``grader.check`` and before ``grader.check(q)``."""
    start = next(i for i, c in enumerate(cells) if "otter.Notebook(" in _source(c)) + 1
    segments, pending = {}, []
    for i in range(start, len(cells)):
        if cells[i]["cell_type"] != "code":
            continue
        match = CHECK.match(_source(cells[i]).strip())
        if match:
            segments[match.group(1)], pending = pending, []
        else:
            pending.append(i)
    return segments


def _planted(solution: Path, edits: dict[str, list[tuple[str, str]]], out: Path) -> Path:
    notebook = json.loads(solution.read_text())
    cells, segments = notebook["cells"], _segments(notebook["cells"])
    for question, pairs in edits.items():
        for old, new in pairs:
            hits = [i for i in segments[question] if old in _source(cells[i])]
            assert len(hits) == 1 and _source(cells[hits[0]]).count(old) == 1, (
                f"{question}: the planted mistake's text {old!r} must occur once in its solution")
            cells[hits[0]]["source"] = _source(cells[hits[0]]).replace(old, new)
    out.write_text(json.dumps(notebook))
    return out


def _raising(solution: Path, question: str, out: Path) -> Path:
    notebook = json.loads(solution.read_text())
    first = _segments(notebook["cells"])[question][0]
    notebook["cells"][first]["source"] = RAISE + _source(notebook["cells"][first])
    out.write_text(json.dumps(notebook))
    return out


def _hidden_cases(zip_path: Path) -> dict[str, list[bool]]:
    """Question -> hidden flag of each test case, read from the autograder's test files."""
    flags = {}
    with zipfile.ZipFile(zip_path) as z:
        for member in z.namelist():
            if re.fullmatch(r"tests/\w+\.py", member):
                scope: dict = {}
                exec(z.read(member).decode(), scope)  # an OK-format test file defines `test`
                test = scope["test"]
                flags[test["name"]] = [case["hidden"] for suite in test["suites"] for case in suite["cases"]]
    return flags


def _otter_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NWFLOW_")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# Jupyter kernels talk over TCP ports chosen at start-up; beside the suite's other parallel
# jobs (its other worker, torch.distributed's stores) a kernel has been seen to die before its
# first reply. That start-up failure, and only it, is retried once.
_KERNEL_START_FAILED = "Kernel died before replying to kernel_info"


def _otter(command: list[str], cwd: Path, finished: Path | None = None,
           fresh: Path | None = None) -> tuple[int, str, str]:
    """Run ``otter`` in its own session (a kernel left behind is killed with it): exit code,
    stdout, stderr. ``finished``: a file whose presence, with the grading summary printed, means
    the work is done when the process then does not exit (seen under load: a kernel that does
    not shut down). ``fresh``: an output folder removed before each attempt."""
    attempt = 0
    while True:
        attempt += 1
        if fresh is not None and fresh.exists():
            shutil.rmtree(fresh)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                env=_otter_env(), start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=600)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            done = finished is not None and "GRADING SUMMARY" in stdout and finished.is_file()
            code = 0 if done else -9
        if code == 0 or attempt == 2 or _KERNEL_START_FAILED not in stdout + stderr:
            return code, stdout, stderr


def _grade(zip_path: Path, notebook: Path, out: Path) -> dict[str, dict]:
    """``otter run`` on one notebook: question -> score, max_score and the failed case numbers."""
    out.mkdir(parents=True)
    code, stdout, stderr = _otter([str(OTTER), "run", "--no-logo", "-a", str(zip_path), "-o", str(out),
                                   str(notebook)], out, finished=out / "results.json")
    assert code == 0, f"otter run failed on {notebook}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    scores = {}
    for test in json.loads((out / "results.json").read_text())["tests"]:
        if test.get("max_score") is None:
            continue  # the summary of public tests
        failed = {int(n) - 1 for q, n, _, status in CASE.findall(test.get("output", ""))
                  if q == test["name"] and status == "failed"}
        scores[test["name"]] = {"score": test["score"], "max": test["max_score"], "failed": failed}
    return scores


def _assign(name: str, base: Path) -> dict:
    out = base / name
    code, stdout, stderr = _otter([str(OTTER), "assign", "-v", f"{name}.ipynb", str(out)], BOOK / name,
                                  fresh=out)
    assert code == 0 and "All autograder tests passed" in stdout + stderr, (
        f"otter assign {name} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    (zip_path,) = (out / "autograder").glob("*.zip")
    return {"out": out, "zip": zip_path, "solution": out / "autograder" / f"{name}.ipynb",
            "student": out / "student" / f"{name}.ipynb", "hidden": _hidden_cases(zip_path)}


def _build_and_grade(name: str, base: Path) -> dict:
    built = _assign(name, base)
    variants = base / f"{name}-variants"
    variants.mkdir()
    first = next(iter(_questions(name)))
    notebooks = {
        "solution": built["solution"],
        "student": built["student"],
        "mistakes": _planted(built["solution"], MISTAKES.get(name, {}), variants / f"{name}.ipynb"),
    }
    (variants / "raises").mkdir()
    notebooks["raises"] = _raising(built["solution"], first, variants / "raises" / f"{name}.ipynb")
    built["grades"] = {kind: _grade(built["zip"], nb, base / f"{name}-{kind}")
                       for kind, nb in notebooks.items()}
    built["first"] = first
    return built


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict[str, dict]:
    """Every assignment assigned and graded once for the module (two at a time: subprocesses)."""
    base = tmp_path_factory.mktemp("assignments")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_build_and_grade, name, base) for name in ASSIGNMENTS}
        results = {name: f.result() for name, f in futures.items()}
    elapsed = time.perf_counter() - start
    print(f"\notter assign and 4 otter runs for each of {len(results)} assignments: {elapsed:.0f} s")
    return results


def test_there_are_assignments_for_each_part_one_chapter_and_two_papers():
    chapters = {int(re.match(r"a(\d+)_", n).group(1)) for n in ASSIGNMENTS}
    assert {1, 2, 3, 4} <= chapters and len(chapters - {1, 2, 3, 4}) >= 2, ASSIGNMENTS
    assert set(MISTAKES) == set(ASSIGNMENTS), "every assignment needs its planted mistakes"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_master_structure(name):
    cells = _cells(master(name))
    config = yaml.safe_load("\n".join(_source(cells[0]).splitlines()[1:]))
    assert _source(cells[0]).startswith("# ASSIGNMENT CONFIG") and config["name"] == name
    assert config["strip_solutions_from_all_cells"] is True and config["tests"]["files"] is False
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert _source(first_code) == book_install.install_cell(*book_install.repository(), assignment=True)
    questions = _questions(name)
    assert 3 <= len(questions) <= 6, list(questions)
    for q, spec in questions.items():
        assert isinstance(spec["points"], int | float) and spec["points"] > 0, q
        assert re.search(rf"\({spec['points']:g} points?\)", spec["text"][0]), f"{q}: state the points"
        assert spec["solution"] and spec["public"] and spec["hidden"], f"{q}: solution, public, hidden tests"
        assert set(MISTAKES[name]) == set(questions), f"{name}: one planted mistake per question"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_questions_are_independent(name):
    """No question's cells use a name another question's solution defines: a student's mistake (or
    a raising cell) in one question costs points there only, and the graders can tell."""
    questions = _questions(name)
    defined = {q: {n.name for src in spec["solution"] for n in ast.parse(src).body
                   if isinstance(n, ast.FunctionDef | ast.ClassDef)} for q, spec in questions.items()}
    for q, spec in questions.items():
        used = {n.id for src in spec["solution"] + spec["public"] + spec["hidden"]
                for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}
        others = set().union(*(d for other, d in defined.items() if other != q))
        assert not used & others, f"{q} uses {sorted(used & others)}, defined by another question"


def _student_text(name: str) -> str:
    return (BOOK / name / "student" / f"{name}.ipynb").read_text()


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_no_solution_or_hidden_test_leaks_into_the_student_copy(name):
    questions = _questions(name)
    visible = "\n".join(_source(c) for c in _cells(master(name)) if c["cell_type"] == "markdown")
    visible += "\n".join(src for spec in questions.values() for src in spec["public"])
    student = json.loads(_student_text(name))
    text = "\n".join(_source(c) for c in student["cells"]) + json.dumps(student["metadata"])
    secret = []
    for spec in questions.values():
        for src in spec["solution"]:
            body = re.search(r"# BEGIN SOLUTION\n(.*?)# END SOLUTION", src, re.S)
            secret += body.group(1).splitlines() if body else src.splitlines()
        for src in spec["hidden"]:
            secret += src.splitlines()[1:]
    lines = {line.strip() for line in secret if len(line.strip()) >= 8 and line.strip() not in visible}
    assert lines, "nothing to look for"
    leaked = sorted(line for line in lines if line in text or json.dumps(line)[1:-1] in text)
    assert not leaked, f"solution or hidden-test text in the student notebook: {leaked}"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_student_copy_has_no_outputs_and_no_raw_cells(name):
    cells = json.loads(_student_text(name))["cells"]
    assert all(c["cell_type"] != "raw" for c in cells)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_committed_student_copy_is_current(graded, name):
    """The page the website shows is what `make assignments` writes from the master today."""
    fresh = json.loads(graded[name]["student"].read_text())
    committed = json.loads(_student_text(name))
    cells = [(c["cell_type"], _source(c)) for c in committed["cells"]]
    assert cells == [(c["cell_type"], _source(c)) for c in fresh["cells"]], "run make assignments, commit it"
    assert committed["metadata"].get("otter") == fresh["metadata"].get("otter")


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_master_solution_scores_full_marks(graded, name):
    grades, questions = graded[name]["grades"]["solution"], _questions(name)
    assert set(grades) == set(questions)
    for q, g in grades.items():
        assert g["max"] == questions[q]["points"] and g["score"] == g["max"], (q, g)


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_untouched_student_notebook_scores_zero(graded, name):
    grades = graded[name]["grades"]["student"]
    assert set(grades) == set(_questions(name))
    assert all(g["score"] == 0 for g in grades.values()), grades


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_each_planted_mistake_fails_a_hidden_test(graded, name):
    grades, hidden = graded[name]["grades"]["mistakes"], graded[name]["hidden"]
    for q in _questions(name):
        g = grades[q]
        assert g["score"] < g["max"], f"{q}: the planted mistake {MISTAKES[name][q]} still scores full marks"
        assert any(hidden[q][i] for i in g["failed"]), f"{q}: no hidden test caught the planted mistake ({g})"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_a_raising_cell_scores_zero_and_grading_goes_on(graded, name):
    grades, first = graded[name]["grades"]["raises"], graded[name]["first"]
    assert grades[first]["score"] == 0, grades[first]
    others = {q: g for q, g in grades.items() if q != first}
    assert others and all(g["score"] == g["max"] for g in others.values()), others


def _toc_files() -> list[str]:
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    return found


def test_toc_shows_student_copies_and_never_masters():
    files = set(_toc_files())
    for name in ASSIGNMENTS:
        assert f"book/assignments/{name}/student/{name}" in files, name
        assert f"book/assignments/{name}/{name}" not in files, f"the master of {name} must not be a page"
    assert "book/instructors" in files


def test_book_never_executes_the_student_copies():
    """An unfilled student notebook raises when run; the book renders it as committed."""
    execute = yaml.safe_load((ROOT / "_config.yml").read_text())["execute"]
    patterns = execute.get("exclude_patterns") or []

    def excluded(rel: str) -> bool:  # myst-nb's test: PurePosixPath(absolute path).match(pattern)
        return any(PurePosixPath((ROOT / rel).as_posix()).match(p) for p in patterns)

    for name in ASSIGNMENTS:
        assert excluded(f"book/assignments/{name}/student/{name}.ipynb"), (name, patterns)
    assert not excluded("book/part1_closed_form/01_flow_matching.ipynb")


def test_make_assignments_writes_student_and_autograder_folders():
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^assignments\s*:.*\n((?:\t.*\n)+)", text, flags=re.M).group(1)
    assert "otter assign" in recipe and "student" in recipe
    assert re.search(r"^ASSIGNMENTS_OUT\s*:?=\s*_build/assignments\s*$", text, flags=re.M)
    assert shutil.which("otter", path=str(OTTER.parent)), "otter-grader is in the test extra"
