"""Read-sets (issue 12 §2): which file versions a turn read, and stale turns.

Two levels, both against real mount daemons: the ctl turn commands alone
(``turn-begin``/``turn-end``, reads by this process and its children), then
the agent runtime with real workers (the ``env`` fixture of
``test_agent_runtime``: cleanup by PID, daemon logs checked), and ``chronicle
agent show``/``agent stale`` on what they recorded.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chronicle.control import ControlChannel
from chronicle.store.history.reads import ReadLog
from chronicle.store.history.turns import TurnLog
from chronicle.store.store import Store

try:
    from .test_agent_runtime import env   # noqa: F401  (the fixture)
except ImportError:
    from test_agent_runtime import env     # noqa: F401

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def agent_mount(mount_factory, tmp_path):
    """A mount of workspace ``bot`` whose agent exists (turn 0), and the store, opened here to read."""
    path = tmp_path / "store"
    with Store.init(path) as st:
        st.create_workspace("bot")
        ws = st.open_workspace("bot", writable=True)
        record = {"id": "bot", "target": "m:C", "cwd": "/", "created": "t", "entity_type": None,
                  "state_version": 1, "parent": None, "last_turn": 0, "message_turns": 0, "history_from": 0,
                  "total_usage": {}, "last_turn_usage": {}, "status": "created"}
        TurnLog(st).create_agent(ws, record, {"version": 1, "entity_type": None, "state": {}}, {"kind": "create"})
        st.release_workspace(ws)
    mount = mount_factory(store=path, workspace="bot")
    store = Store.open(path)
    try:
        yield mount, store
    finally:
        store.close()


def _turn(ctl: ControlChannel, n: int, **fields) -> None:
    ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": n, "record": {"kind": "message"}, **fields})


def _end(ctl: ControlChannel) -> dict:
    return ctl.request({"cmd": "turn-end", "record": {"status": "completed"}})


def test_ctl_turn_records_reads_of_this_process_and_a_child(agent_mount):
    mount, store = agent_mount
    big = os.urandom(3 << 20)
    (mount.path / "a.txt").write_text("alpha\n")
    (mount.path / "b.bin").write_bytes(big)
    (mount.path / "a.txt").read_text()                       # cached by the kernel before the turn
    with ControlChannel(mount.path) as ctl:
        _turn(ctl, 1)
        assert (mount.path / "a.txt").read_text() == "alpha\n"
        subprocess.run(["dd", f"if={mount.path / 'b.bin'}", "of=/dev/null", "bs=4096", "skip=256", "count=1",
                        "status=none"], check=True)
        list((mount.path / ".chronicle").iterdir())
        (mount.path / ".chronicle" / "log").read_bytes()       # not a file of the workspace
        _end(ctl)
    reads = {r["path"]: r for r in ReadLog(store).turn_reads("bot", "bot", 1)}
    assert set(reads) == {"a.txt", "b.bin"}
    a, b = reads["a.txt"], reads["b.bin"]
    assert (a["version"], a["ranges"], a["bytes"], a["size"]) == (1, [[0, 6]], 6, 6)
    with store.env.begin() as txn:
        history = store.open_workspace("bot").history
        assert a["seq"] == history.versions(txn, b"a.txt")[-1].seq
    assert b["version"] == 1 and b["size"] == len(big)
    [(start, end)] = b["ranges"]                              # the block, with the kernel's read-ahead
    assert start <= 256 * 4096 and end >= 257 * 4096 and end <= len(big)
    import blake3
    assert a["hash"] == blake3.blake3(b"alpha\n").hexdigest()


def test_untracked_turn_and_reads_outside_turns_record_nothing(agent_mount):
    mount, store = agent_mount
    (mount.path / "a.txt").write_text("alpha\n")
    (mount.path / "a.txt").read_text()
    with ControlChannel(mount.path) as ctl:
        _turn(ctl, 1, track_reads=False)
        (mount.path / "a.txt").read_text()
        _end(ctl)
        (mount.path / "a.txt").read_text()                   # no turn open
        _turn(ctl, 2)
        with open(mount.path / "a.txt", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:5] == b"alpha"                          # an mmap read: a page fault, then read()
        _end(ctl)
    log = ReadLog(store)
    assert log.turn_reads("bot", "bot", 1) == []
    assert [(r["path"], r["ranges"]) for r in log.turn_reads("bot", "bot", 2)] == [("a.txt", [[0, 6]])]
