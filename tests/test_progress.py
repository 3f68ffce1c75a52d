"""progress_bar never warns, in the situation where ``tqdm.auto`` does, and never shows a widget.

That situation: a Jupyter kernel (nbval, the book build's nbclient, JupyterLab) with an
ipywidgets that is installed, so that ``importlib.util.find_spec`` finds it, but fails to
import (a missing dependency). ``tqdm.auto`` then warns "IProgress not found" on stderr, and
the book build (``stderr_output: warn``, ``-W``) fails. It is simulated with a real package
directory named ``ipywidgets`` whose import raises, and once more in a real kernel.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings

import IPython
import pytest
from tqdm import TqdmWarning
from tqdm.std import tqdm as text_bar

from nwflow._progress import progress_bar

BROKEN_IPYWIDGETS = 'raise ImportError("ipywidgets needs comm, which is not installed")\n'
FRESH = ("ipywidgets", "tqdm.notebook", "tqdm.autonotebook", "tqdm.auto")


class ZMQInteractiveShell:
    """Stands in for the shell of a Jupyter kernel: tqdm and nwflow look at its class name."""


@pytest.fixture
def kernel_with_broken_ipywidgets(monkeypatch, tmp_path):
    (tmp_path / "ipywidgets").mkdir()
    (tmp_path / "ipywidgets" / "__init__.py").write_text(BROKEN_IPYWIDGETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    shell = ZMQInteractiveShell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    # tqdm.autonotebook also requires the kernel's shell module to be loaded.
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", type(sys)("ipykernel.zmqshell"))
    saved = {name: sys.modules.pop(name) for name in FRESH if name in sys.modules}
    yield
    for name in FRESH:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


def test_the_simulation_reproduces_the_tqdm_auto_warning(kernel_with_broken_ipywidgets):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import tqdm.auto  # noqa: F401
    assert any(issubclass(w.category, TqdmWarning) and "IProgress not found" in str(w.message)
               for w in caught)


def test_no_warning_in_a_kernel_with_broken_ipywidgets(kernel_with_broken_ipywidgets):
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = progress_bar(range(4), desc="steps", file=out)
        assert list(bar) == [0, 1, 2, 3]
    assert caught == []
    assert type(bar) is text_bar and "steps" in out.getvalue()


def test_warnings_as_errors_in_a_kernel_with_broken_ipywidgets(kernel_with_broken_ipywidgets):
    # What -W does to the book build. tqdm.autonotebook catches a warning raised as an error
    # and falls back silently, so this alone would not see the old fault: the recording
    # tests above and below do.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with progress_bar(total=3, file=io.StringIO()) as bar:
            bar.update(3)
    assert bar.n == 3


def _kernel_outputs(code: str, tmp_path) -> list[dict]:
    """The outputs of ``code`` run as one cell in a real kernel under nbclient (what nbval and the
    book build run), in a subprocess: the kernel's shutdown warns (ipykernel), which pytest would
    count against the test."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    path = tmp_path / "bar.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path)
    script = ("import json, sys, nbformat\nfrom nbclient import NotebookClient\n"
              "nb = nbformat.read(sys.argv[1], 4)\nNotebookClient(nb, timeout=120).execute()\n"
              "print(json.dumps(nb.cells[0].outputs))\n")
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_text_bar_outside_a_kernel_and_silent_when_disabled(capsys):
    bar = progress_bar(range(2), desc="plain")
    assert type(bar) is text_bar and list(bar) == [0, 1]
    assert "plain" in capsys.readouterr().err
    assert list(progress_bar(range(2), enabled=False, desc="quiet")) == [0, 1]
    assert capsys.readouterr().err == ""


def test_no_warning_in_a_real_kernel_with_broken_ipywidgets(tmp_path):
    """The same under nbclient (what nbval and the book build run): stderr holds the bar, no warning."""
    pytest.importorskip("ipykernel")
    (tmp_path / "ipywidgets").mkdir()
    (tmp_path / "ipywidgets" / "__init__.py").write_text(BROKEN_IPYWIDGETS)
    code = ("import sys, warnings\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "warnings.simplefilter('always')\n"
            "from nwflow._progress import progress_bar\n"
            "for _ in progress_bar(range(3), desc='kernel bar'):\n"
            "    pass\n")
    outputs = _kernel_outputs(code, tmp_path)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "kernel bar" in stderr
    assert "Warning" not in stderr and "IProgress" not in stderr, stderr


def test_a_real_kernel_with_working_ipywidgets_gets_the_text_bar_not_a_widget(tmp_path):
    """Widget output would make the built page load require.js and the widget manager from a CDN
    (the offline site check fails on it): the bar must be text on stderr even where widgets work."""
    pytest.importorskip("ipywidgets")
    code = ("from nwflow._progress import progress_bar\n"
            "for _ in progress_bar(range(3), desc='kernel bar'):\n"
            "    pass\n")
    outputs = _kernel_outputs(code, tmp_path)
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert "kernel bar" in "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
