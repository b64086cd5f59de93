"""meta.snapdiff: the changes between two pinned LMDB snapshots, from the pages they do not share."""

from __future__ import annotations

import os

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronicle.errors import Corrupt
from chronicle.store.meta.recovery import read_meta_pages
from chronicle.store.meta.snapdiff import DiffStats, snapshot_diff

PAGE = os.sysconf("SC_PAGE_SIZE")
NAMES = (b"alpha", b"beta", b"gamma")


def _open(path) -> tuple[lmdb.Environment, dict]:
    env = lmdb.open(str(path), max_dbs=8, map_size=1 << 30, subdir=True)
    return env, {n: env.open_db(n) for n in NAMES[:2]}


def _meta_now(env: lmdb.Environment) -> bytes:
    txnid = env.info()["last_txnid"]
    (meta,) = [m.raw for m in read_meta_pages(os.path.join(env.path(), "data.mdb"), PAGE) if m.txnid == txnid]
    return meta


def _scan(env: lmdb.Environment, txn: lmdb.Transaction) -> dict:
    out = {}
    for name in NAMES:
        try:
            db = env.open_db(name, txn=txn, create=False)
        except lmdb.NotFoundError:
            continue
        out[name.decode()] = dict(txn.cursor(db).iternext())
    return out


def _expected(before: dict, after: dict) -> list[tuple[str, bytes, bytes | None]]:
    out = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name, {}), after.get(name, {})
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                out.append((name, key, new.get(key)))
    return out


def _diff(env, old_meta, new_meta, stats=None) -> list[tuple[str, bytes, bytes | None]]:
    data = os.path.join(env.path(), "data.mdb")
    return [(c.db, c.key, c.value) for c in snapshot_diff(data, old_meta, new_meta, stats=stats)]


# keys: fresh ones, and the seeded ones (so that commits overwrite and delete what the trees hold)
keys = st.one_of(st.binary(min_size=1, max_size=24), st.integers(0, 40).map(lambda i: b"k%06d" % (i * 70)))
big = st.builds(lambda unit, n: unit * n, st.binary(min_size=1, max_size=4), st.integers(PAGE // 2, 3 * PAGE))
values = st.one_of(st.sampled_from([b"same-size-1", b"same-size-2"]), st.binary(max_size=64), big)                               # overflow pages too
ops = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["put", "delete"]), keys, values), max_size=80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before_ops=ops, batches=st.lists(ops, min_size=1, max_size=4), seed_keys=st.integers(0, 3000))
def test_diff_is_the_difference_of_the_two_snapshots(tmp_path_factory, before_ops, batches, seed_keys):
    """Whatever was put and deleted between two snapshots, in however many
    commits, the diff lists exactly the keys whose values differ, with the
    newer value (None: gone) -- large values and a database created between
    the two included."""
    env, dbs = _open(tmp_path_factory.mktemp("env"))
    try:
        with env.begin(write=True) as txn:
            for i in range(seed_keys):                  # enough to give the trees branch pages
                txn.put(b"k%06d" % i, b"same-size-%d" % (i % 2), db=dbs[NAMES[i % 2]])
        _apply(env, before_ops)
        old_meta = _meta_now(env)
        pin = env.begin()                               # the recovery pin the diff's precondition asks for
        before = _scan(env, pin)
        for batch in batches:
            _apply(env, batch)
        with env.begin() as now:
            after = _scan(env, now)
            assert _diff(env, old_meta, _meta_now(env)) == _expected(before, after)
        pin.abort()
    finally:
        env.close()


def _apply(env: lmdb.Environment, batch) -> None:
    with env.begin(write=True) as txn:
        for name, op, key, value in batch:
            db = env.open_db(name, txn=txn)
            if op == "put":
                txn.put(key, value, db=db)
            else:
                txn.delete(key, db=db)


def test_a_small_change_reads_few_pages(tmp_path):
    """Ten changed keys in a database of 100,000 cost a handful of pages per
    tree, not the 1,000-odd leaf pages the database holds."""
    env, dbs = _open(tmp_path / "env")
    try:
        with env.begin(write=True) as txn:
            for i in range(100_000):
                txn.put(b"key%08d" % i, b"value %d" % i, db=dbs[b"alpha"])
        old_meta = _meta_now(env)
        pin = env.begin()
        with env.begin(write=True) as txn:
            for i in range(0, 100_000, 10_000):
                txn.put(b"key%08d" % i, b"changed", db=dbs[b"alpha"])
        stats = DiffStats()
        changes = _diff(env, old_meta, _meta_now(env), stats)
        assert changes == [("alpha", b"key%08d" % i, b"changed") for i in range(0, 100_000, 10_000)]
        with env.begin() as txn:
            leaves = txn.stat(dbs[b"alpha"])["leaf_pages"]
        assert leaves > 500
        assert stats.pages <= 2 * 10 * 4 + 4           # two trees, ten paths of depth <= 4
        assert stats.shared > 0
        pin.abort()
    finally:
        env.close()


def test_no_change_reads_nothing(tmp_path):
    env, dbs = _open(tmp_path / "env")
    try:
        with env.begin(write=True) as txn:
            txn.put(b"a", b"1", db=dbs[b"alpha"])
        meta = _meta_now(env)
        stats = DiffStats()
        assert _diff(env, meta, meta, stats) == []
        assert stats.pages <= 2                         # the two main databases' roots
    finally:
        env.close()


def test_a_damaged_page_is_an_error_not_a_short_diff(tmp_path):
    env, dbs = _open(tmp_path / "env")
    try:
        with env.begin(write=True) as txn:
            for i in range(5000):
                txn.put(b"key%08d" % i, b"x" * 40, db=dbs[b"alpha"])
        old_meta = _meta_now(env)
        pin = env.begin()
        with env.begin(write=True) as txn:
            txn.put(b"key%08d" % 7, b"changed", db=dbs[b"alpha"])
            root = txn.stat(dbs[b"alpha"])
        new_meta = _meta_now(env)
        data = os.path.join(env.path(), "data.mdb")
        # find the new tree's root page number from the sub-database record and damage that page's header
        from chronicle.store.meta.pages import PageWalk
        with PageWalk(data) as walk:
            db = walk.databases()[b"alpha"]
        assert root["depth"] == db[2]
        with open(data, "r+b") as f:
            f.seek(db[7] * PAGE)
            f.write(b"\xff" * 16)
        with pytest.raises(Corrupt):
            list(snapshot_diff(data, old_meta, new_meta))
        pin.abort()
    finally:
        env.close()


def test_the_new_snapshot_must_not_be_older(tmp_path):
    env, dbs = _open(tmp_path / "env")
    try:
        with env.begin(write=True) as txn:
            txn.put(b"a", b"1", db=dbs[b"alpha"])
        old = _meta_now(env)
        with env.begin(write=True) as txn:
            txn.put(b"a", b"2", db=dbs[b"alpha"])
        with pytest.raises(ValueError):
            _diff(env, _meta_now(env), old)
    finally:
        env.close()
