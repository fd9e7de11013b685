"""The ``crowdsam`` command: serve, worker, db, token, client."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import typer

from app.auth.models import Role
from app.client import commands as client_commands
from app.core.runtime import configure_process

app = typer.Typer(help="crowdsam: crowd boxes on CT → SAM organ masks", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic)", no_args_is_help=True)
token_app = typer.Typer(help="API tokens", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(client_commands.app, name="client")  # researcher CLI over the HTTP API (app/client/)


@app.callback()
def start_up() -> None:
    """Process policy for every command: child processes are spawned, never forked (app.core.runtime)."""
    configure_process()


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="bind address"),
    port: int = typer.Option(8000, help="port"),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes (they share CROWDSAM_DB_CONNECTIONS)"),
    migrate: bool = typer.Option(True, help="run `db upgrade` first"),
    access_log: bool = typer.Option(True, help="log every request"),
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from app.core.config import get_settings
    from app.core.logs import configure_logging, uvicorn_log_config
    from app.core.metrics import prepare_multiprocess
    from app.core.services import database_url, redis_url

    configure_logging()  # CROWDSAM_LOG_FORMAT=text|json, here and (log_config) in every server process
    prepare_multiprocess(workers, get_settings().data_dir)  # N processes share Prometheus counts
    # Each process sizes its pool and admission gate from its share of the connection budget.
    os.environ["CROWDSAM_WEB_WORKERS"] = str(workers)
    get_settings.cache_clear()

    # Resolve (and start, when embedded) the servers once so worker processes share them.
    os.environ.setdefault("DATABASE_URL", database_url())
    os.environ.setdefault("REDIS_URL", redis_url())
    if migrate:
        from app import migrate as migrations

        migrations.upgrade()
    _check_storage()
    uvicorn.run("app.main:app", host=host, port=port, workers=workers, log_level="info", access_log=access_log,
                log_config=uvicorn_log_config(get_settings().log_format))


@app.command()
def worker(
    queues: list[str] = typer.Option(["sam", "cpu", "preencode"], "--queue", "-q",
                                     help="queues to listen on, highest priority first"),
    burst: bool = typer.Option(False, help="exit when the queues are empty"),
) -> None:
    """Run an RQ worker on the project's queues."""
    _check_storage()
    from workers.run import run_worker

    run_worker(queues, burst=burst)


def _check_storage() -> None:
    """Refuse to start on an unusable artefact store (a missing bucket) with one clear line, not a traceback."""
    from app.core.storage import StorageUnavailable, get_storage

    try:
        get_storage().check()
    except StorageUnavailable as exc:
        typer.echo(f"error: artefact store {get_storage()!r}: {exc}", err=True)
        raise typer.Exit(2) from None


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from app import migrate as migrations

    migrations.upgrade(revision=revision)
    typer.echo(f"database at {revision}", err=True)


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="target revision, e.g. base")) -> None:
    """Revert migrations down to REVISION."""
    from app import migrate as migrations

    migrations.downgrade(revision=revision)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_expiry(value: str) -> datetime:
    """``30d`` / ``12h`` / ``90m`` from now, or an ISO 8601 time (UTC without an offset); must be future."""
    now = datetime.now(UTC)
    match = _DURATION.match(value.strip())
    try:
        if match:
            when = now + timedelta(**{_UNITS[match[2]]: float(match[1])})
        else:
            when = datetime.fromisoformat(value.strip())
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise typer.BadParameter(f"{value!r}: use e.g. 30d, 12h, 90m or an ISO time") from exc
    if when <= now:
        raise typer.BadParameter(f"{value!r} is not in the future")
    return when


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., help="unique name; annotators are identified by it"),
    role: Role = typer.Option(..., help="admin | researcher | annotator"),
    expires: str | None = typer.Option(None, help="the token stops working after 30d / 12h / 90m, or at an "
                                                  "ISO time; default never"),
    link: str | None = typer.Option(None, help="also print (on stderr) a sign-in link to the annotate page of "
                                               "this base URL, the token in the #fragment (never sent to a "
                                               "server, never in an access log)"),
) -> None:
    """Create a token and print only the secret on stdout."""
    from app.auth.service import create_token
    from app.core.db import session_scope
    from app.core.errors import CrowdsamError

    expires_at = None if expires is None else parse_expiry(expires)
    with session_scope() as session:
        try:
            _row, secret = create_token(session, name, role, expires_at)
        except CrowdsamError as exc:
            typer.echo(f"error: {exc.detail}", err=True)
            raise typer.Exit(1) from exc
        session.commit()
    typer.echo(secret)
    if link:
        typer.echo(f"{link.rstrip('/')}/annotate#token={secret}", err=True)


if __name__ == "__main__":
    app()
