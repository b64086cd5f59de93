"""Store format 4: content records as trees of extent nodes, upgraded in place from format 3.

A format-3 store is made the way format 3 wrote it (``storeutil.write_format3``:
flat extent lists cut at fixed offsets, keyed by the BLAKE3 of the bytes), its
``store.json`` set back to 3; opening it upgrades it, its old contents keep
their ids and read back, new versions get tree hashes, and fsck and GC work
over both kinds. Then the tree's reference counts under GC: a node shared by
versions lives until its last holder goes.
"""

from __future__ import annotations

import json
import os
import random
import time

from chronicle.store.chunks.ids import hash_bytes
from chronicle.store.chunks.tree import hash_data, hash_file
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.history.receipts import Receipts
from chronicle.store.meta import schema
from chronicle.store.store import Store
from tests.storeutil import A, history, read, write, write_format3

LATER = time.time_ns() + 400 * 86400 * 10**9        # every version is old by then


def _clean(store: Store) -> None:
    report = fsck(store, verify_contents=True)
    assert report.clean, [(p.severity, p.kind, p.message) for p in report.problems]


def _nodes(store: Store) -> int:
    with store.env.begin() as txn:
        return txn.stat(store.dbs["content_nodes"])["entries"]


def _format3_store(path) -> tuple[bytes, bytes]:
    store = Store.init(path)
    ws = store.open_workspace("w", writable=True, create=True)
    big = random.Random(1).randbytes(3_000_000)             # 30 fixed pieces: not the canonical chunking
    write_format3(ws, ws.root, b"big", big)
    write_format3(ws, ws.root, b"sparse", b"tail", hole=1 << 20)
    store.close()
    config = json.loads((path / "store.json").read_text())
    (path / "store.json").write_text(json.dumps(dict(config, format=3)))
    return big, b"tail"


def test_a_format3_store_is_upgraded_in_place_and_keeps_working(tmp_path):
    big, tail = _format3_store(tmp_path / "s")
    store = Store.open(tmp_path / "s")
    try:
        assert json.loads((tmp_path / "s" / "store.json").read_text())["format"] == schema.FORMAT_VERSION == 4
        ws = store.open_workspace("w", writable=True)
        assert read(ws, b"big") == big and read(ws, b"sparse") == bytes(1 << 20) + tail
        assert history(ws, b"big")[-1]["hash"] == hash_bytes(big).hex()      # a format-3 content keeps its id
        _clean(store)
        receipt = Receipts(ws).make()                    # format-3 contents are hashed again, densely
        assert receipt == Receipts(ws).compute() | {"time": receipt["time"], "computed": receipt["computed"]}
        ino, _ = ws.resolve(b"big")
        ws.files.open(ino)
        ws.files.write(ino, 1_000_000, b"EDIT", A.pid)
        ws.files.commit(ino)
        ws.files.release(ino)
        edited = big[:1_000_000] + b"EDIT" + big[1_000_004:]
        versions = history(ws, b"big")
        assert versions[-1]["hash"] == hash_data(edited).hex()   # a new version: the tree hash of the bytes
        assert read(ws, b"big") == edited and _nodes(store) > 0
        _clean(store)
        dryrun.set_policy(store, ws.id, Policy(keep_last=1))
        promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
        result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
        assert result["freed_contents"] == promised["freed_contents"] == 1        # the format-3 version
        assert result["freed_chunks"] == promised["freed_chunks"] > 0
        assert read(ws, b"big") == edited
        _clean(store)
    finally:
        store.close()


def test_a_format4_store_is_refused_by_a_store_that_does_not_know_it(tmp_path):
    store = Store.init(tmp_path / "s")
    store.close()
    config = json.loads((tmp_path / "s" / "store.json").read_text())
    (tmp_path / "s" / "store.json").write_text(json.dumps(dict(config, format=5)))
    try:
        Store.open(tmp_path / "s")
    except Exception as exc:                                  # noqa: BLE001 - the message is the point
        assert "format 5 is not supported" in str(exc)
    else:
        raise AssertionError("a format-5 store opened")


def test_versions_share_tree_nodes_and_gc_frees_each_when_its_last_holder_goes(store, ws):
    data = random.Random(2).randbytes(4_000_000)               # ~100 chunks: a root over a few leaves
    write(ws, ws.root, b"f", data)
    first = _nodes(store)
    assert first >= 2
    versions = [data]
    ino, _ = ws.resolve(b"f")
    for i in range(5):                                         # small edits: one new leaf each
        ws.files.open(ino)
        ws.files.write(ino, 300_000 * (i + 1), b"edit %d" % i, A.pid)
        ws.files.commit(ino)
        ws.files.release(ino)
        d = bytearray(versions[-1])
        d[300_000 * (i + 1):300_000 * (i + 1) + 6] = b"edit %d" % i
        versions.append(bytes(d))
    assert _nodes(store) <= first + 5 * 2                      # a leaf (and at most one inner node) per version
    assert read(ws, b"f") == versions[-1]
    _clean(store)
    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    promised = dryrun.dry_run(store, ["w"], now_ns=LATER)
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert result["freed_contents"] == promised["freed_contents"] == 5
    assert result["freed_chunks"] == promised["freed_chunks"] and result["freed_bytes"] == promised["freed_bytes"]
    assert first - 1 <= _nodes(store) <= first + 2             # what the last version holds
    assert read(ws, b"f") == versions[-1]
    _clean(store)


def test_hash_file_of_a_copy_is_the_hash_chronicle_shows(store, ws, tmp_path):
    data = random.Random(3).randbytes(2_500_000)
    write(ws, ws.root, b"f", data)
    copy = tmp_path / "copy"
    copy.write_bytes(data)
    assert hash_file(copy).hex() == history(ws, b"f")[-1]["hash"] == hash_data(data).hex()
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(4 << 20)
        f.seek(4 << 20)
        f.write(b"end")
    ino, _ = ws.create(ws.root, b"s", 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 4 << 20, b"end", A.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    if os.lseek(os.open(sparse, os.O_RDONLY), 0, os.SEEK_DATA) > 0:    # the file system keeps holes
        assert hash_file(sparse).hex() == history(ws, b"s")[-1]["hash"]
    assert hash_file(sparse, dense=True) == hash_data(bytes(4 << 20) + b"end")


def test_fsck_names_the_file_whose_extent_node_is_lost_or_damaged(store, ws):
    write(ws, ws.root, b"big", random.Random(4).randbytes(3_000_000))
    write(ws, ws.root, b"small", b"fine")
    with store.env.begin(write=True) as txn:
        keys = [bytes(k) for k, _v in txn.cursor(db=store.dbs["content_nodes"])]
        raw = bytearray(txn.get(keys[0], db=store.dbs["content_nodes"]))
        raw[-1] ^= 1                                           # a damaged leaf: its hash no longer matches
        txn.put(keys[0], bytes(raw), db=store.dbs["content_nodes"])
    damaged = [p for p in fsck(store).problems if p.kind == "content-node"]
    assert damaged and "is damaged" in damaged[0].message and "w:big v1" in damaged[0].message
    with store.env.begin(write=True) as txn:
        for key in keys:
            txn.delete(key, db=store.dbs["content_nodes"])        # lost nodes
    report = fsck(store)
    lost = [p for p in report.problems if p.kind == "content-node"]
    assert lost and not report.clean and all("w:big v1" in p.message for p in lost), [p.message for p in lost]
    assert read(ws, b"small") == b"fine"


def test_fsck_reports_a_node_refcount_that_is_not_its_holders(store, ws):
    write(ws, ws.root, b"big", random.Random(5).randbytes(3_000_000))
    with store.env.begin(write=True) as txn:
        key, raw = next(iter(txn.cursor(db=store.dbs["content_nodes"])))
        txn.put(bytes(key), schema.node_with_refcount(bytes(raw), 7), db=store.dbs["content_nodes"])
    assert "node-refcount" in {p.kind for p in fsck(store).problems}
