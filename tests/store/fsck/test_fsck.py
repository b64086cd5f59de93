"""``chronicle.store.fsck.checks``: a healthy store is clean; each kind of damage is
found, named for the user, and repaired where repair can do it safely.

Store-level tests: stores are built through the Python API (no mount); the
damage is done to pack files and LMDB records directly.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest

from chronicle.store import model
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, hash_bytes
from chronicle.store.chunks.packs import RECORD_HEADER, ChunkLocation, PackWriter, pack_path
from chronicle.store.fsck.checks import ERROR, INFO, WARNING, FsckReport, fsck
from chronicle.store.meta import schema
from chronicle.store.meta.schema import ChunkRecord, ContentRecord
from chronicle.store.model import Actor
from chronicle.store.namespace.restore import restore_file, restore_tree
from chronicle.store.store import Store

A = Actor(uid=0, gid=0, pid=1)


# --- building stores ---------------------------------------------------------------


def write(ws, parent: int, name: bytes, data: bytes, *, create: bool = True) -> int:
    if create:
        ino, _ = ws.create(parent, name, 0o100644, A)
    else:
        ino, _ = ws.lookup(parent, name)
    ws.files.open(ino, created=create)
    ws.files.write(ino, 0, data, 1)
    ws.files.truncate(ino, len(data))
    ws.files.commit(ino)
    ws.files.release(ino)
    return ino


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def build(path) -> dict:
    """A store with versions, renames, links, a sparse file, a fork, a
    snapshot and restores. Returns facts the tests use; the store is closed."""
    st = Store.init(path)
    ws = st.open_workspace("w", writable=True, create=True)
    f = write(ws, ws.root, b"f.txt", noise(300_000, 1))                    # v1: several chunks
    write(ws, ws.root, b"f.txt", noise(300_000, 1)[:150_000] + b"x" * 1000, create=False)  # v2
    d, _ = ws.mkdir(ws.root, b"d", 0o755, A)
    ws.rename(ws.root, b"f.txt", d, b"g.txt", 0, A)
    write(ws, d, b"h.txt", b"hello\n")
    moved_at = ws.head_seq
    ws.link(f, ws.root, b"hard", A)
    ws.symlink(ws.root, b"sym", b"d/g.txt", A)
    ws.setattr(f, A, mode=0o600)
    ws.setxattr(f, b"user.k", b"v", A)
    sparse, _ = ws.create(ws.root, b"sparse", 0o100644, A)
    ws.files.open(sparse, created=True)
    ws.files.write(sparse, 5 << 20, b"tail", 1)
    ws.files.commit(sparse)
    ws.files.release(sparse)
    ws.snapshot("before")
    fork_at = ws.head_seq
    st.fork("w", None, "w2")
    ws2 = st.open_workspace("w2", writable=True)
    write(ws2, ws2.root, b"fork.txt", noise(100_000, 2))
    ws2.unlink(d, b"h.txt", A)
    ws2.rename(ws2.root, b"hard", ws2.root, b"hard2", 0, A)
    ws.unlink(ws.root, b"sym", A)
    restore_tree(ws, moved_at, A)           # the whole tree back to before the links
    restore_file(ws, b"d/g.txt", 1, A)      # its history follows the rename back to f.txt
    st.fork("w2", fork_at + 1, "w3")        # a fork of a fork
    st.close()
    return {"file_ino": f, "fork_at": fork_at}


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store"
    build(path)
    return path


@pytest.fixture
def open_store(store_path):
    stores = []

    def opener():
        st = Store.open(store_path)
        stores.append(st)
        return st

    yield opener
    for st in stores:
        st.close()


def check(path, **kw) -> FsckReport:
    """fsck on a freshly opened store (no cached pack descriptors)."""
    with Store.open(path) as st:
        return fsck(st, **kw)


def index(st) -> dict[bytes, ChunkRecord]:
    with st.env.begin() as txn:
        return dict(st.chunks.iter_index(txn))


def content_of(st, ws_name: str, path: bytes) -> tuple[bytes, ContentRecord]:
    ws = st.open_workspace(ws_name)
    ino, _kind = ws.resolve(path)
    cid = ws.head_attrs(ino).content
    with st.env.begin() as txn:
        return cid, ContentRecord.decode(txn.get(cid, db=st.dbs["contents"]), cid)


def chunk_of(st, ws_name: str, path: bytes, i: int = 0) -> tuple[bytes, ChunkRecord]:
    _cid, rec = content_of(st, ws_name, path)
    chunk_id = rec.chunk_id(i)
    return chunk_id, index(st)[chunk_id]


def flip_byte(st, rec: ChunkRecord, at: int | None = None) -> None:
    path = pack_path(st.packs_dir, rec.pack_no)
    pos = rec.offset + (rec.stored_len // 2 if at is None else at)
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))


def kinds(report: FsckReport, severity: str | None = None) -> set[str]:
    return {p.kind for p in report.problems if severity is None or p.severity == severity}


def only(report: FsckReport, kind: str):
    found = [p for p in report.problems if p.kind == kind]
    assert found, f"no {kind} problem in {[p.as_dict() for p in report.problems]}"
    return found


# --- a healthy store ---------------------------------------------------------------------


def test_fresh_store_is_clean(store_path):
    calls = []
    report = check(store_path, verify_contents=True, progress=lambda *a: calls.append(a))
    assert report.clean, [p.as_dict() for p in report.problems]
    assert not [p for p in report.problems if p.severity != INFO]
    assert report.workspaces == 3
    assert report.chunks > 5 and report.packs >= 1
    assert report.bytes_checked > 0 and report.content_bytes_checked > 300_000
    assert report.inodes > 0 and report.events > 0 and report.contents >= 5
    phases = [c[0] for c in calls]
    for phase in ("workspaces", "packs", "contents", "inodes", "tree", "events", "verify-contents"):
        assert phase in phases
    for phase, done, total in calls:
        assert 0 <= done <= total
    d = report.as_dict()
    assert d["clean"] is True and d["errors"] == 0 and isinstance(d["problems"], list)


def test_empty_store_is_clean(tmp_path):
    st = Store.init(tmp_path / "s")
    try:
        report = fsck(st)
        assert report.clean and report.problems == []
    finally:
        st.close()


def test_repair_of_a_clean_store_changes_nothing(store_path):
    with Store.open(store_path) as st:
        before = index(st)
        report = fsck(st, repair=True)
        assert report.clean and not any(p.repaired for p in report.problems)
        assert index(st) == before


# --- chunk data ------------------------------------------------------------------------------


def test_flipped_byte_is_chunk_corrupt_naming_the_file(store_path, open_store):
    st = open_store()
    chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
    flip_byte(st, rec)
    st.close()
    report = check(store_path)
    assert not report.clean
    problem = only(report, "chunk-corrupt")[0]
    assert problem.severity == ERROR
    assert chunk_id.hex()[:16] in problem.message
    # every version that holds the chunk (v1 and v2 share their first chunks), as workspace:path vN,
    # followed through the rename, the hard links and into the fork
    assert "w:f.txt v1" in problem.message and "w:d/g.txt v3" in problem.message, problem.message
    assert {(f["workspace"], f["path"], f["version"]) for f in problem.details["files"]} == {
        ("w", "f.txt", 1), ("w", "f.txt", 2), ("w", "d/g.txt", 2), ("w", "d/g.txt", 3), ("w", "hard", 1),
        ("w2", "hard2", 1)}
    assert problem.details["chunk"] == chunk_id.hex()
    # no other copy exists: repair cannot help, and says the data is lost
    with Store.open(store_path) as st2:
        repaired = fsck(st2, repair=True)
    problem = only(repaired, "chunk-corrupt")[0]
    assert not problem.repaired and "lost" in problem.message
    assert not check(store_path).clean


def test_flipped_header_byte_is_found(store_path, open_store):
    st = open_store()
    _chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
    flip_byte(st, rec, at=-RECORD_HEADER.size + 10)        # inside raw_len of the record header
    st.close()
    report = check(store_path)
    assert {"chunk-corrupt"} <= kinds(report, ERROR)


def test_deleted_pack_is_chunk_missing(store_path, open_store):
    st = open_store()
    _chunk_id, rec = chunk_of(st, "w2", b"fork.txt")
    st.close()
    os.unlink(pack_path(store_path / "packs", rec.pack_no))
    report = check(store_path)
    missing = only(report, "chunk-missing")
    assert all(p.severity == ERROR for p in missing)
    assert any("missing" in p.message for p in missing)
    assert any(any(f["path"] == "fork.txt" for f in p.details["files"]) for p in missing)


def test_torn_tail_is_info_only(store_path, open_store):
    st = open_store()
    _chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
    st.close()
    path = pack_path(store_path / "packs", rec.pack_no)
    # a complete record header whose payload never made it, as a crash leaves it
    header = RECORD_HEADER.pack(b"CK", 0, 0, 5000, 5000, bytes(32))
    with open(path, "ab") as f:
        f.write(header + b"partial")
    report = check(store_path, verify_contents=True)
    assert report.clean, [p.as_dict() for p in report.problems]
    torn = only(report, "pack-torn-tail")
    assert torn[0].severity == INFO and torn[0].details["bytes"] == len(header) + 7
    assert report.unreferenced_bytes >= len(header) + 7


def test_short_torn_tail_and_zero_filled_tail_are_info(store_path, open_store):
    st = open_store()
    _chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
    st.close()
    path = pack_path(store_path / "packs", rec.pack_no)
    with open(path, "ab") as f:
        f.write(b"CK\x00")                                     # less than a header
    assert check(store_path).clean
    with open(path, "ab") as f:
        f.write(bytes(8192))                                   # zeros: a crash on a filesystem without ordering
    report = check(store_path)
    assert report.clean and kinds(report) - {"pack-torn-tail", "chunk-unused", "content-unused"} == set()


def test_unindexed_chunks_after_a_crash_are_info(store_path):
    # A writer stored chunks in a pack, then died before the metadata commit.
    with Store.open(store_path) as st:
        data = noise(50_000, 9)
        st.chunks.put(hash_bytes(data), data)
        st.chunks.flush()
    report = check(store_path)
    assert report.clean
    assert report.unreferenced_bytes >= 50_000


def test_damaged_pack_middle_is_reported(store_path, open_store):
    st = open_store()
    _chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
    st.close()
    with open(pack_path(store_path / "packs", rec.pack_no), "r+b") as f:
        f.seek(rec.offset - RECORD_HEADER.size)
        f.write(b"XX")                                         # destroy the record magic
    report = check(store_path)
    assert "pack-damaged" in kinds(report, ERROR)
    assert "chunk-corrupt" in kinds(report, ERROR)


# --- refcounts -------------------------------------------------------------------------------


def _put(st, db: str, key: bytes, value: bytes) -> None:
    with st.env.begin(write=True) as txn:
        txn.put(key, value, db=st.dbs[db])


def test_chunk_refcount_is_reported_and_repaired(store_path):
    with Store.open(store_path) as st:
        chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
        good = rec.refcount
        rec.refcount += 3
        _put(st, "chunks", chunk_id, rec.encode())
    report = check(store_path)
    problem = only(report, "chunk-refcount")[0]
    assert problem.details == {"chunk": chunk_id.hex(), "stored": good + 3, "counted": good}
    assert not report.clean
    with Store.open(store_path) as st:
        repaired = fsck(st, repair=True)
        assert repaired.clean and only(repaired, "chunk-refcount")[0].repaired
        assert index(st)[chunk_id].refcount == good
    again = check(store_path)
    assert again.clean and "chunk-refcount" not in kinds(again)


def test_content_refcounts_are_reported_and_repaired(store_path):
    with Store.open(store_path) as st:
        cid, rec = content_of(st, "w", b"d/g.txt")
        with st.env.begin(write=True) as txn:
            raw = txn.get(cid, db=st.dbs["contents"])
            txn.put(cid, schema.content_with_refcount(raw, 0), db=st.dbs["contents"])
            raw = txn.get(EMPTY_CONTENT_ID, db=st.dbs["contents"])
            txn.put(EMPTY_CONTENT_ID, schema.content_with_refcount(raw, 99), db=st.dbs["contents"])
    report = check(store_path)
    found = only(report, "content-refcount")
    assert {p.details["content"] for p in found} == {cid.hex(), EMPTY_CONTENT_ID.hex()}
    assert report.count(ERROR) == 2
    with Store.open(store_path) as st:
        assert fsck(st, repair=True).clean
    again = check(store_path)
    assert again.clean and "content-refcount" not in kinds(again)
    with Store.open(store_path) as st:
        with st.env.begin() as txn:
            assert schema.content_header(txn.get(cid, db=st.dbs["contents"]), cid)[1] == rec.refcount


def test_missing_empty_content_record_is_restored(store_path):
    with Store.open(store_path) as st:
        with st.env.begin(write=True) as txn:
            raw = bytes(txn.get(EMPTY_CONTENT_ID, db=st.dbs["contents"]))
            txn.delete(EMPTY_CONTENT_ID, db=st.dbs["contents"])
    report = check(store_path)
    assert "content-missing" in kinds(report, ERROR)
    with Store.open(store_path) as st:
        assert fsck(st, repair=True).clean
        with st.env.begin() as txn:
            assert txn.get(EMPTY_CONTENT_ID, db=st.dbs["contents"]) == raw
    assert check(store_path).clean


# --- repair from a duplicate copy --------------------------------------------------------------


def test_repair_repoints_a_corrupt_chunk_at_a_good_duplicate(store_path):
    with Store.open(store_path) as st:
        chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
        payload = st.chunks.reader.read(ChunkLocation(rec.pack_no, rec.offset, rec.stored_len))
        # a second writer stored the same chunk in a pack of its own
        writer = PackWriter(st.chunks.backend)
        copy = writer.append(chunk_id, rec.codec, rec.raw_len, payload)
        writer.close()
        expected = st.open_workspace("w").files.read(st.open_workspace("w").resolve(b"d/g.txt")[0], 0, 1 << 20)
        flip_byte(st, rec)
    report = check(store_path)
    assert "chunk-corrupt" in kinds(report, ERROR)
    with Store.open(store_path) as st:
        repaired = fsck(st, repair=True)
        problem = only(repaired, "chunk-corrupt")[0]
        assert problem.repaired and f"pack {copy.pack_no}" in problem.message
        assert repaired.clean
        new = index(st)[chunk_id]
        assert (new.pack_no, new.offset) == (copy.pack_no, copy.offset)
        assert new.refcount == rec.refcount
    after = check(store_path, verify_contents=True)
    assert after.clean, [p.as_dict() for p in after.problems]
    with Store.open(store_path) as st:
        ws = st.open_workspace("w")
        assert ws.files.read(ws.resolve(b"d/g.txt")[0], 0, 1 << 20) == expected


def test_repair_reindexes_a_chunk_missing_from_the_index(store_path):
    with Store.open(store_path) as st:
        chunk_id, rec = chunk_of(st, "w2", b"fork.txt")
        with st.env.begin(write=True) as txn:
            txn.delete(chunk_id, db=st.dbs["chunks"])
    report = check(store_path)
    problem = only(report, "chunk-missing")[0]
    assert "not in the chunk index" in problem.message
    assert any(f["path"] == "fork.txt" and f["workspace"] == "w2" for f in problem.details["files"])
    with Store.open(store_path) as st:
        assert fsck(st, repair=True).clean
        assert index(st)[chunk_id] == rec
    assert check(store_path, verify_contents=True).clean


def test_damaged_index_entry_is_rebuilt_from_the_pack(store_path):
    with Store.open(store_path) as st:
        chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
        _put(st, "chunks", chunk_id, b"garbage")
    report = check(store_path)
    assert {"chunk-index-corrupt", "chunk-missing"} <= kinds(report, ERROR)
    with Store.open(store_path) as st:
        fixed = fsck(st, repair=True)
        assert fixed.clean, [p.as_dict() for p in fixed.problems]
        assert index(st)[chunk_id] == rec
    assert check(store_path).clean


# --- references ------------------------------------------------------------------------------


def test_missing_content_names_the_lost_versions(store_path):
    with Store.open(store_path) as st:
        cid, _rec = content_of(st, "w2", b"fork.txt")
        with st.env.begin(write=True) as txn:
            txn.delete(cid, db=st.dbs["contents"])
    report = check(store_path)
    problem = only(report, "content-missing")[0]
    assert "w2:fork.txt v1" in problem.message and "lost" in problem.message
    with Store.open(store_path) as st:
        assert not fsck(st, repair=True).clean          # nothing to rebuild it from


def test_dangling_dirent(store_path):
    with Store.open(store_path) as st:
        ws = st.open_workspace("w2")
        ino, _ = ws.resolve(b"fork.txt")
        with st.env.begin(write=True) as txn, txn.cursor(db=st.dbs["inodes"]) as cur:
            prefix = schema.inode_prefix(ws.id, ino)
            cur.set_range(prefix)
            while cur.key()[:12] == prefix:
                cur.delete()
    report = check(store_path)
    dangling = only(report, "dangling-dirent")
    assert all(p.details["workspace"] == "w2" for p in dangling)
    assert "content-refcount" in kinds(report)           # the deleted records counted on the content


def test_fork_reads_through_to_its_parent(store_path):
    # w3's entries point at inodes whose records are w's and w2's: no complaint.
    with Store.open(store_path) as st:
        ws3 = st.open_workspace("w3", writable=True)
        ws3.rename(ws3.root, b"fork.txt", ws3.root, b"moved.txt", 0, A)
        write(ws3, ws3.root, b"new.txt", b"x")
    assert check(store_path).clean


def test_directory_loop_and_unreachable_directory(store_path):
    with Store.open(store_path) as st:
        ws = st.open_workspace("w")
        d, _ = ws.resolve(b"d")
        with st.env.begin(write=True) as txn:     # d/loop -> d
            txn.put(schema.dirent_key(ws.id, d, b"loop"), schema.encode_dirent(d, model.KIND_DIR),
                    db=st.dbs["dirents"])
    report = check(store_path)
    loop = only(report, "tree-loop")[0]
    assert loop.severity == ERROR and loop.details["paths"] == ["d", "d/loop"]
    with Store.open(store_path) as st:
        ws = st.open_workspace("w")
        with st.env.begin(write=True) as txn:     # cut d off the root: its entries float
            txn.delete(schema.dirent_key(ws.id, ws.root, b"d"), db=st.dbs["dirents"])
    report = check(store_path)
    assert "tree-unreachable" in kinds(report, WARNING) and "tree-loop" not in kinds(report)


def test_report_as_dict_is_json(store_path, open_store):
    st = open_store()
    _chunk_id, rec = chunk_of(st, "w", b"d/g.txt")
    flip_byte(st, rec)
    st.close()
    d = json.loads(json.dumps(check(store_path).as_dict()))
    assert d["clean"] is False and d["errors"] >= 1
    assert {"kind", "severity", "message", "repaired", "details"} <= d["problems"][0].keys()
    assert d["chunks"] > 0 and d["bytes_checked"] > 0


def test_missing_event_and_head(store_path):
    with Store.open(store_path) as st:
        ws = st.open_workspace("w")
        head = ws.head_seq
        with st.env.begin(write=True) as txn:
            txn.delete(schema.event_key(ws.id, 2), db=st.dbs["events"])
            txn.delete(schema.ws_key(ws.id), db=st.dbs["heads"])
    report = check(store_path)
    gap = only(report, "event-missing")[0]
    assert gap.details["seqs"] == [[2, 2]]
    assert only(report, "workspace-head")[0].severity == ERROR
    with Store.open(store_path) as st:
        fixed = fsck(st, repair=True)
        assert only(fixed, "workspace-head")[0].repaired
        assert not only(fixed, "event-missing")[0].repaired
        with st.env.begin() as txn:
            assert st.head_seq(txn, ws.id) == head


def test_orphan_records_are_warnings(store_path):
    with Store.open(store_path) as st:
        _put(st, "events", schema.event_key(77, 1), b'{"seq": 1}')
    report = check(store_path)
    assert only(report, "orphan-records")[0].severity == WARNING
    assert not report.clean


# --- crashes ---------------------------------------------------------------------------------

_WRITER = r"""
import os, sys
from chronicle.store.model import Actor
from chronicle.store.store import Store
a = Actor(0, 0, os.getpid())
st = Store.open(sys.argv[1])
ws = st.open_workspace("w", writable=True)
for i in range(100000):
    ino, _ = ws.create(ws.root, b"c%d" % i, 0o100644, a)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 0, os.urandom(20000 + i % 7 * 9000) * 2, 1)
    ws.files.commit(ino)
    ws.files.release(ino)
    if i == 3:
        st.sync()
        print("synced", flush=True)
"""


@pytest.mark.parametrize("reboot", [False, True], ids=["kill-9", "machine-crash"])
def test_store_is_clean_after_a_crash(store_path, monkeypatch, caplog, reboot):
    """kill -9 of a writer in the middle of its work; with ``reboot`` the
    metadata is also rolled back to the last sync (as after a power cut),
    leaving pack data no index entry refers to."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store_path)], stdout=subprocess.PIPE,
                            text=True)
    packs = Path(store_path) / "packs"

    def pack_bytes() -> int:
        return sum(f.stat().st_size for f in packs.rglob("*") if f.is_file())
    try:
        assert proc.stdout.readline().strip() == "synced"
        at_sync, deadline = pack_bytes(), time.monotonic() + 30
        time.sleep(0.5)
        while pack_bytes() < at_sync + (256 << 10) and time.monotonic() < deadline:
            time.sleep(0.1)                       # a loaded machine: wait until it wrote past the sync
    finally:
        proc.kill()
        proc.wait()
    if reboot:
        monkeypatch.setenv("CHRONICLE_BOOT_ID", "another-boot")
    report = check(store_path, verify_contents=True)
    assert report.clean, [p.as_dict() for p in report.problems if p.severity != INFO]
    with Store.open(store_path) as st:
        ws = st.open_workspace("w")
        names = [name for name, _ino, _kind in ws.readdir(ws.root) if name.startswith(b"c")]
        assert len(names) >= 4
    if reboot:
        assert "rolled back" in caplog.text          # the recovery did run
        assert report.unreferenced_bytes > 0


# --- scale -----------------------------------------------------------------------------------


def test_many_chunks_are_checked_quickly(tmp_path):
    """20k small chunks in one content: fsck reads packs in order (the
    same code path scales to 100k chunks in a few seconds)."""
    n = int(os.environ.get("FSCK_SCALE_CHUNKS", 20_000))
    st = Store.init(tmp_path / "s")
    try:
        ws = st.open_workspace("w", writable=True, create=True)
        ino, _ = ws.create(ws.root, b"big", 0o100644, A)
        pieces = [noise(64, i) for i in range(n)]
        ids = []
        for piece in pieces:
            chunk_id = hash_bytes(piece)
            st.chunks.put(chunk_id, piece)
            ids.append(chunk_id)
        data = b"".join(pieces)
        record = ContentRecord(len(data), hash_bytes(data), b"".join(ids), array("Q", [64] * n))
        cid = record.hash
        st.chunks.flush()
        with ws.event(A) as w:
            w.txn.put(cid, record.encode(), db=st.dbs["contents"])
            inserted = st.chunks.add_refs(w.txn, record)
            attrs = ws.head_attrs(ino, w.txn).replace(content=cid, size=len(data))
            w.put_attrs(ino, attrs)
            w.path_entry(b"big", "write", ino=ino, flags=schema.P_BUMPS | schema.P_CONTENT, content=cid,
                         size=len(data))         # a commit always records its path entry (fsck checks it)
            w.log("write", b"big", size=len(data))
        st.chunks.committed(inserted)
        st.sync()
        started = time.monotonic()
        report = fsck(st, verify_contents=True)
        elapsed = time.monotonic() - started
        assert report.clean, [p.as_dict() for p in report.problems[:5]]
        assert report.chunks == n
        assert elapsed < 20, elapsed
    finally:
        st.close()
