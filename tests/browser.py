"""Opening a report.html in headless Chromium (Debian's ``chromium``) for the page tests; skipped without it."""

import re
import shutil
import subprocess

import pytest


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("chromium-headless-shell")


def load_page(path) -> dict[str, str]:
    """The ``data-*`` attributes the page's load check set on ``<body>`` (loaded, plots, broken)."""
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); CI installs it")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    return dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(0)))
