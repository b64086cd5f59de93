"""Ignore rules at commit time (store level): an ignored path keeps its latest content only."""

from __future__ import annotations

import json

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.meta import schema
from tests.storeutil import A, history, write


def _query(ws, path: bytes) -> dict:
    with ws.read_txn() as txn:
        return json.loads(ws.history.render_query(txn, path))


def _refcount(store, content_id: bytes) -> int:
    with store.env.begin() as txn:
        return schema.content_header(txn.get(content_id, db=store.dbs["contents"]), content_id)[1]


def test_ignored_path_keeps_one_version_and_says_unversioned(store, ws):
    nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
    ino = write(ws, nm, b"lib.js", b"one" * 1000)
    first = ws.head_attrs(ino).content
    write(ws, nm, b"lib.js", b"two" * 1000)
    write(ws, nm, b"lib.js", b"three" * 1000)
    last = ws.head_attrs(ino).content
    doc = _query(ws, b"node_modules/lib.js")
    assert doc["unversioned"] is True
    assert len(doc["versions"]) == 1 and doc["versions"][0]["version"] == 1
    assert doc["versions"][0]["size"] == 5000
    assert _refcount(store, first) == 0                  # only GC frees it now
    assert _refcount(store, last) >= 1
    report = fsck(store)
    assert report.clean, [p.message for p in report.problems]
    with ws.read_txn() as txn:                           # a past tree shows the latest content
        past = ws.view(ws.head_seq - 2)
        found = past.lookup(txn, nm, b"lib.js")
        assert past.attrs(txn, found[0]).content == last


def test_versioned_paths_are_untouched(store, ws):
    write(ws, ws.root, b"app.py", b"v1")
    write(ws, ws.root, b"app.py", b"v2")
    doc = _query(ws, b"app.py")
    assert "unversioned" not in doc and len(doc["versions"]) == 2


def test_policy_patterns_and_the_ignore_file(store, ws):
    dryrun.set_policy(store, ws.id, Policy(ignore=("*.log",)))
    for _ in range(2):
        write(ws, ws.root, b"run.log", b"x" * 100)
        write(ws, ws.root, b"run.log", b"y" * 100)
        write(ws, ws.root, b"node.db-wal", b"a")
        write(ws, ws.root, b"node.db-wal", b"b")
    assert len(history(ws, b"run.log")) == 1
    assert len(history(ws, b"node.db-wal")) == 4         # this policy replaced the default patterns
    write(ws, ws.root, b".chronicleignore", b"# scratch\nscratch/\n!keep.log\n")
    assert len(history(ws, b".chronicleignore")) == 1
    sc = ws.mkdir(ws.root, b"scratch", 0o755, A)[0]
    for data in (b"1", b"2", b"3"):
        write(ws, sc, b"t", data)
        write(ws, ws.root, b"keep.log", data)
    assert _query(ws, b"scratch/t")["unversioned"] is True and len(history(ws, b"scratch/t")) == 1
    assert len(history(ws, b"keep.log")) == 3            # re-included by the file
    write(ws, ws.root, b".chronicleignore", b"")         # the edit takes effect for later commits
    write(ws, sc, b"t", b"4")
    write(ws, sc, b"t", b"5")
    assert len(history(ws, b"scratch/t")) == 3 and "unversioned" not in _query(ws, b"scratch/t")
    assert fsck(store).clean


def test_hard_linked_files_keep_their_history(store, ws):
    nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
    ino = write(ws, nm, b"a", b"1")
    ws.link(ino, ws.root, b"a-link", A)
    write(ws, nm, b"a", b"2")
    write(ws, nm, b"a", b"3")
    assert len(history(ws, b"node_modules/a")) >= 3
    assert fsck(store).clean


def test_dry_run_after_ignored_writes(store, ws):
    pc = ws.mkdir(ws.root, b"__pycache__", 0o755, A)[0]
    for i in range(4):
        write(ws, pc, b"m.pyc", bytes([i]) * 9000)
    report = dryrun.dry_run(store, ["w"])
    assert report["workspaces"][0]["versions"] == 1
