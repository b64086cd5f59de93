"""Fixtures of the adapter tests: the FUSE ``Operations`` object called directly
(no kernel, no mount), as S3QL's ``t3_fs_api`` tests do."""

from __future__ import annotations

import pytest

from chronicle.fs.operations import ChronicleOperations
from chronicle.store.store import Store


@pytest.fixture
def fs(tmp_path) -> ChronicleOperations:
    """The operations of a fresh workspace ``w`` of a new store."""
    store = Store.init(tmp_path / "store")
    ws = store.open_workspace("w", writable=True, create=True)
    try:
        yield ChronicleOperations(ws, store)
    finally:
        store.close()
