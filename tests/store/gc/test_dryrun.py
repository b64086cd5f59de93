"""Policy records and the GC dry run against a real store (no mount)."""

from __future__ import annotations

import json
import time

import pytest

from chronicle.errors import NotFound
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import dryrun
from chronicle.store.gc.policy import DEFAULT_POLICY, Policy
from chronicle.store.history import points
from chronicle.store.meta import schema
from tests.storeutil import write

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then


def _contents(n: int) -> list[bytes]:
    return [bytes([i]) * 70_000 + b"%d" % i for i in range(n)]     # distinct, one or more chunks each


def test_policy_records(store, ws):
    assert dryrun.get_policy(store, ws.id) == DEFAULT_POLICY
    assert not dryrun.has_own_policy(store, ws.id)
    mine = Policy(keep_last=3)
    dryrun.set_policy(store, ws.id, mine)
    assert dryrun.get_policy(store, ws.id) == mine and dryrun.has_own_policy(store, ws.id)
    assert schema.FORMAT_VERSION == 4


def test_dry_run_drops_old_versions_and_counts_what_only_they_hold(store, ws):
    for data in _contents(6):
        write(ws, ws.root, b"f.txt", data)
    write(ws, ws.root, b"same.txt", b"x" * 10)
    dryrun.set_policy(store, ws.id, Policy(keep_last=2))
    before = fsck(store)
    report = dryrun.dry_run(store, ["w"], now_ns=LATER)
    mine = report["workspaces"][0]
    assert mine["versions"] == 7 and mine["dropped_versions"] == 4 and mine["kept_versions"] == 3
    assert mine["paths"] == [{"path": "f.txt", "versions": 6, "kept": 2, "dropped": mine["paths"][0]["dropped"]}]
    assert len(mine["paths"][0]["dropped"]) == 4
    assert report["freed_contents"] == 4 and report["freed_chunks"] >= 4
    assert 0 < report["freed_bytes"] and report["freed_raw_bytes"] >= 4 * 70_000
    assert mine["dropped_bytes"] == sum(len(d) for d in _contents(4))
    after = fsck(store)
    assert before.clean and after.clean                  # nothing changed


def test_pins_keep_snapshots_forks_and_turn_ends(store, ws):
    seqs = []
    for data in _contents(5):
        write(ws, ws.root, b"f", data)
        seqs.append(ws.head_seq)
    points.put_snapshot(ws, "old", seqs[0])
    store.fork("w", seqs[2], "child")
    dryrun.set_policy(store, ws.id, Policy())
    report = dryrun.dry_run(store, ["w"], now_ns=LATER)
    mine = report["workspaces"][0]
    assert set(mine["pins"]) >= {seqs[0], seqs[2], seqs[4]}
    assert mine["kept_versions"] == 3 and mine["dropped_versions"] == 2
    everything = dryrun.dry_run(store, None, now_ns=LATER)
    assert [w["workspace"] for w in everything["workspaces"]] == ["child", "w"]
    with pytest.raises(NotFound):
        dryrun.dry_run(store, ["nope"])


def test_shared_content_is_not_counted_as_freed(store, ws):
    data = _contents(3)
    write(ws, ws.root, b"a", data[0])
    write(ws, ws.root, b"a", data[1])
    write(ws, ws.root, b"b", data[0])                    # b holds a's first content: not freed
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    report = dryrun.dry_run(store, ["w"], now_ns=LATER)
    assert report["workspaces"][0]["dropped_versions"] == 1
    assert report["freed_contents"] == 0 and report["freed_bytes"] == 0


def test_delete_workspace_drops_its_policy(store, ws):
    other = store.open_workspace("o", create=True)
    dryrun.set_policy(store, other.id, Policy(keep_last=1))
    store.delete_workspace("o")
    with store.env.begin() as txn:
        assert txn.get(schema.ws_key(other.id), db=store.dbs["policies"]) is None


def test_the_last_turns_ends_are_pins(store, ws):
    seqs = []
    for data in _contents(6):
        write(ws, ws.root, b"f", data)
        seqs.append(ws.head_seq)
    with store.env.begin(write=True) as txn:
        for n, end in enumerate(seqs[:4], 1):
            label = {"agent": "a", "turn": n, "begin_seq": end, "end_seq": end}
            txn.put(schema.turn_key(ws.id, b"a", n), json.dumps(label).encode(), db=store.dbs["turns"])
    dryrun.set_policy(store, ws.id, Policy(keep_turns=2))
    with store.env.begin() as txn:
        pinned = dryrun.pins(store, store.workspace_record("w"), Policy(keep_turns=2), txn)
    assert pinned == {seqs[2], seqs[3], seqs[5]}
    mine = dryrun.dry_run(store, ["w"], now_ns=LATER)["workspaces"][0]
    assert mine["kept_versions"] == 3
