"""Opaque cursors for keyset pagination: a cursor is the url-safe base64 of a small JSON object (the sort
key of the last row returned). Clients pass it back unchanged; a tampered cursor is a 422, never a 500."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from api.errors import ApiError

LIMIT_DEFAULT = 50
LIMIT_MAX = 500


class InvalidCursor(ApiError):
    status = 422
    code = "api.invalid_cursor"


def encode_cursor(position: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidCursor("the cursor is not one this API returned") from exc
    if not isinstance(value, dict):
        raise InvalidCursor("the cursor is not one this API returned")
    return value


def cursor_int(cursor: str | None, field: str) -> int | None:
    position = decode_cursor(cursor)
    if position is None:
        return None
    value = position.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidCursor("the cursor is not one this API returned")
    return value
