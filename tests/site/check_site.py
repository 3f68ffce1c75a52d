"""Open every page of the built book in a real (headless) Chromium and check what a reader sees.

Usage: python tests/site/check_site.py _build/html [--screenshots DIR] [--full-page]

The html folder is served on 127.0.0.1 (a random free port, a thread of this process) and
each page is loaded by Python playwright driving the system Chromium (never a downloaded
browser). A page passes when:

- MathJax finished (``MathJax.startup.promise``) with no ``mjx-merror`` (TeX errors) and no
  red undefined macros, and every math element of the html (``.math`` from Sphinx) holds a
  typeset ``mjx-container``;
- every ``<img>`` loaded (``naturalWidth > 0``);
- no request left 127.0.0.1 (each one is aborted and reported: the book must work offline);
- no local request failed or answered >= 400, no JavaScript exception, no console error;
- every local link points at a file that exists, and a page built from a notebook offers
  its ``.ipynb`` for download.

Exit status 0 when every page passes, 1 with a list of failures otherwise, 2 on bad usage.
Without Chromium the check says so and exits 0 (``make test`` must work on machines
without a browser; CI installs Debian's ``chromium`` first).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

SKIP_MESSAGE = "site check SKIPPED: no Chromium on this machine (install Debian's chromium)"
# Flags that work as root in a container, with no network side traffic from the browser.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
# Console messages that are not failures: pydata-sphinx-theme logs this with console.error
# on the first visit of a fresh browser profile (no stored light/dark choice yet).
BENIGN_CONSOLE = ("Got invalid theme mode",)
REDIRECT = re.compile(r"""<meta[^>]+http-equiv=["']refresh["'][^>]*url=([^"'>]+)""", re.I)
# Folders of the html output that hold assets or copies of sources, not pages.
NON_PAGE_DIRS = {"_static", "_sources", "_images", "_downloads", "_sphinx_design_static"}

# Waits for MathJax (if the page loads it) and for every image, then reports what is there.
PAGE_PROBE = """
async () => {
  const mj = window.MathJax;
  let mathjax = false;
  if (mj && mj.startup && mj.startup.promise) { await mj.startup.promise; mathjax = true; }
  const imgs = Array.from(document.images);
  for (const img of imgs) { if (img.loading === 'lazy') img.loading = 'eager'; }
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => {
    img.addEventListener('load', r); img.addEventListener('error', r); })));
  return {
    mathjax: mathjax,
    sphinxMath: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    untypeset: Array.from(document.querySelectorAll('.math'))
      .filter(e => !e.querySelector('mjx-container') && e.textContent.trim())
      .map(e => e.textContent.trim().slice(0, 60)),
    merrors: Array.from(document.querySelectorAll('mjx-merror'))
      .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 80)),
    // An undefined macro is typeset as red text; its name is in the assistive MathML copy.
    undefinedMacros: Array.from(document.querySelectorAll('mjx-mtext[style*="color: red"]')).map(e => {
      const mml = e.closest('mjx-container').querySelector('mtext[mathcolor="red"]');
      return mml ? mml.textContent.slice(0, 40) : '?'; }),
    images: imgs.map(img => ({src: img.getAttribute('src'), width: img.naturalWidth})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  };
}
"""


@dataclass
class PageReport:
    path: str
    math: int = 0
    images: int = 0
    failures: list[str] = field(default_factory=list)


def find_chromium() -> str | None:
    """/usr/bin/chromium, else ``chromium`` on PATH, else None."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def list_pages(root: Path) -> list[Path]:
    """Every .html file under ``root`` outside the asset folders, sorted."""
    pages = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root)
        if rel.parts[0] in NON_PAGE_DIRS or any(part.startswith(".") for part in rel.parts):
            continue
        pages.append(p)
    return pages


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # The browser closing a connection early (an aborted download) is not an error.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``root`` on 127.0.0.1 at a free port in a daemon thread; returns (server, base URL)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _local_target(root: Path, page: Path, href: str) -> Path | None:
    """The file a relative link points at, or None for external, anchor-only and special links."""
    parsed = urlparse(href)
    if parsed.scheme or parsed.netloc or href.startswith(("#", "mailto:", "javascript:")):
        return None
    path, _ = urldefrag(parsed.path)
    if not path:
        return None
    target = (page.parent / unquote(path)).resolve()
    return target / "index.html" if target.is_dir() else target


def check_links(root: Path, page: Path, links: list[str], report: PageReport) -> None:
    """Every local link resolves to a file; a notebook page links its .ipynb for download."""
    for href in links:
        target = _local_target(root, page, href)
        if target is not None and not target.exists():
            report.failures.append(f"broken local link {href}")
    rel = page.relative_to(root).with_suffix(".ipynb")
    if (root / "_sources" / rel).is_file():
        wanted = f"_sources/{rel.as_posix()}"
        if not any(href.endswith(wanted) for href in links):
            report.failures.append(f"no download button for {wanted}")


def check_pages(root: Path, chromium: str, screenshots: Path | None, full_page: bool,
                timeout_ms: int) -> list[PageReport]:
    from playwright.sync_api import sync_playwright

    server, base = serve(root)
    host = urlparse(base).netloc
    reports: list[PageReport] = []
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="nwflow-chromium-") as profile:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            current: PageReport | None = None

            def route(route, request) -> None:
                url = urlparse(request.url)
                if url.scheme in ("data", "blob", "about") or url.netloc == host:
                    route.continue_()
                else:
                    if current is not None:
                        current.failures.append(f"request left 127.0.0.1: {request.url}")
                    route.abort()

            context.route("**/*", route)
            for page_path in list_pages(root):
                rel = page_path.relative_to(root).as_posix()
                current = report = PageReport(rel)
                reports.append(report)
                redirect = REDIRECT.search(page_path.read_text(errors="replace")[:4000])
                if redirect:  # a redirect stub (index.html -> the root page): its target must exist
                    check_links(root, page_path, [redirect.group(1).strip()], report)
                    continue
                page = context.new_page()
                page.on("pageerror", lambda exc, r=report: r.failures.append(f"javascript error: {exc}"))

                def on_console(msg, r=report) -> None:
                    if msg.type == "error" and not any(b in msg.text for b in BENIGN_CONSOLE):
                        r.failures.append(f"console error: {msg.text}")

                page.on("console", on_console)

                def on_response(response, r=report) -> None:
                    if urlparse(response.url).netloc == host and response.status >= 400:
                        r.failures.append(f"HTTP {response.status} for {response.url}")

                def on_failed(request, r=report) -> None:
                    if urlparse(request.url).netloc == host:
                        r.failures.append(f"request failed: {request.url} ({request.failure})")

                page.on("response", on_response)
                page.on("requestfailed", on_failed)
                try:
                    page.goto(f"{base}/{rel}", wait_until="load", timeout=timeout_ms)
                    probe = page.evaluate(PAGE_PROBE)
                except Exception as exc:  # a page that does not load is a failure, not a crash
                    report.failures.append(f"could not load or probe: {exc}")
                    page.close()
                    continue
                report.math, report.images = probe["typeset"], len(probe["images"])
                if probe["merrors"]:
                    report.failures.append(f"{len(probe['merrors'])} MathJax errors: {probe['merrors'][:3]}")
                if probe["undefinedMacros"]:
                    report.failures.append(f"undefined TeX macros: {probe['undefinedMacros'][:3]}")
                if probe["sphinxMath"] and not probe["typeset"]:
                    report.failures.append(
                        f"{probe['sphinxMath']} math elements but nothing typeset "
                        f"(MathJax {'ran' if probe['mathjax'] else 'did not load'})")
                elif probe["untypeset"]:
                    report.failures.append(
                        f"{len(probe['untypeset'])} math elements left as raw TeX: {probe['untypeset'][:3]}")
                for img in probe["images"]:
                    if not img["width"]:
                        report.failures.append(f"image did not load: {img['src']}")
                check_links(root, page_path, probe["links"], report)
                if screenshots is not None:
                    shot = screenshots / (rel.replace("/", "__").removesuffix(".html") + ".png")
                    page.screenshot(path=str(shot), full_page=full_page)
                page.close()
            context.close()
    finally:
        server.shutdown()
        server.server_close()
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html_dir", type=Path, help="the built html folder (e.g. _build/html)")
    parser.add_argument("--screenshots", type=Path, default=None, help="save one PNG per page here")
    parser.add_argument("--full-page", action="store_true", help="screenshot whole pages, not the viewport")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds allowed per page")
    args = parser.parse_args(argv)

    root = args.html_dir.resolve()
    if not (root / "index.html").is_file():
        print(f"site check: {root} holds no index.html; build the book first", file=sys.stderr)
        return 2
    chromium = find_chromium()
    if chromium is None:
        print(SKIP_MESSAGE)
        return 0
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("site check: python playwright is missing (pip install -e '.[test]')", file=sys.stderr)
        return 2
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    reports = check_pages(root, chromium, args.screenshots, args.full_page, int(args.timeout * 1000))
    failed = [r for r in reports if r.failures]
    for r in reports:
        print(f"{'FAIL' if r.failures else 'ok  '}  {r.path}  (typeset math: {r.math}, images: {r.images})")
    total_math = sum(r.math for r in reports)
    print(f"site check: {len(reports)} pages, {total_math} typeset formulas, "
          f"{sum(r.images for r in reports)} images, {len(failed)} failing pages")
    if not reports:
        print("site check FAILED: no pages found")
        return 1
    if failed:
        print("site check FAILED:")
        for r in failed:
            for f in r.failures:
                print(f"  {r.path}: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
