"""Every request body of the API follows the shared input rules (api/validation.py): its model derives from
``RequestModel`` (no NUL, bounded depth) and its money fields take JSON integers only. A new route with a plain
``BaseModel`` body, or a lax ``*_minor: int``, fails here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from api.main import create_app
from api.settings import ApiSettings
from api.validation import RequestModel
from meterline.security_matrix import _api_routes


def _body_models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found[annotation.__name__] = annotation
        for arg in getattr(annotation, "__args__", ()) or ():
            visit(arg)

    def walk(dependant: Any) -> None:
        for param in dependant.body_params:
            visit(param.field_info.annotation)
        for sub in dependant.dependencies:
            walk(sub)

    for route in _api_routes(create_app(ApiSettings()).router.routes):
        walk(route.dependant)
    return found


def test_every_request_body_is_a_request_model() -> None:
    models = _body_models()
    assert len(models) > 30
    lax = sorted(name for name, model in models.items() if not issubclass(model, RequestModel))
    assert not lax, f"request bodies not deriving from api.validation.RequestModel: {lax}"


def test_money_fields_refuse_booleans_and_strings() -> None:
    checked = 0
    for name, model in _body_models().items():
        for field_name, field in model.model_fields.items():
            if not field_name.endswith("_minor") or "int" not in str(field.annotation):
                continue
            for bad in (True, "10"):
                try:
                    model.model_validate({field_name: bad})
                except ValidationError as exc:
                    assert any(e["loc"][:1] == (field_name,) for e in exc.errors()), (name, field_name, bad)
                else:
                    raise AssertionError(f"{name}.{field_name} accepted {bad!r}")
                checked += 1
    assert checked >= 10
