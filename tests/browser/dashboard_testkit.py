"""Helpers of the dashboard's browser tests (the fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "correct horse battery staple"


def open_page(browser: Any, url: str) -> None:
    """Navigate and wait until the page has rendered (``body.dataset.ready``); fail with the page's error."""
    browser.goto(url)
    state = browser.wait("document.readyState === 'complete' && document.body.dataset.ready")
    assert state == "1", browser.evaluate("document.getElementById('error') && document.getElementById('error').textContent")
