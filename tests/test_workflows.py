"""The GitHub Actions workflows are linted here, so a broken one fails `make test`, not a push.

The linter is check-jsonschema (test extra) with the GitHub workflow schema it ships
(``--builtin-schema vendor.github-workflows``): it runs offline. actionlint's PyPI package was
the first choice, but it publishes only a source distribution whose build downloads the Go
binary from GitHub, which an offline machine cannot do. The schema catches structural errors
(unknown keys, a job without ``runs-on`` or steps, bad triggers); the checks below add what the
book's publishing needs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
LINTER = Path(sys.executable).with_name("check-jsonschema")


def _lint(*paths: Path) -> subprocess.CompletedProcess:
    if not LINTER.exists():
        pytest.fail(f"{LINTER} is missing: pip install -e '.[test]' (check-jsonschema)")
    return subprocess.run([str(LINTER), "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def test_workflows_pass_the_linter():
    assert WORKFLOWS, "no workflow under .github/workflows"
    run = _lint(*WORKFLOWS)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("broken", [
    ("runs-on: ubuntu-latest", "runs_on: ubuntu-latest"),      # a misspelt key
    ("on:\n", "trigger:\n"),                                    # no trigger
    ("timeout-minutes: 90", "timeout-minutes: soon"),           # a wrong type
], ids=["misspelt-key", "no-trigger", "wrong-type"])
def test_the_linter_rejects_a_broken_workflow(tmp_path, broken):
    old, new = broken
    text = WORKFLOWS[0].read_text()
    assert old in text
    path = tmp_path / "broken.yml"
    path.write_text(text.replace(old, new, 1))
    assert _lint(path).returncode != 0


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _uses(job: dict) -> list[str]:
    return [s["uses"].split("@")[0] for s in _steps(job) if "uses" in s]


def _runs(job: dict) -> str:
    return "\n".join(s.get("run", "") for s in _steps(job))


def test_book_is_built_tested_and_deployed_to_pages_on_main():
    flows = [_load(p) for p in WORKFLOWS]
    jobs = {name: job for flow in flows for name, job in flow["jobs"].items()}
    on = next(f["on"] for f in flows if any("actions/deploy-pages" in _uses(j) for j in f["jobs"].values()))
    assert "main" in on["push"]["branches"]
    test = next(j for j in jobs.values() if re.search(r"^make test$", _runs(j), re.M))
    build = next(j for j in jobs.values() if re.search(r"^make book$", _runs(j), re.M))
    deploy = next(j for j in jobs.values() if "actions/deploy-pages" in _uses(j))
    assert {"actions/configure-pages", "actions/upload-pages-artifact"} <= set(_uses(build))
    upload = next(s for s in _steps(build) if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    # The chapters' caches: jupyter-cache's executions and the training checkpoints.
    cache = next(s for s in _steps(build) if s.get("uses", "").startswith("actions/cache"))
    assert "_build/.jupyter_cache" in cache["with"]["path"] and "~/.cache/nwflow" in cache["with"]["path"]
    names = {id(j): n for n, j in jobs.items()}
    needs = deploy["needs"] if isinstance(deploy["needs"], list) else [deploy["needs"]]
    assert {names[id(test)], names[id(build)]} <= set(needs), "deploy only what built and passed"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert "refs/heads/main" in deploy["if"], "pull requests build and test, and deploy nothing"


def test_actions_are_pinned_to_a_version():
    for path in WORKFLOWS:
        for job in _load(path)["jobs"].values():
            for step in _steps(job):
                if "uses" in step:
                    pinned = re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", step["uses"])
                    assert pinned, f"{path.name}: {step['uses']} is not pinned"
