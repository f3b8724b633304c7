"""A pytest plugin for tests/test_shard.py: `--collection-json FILE` writes the tests a run kept, as JSON rows
`[node id, variant name or null, migration variant name or null]`, the parameters that decide a test's shard unit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--collection-json", metavar="FILE", help="write the kept tests and their variants here")


def pytest_collection_finish(session: pytest.Session) -> None:
    out = session.config.getoption("--collection-json")
    if out is None:
        return
    rows = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        rows.append([item.nodeid, *(params[name].name if name in params else None
                                    for name in ("variant", "migration_variant"))])
    Path(out).write_text(json.dumps(rows), encoding="utf-8")
