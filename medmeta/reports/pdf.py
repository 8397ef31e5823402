"""``report.pdf``: ``report.html`` printed by headless Chromium, the same page on paper (the
filters hidden, rows kept whole across pages).

The browser is found as ``$MEDMETA_BROWSER``, else ``chromium``, ``chromium-browser`` or
``google-chrome`` on the ``PATH`` (Debian and Ubuntu: ``apt install chromium``). It opens the
page from its folder, so the thumbnails beside it are printed; it is given no network and the
page asks for none (its Content-Security-Policy allows no other address).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from medmeta.errors import MedmetaError
from medmeta.io import atomic_path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: Seconds the browser may take to print a page.
TIMEOUT = 300


def find_browser() -> str | None:
    """The headless browser that prints PDFs, or None."""
    named = os.environ.get("MEDMETA_BROWSER")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def require_browser() -> str:
    """:func:`find_browser`, or a :class:`MedmetaError` saying what to install."""
    browser = find_browser()
    if browser is None:
        raise MedmetaError(
            "--pdf needs headless Chromium to print the report: install it (Debian/Ubuntu: apt install chromium) "
            "or name it in MEDMETA_BROWSER"
        )
    return browser


def write_pdf(html: str | Path, pdf: str | Path) -> Path:
    """Print the page ``html`` to ``pdf`` (atomically); a :class:`MedmetaError` if the browser fails."""
    browser, html, pdf = require_browser(), Path(html).resolve(), Path(pdf)
    with atomic_path(pdf) as tmp:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                   f"--print-to-pdf={tmp}", html.as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise MedmetaError(f"{pdf}: the browser did not print the report within {TIMEOUT} s") from None
        if done.returncode != 0 or not tmp.stat().st_size or not tmp.read_bytes()[:5] == b"%PDF-":
            raise MedmetaError(f"{pdf}: the browser ({browser}) could not print the report (exit status {done.returncode})")
    return pdf
