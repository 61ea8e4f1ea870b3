"""Input rules every request shares: no NUL in any string, a bounded JSON depth, strict integers for money.

Why these, stated:
- PostgreSQL refuses NUL in ``text`` and ``jsonb`` (and C libraries truncate at it), so a NUL that passes
  validation turns into a database error (a 500) far from the input. It is refused here, as a 422.
- orjson parses 1,024 levels but writes only 254, and Python's recursion limit is ~1,000: free-form JSON
  (event ``data``, debit ``metadata``) nested deeper than ``JSON_DEPTH_MAX`` is a 422 at validation, never a
  500 (or a RecursionError) when it is written or stored.
- ``{"amount_minor": true}`` is 1 and ``"10"`` is 10 for a lax ``int``: money fields take JSON integers only.

``RequestModel`` is the base of every request body model: one ``before`` validator walks the raw input once
(strings, keys, depth), so nested models and free-form ``dict[str, Any]`` fields are covered alike.
``SafeStr`` carries the same NUL rule for path, query and header parameters; the HTTP hygiene middleware also
refuses a NUL anywhere in a path (404) or a query string (422) before routing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Strict, model_validator

#: Deepest nesting of objects/arrays accepted in any JSON body (a body is depth 1). orjson writes ≤ 254 levels.
JSON_DEPTH_MAX = 32


class InputRefused(ValueError):
    """A request value breaks one of the shared input rules (pydantic turns it into a 422 error entry)."""


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise InputRefused("strings must not contain NUL (\\u0000)")
    return value


def check_json(value: Any, *, depth_max: int = JSON_DEPTH_MAX, strings: bool = True) -> None:
    """Refuse NUL in any string or key and nesting deeper than ``depth_max``. Iterative (no recursion), so
    the check itself cannot overflow the stack on a hostile body. ``strings=False`` checks depth only (the
    caller has ruled NUL out on the raw bytes)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if strings and "\x00" in item:
                raise InputRefused("strings must not contain NUL (\\u0000)")
        elif isinstance(item, dict):
            if depth > depth_max:
                raise InputRefused(f"JSON nested deeper than {depth_max} levels")
            for key, sub in item.items():
                if isinstance(key, str) and "\x00" in key:
                    raise InputRefused("keys must not contain NUL (\\u0000)")
                if isinstance(sub, str | dict | list):
                    stack.append((sub, depth + 1))
        elif isinstance(item, list):
            if depth > depth_max:
                raise InputRefused(f"JSON nested deeper than {depth_max} levels")
            stack.extend((sub, depth + 1) for sub in item if isinstance(sub, str | dict | list))


def check_json_body(body: bytes, value: Any, *, depth_max: int = JSON_DEPTH_MAX) -> None:
    """``check_json`` for a value parsed from ``body``, for routes that parse their own raw body (ingest,
    webhooks). JSON can only carry a NUL as the escape ``\\u0000``, so strings are walked only when the raw
    bytes hold one; and a body with fewer brackets than ``depth_max`` cannot be too deep."""
    has_nul_escape = b"\\u0000" in body
    if not has_nul_escape and body.count(b"{") + body.count(b"[") <= depth_max:
        return
    check_json(value, depth_max=depth_max, strings=has_nul_escape)


def json_problem(value: Any, *, depth_max: int = JSON_DEPTH_MAX) -> str | None:
    """``check_json`` as a reason string (None when the value is fine), for code that reports, not raises."""
    try:
        check_json(value, depth_max=depth_max)
    except InputRefused as exc:
        return str(exc)
    return None


class RequestModel(BaseModel):
    """Base of every request body: the shared input rules over the whole raw input, before field validation."""

    @model_validator(mode="before")
    @classmethod
    def _shared_input_rules(cls, data: Any) -> Any:
        check_json(data)
        return data


#: A string parameter (path, query, header) that refuses NUL.
SafeStr = Annotated[str, AfterValidator(no_nul)]
#: An integer that must arrive as a JSON integer: no booleans, no strings, no floats. Add bounds with Field.
StrictInt = Annotated[int, Strict()]


#: The instants the analytics store can represent (ClickHouse DateTime64 spans 1900–2299; ``DateTime`` starts at
#: 1970): a query window outside them is a 422, not a 500 from the engine.
WINDOW_MIN = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_MAX = datetime(2200, 1, 1, tzinfo=UTC)


def in_analytics_range(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not WINDOW_MIN <= aware < WINDOW_MAX:
        raise InputRefused(f"must be between {WINDOW_MIN.date()} and {WINDOW_MAX.date()}")
    return value


#: A query-window instant (``from``/``to`` of analytics routes).
WindowDatetime = Annotated[datetime, AfterValidator(in_analytics_range)]
