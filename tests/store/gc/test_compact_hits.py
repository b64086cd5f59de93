"""Compaction after commits that reference no new chunk (the same bytes written
again, or a content another version already has): their dedup hits must not
hold GC back, or no dead chunk could be dropped for an hour (as SQLite's
WAL and shared-memory files, rewritten with bytes they had before, did)."""

from __future__ import annotations

import os
import time

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from tests.storeutil import history, write

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then


def _pack_bytes(store) -> int:
    return sum(f.stat().st_size for f in store.packs_dir.rglob("*") if f.is_file())


def _read_head(ws, ino: int) -> bytes:
    attrs = ws.head_attrs(ino)
    return ws.store.content_map(attrs.content).read(0, attrs.size)


def _gc_frees_and_keeps(store, ws, ino: int, kept: bytes) -> None:
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    before = _pack_bytes(store)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["deferred"] is None, result
    assert result["freed_bytes"] > 0 and result["packs_deleted"] >= 1, result
    assert _pack_bytes(store) < before - 500_000              # the dead chunks' bytes came back
    assert _read_head(ws, ino) == kept
    assert [bool(v.get("pruned")) for v in history(ws, b"f")][-1] is False
    report = fsck(store)
    assert report.clean, [(p.kind, p.message) for p in report.problems]


def test_the_same_bytes_written_again_do_not_hold_compaction_back(store, ws):
    old = os.urandom(600_000)
    ino = write(ws, ws.root, b"f", old)
    write(ws, ws.root, b"f", old)                   # unchanged: no version, every chunk a dedup hit
    new = os.urandom(300_000)
    write(ws, ws.root, b"f", new)
    assert store.chunks.lease_state()[1] is None    # no dedup hit waits for a commit
    _gc_frees_and_keeps(store, ws, ino, new)


def test_a_content_stored_already_does_not_hold_compaction_back(store, ws):
    a, b = os.urandom(600_000), os.urandom(300_000)
    ino = write(ws, ws.root, b"f", a)
    write(ws, ws.root, b"f", b)
    write(ws, ws.root, b"f", a)                     # a version whose content is stored: no chunk referenced anew
    write(ws, ws.root, b"f", b)
    assert store.chunks.lease_state()[1] is None
    _gc_frees_and_keeps(store, ws, ino, b)
