"""Engine, session factory and the request-scoped session dependency.

The request's session commits when the handler returns and rolls back when it raises;
services and repositories never commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import lru_cache
from typing import Annotated

from fastapi import Depends
from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from app.core.config import get_settings
from app.core.services import database_url

log = logging.getLogger("crowdsam.db")

ON_ROLLBACK = "crowdsam_on_rollback"
ON_COMMIT = "crowdsam_on_commit"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), nullable=False
    )


@lru_cache
def get_engine() -> Engine:
    """One pool per process, sized by the settings (the admission gate keeps requests within it)."""
    settings = get_settings()
    return create_engine(
        database_url(),
        pool_pre_ping=True,
        pool_size=settings.pool_size,
        max_overflow=2,  # health checks and other work outside admission never wait on the pool
        pool_timeout=settings.db_pool_timeout_s,
    )


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def session_scope() -> Session:
    """A new session for jobs and scripts (caller commits)."""
    return get_sessionmaker()()


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": commit before the response is sent, so a 2xx always means "stored".
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def on_rollback(session: Session, undo: Callable[[], None]) -> None:
    """Run ``undo`` if the session's transaction rolls back (e.g. delete files stored for rows that never commit)."""
    session.info.setdefault(ON_ROLLBACK, []).append(undo)


def on_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the session's transaction has committed (e.g. delete the files of deleted rows);
    forgotten if it rolls back. A failing action is logged, never raised: the commit stands."""
    session.info.setdefault(ON_COMMIT, []).append(action)


@event.listens_for(Session, "after_commit")
def _forget_undo(session: Session) -> None:
    session.info.pop(ON_ROLLBACK, None)
    for action in session.info.pop(ON_COMMIT, []):
        try:
            action()
        except Exception:
            log.exception("could not finish the side effect of a committed transaction")


@event.listens_for(Session, "after_rollback")
def _undo(session: Session) -> None:
    session.info.pop(ON_COMMIT, None)
    for undo in session.info.pop(ON_ROLLBACK, []):
        try:
            undo()
        except Exception:
            log.exception("could not undo the side effect of a rolled-back transaction")
