"""A PostgreSQL database of its own for each test, on the server these machines run
(127.0.0.1:5432, trust auth, user postgres; ``MDM_TEST_POSTGRES`` names another)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import uuid4

import psycopg
import pytest

SERVER = os.environ.get("MDM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def url_of(name: str) -> str:
    return f"{SERVER.rsplit('/', 1)[0]}/{name}"


@contextmanager
def database() -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards; skipped without a server (failed in CI)."""
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"no PostgreSQL server at {SERVER}: {str(exc).strip().splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (required in CI)")
        pytest.skip(message)
    name = f"mdm_test_{uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url_of(name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
