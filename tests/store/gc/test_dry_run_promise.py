"""The dry run promises exactly what GC then does; deleted files and empty versions follow the policy."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.errors import Exists, NotFound, Pruned
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.leases import DeletedFiles, LeaseInfo
from chronicle.store.gc.policy import Policy
from chronicle.store.history import points
from chronicle.store.store import Store
from tests.storeutil import A, history, names_at_every_seq, write

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then
FIGURES = ("freed_contents", "freed_chunks", "freed_bytes", "freed_raw_bytes")


def _clean(store) -> None:
    report = fsck(store)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


def _read_at(ws, seq: int, path: bytes) -> bytes | None:
    view = ws.view(seq)
    with ws.read_txn() as txn:
        try:
            ino, _kind = view.resolve(txn, path)
        except NotFound:
            return None
        attrs = view.attrs(txn, ino)
    return ws.store.content_map(attrs.content).read(0, attrs.size)


def _check_promise(store, ws, promised: dict, result: dict) -> None:
    mine = promised["workspaces"][0]
    assert mine["dropped_versions"] == result["pruned_versions"]
    assert {k: promised[k] for k in FIGURES} == {k: result[k] for k in FIGURES}
    marks = sum(1 for p in mine["paths"] for _ in p["dropped"])
    assert marks == result["pruned_versions"]


_PATHS = [b"a", b"b", b"c"]
_OP = st.one_of(st.tuples(st.just("write"), st.sampled_from(_PATHS), st.integers(0, 4)),
                st.tuples(st.just("empty"), st.sampled_from(_PATHS), st.just(0)),
                st.tuples(st.just("delete"), st.sampled_from(_PATHS), st.just(0)),
                st.tuples(st.just("rename"), st.sampled_from(_PATHS), st.integers(0, 2)))
_POLICY = st.builds(Policy, keep_last=st.sampled_from([None, 0, 1, 2, 3]), keep_daily=st.sampled_from([None, 0, 1]),
                    keep_within=st.sampled_from([None, 0]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_OP, min_size=1, max_size=16), policy=_POLICY, snap=st.one_of(st.none(), st.integers(0, 15)))
def test_dry_run_figures_are_what_gc_frees(tmp_path_factory, ops, policy, snap):
    """Random histories (writes, truncations to empty, deletions, renames over
    other files) and random policies: the dry run's dropped versions and freed
    contents, chunks and bytes are gc's pruned versions and freed figures, and
    every tree reads its own content or ``Pruned``, never a neighbour's."""
    store = Store.init(tmp_path_factory.mktemp("promise") / "s")
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        trees: dict[int, dict[bytes, bytes]] = {}
        tree: dict[bytes, bytes] = {}
        for kind, path, n in ops:
            try:
                if kind == "write":
                    tree[path] = bytes([n + 1]) * (20_000 + n) + os.urandom(64)
                    write(ws, ws.root, path, tree[path])
                elif kind == "empty":
                    tree[path] = b""
                    write(ws, ws.root, path, b"")
                elif kind == "delete":
                    ws.unlink(ws.root, path, A)
                    del tree[path]
                else:
                    target = _PATHS[n]
                    ws.rename(ws.root, path, ws.root, target, 0, A)
                    if target != path:
                        tree[target] = tree.pop(path)
            except (NotFound, Exists):
                continue
            trees[ws.head_seq] = dict(tree)
        if not trees:
            return
        seqs = sorted(trees)
        if snap is not None:
            points.put_snapshot(ws, "s", seqs[snap % len(seqs)])
        dryrun.set_policy(store, ws.id, policy)
        promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
        result = collect.collect(store, ["w"], now_ns=LATER)
        _check_promise(store, ws, promised, result)
        for seq, files in trees.items():
            for path, data in files.items():
                try:
                    assert _read_at(ws, seq, path) == data
                except Pruned:
                    assert seq != ws.head_seq and (snap is None or seq != seqs[snap % len(seqs)])
        _clean(store)
        again = dryrun.dry_run(store, ["w"], now_ns=LATER)
        assert again["workspaces"][0]["dropped_versions"] == 0 and again["freed_bytes"] == 0
    finally:
        store.close()


def test_an_empty_version_the_policy_drops_is_pruned(store, ws):
    write(ws, ws.root, b"f", b"")
    write(ws, ws.root, b"f", b"one" * 10_000)
    write(ws, ws.root, b"f", b"two" * 10_000)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert promised["workspaces"][0]["dropped_versions"] == result["pruned_versions"] == 2
    assert [bool(v.get("pruned")) for v in history(ws, b"f")] == [True, True, False]
    _clean(store)


def _deleted_file(store, ws) -> tuple[int, int, bytes]:
    """f written twice then deleted; returns (its inode, the seq of its last version, that content)."""
    write(ws, ws.root, b"f", os.urandom(150_000))
    last = os.urandom(150_000)
    ino = write(ws, ws.root, b"f", last)
    seq = ws.head_seq
    write(ws, ws.root, b"keep", b"k" * 1000)
    ws.unlink(ws.root, b"f", A)
    return ino, seq, last


def test_a_deleted_files_last_content_goes_when_the_policy_drops_it(store, ws):
    """The last version of a deleted path is freed like any other the policy
    drops; its history shows the pruned mark (no silent gap)."""
    _ino, seq, _last = _deleted_file(store, ws)
    dryrun.set_policy(store, ws.id, Policy(keep_last=0))
    stored_before = store.stats()["stored_bytes"]
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["pruned_versions"] == promised["workspaces"][0]["dropped_versions"] == 2
    assert result["freed_contents"] == promised["freed_contents"] == 2
    assert result["freed_bytes"] == promised["freed_bytes"] >= 0.9 * stored_before - 2000
    assert [bool(v.get("pruned")) for v in history(ws, b"f")] == [True, True, False]     # the last: the deletion
    with pytest.raises(Pruned):
        _read_at(ws, seq, b"f")
    assert _read_at(ws, ws.head_seq, b"keep") == b"k" * 1000
    _clean(store)


def test_a_deleted_file_still_open_keeps_its_content(store, ws):
    """An unlinked file open in the process that has the workspace (a mount's
    open handle) is read through its last inode record: gc keeps it until it is closed."""
    ino, _seq, last = _deleted_file(store, ws)
    ws.files.open(ino)                    # reopened before the unlink would be the same: the handle stays
    dryrun.set_policy(store, ws.id, Policy(keep_last=0))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert promised["freed_contents"] == result["freed_contents"] == 1     # the older version only
    assert store.content_map(ws.head_attrs(ino).content).read(0, len(last)) == last
    ws.files.release(ino)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["freed_contents"] == 1
    _clean(store)


def test_a_deleted_file_of_another_writer_waits_for_its_lease(store, ws):
    """Another process that has the workspace open: its lease must be refreshed
    after the deletion (and not list the file open) before gc takes the last record."""
    deleted = time.time_ns()
    fresh = LeaseInfo(pid=1, heartbeat=deleted + 5 * 10**9, pins=(), packs=frozenset(), busy_since=None,
                      tracks=frozenset({ws.id}))
    stale = LeaseInfo(pid=1, heartbeat=deleted, pins=(), packs=frozenset(), busy_since=None,
                      tracks=frozenset({ws.id}))
    holding = LeaseInfo(pid=1, heartbeat=deleted + 5 * 10**9, pins=(), packs=frozenset(), busy_since=None,
                        tracks=frozenset({ws.id}), open=frozenset({(ws.id, 7)}))
    assert DeletedFiles(None, [fresh]).may_drop(ws.id, 7, deleted)
    assert not DeletedFiles(None, [stale]).may_drop(ws.id, 7, deleted)
    assert not DeletedFiles(None, [holding]).may_drop(ws.id, 7, deleted)
    assert DeletedFiles(None, [holding]).may_drop(ws.id, 8, deleted)
    assert DeletedFiles(None, [stale]).may_drop(ws.id + 1, 7, deleted)      # it does not have that workspace


def test_a_chmod_between_versions_is_pruned_with_the_version_it_shows(store, ws):
    """write, chmod, write: the chmod's record and path entry show the first
    version's content, so they go with it (fsck finds no entry pointing at a freed content)."""
    ino = write(ws, ws.root, b"f", os.urandom(60_000))
    ws.setattr(ino, A, mode=0o100600)
    write(ws, ws.root, b"f", os.urandom(60_000))
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER)
    _check_promise(store, ws, promised, result)
    assert result["pruned_versions"] == 1 and result["pruned_records"] == 2 and result["freed_contents"] == 1
    _clean(store)


def test_a_hard_linked_file_keeps_its_versions(store, ws):
    ino = write(ws, ws.root, b"f", os.urandom(60_000))
    ws.link(ino, ws.root, b"g", A)
    write(ws, ws.root, b"f", os.urandom(60_000))
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER)
    _check_promise(store, ws, promised, result)
    _clean(store)


_NM_OP = st.one_of(st.tuples(st.just("write"), st.sampled_from([b"a", b"b"]), st.integers(0, 3)),
                   st.tuples(st.just("delete"), st.sampled_from([b"a", b"b"]), st.just(0)),
                   st.tuples(st.just("rmtree"), st.just(b""), st.just(0)),
                   st.tuples(st.just("app"), st.just(b"app.py"), st.integers(0, 3)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_NM_OP, min_size=1, max_size=16), snap=st.one_of(st.none(), st.integers(0, 15)))
def test_dry_run_promises_what_gc_drops_of_ignored_paths(tmp_path_factory, ops, snap):
    """Random writes and deletes in ``node_modules/`` (ignored by the default
    policy), removals of the whole directory and versioned writes beside it:
    the dry run's freed figures, dropped inodes and dropped log lines are
    gc's; every past tree lists only names whose inodes read; fsck is clean."""
    store = Store.init(tmp_path_factory.mktemp("promise-nm") / "s")
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        for kind, name, n in ops:
            nm = _lookup(ws, b"node_modules")
            if kind == "app":
                write(ws, ws.root, name, bytes([n]) * 5000)
                continue
            if nm is None:
                nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
            try:
                if kind == "write":
                    write(ws, nm, name, bytes([n + 1]) * (10_000 + n) + os.urandom(32))
                elif kind == "delete":
                    ws.unlink(nm, name, A)
                else:
                    for child in (b"a", b"b"):
                        try:
                            ws.unlink(nm, child, A)
                        except NotFound:
                            pass
                    ws.rmdir(ws.root, b"node_modules", A)
            except NotFound:
                continue
        if snap is not None:
            points.put_snapshot(ws, "s", 1 + snap % ws.head_seq)
        promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
        result = collect.collect(store, ["w"], now_ns=LATER)
        _check_promise(store, ws, promised, result)
        mine = promised["workspaces"][0]
        assert (mine["dropped_inodes"], mine["dropped_lines"]) == (result["dropped_inodes"], result["dropped_lines"])
        names_at_every_seq(ws)
        _clean(store)
        again = dryrun.dry_run(store, ["w"], now_ns=LATER)
        assert again["workspaces"][0]["dropped_inodes"] == 0 and again["freed_bytes"] == 0
    finally:
        store.close()


def _lookup(ws, name: bytes) -> int | None:
    with ws.read_txn() as txn:
        found = ws.view().lookup(txn, ws.root, name)
    return found[0] if found is not None else None
