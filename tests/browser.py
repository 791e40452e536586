"""Headless Chromium for the HTML report's checks (and the README's screenshot): Debian's `chromium` package."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
          "--no-first-run", "--disable-extensions", "--virtual-time-budget=8000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: Path, timeout: float = 120) -> str:
    """The DOM after the page's load event (its own script has run)."""
    out = subprocess.run([chromium(), *_FLAGS, "--dump-dom", page.resolve().as_uri()], capture_output=True,
                         text=True, timeout=timeout, check=True)
    return out.stdout


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1500, timeout: float = 120) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium(), *_FLAGS, f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                    page.resolve().as_uri()], capture_output=True, timeout=timeout, check=True)
    return png


if __name__ == "__main__":  # `python tests/browser.py REPORT.html OUT.png`: the README's screenshot
    import sys

    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
