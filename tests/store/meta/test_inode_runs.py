"""Run records (issue 9 §6): a directory's versions share one ``inodes``
record per ``model.RUN_MAX_BYTES`` of run, and a name's ``dirent_hist``
records one per ``schema.HIST_RUN_MAX_BYTES``; every past tree reads each version
as it was, stores with one record a version (as main wrote them) read the
same and go on folding, and gc and fsck read both."""

from __future__ import annotations

import stat
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect
from chronicle.store.gc.policy import Policy
from chronicle.store.gc import dryrun
from chronicle.store.meta import schema
from chronicle.store.model import (RUN_MAX_BYTES, Attrs, attrs_at, encode_run, inode_content_nlink, is_run,
                                   run_append, run_versions)
from chronicle.store.store import Store
from tests.storeutil import A, write


def _dir_history(ws, d: int, rounds: int, start: int = 0, listings: dict | None = None) -> dict[int, Attrs]:
    """Create and remove files in ``d`` (plus a chmod and a subdirectory now and
    then: nlink and mode change too); ``{seq: d's attrs after it}``, and
    ``listings[seq]``: d's entries then."""
    seen = _Seen(ws, d, listings)
    for i in range(start, start + rounds):
        write(ws, d, b"f%d" % (i % 7), b"v%d" % i)
        seen[ws.head_seq] = ws.getattr(d)
        if i % 3 == 0:
            ws.unlink(d, b"f%d" % (i % 7), A)
            seen[ws.head_seq] = ws.getattr(d)
        if i % 17 == 5:
            ws.mkdir(d, b"sub%d" % i, 0o755, A)
            seen[ws.head_seq] = ws.getattr(d)
        if i % 29 == 11:
            ws.setattr(d, A, mode=stat.S_IFDIR | (0o700 if i % 2 else 0o755))
            seen[ws.head_seq] = ws.getattr(d)
    return seen


class _Seen(dict):
    def __init__(self, ws, d, listings):
        super().__init__()
        self.ws, self.d, self.listings = ws, d, listings

    def __setitem__(self, seq, attrs):
        super().__setitem__(seq, attrs)
        if self.listings is not None:
            self.listings[seq] = self.ws.readdir(self.d)


def _check_listings(ws, d: int, listings: dict) -> None:
    for seq, names in listings.items():
        with ws.read_txn() as txn:
            assert ws.view(seq).entries(txn, d) == names, seq


def _hist(store: Store, ws_id: int, d: int) -> list[tuple[bytes, bytes]]:
    prefix = schema.dir_prefix(ws_id, d)
    with store.env.begin() as txn:
        with txn.cursor(db=store.dbs["dirent_hist"]) as cur:
            cur.set_range(prefix)
            return [(bytes(k), bytes(v)) for k, v in cur if k[:12] == prefix]


def _records(store: Store, ws_id: int, ino: int) -> list[tuple[bytes, bytes]]:
    prefix = schema.inode_prefix(ws_id, ino)
    with store.env.begin() as txn:
        with txn.cursor(db=store.dbs["inodes"]) as cur:
            cur.set_range(prefix)
            return [(bytes(k), bytes(v)) for k, v in cur if k[:12] == prefix]


def _versions(records: list[tuple[bytes, bytes]]) -> dict[int, Attrs]:
    out = {}
    for key, raw in records:
        out.update(run_versions(raw, schema.inode_key_seq(key)))
    return out


def _check_every_seq(ws, d: int, seen: dict[int, Attrs]) -> None:
    """The past tree after each step shows ``d`` as it was then."""
    for seq, attrs in seen.items():
        with ws.read_txn() as txn:
            assert ws.view(seq).attrs(txn, d) == attrs, seq


def test_a_directory_s_versions_fold_into_runs_and_every_past_tree_reads_them(tmp_path):
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    d, _ = ws.mkdir(ws.root, b"dir", 0o755, A)
    seen = _dir_history(ws, d, 150)
    records = _records(store, ws.id, d)
    versions = _versions(records)
    assert len(versions) > 100 and len(records) <= len(versions) // 20 + 6     # (a chmod starts a run)
    assert not is_run(records[0][1]) and all(is_run(v) for _k, v in records[1:])   # the newest stands alone
    assert all(len(v) <= RUN_MAX_BYTES for _k, v in records)
    _check_every_seq(ws, d, seen)
    with ws.read_txn() as txn:
        assert ws.view(None).attrs(txn, d) == ws.getattr(d) == seen[max(seen)]
    files = _records(store, ws.id, ws.resolve(b"dir/f1")[0])
    assert files and not any(is_run(v) for _k, v in files)        # records with content stay one a version
    fork = store.fork("w", min(seen) + 40, "child")               # a fork reads its parent's run at the fork seq
    child = store.open_workspace(fork.name)
    with child.read_txn() as txn:
        assert child.view(None).attrs(txn, d) == ws.view(min(seen) + 40).attrs(txn, d)
    store.close()
    store = Store.open(tmp_path / "s")
    report = fsck(store)
    assert report.clean, [(p.kind, p.message) for p in report.problems]
    store.close()


def test_a_store_with_one_record_a_directory_version_reads_the_same_and_folds_on(tmp_path):
    """Records as main wrote them (one a version, every form it wrote) read
    alike, and new versions fold on top of them."""
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    d, _ = ws.mkdir(ws.root, b"dir", 0o755, A)
    seen = _dir_history(ws, d, 60)
    db = store.dbs["inodes"]
    with store.env.begin(write=True) as txn:
        for key, raw in list(txn.cursor(db=db)):
            if is_run(raw):
                txn.delete(key, db=db)
                ws_id, ino = schema.U32.unpack_from(key)[0], schema.U64.unpack_from(key, 4)[0]
                for seq, attrs in run_versions(bytes(raw), schema.inode_key_seq(key)):
                    txn.put(schema.inode_key(ws_id, ino, seq), attrs.encode_fixed(), db=db)
    assert not any(is_run(v) for _k, v in _records(store, ws.id, d))
    _check_every_seq(ws, d, seen)
    seen.update(_dir_history(ws, d, 60, 60))
    records = _records(store, ws.id, d)
    assert any(is_run(v) for _k, v in records) and len(records) < len(seen) // 2
    _check_every_seq(ws, d, seen)
    store.close()
    assert fsck(Store.open(tmp_path / "s")).clean


def test_gc_drops_an_ignored_directory_with_runs_and_prunes_around_them(tmp_path):
    store = Store.init(tmp_path / "s")
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        write(ws, ws.root, b".chronicleignore", b"build/\n")
        b, _ = ws.mkdir(ws.root, b"build", 0o755, A)
        keep, _ = ws.mkdir(ws.root, b"src", 0o755, A)
        for i in range(80):
            write(ws, b, b"o%d" % (i % 5), b"obj %d" % i)
            write(ws, keep, b"s%d" % (i % 5), b"src %d" % i)
        assert any(is_run(v) for _k, v in _records(store, ws.id, b))
        for name, _ino, _kind in ws.readdir(b):
            ws.unlink(b, name, A)
        ws.rmdir(ws.root, b"build", A)
        src = _records(store, ws.id, keep)
        dryrun.set_policy(store, ws.id, Policy(keep_last=1))
        later = time.time_ns() + 400 * 86400 * 10**9
        result = collect.collect(store, ["w"], now_ns=later)
        assert result["pruned_versions"] > 0 and result["dropped_inodes"] >= 1
        assert _records(store, ws.id, b) == []                    # the ignored directory, runs and all, is gone
        assert _records(store, ws.id, keep) == src                # the kept one's runs are untouched
        report = fsck(store)
        assert report.clean, [(p.kind, p.message) for p in report.problems]
    finally:
        store.close()


_TIME = st.integers(-(1 << 62), 1 << 62)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(1, 1 << 40), _TIME, _TIME, st.integers(0, 1 << 32),
                                st.sampled_from([None, 0o700, 0o755]), st.booleans()), min_size=1, max_size=80))
def test_a_run_gives_back_every_version_appended(steps):
    now = time.time_ns()
    first = Attrs(stat.S_IFDIR | 0o755, 0, 0, 2, 4096, now, now, now)
    raw, seq, seqs, attrs = encode_run(first), 10, {10: first}, first
    for dseq, mtime, ctime, nlink, mode, xattr in steps:
        attrs = attrs.replace(mtime_ns=mtime, ctime_ns=ctime, nlink=nlink,
                              mode=stat.S_IFDIR | mode if mode else attrs.mode,
                              xattrs=((b"user.x", b"1"),) if xattr else ())
        joined = run_append(raw, 10, seq + dseq, attrs)
        same = attrs.replace(mtime_ns=now, ctime_ns=now, nlink=2) == first
        if joined is None:                      # another mode or xattrs, or full: a record of its own follows
            assert not same or len(raw) > RUN_MAX_BYTES - 40
            break
        assert same
        raw, seq = joined, seq + dseq
        seqs[seq] = attrs
    assert dict(run_versions(raw, 10)) == seqs and Attrs.decode(raw) == first
    assert inode_content_nlink(raw) == (b"", first.nlink)
    ordered = sorted(seqs)
    for i, s in enumerate(ordered):
        assert attrs_at(raw, 10, s) == (seqs[s], s)
        if i + 1 < len(ordered) and ordered[i + 1] > s + 1:
            assert attrs_at(raw, 10, s + 1) == (seqs[s], s)
    assert run_append(raw, 10, seq + 1, attrs.replace(content=bytes(32))) is None   # content: never in a run
    assert run_append(first.encode(), 10, seq + 1, first) is None                    # no run: nothing to join


def test_a_name_s_history_folds_into_runs_and_every_past_listing_reads_the_same(tmp_path):
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    d, _ = ws.mkdir(ws.root, b"dir", 0o755, A)
    listings: dict = {}
    _dir_history(ws, d, 150, listings=listings)
    records = _hist(store, ws.id, d)
    versions = [v for k, raw in records for v in schema.hist_run_versions(raw, schema.split_dirent_hist_key(k)[1])]
    assert len(versions) > 3 * len(records) and any(schema.is_hist_run(v) for _k, v in records)
    newest: dict[bytes, bytes] = {}
    for k, v in records:
        newest.setdefault(schema.split_dirent_hist_key(k)[0], v)
    assert not any(schema.is_hist_run(v) for v in newest.values())        # each name's newest stands alone
    _check_listings(ws, d, listings)
    with ws.read_txn() as txn:                # a fork reads through to its parent's runs
        fork_seq = sorted(listings)[len(listings) // 2]
        child = store.open_workspace(store.fork("w", fork_seq, "child").name)
        assert child.view(None).entries(txn, d) == listings[fork_seq]
    # as main wrote them: one record a version; they read the same and fold on
    db = store.dbs["dirent_hist"]
    with store.env.begin(write=True) as txn:
        for key, raw in records:
            if schema.is_hist_run(raw):
                name, first = schema.split_dirent_hist_key(key)
                for seq, entry in schema.hist_run_versions(raw, first):
                    txn.put(schema.dirent_hist_key(ws.id, d, name, seq),
                            b"" if entry is None else schema.encode_dirent(*entry), db=db)
    assert not any(schema.is_hist_run(v) for _k, v in _hist(store, ws.id, d))
    _check_listings(ws, d, listings)
    _dir_history(ws, d, 60, 150, listings=listings)
    assert any(schema.is_hist_run(v) for _k, v in _hist(store, ws.id, d))
    _check_listings(ws, d, listings)
    store.close()
    store = Store.open(tmp_path / "s")
    report = fsck(store)
    assert report.clean, [(p.kind, p.message) for p in report.problems]
    store.close()


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(1, 1 << 40), st.one_of(st.none(), st.tuples(
    st.integers(1, (1 << 64) - 1), st.integers(0, 255)))), min_size=1, max_size=80))
def test_a_dirent_run_gives_back_every_version_appended(steps):
    raw, seq, seqs = schema.encode_hist_run([(5, (17, 1))]), 5, {5: (17, 1)}
    for dseq, entry in steps:
        joined = schema.hist_run_append(raw, 5, seq + dseq, entry)
        if joined is None:
            assert len(raw) > schema.HIST_RUN_MAX_BYTES - 25
            break
        raw, seq = joined, seq + dseq
        seqs[seq] = entry
        assert schema.is_hist_run(raw) and len(raw) not in (0, 9)
    assert dict(schema.hist_run_versions(raw, 5)) == seqs
    ordered = sorted(seqs)
    for i, s in enumerate(ordered):
        assert schema.hist_at(raw, 5, s) == seqs[s]
        if i + 1 < len(ordered) and ordered[i + 1] > s + 1:
            assert schema.hist_at(raw, 5, s + 1) == seqs[s]
    assert schema.hist_run_versions(schema.encode_dirent(9, 2), 3) == [(3, (9, 2))]
    assert schema.hist_run_versions(b"", 3) == [(3, None)]
    nine = schema.encode_hist_run([(1, (200, 1)), (2, (1000, 1))])    # would be 9 bytes, an entry's length: padded
    assert len(nine) == 10 and schema.hist_run_versions(nine, 1) == [(1, (200, 1)), (2, (1000, 1))]
    grown = schema.hist_run_append(schema.encode_hist_run([(1, (200, 1))]), 1, 2, (1000, 1))
    assert grown == nine and schema.hist_run_versions(schema.hist_run_append(nine, 1, 3, None), 1)[-1] == (3, None)
