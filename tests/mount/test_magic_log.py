"""``.chronicle/log`` of a real mount with a long history (SPEC §4): opening
it costs O(1) on the daemon's loop — the log is rendered as it is read, not
at open — and the handle reads exactly the events up to its open.

The 40,000 events are written into the store before it is mounted, as the
journal writes them, so the test does not spend a minute making them
through the mount.
"""

from __future__ import annotations

import json
import os
import time

import mounts
import pytest

from chronicle.store.meta import schema
from chronicle.store.meta.journal import EventWriter
from chronicle.store.model import Actor
from chronicle.store.store import Store

EVENTS = 40000


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")


def store_with_events(path, n: int) -> None:
    """A store whose workspace has a directory ``d`` and ``n`` events in all."""
    actor = Actor(os.getuid(), os.getgid(), os.getpid())
    with Store.init(path) as store:
        ws = store.open_workspace(mounts.DEFAULT_WORKSPACE, writable=True, create=True)
        ws.mkdir(ws.root, b"d", 0o755, actor)
        with store.env.begin(write=True) as txn:
            for seq in range(2, n + 1):
                EventWriter(txn, store.dbs, ws.id, seq, is_fork=False, turn=None, pid=actor.pid,
                            history=ws.history).log("chmod", b"d", mode="0o755")
            txn.put(schema.ws_key(ws.id), schema.U64.pack(n), db=store.dbs["heads"])
        store.note_commit()


def test_a_40000_event_log_opens_at_once_and_reads_exactly_the_events_up_to_its_open(mount_factory):
    store = mount_factory.new_store()
    store_with_events(store, EVENTS)
    mount = mount_factory(store=store)
    log = mount.path / ".chronicle" / "log"
    os.stat(log)                                   # the lookup is not what is measured
    started = time.perf_counter()
    fd = os.open(log, os.O_RDONLY)
    opened = time.perf_counter() - started
    try:
        os.mkdir(mount.path / "after-open")        # seq EVENTS + 1: not in this handle
        pieces, slowest_stat = [], 0.0
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                break
            pieces.append(piece)
            started = time.perf_counter()
            os.stat(mount.path / "d")
            slowest_stat = max(slowest_stat, time.perf_counter() - started)
    finally:
        os.close(fd)
    seqs = [json.loads(line)["seq"] for line in b"".join(pieces).splitlines()]
    assert seqs == list(range(1, EVENTS + 1))
    assert opened < 0.1, f"open took {opened * 1000:.0f} ms"
    assert slowest_stat < 0.1, f"a stat between reads took {slowest_stat * 1000:.0f} ms"
    assert json.loads(log.read_bytes().splitlines()[-1])["path"] == "after-open"
