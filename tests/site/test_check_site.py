"""The browser check itself: it passes a clean page and catches each kind of broken page.

A tiny site is written to a temporary folder (with the same offline MathJax the book
uses) and ``check_site.main`` is run on it in headless Chromium; skipped without Chromium.
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("check_site", HERE / "check_site.py")
check_site = importlib.util.module_from_spec(spec)
sys.modules["check_site"] = check_site  # dataclasses look their module up there
spec.loader.exec_module(check_site)

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
MATHJAX = Path(sysconfig.get_paths()["purelib"]) / "sphinx-mathjax-offline" / "static" / "mathjax"
HEAD = ('<script>window.MathJax = {"options": {"processHtmlClass": "math"}}</script>'
        '<script defer src="mathjax/tex-chtml.js"></script>')


def _page(body: str) -> str:
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'>{HEAD}</head><body>{body}</body></html>"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    if not MATHJAX.is_dir():
        pytest.skip(f"offline MathJax not found at {MATHJAX}")
    shutil.copytree(MATHJAX, tmp_path / "mathjax")
    (tmp_path / "dot.png").write_bytes(PNG)
    (tmp_path / "index.html").write_text(_page(
        '<p class="math">\\(x^2 + \\sigma_t\\)</p><img src="dot.png"><a href="good.html">ok</a>'))
    (tmp_path / "good.html").write_text(_page('<div class="math">\\[\\frac{a}{b}\\]</div>'))
    (tmp_path / "redirect.html").write_text(
        '<html><head><meta http-equiv="refresh" content="0; url=good.html"></head></html>')
    return tmp_path


def _run(site: Path, capsys) -> tuple[int, str]:
    code = check_site.main([str(site)])
    return code, capsys.readouterr().out


def test_skips_plainly_without_chromium(site, capsys, monkeypatch):
    monkeypatch.setattr(check_site, "find_chromium", lambda: None)
    code, out = _run(site, capsys)
    assert code == 0
    assert check_site.SKIP_MESSAGE in out


def test_missing_build_is_a_usage_error(tmp_path, capsys):
    assert check_site.main([str(tmp_path)]) == 2


needs_chromium = pytest.mark.skipif(check_site.find_chromium() is None, reason="no Chromium on this machine")


@needs_chromium
def test_clean_site_passes(site, capsys):
    code, out = _run(site, capsys)
    assert code == 0, out
    assert "ok    index.html  (typeset math: 1, images: 1)" in out
    assert "ok    good.html  (typeset math: 1" in out


@needs_chromium
def test_each_failure_is_reported(site, capsys):
    (site / "bad.html").write_text(_page(
        '<p class="math">\\(\\frac{a}\\)</p>'                  # TeX error -> mjx-merror
        '<p class="math">\\(\\foo x\\)</p>'                    # undefined macro (shown red)
        '<p class="math">\\(\\frac{a}{\\)</p>'                 # unbalanced: left as raw TeX
        '<img src="missing.png">'                              # local 404 and an unloaded image
        '<img src="https://example.invalid/x.png">'            # a request leaving 127.0.0.1
        '<script>throw new Error("boom")</script>'             # a JavaScript exception
        '<a href="nowhere.html">broken</a>'))                  # a broken local link
    (site / "nomath.html").write_text(
        '<html><body><span class="math">\\(x\\)</span></body></html>')  # math but no MathJax
    (site / "badredirect.html").write_text(
        '<html><head><meta http-equiv="refresh" content="0; url=gone.html"></head></html>')
    code, out = _run(site, capsys)
    assert code == 1
    failures = out.split("site check FAILED:")[1]
    assert "bad.html: 1 MathJax errors: ['Missing argument for \\\\frac'" in failures
    assert "bad.html: undefined TeX macros: ['\\\\foo']" in failures
    assert "bad.html: 1 math elements left as raw TeX" in failures
    assert "bad.html: image did not load: missing.png" in failures
    assert "bad.html: HTTP 404" in failures
    assert "bad.html: request left 127.0.0.1: https://example.invalid/x.png" in failures
    assert "bad.html: javascript error: boom" in failures
    assert "bad.html: broken local link nowhere.html" in failures
    assert "nomath.html: 1 math elements but nothing typeset (MathJax did not load)" in failures
    assert "badredirect.html: broken local link gone.html" in failures
    assert "ok    index.html" in out and "ok    redirect.html" in out
