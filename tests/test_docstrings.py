"""The API pages' docstrings: book/_ext/nwflow_docstrings.py turns a docstring into reST (prose
as literal blocks, ``.. math::`` as math), and every public function of the math modules states
its equation (a ``.. math::`` block), its shapes and the chapter that derives it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import docutils.core
import docutils.utils
import pytest
from docutils import nodes

ROOT = Path(__file__).resolve().parents[1]
_EXT = ROOT / "book" / "_ext" / "nwflow_docstrings.py"
_spec = importlib.util.spec_from_file_location("nwflow_docstrings", _EXT)
ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ext)

MODULES = ["path", "empirical", "distributed", "attention", "efm", "ot", "proximal", "rectified",
           "conditioner", "solvers", "metrics"]

# Public names without an equation or without tensors, each with its reason.
EXEMPT = {
    "nwflow.solvers.METHODS": "a constant: the table of fixed-step methods",
    "nwflow.solvers.ADAPTIVE_METHODS": "a constant: the names of torchdiffeq's adaptive methods",
    "nwflow.attention.GaussianKernelAttention.extra_repr": "nn.Module's repr hook",
    "nwflow.distributed.ShardedField.posterior_weights": "not provided over a sharded support: it raises",
}

SHAPE = re.compile(r"\((?:\*?\w+(?: [+-] \d+)?, ?)+(?:\*?\w+(?: [+-] \d+)?)?\)|\bshapes?\b", re.IGNORECASE)
CHAPTER = re.compile(r"\b[Cc]hapters? [1-8]\b")


def doctree(text: str) -> nodes.document:
    """A docstring as the API page parses it; a warning (a malformed directive) raises."""
    rest = "\n".join(ext.to_rest(inspect.cleandoc(text).splitlines()))
    return docutils.core.publish_doctree(rest, settings_overrides={"report_level": 2, "halt_level": 2})


def blocks(text: str) -> list[tuple[str, str]]:
    return [(n.tagname, n.astext()) for n in doctree(text).children]


def unbalanced(latex: str) -> str | None:
    """What is unbalanced in ``latex`` (braces, \\left/\\right, \\begin/\\end), or None."""
    stack: list[str] = []
    for token in re.findall(r"\\[{}]|\\left\b|\\right\b|\\begin\{\w+\*?\}|\\end\{\w+\*?\}|[{}]", latex):
        if token in ("\\{", "\\}"):
            continue
        if token in ("{", "\\left") or token.startswith("\\begin"):
            stack.append(token)
            continue
        want = {"}": "{", "\\right": "\\left"}.get(token, token.replace("\\end", "\\begin"))
        if not stack or stack[-1] != want:
            return f"{token} without its {want}"
        stack.pop()
    return f"{stack[-1]} is never closed" if stack else None


# -- the splitting function, on examples --
def test_prose_is_one_literal_block_verbatim():
    text = "Weights w_j = softmax(-||x - t x^(j)||^2 / 2 s^2) of *every* row.\n\n- x: (B, *S)\n  |rows|"
    assert blocks(text) == [("literal_block", text)]
    assert ext.to_rest([]) == [] and ext.to_rest(["", "  "]) == []


def test_math_passes_through_between_literal_blocks():
    text = """Noise scale |t|.

    .. math:: \\sigma_t = 1 - t

    Chapter 1, *shapes* kept."""
    assert blocks(text) == [("literal_block", "Noise scale |t|."), ("math_block", "\\sigma_t = 1 - t"),
                            ("literal_block", "Chapter 1, *shapes* kept.")]


def test_math_body_with_blank_lines_and_an_argument_line():
    text = """Two equations.

    .. math::

        a = b,

        c = \\frac{d}{e}
    after the body, at the directive's indent
    .. math:: u = m
        - x
    """
    got = blocks(text)
    assert got == [("literal_block", "Two equations."), ("math_block", "a = b,"),
                   ("math_block", "c = \\frac{d}{e}"),
                   ("literal_block", "after the body, at the directive's indent"),
                   ("math_block", "u = m\n- x")]


def test_indented_math_moves_to_the_margin_and_ends_at_its_indent():
    lines = ["- item one:", "", "    .. math:: x_t = t x_1", "", "      continued", "  back in the list"]
    assert ext.to_rest(lines) == [".. code:: text", "", "    - item one:", "", ".. math:: x_t = t x_1", "",
                                  "  continued", "", ".. code:: text", "", "      back in the list", ""]


def test_a_malformed_math_directive_fails_and_unbalanced_latex_is_seen():
    with pytest.raises(docutils.utils.SystemMessage):
        doctree("Text.\n\n.. math::\n\nNo body.")
    with pytest.raises(docutils.utils.SystemMessage):
        doctree("Text.\n\n.. math::\n    :nonsense: 1\n\n    x")
    assert unbalanced(r"\frac{a}{b}") is None
    assert unbalanced(r"\left( \{x\} \right)") is None
    assert unbalanced(r"\frac{a}{b") == "{ is never closed"
    assert unbalanced(r"\left( x") == "\\left is never closed"
    assert unbalanced(r"x \right)") == "\\right without its \\left"
    assert unbalanced(r"\begin{cases} a \end{aligned}") == "\\end{aligned} without its \\begin{aligned}"


# -- every public function of the math modules --
def _public() -> list[tuple[str, object]]:
    out = []
    for name in MODULES:
        module = importlib.import_module(f"nwflow.{name}")
        for attr in module.__all__:
            obj = getattr(module, attr)
            out.append((f"nwflow.{name}.{attr}", obj))
            if inspect.isclass(obj):
                out += [(f"nwflow.{name}.{attr}.{k}", v) for k, v in vars(obj).items()
                        if not k.startswith("_") and inspect.isfunction(v)]
    return out


PUBLIC = _public()


def test_the_exemptions_are_public_names():
    assert set(EXEMPT) <= {name for name, _ in PUBLIC}


@pytest.mark.parametrize("name,obj", [pytest.param(n, o, id=n) for n, o in PUBLIC if n not in EXEMPT])
def test_docstring_has_equation_shapes_and_chapter(name, obj):
    doc = obj.__doc__ or ""
    assert doc.strip(), f"{name} has no docstring"
    assert any(isinstance(n, nodes.math_block) for n in doctree(doc).children), \
        f"{name}: no `.. math::` block"
    assert SHAPE.search(doc), f"{name}: no shapes (e.g. '(B, D)' or 'Shapes:')"
    assert CHAPTER.search(doc), f"{name}: names no chapter ('Chapter N', N in 1..8)"


@pytest.mark.parametrize("module", MODULES)
def test_every_docstring_renders_and_its_latex_is_balanced(module):
    mod = importlib.import_module(f"nwflow.{module}")
    docs = [(f"nwflow.{module}", mod.__doc__ or "")]
    docs += [(name, obj.__doc__ or "") for name, obj in PUBLIC
             if name.startswith(f"nwflow.{module}.") and (inspect.isfunction(obj) or inspect.isclass(obj))]
    for name, doc in docs:
        try:
            tree = doctree(doc)
        except docutils.utils.SystemMessage as err:
            pytest.fail(f"{name}: {err}")
        for block in tree.findall(nodes.math_block):
            problem = unbalanced(block.astext())
            assert problem is None, f"{name}: {problem} in {block.astext()!r}"
