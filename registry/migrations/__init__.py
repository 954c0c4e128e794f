"""Alembic migrations for the registry schema, run programmatically (no alembic.ini needed at runtime).

Why programmatic: the registry ships as a package; the server and tests call ``migrate(db_url)`` at start-up and
the script location is found next to this file, so an installed wheel migrates exactly like a checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(db_url: str) -> Config:
    """An in-memory Alembic config pointing at this package's scripts and the given database."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    config.attributes["db_url"] = db_url
    return config


def migrate(db_url: str, revision: str = "head") -> None:
    """Upgrade the database at ``db_url`` to ``revision`` (default: the newest schema).

    An unreachable database is ``Unavailable`` (one line at start-up, the driver's text in ``detail``), like the
    same failure while serving.
    """
    from alembic import command
    from sqlalchemy.exc import InterfaceError, OperationalError

    from loraplex.registry.errors import Unavailable

    try:
        command.upgrade(alembic_config(db_url), revision)
    except (OperationalError, InterfaceError) as exc:
        raise Unavailable("metadata database unavailable", detail=str(exc.orig)) from exc
