"""`meterline meters|prices|subjects ...`: the streams catalog from the command line (DATABASE_URL or the local stack).

Every command is a thin shell over ``streams.catalog``; output is JSON (one object or a list), errors exit 1
with the component's stable code. A running streams worker picks changes up within its catalog refresh
period (STREAMS_CATALOG_REFRESH_MS), no restart needed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.console import Console

if TYPE_CHECKING:  # sqlalchemy costs ~0.3 s to import: `meterline up` must fail fast on a busy port
    from sqlalchemy import Connection

console = Console(stderr=True)
ProjectOpt = Annotated[str, typer.Option("--project", "-p", envvar="METERLINE_PROJECT", help="project id")]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError


def _emit(value: Any) -> None:
    if isinstance(value, list):
        value = [v.to_json() if hasattr(v, "to_json") else v for v in value]
    elif hasattr(value, "to_json"):
        value = value.to_json()
    typer.echo(orjson.dumps(value, default=_json_default, option=orjson.OPT_INDENT_2).decode())


@contextmanager
def _conn() -> Iterator[Connection]:
    from ledger.db import make_engine
    from meterline.urls import EngineUrlMissing, engine_url
    from streams.errors import StreamsError

    try:
        url = engine_url("database_url")
    except EngineUrlMissing as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    engine = make_engine(url, pool_size=1, application_name="meterline-cli")
    try:
        with engine.begin() as conn:
            yield conn
    except StreamsError as exc:
        console.print(f"[bold red]error ({exc.code}):[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def _run(fn: Callable[[Connection], Any]) -> None:
    with _conn() as conn:
        result = fn(conn)
    _emit(result)


def _json_arg(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        console.print(f"[bold red]error:[/] {what} is not JSON: {exc}")
        raise typer.Exit(2) from None


def _price_model(model: str | None, unit_price: str | None) -> dict[str, Any]:
    if (model is None) == (unit_price is None):
        console.print("[bold red]error:[/] give exactly one of --model JSON or --unit-price DECIMAL")
        raise typer.Exit(2)
    if unit_price is not None:
        return {"model": "per_unit", "unit_price_minor": unit_price}
    assert model is not None
    parsed = _json_arg(model, "--model")
    if not isinstance(parsed, dict):
        console.print("[bold red]error:[/] --model must be a JSON object")
        raise typer.Exit(2)
    return parsed


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        console.print("[bold red]error:[/] --effective-from needs a UTC offset (e.g. 2026-12-01T00:00:00Z)")
        raise typer.Exit(2)
    return when


meters_app = typer.Typer(no_args_is_help=True, help="Meters: how usage events become units (versioned).")
prices_app = typer.Typer(no_args_is_help=True, help="Prices of meters (immutable versions).")
subjects_app = typer.Typer(no_args_is_help=True, help="Subject keys (subject -> wallet) and unknown-subject policy.")


@meters_app.command("list")
def meters_list(project: ProjectOpt, all_: Annotated[bool, typer.Option("--all", help="include archived")] = False) -> None:
    """Current meters of a project."""
    from streams import catalog

    _run(lambda c: catalog.list_meters(c, project_id=project, include_archived=all_))


@meters_app.command("create")
def meters_create(
    project: ProjectOpt,
    slug: Annotated[str, typer.Option(help="stable short name, e.g. tokens")],
    event_type: Annotated[str, typer.Option(help="CloudEvents type this meter counts")],
    aggregation: Annotated[str, typer.Option(help="SUM | COUNT | MAX | UNIQUE_COUNT | LATEST")] = "SUM",
    value_property: Annotated[str | None, typer.Option(help="JSON path into data, e.g. $.tokens")] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter", help='{"property": "$.model", "equals": "x"}')] = None,
    group_by: Annotated[list[str] | None, typer.Option(help="dimension path (repeatable)")] = None,
    name: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a meter."""
    from streams import catalog

    filters = [_json_arg(f, "--filter") for f in filter_ or []]
    _run(lambda c: catalog.create_meter(c, project_id=project, slug=slug, event_type=event_type,
                                        aggregation=aggregation, value_property=value_property, filters=filters,
                                        group_by=list(group_by or []), name=name))
    # a meter without a price counts usage and charges nothing (`meterline status` reports it as "unpriced")
    console.print(f"[yellow]note:[/] meter {slug!r} has no price yet: its usage is counted, not charged. Price it "
                  f"with `meterline prices create -p {project} --meter {slug} --unit-price <minor units per unit>`.")


@meters_app.command("update")
def meters_update(
    project: ProjectOpt,
    meter: Annotated[str, typer.Argument(help="meter id or slug")],
    event_type: Annotated[str | None, typer.Option()] = None,
    aggregation: Annotated[str | None, typer.Option()] = None,
    value_property: Annotated[str | None, typer.Option()] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter", help="replaces all filters (repeatable)")] = None,
    group_by: Annotated[list[str] | None, typer.Option(help="replaces the dimensions (repeatable)")] = None,
    name: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create the next version of a meter with these changes (history is kept)."""
    from streams import catalog

    changes: dict[str, Any] = {k: v for k, v in {"event_type": event_type, "aggregation": aggregation,
                                                 "value_property": value_property, "name": name}.items()
                               if v is not None}
    if filter_ is not None:
        changes["filters"] = [_json_arg(f, "--filter") for f in filter_]
    if group_by is not None:
        changes["group_by"] = list(group_by)
    _run(lambda c: catalog.update_meter(c, project_id=project, meter=meter, **changes))


@meters_app.command("archive")
def meters_archive(project: ProjectOpt, meter: Annotated[str, typer.Argument()]) -> None:
    """Stop metering a meter's events (history and charges stay)."""
    from streams import catalog

    _run(lambda c: catalog.archive_meter(c, project_id=project, meter=meter))


@meters_app.command("history")
def meters_history(project: ProjectOpt, meter: Annotated[str, typer.Argument()]) -> None:
    """Every version of a meter."""
    from streams import catalog

    _run(lambda c: catalog.meter_history(c, project_id=project, meter=meter))


@prices_app.command("list")
def prices_list(project: ProjectOpt, meter: Annotated[str | None, typer.Option()] = None,
                all_: Annotated[bool, typer.Option("--all", help="include archived")] = False) -> None:
    """Prices (with all their versions)."""
    from streams import catalog

    _run(lambda c: catalog.list_prices(c, project_id=project, meter=meter, include_archived=all_))


@prices_app.command("create")
def prices_create(
    project: ProjectOpt,
    meter: Annotated[str, typer.Option(help="meter id or slug")],
    model: Annotated[str | None, typer.Option(help="PriceModel JSON (per_unit/package/graduated/volume)")] = None,
    unit_price: Annotated[str | None, typer.Option(help="shortcut: per_unit price in minor units, e.g. 0.4")] = None,
    period: Annotated[str, typer.Option(help="month | day")] = "month",
    effective_from: Annotated[str | None, typer.Option(help="ISO time with offset (default: now)")] = None,
) -> None:
    """Price a meter (its first version)."""
    from streams import catalog

    price_model = _price_model(model, unit_price)
    _run(lambda c: catalog.create_price(c, project_id=project, meter=meter, model=price_model, period=period,
                                        effective_from=_when(effective_from)))


@prices_app.command("add-version")
def prices_add_version(
    project: ProjectOpt,
    price_id: Annotated[str, typer.Argument()],
    model: Annotated[str | None, typer.Option()] = None,
    unit_price: Annotated[str | None, typer.Option()] = None,
    period: Annotated[str | None, typer.Option(help="month | day (default: unchanged)")] = None,
    effective_from: Annotated[str | None, typer.Option(help="ISO time with offset (default: now)")] = None,
) -> None:
    """A new immutable version of a price, effective from a time after the latest version."""
    from streams import catalog

    price_model = _price_model(model, unit_price)
    _run(lambda c: catalog.add_price_version(c, project_id=project, price_id=price_id, model=price_model,
                                             period=period, effective_from=_when(effective_from)))


@prices_app.command("archive")
def prices_archive(project: ProjectOpt, price_id: Annotated[str, typer.Argument()]) -> None:
    """Stop charging a meter's events with this price."""
    from streams import catalog

    _run(lambda c: catalog.archive_price(c, project_id=project, price_id=price_id))


@subjects_app.command("list")
def subjects_list(project: ProjectOpt, wallet: Annotated[str | None, typer.Option()] = None,
                  after: Annotated[str | None, typer.Option(help="page after this subject")] = None,
                  limit: Annotated[int, typer.Option(min=1, max=1000)] = 100) -> None:
    """Subject keys, ordered by subject."""
    from streams import catalog

    _run(lambda c: catalog.list_subject_keys(c, project_id=project, wallet_id=wallet, after=after, limit=limit))


@subjects_app.command("set")
def subjects_set(project: ProjectOpt, subject: Annotated[str, typer.Argument()],
                 wallet: Annotated[str | None, typer.Option(help="default: the subject's own wallet")] = None) -> None:
    """Map a subject to a wallet (a wallet may carry several subjects)."""
    from streams import catalog

    _run(lambda c: catalog.set_subject_key(c, project_id=project, subject=subject, wallet_id=wallet))


@subjects_app.command("delete")
def subjects_delete(project: ProjectOpt, subject: Annotated[str, typer.Argument()]) -> None:
    """Remove a subject key (its later events follow the unknown-subject policy)."""
    from streams import catalog

    _run(lambda c: catalog.delete_subject_key(c, project_id=project, subject=subject))


@subjects_app.command("policy")
def subjects_policy(
    project: ProjectOpt,
    unknown_subjects: Annotated[str | None, typer.Option(help="auto_provision | dead_letter")] = None,
    allowed_lateness_s: Annotated[int | None, typer.Option(min=0)] = None,
) -> None:
    """Show or change the project's unknown-subject policy and allowed lateness."""
    from streams import catalog
    from streams.catalog_model import ProjectPolicy
    from streams.settings import get_settings

    if unknown_subjects is None and allowed_lateness_s is None:
        settings = get_settings()
        default = ProjectPolicy(settings.unknown_subjects, settings.allowed_lateness_s)  # type: ignore[arg-type]
        _run(lambda c: catalog.get_project_settings(c, project_id=project, default=default))
        return
    _run(lambda c: catalog.set_project_settings(c, project_id=project, unknown_subjects=unknown_subjects,
                                                allowed_lateness_s=allowed_lateness_s))


def register(app: typer.Typer) -> None:
    app.add_typer(meters_app, name="meters")
    app.add_typer(prices_app, name="prices")
    app.add_typer(subjects_app, name="subjects")
