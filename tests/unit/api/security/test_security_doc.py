"""docs/security.md's role/scope table is generated from the code; this fails when the document's copy is stale
(regenerate: ``python -m meterline.security_matrix --write``)."""

from __future__ import annotations

from pathlib import Path

from api.main import create_app
from api.settings import ApiSettings
from meterline.security_matrix import BEGIN, END, render_markdown

DOC = Path(__file__).resolve().parents[4] / "docs" / "security.md"


def test_the_documented_matrix_is_the_code_s() -> None:
    text = DOC.read_text()
    documented = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")
    assert documented == render_markdown(create_app(ApiSettings())).strip("\n"), (
        "docs/security.md is stale: run `python -m meterline.security_matrix --write`")
