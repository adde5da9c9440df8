"""The server's store: the ``Store`` interface, its SQLite and PostgreSQL backends, ``open_store``.

- ``base``: the interface (``Store``), acks and leases;
- ``packing``: one telemetry frame <-> one blob (what both backends store);
- ``sql``: the queries both backends share;
- ``sqlite``: ``TraceStore``, the embedded default (one file);
- ``postgres``: ``PostgresStore``, a database several server processes share.
"""

from __future__ import annotations

from pathlib import Path

from plasma.protocol.errors import StoreError

from .base import Ack, Lease, LeaseLost, Store, publisher_lease
from .sqlite import MIGRATIONS, SCHEMA_VERSION, TraceStore

__all__ = ["Ack", "Lease", "LeaseLost", "MIGRATIONS", "SCHEMA_VERSION", "Store", "StoreError",
           "TraceStore", "is_store_url", "open_store", "publisher_lease"]

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_store_url(value: str) -> bool:
    """True for a ``postgresql://`` URL (anything else is a SQLite path)."""
    return value.startswith(_PG_SCHEMES)


def open_store(url_or_path: str | Path) -> Store:
    """``postgresql://...`` -> ``PostgresStore``; a path (or ``":memory:"``) -> ``TraceStore``.

    Other URL schemes (``mysql://``, ``sqlite://``...) are refused rather than taken for a file
    name."""
    text = str(url_or_path)
    if is_store_url(text):
        from .postgres import PostgresStore  # psycopg is an optional extra

        return PostgresStore(text)
    if "://" in text:
        raise StoreError(f"--store {text.split('://', 1)[0]}://...: use a SQLite file path or a "
                         "postgresql:// URL")
    return TraceStore(text)
