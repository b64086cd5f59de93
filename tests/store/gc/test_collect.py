"""GC against a real store (no mount): prune, sweep, compaction, pins, leases."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.errors import Busy, Pruned
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.leases import GcLock, read_leases
from chronicle.store.gc.policy import Policy
from chronicle.store.history import points
from chronicle.store.history.views import HistoryViews
from chronicle.store.store import Store
from tests.storeutil import A, history, log_lines, write

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then


def _data(i: int, size: int = 200_000) -> bytes:
    return os.urandom(size // 2) + bytes([i % 256]) * (size // 2)


def read_at(ws, seq: int, path: bytes) -> bytes:
    """The content of ``path`` in the tree at ``seq`` (what ``at/<seq>/path`` reads)."""
    view = ws.view(seq)
    with ws.read_txn() as txn:
        ino, _kind = view.resolve(txn, path)
        attrs = view.attrs(txn, ino)
    return ws.store.content_map(attrs.content).read(0, attrs.size)


def du(path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def _clean(store) -> None:
    report = fsck(store)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


def test_gc_prunes_marks_frees_and_gives_disk_space_back(store, ws):
    seqs, datas = [], []
    for i in range(8):
        datas.append(_data(i))
        write(ws, ws.root, b"f", datas[-1])
        seqs.append(ws.head_seq)
    dryrun.set_policy(store, ws.id, Policy(keep_last=2))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    before = du(store.packs_dir)
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["pruned_versions"] == 6
    assert result["freed_bytes"] == promised["freed_bytes"] > 0
    assert result["freed_contents"] == promised["freed_contents"] == 6
    after = du(store.packs_dir)
    assert after < 0.4 * before                          # 2 of 8 kept: the pack rewritten, the old one deleted
    assert result["reclaimed_bytes"] >= before - after - 64 * 1024
    # the history shows where it was pruned; numbers do not move
    versions = history(ws, b"f")
    assert [v["version"] for v in versions] == list(range(1, 9))
    assert [bool(v.get("pruned")) for v in versions] == [True] * 6 + [False] * 2
    assert all("hash" not in v for v in versions[:6]) and all("hash" in v for v in versions[6:])
    marked = [line for line in log_lines(ws) if line.get("pruned")]
    assert [line["seq"] for line in marked] == seqs[:6]
    # a pruned version reads as an error, never as its neighbour; kept ones read back
    for seq in seqs[:6]:
        with pytest.raises(Pruned):
            read_at(ws, seq, b"f")
    assert read_at(ws, seqs[6], b"f") == datas[6] and read_at(ws, seqs[7], b"f") == datas[7]
    views = HistoryViews(ws)
    with pytest.raises(Pruned):
        views.version(b"f", 3)
    assert collect.last_result(store)["freed_bytes"] == result["freed_bytes"]
    _clean(store)
    again = collect.collect(store, ["w"], now_ns=LATER)          # idempotent
    assert again["pruned_versions"] == 0 and again["freed_bytes"] == 0
    _clean(store)


def test_snapshots_forks_and_leases_pin(store, ws):
    seqs, datas = [], []
    for i in range(6):
        datas.append(_data(i, 60_000))
        write(ws, ws.root, b"f", datas[-1])
        seqs.append(ws.head_seq)
    points.put_snapshot(ws, "snap", seqs[0])
    store.fork("w", seqs[2], "child")
    store.lease.pin(ws.id, seqs[3])          # an open at/ handle (this process's lease)
    assert any((ws.id, seqs[3]) in lease.pins for lease in read_leases(store.run_dir))
    dryrun.set_policy(store, ws.id, Policy())
    collect.collect(store, ["w"], now_ns=LATER)
    for i in (0, 2, 3, 5):                   # snapshot, fork point, lease, head
        assert read_at(ws, seqs[i], b"f") == datas[i]
    for i in (1, 4):
        with pytest.raises(Pruned):
            read_at(ws, seqs[i], b"f")
    child = store.open_workspace("child")
    assert read_at(child, child.head_seq, b"f") == datas[2]      # a fork of a pruned parent reads correctly
    with pytest.raises(Pruned):
        read_at(child, seqs[1], b"f")
    store.lease.unpin(ws.id, seqs[3])
    collect.collect(store, ["w"], now_ns=LATER)
    with pytest.raises(Pruned):
        read_at(ws, seqs[3], b"f")
    _clean(store)


def test_renamed_file_keeps_the_tree_a_pin_shows(store, ws):
    """A version dropped for path ``a`` whose inode lives on as ``b`` at a pinned seq stays readable there."""
    old = _data(1, 50_000)
    write(ws, ws.root, b"a", old)
    first = ws.head_seq

    ws.rename(ws.root, b"a", ws.root, b"b", 0, A)
    write(ws, ws.root, b"a", _data(2, 50_000))
    write(ws, ws.root, b"a", _data(3, 50_000))
    pinned = ws.head_seq
    points.put_snapshot(ws, "s", pinned)
    write(ws, ws.root, b"b", _data(4, 50_000))
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    collect.collect(store, ["w"], now_ns=LATER)
    assert read_at(ws, pinned, b"b") == old
    with pytest.raises(Pruned):
        read_at(ws, first, b"a")
    _clean(store)


def test_dead_chunk_revived_by_a_commit_survives_compaction(store, ws):
    shared = _data(7, 120_000)
    write(ws, ws.root, b"f", shared)
    write(ws, ws.root, b"f", _data(8, 120_000))
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    collect.collect(store, ["w"], now_ns=LATER)          # the first content's chunks are dead and gone
    write(ws, ws.root, b"g", shared)                     # the same bytes again: written afresh
    result = collect.collect(store, ["w"], now_ns=LATER)
    assert result["freed_bytes"] == 0
    assert read_at(ws, ws.head_seq, b"g") == shared
    _clean(store)


def test_dedup_hit_before_the_sweep_defers_dropping_dead_chunks(store, ws):
    """A chunk found live by a put, then made dead by gc, is not dropped
    while the commit that counts on it is still to come (ChunkStore hits)."""
    data = _data(9, 100_000)
    write(ws, ws.root, b"f", data)
    write(ws, ws.root, b"f", _data(10, 100_000))
    chunk_id = next(iter(_chunks_of(store, ws, b"f", version=1)))
    store.chunks.put(chunk_id, b"unused: a dedup hit does not write")   # a hit: recorded, not written
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0.2)
    assert result["deferred"] and "uncommitted" in result["deferred"]
    assert store.chunks.record(chunk_id) is not None     # still indexed: a commit may revive it
    _clean(store)


def _chunks_of(store, ws, path: bytes, version: int) -> list[bytes]:
    found = HistoryViews(ws).version(path, version)
    record = store.content_map(found.entry.content).record
    return [record.chunk_id(i) for i in range(record.extent_count)]


def test_one_gc_at_a_time(store, ws):
    with GcLock(store.run_dir):
        with pytest.raises(Busy):
            collect.collect(store, ["w"])


def test_reader_of_a_compacted_pack_reads_the_new_location(tmp_path):
    path = tmp_path / "s"
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    keep = _data(1, 150_000)
    write(ws, ws.root, b"keep", keep)
    for i in range(4):
        write(ws, ws.root, b"churn", _data(10 + i, 150_000))
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    seq = ws.head_seq
    store.close()
    reader = Store.open(path)                      # this process's registry hands out one Store per path:
    reader_ws = reader.open_workspace("w")         # the "other process" is simulated by a stale record
    view = reader_ws.view(seq)
    with reader_ws.read_txn() as txn:
        ino, _ = view.resolve(txn, b"keep")
        attrs = view.attrs(txn, ino)
        content = reader.content_map(attrs.content)
        stale = {cid: reader.chunks.record(cid, txn) for cid in
                 (content.record.chunk_id(i) for i in range(content.record.extent_count))}
    result = collect.collect(reader, ["w"], now_ns=LATER)
    assert result["packs_deleted"] >= 1
    reader.chunks.cache = type(reader.chunks.cache)(reader.chunks.cache.max_bytes)   # nothing cached
    for cid, record in stale.items():
        assert reader.chunks.record(cid).pack_no != record.pack_no
        assert reader.chunks._load(cid, None)      # reads the moved chunk
    assert content.read(0, len(keep)) == keep
    reader.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 5)), min_size=1, max_size=14),
       keep_last=st.integers(0, 3), snap=st.integers(0, 13))
def test_random_histories_keep_what_the_policy_and_pins_say(tmp_path_factory, ops, keep_last, snap):
    store = Store.init(tmp_path_factory.mktemp("gc") / "s")
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        written: dict[int, dict[bytes, bytes]] = {}
        tree: dict[bytes, bytes] = {}
        for path, n in ops:
            tree[path] = bytes([n]) * (30_000 + n)
            write(ws, ws.root, path, tree[path])
            written[ws.head_seq] = dict(tree)
        seqs = sorted(written)
        snap_seq = seqs[snap % len(seqs)]
        points.put_snapshot(ws, "s", snap_seq)
        dryrun.set_policy(store, ws.id, Policy(keep_last=keep_last))
        promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
        result = collect.collect(store, ["w"], now_ns=LATER)
        assert result["freed_bytes"] == promised["freed_bytes"]
        for seq in (snap_seq, ws.head_seq):
            for path, data in written[seq].items():
                assert read_at(ws, seq, path) == data
        for seq, files in written.items():       # never a neighbour's content
            for path, data in files.items():
                try:
                    assert read_at(ws, seq, path) == data
                except Pruned:
                    pass
        _clean(store)
    finally:
        store.close()
