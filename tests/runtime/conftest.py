"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest

from chronicle.store.history.turns import TurnLog
from chronicle.store.store import Store


@pytest.fixture
def agent_mount(mount_factory, tmp_path):
    """``(mount, store, TurnLog(store))``: a mount of workspace ``bot`` whose agent exists (turn 0,
    state ``{"n": 0}``), and the store, opened here to read."""
    path = tmp_path / "store"
    with Store.init(path) as st:
        st.create_workspace("bot")
        ws = st.open_workspace("bot", writable=True)
        record = {"id": "bot", "target": "m:C", "cwd": "/", "created": "t", "entity_type": None,
                  "state_version": 1, "parent": None, "last_turn": 0, "message_turns": 0, "history_from": 0,
                  "total_usage": {}, "last_turn_usage": {}, "status": "created"}
        TurnLog(st).create_agent(ws, record, {"version": 1, "entity_type": None, "state": {"n": 0}},
                                 {"kind": "create"})
        st.release_workspace(ws)
    mount = mount_factory(store=path, workspace="bot")
    store = Store.open(path)
    try:
        yield mount, store, TurnLog(store)
    finally:
        store.close()
