"""Sphinx extension: the book's page chrome (header buttons, scripts).

- Every notebook page offers its ``.ipynb`` for download (the theme's download button).
- Binder and Colab buttons follow ONE setting, ``repository: url:`` in ``_config.yml``.
  The ``launch_buttons`` section names Binder and Colab once and for all; while the
  repository URL is empty (the book has no public home yet) the launch, repository, issues
  and edit buttons are switched off, because the theme cannot build a launch link without
  a repository (it would crash, or point at a wrong one). Set the URL to a GitHub
  repository and every notebook page gets Binder and Colab buttons and a repository link.
- Each inline script is emitted once. Sphinx 7.4 registers an inline script added during
  the build (sphinx-thebe's configuration) a second time when it starts writing, and the
  duplicate ``const`` declaration is a JavaScript error on every page.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config

LAUNCH_KEYS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url", "thebe")


def launch_options(theme_options: dict[str, Any]) -> dict[str, Any]:
    """The theme options: download button on; launch/repository buttons only with a repository URL."""
    options = dict(theme_options)
    options["use_download_button"] = True
    url = str(options.get("repository_url") or "").strip()
    if url:
        options["repository_url"] = url
        options["use_repository_button"] = True
        return options
    options.pop("repository_url", None)
    options["launch_buttons"] = {k: v for k, v in dict(options.get("launch_buttons") or {}).items()
                                 if k not in LAUNCH_KEYS}
    options["use_repository_button"] = False
    options["use_issues_button"] = False
    options["use_edit_page_button"] = False
    return options


def unique_scripts(scripts: list[Any]) -> list[Any]:
    """Scripts in order, without repeats (an inline script may be registered as None and as '')."""
    seen, unique = set(), []
    for js in scripts:
        key = (js.filename or "", js.priority, tuple(sorted((k, str(v)) for k, v in js.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    return unique


def _on_config_inited(app: Sphinx, config: Config) -> None:
    config.html_theme_options = launch_options(config.html_theme_options or {})


def _on_page_context(app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    scripts = context.get("script_files")
    if scripts:
        scripts[:] = unique_scripts(scripts)


def setup(app: Sphinx) -> dict[str, Any]:
    # Before the theme's own config-inited handlers (default priority 500) see the options.
    app.connect("config-inited", _on_config_inited, priority=100)
    # After every extension has added its page scripts.
    app.connect("html-page-context", _on_page_context, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
