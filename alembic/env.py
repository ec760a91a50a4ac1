"""Alembic environment for FacePro's schema (target: :data:`storage.models.Base.metadata`).

Database, in this order:

1. ``config.attributes["connection"]``: a connection handed in by
   :func:`storage.db.upgrade` (the caller owns the transaction);
2. ``-x url=...`` on the ``alembic`` command line;
3. the ``FACEPRO_DATABASE_URL`` environment variable;
4. ``sqlalchemy.url`` in ``alembic.ini``.

Without a handed-in connection the engine comes from
:func:`storage.db.open_engine` with SQLite foreign keys off (table rebuilds
must not cascade), the whole run is one transaction, and SQLite foreign keys
are checked before commit. ``render_as_batch=True`` makes ALTERs work on SQLite.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from storage.db import check_foreign_keys, open_engine
from storage.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("FACEPRO_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x url=sqlite:////path/facepro.db, set FACEPRO_DATABASE_URL, "
            "or set sqlalchemy.url in alembic.ini"
        )
    return url


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kwargs)


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run_on(given)
        return
    url = _url()
    engine = open_engine(url, foreign_keys=False)
    try:
        with engine.begin() as connection:
            _run_on(connection)
            check_foreign_keys(url, connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
