"""Headless Chromium for the tests that check a page the way a reader sees it.

Parsing HTML proves what was written, not what a browser shows: an image the browser
cannot decode, a CSS rule that shrinks a thumbnail or smooths its pixels only shows up
when the page is really rendered. Debian's ``chromium`` package provides the browser
(``apt-get install -y chromium``); tests skip without it, naming the package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_or_skip() -> str:
    """The path of a Chromium-compatible browser, or skip the calling test."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not installed (apt-get install -y chromium)")


def run_headless(page: Path, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in a fresh headless profile with ``args`` (e.g. ``--dump-dom``); no network is needed."""
    browser = chromium_or_skip()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--virtual-time-budget=5000", f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 1000) -> Image.Image:
    """The top ``width`` x ``height`` CSS pixels of ``page`` as rendered, at one device pixel per CSS pixel."""
    proc = run_headless(page, out.parent / f"{out.stem}-profile", f"--screenshot={out}",
                        f"--window-size={width},{height}", "--force-device-scale-factor=1")
    assert out.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(out) as im:
        return im.convert("RGB")
