"""Fixtures of the store tests (no mount, no trio): a fresh store and a writable workspace."""

from __future__ import annotations

import pytest

from chronicle.store.namespace.workspace import Workspace
from chronicle.store.store import Store


@pytest.fixture
def store(tmp_path) -> Store:
    """A new store in the test's temp dir, closed afterwards."""
    st = Store.init(tmp_path / "store")
    yield st
    st.close()


@pytest.fixture
def ws(store: Store) -> Workspace:
    """Workspace ``w`` of ``store``, open for writing (as the mount daemon holds it)."""
    return store.open_workspace("w", writable=True, create=True)
