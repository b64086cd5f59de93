"""Compact metadata records (issue 9 §6): inode records are packed, with
content or without; records as main wrote them (the fixed form) still read
the same, and gc reads and rewrites every form in place alike."""

from __future__ import annotations

import os
import stat
from array import array
import struct
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.errors import Corrupt, Pruned
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, PRUNED_ID
from chronicle.store.fsck.checks import fsck
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.meta import schema
from chronicle.store.meta.schema import ChunkRecord, ContentRecord, PathEntry
from chronicle.store.model import Attrs, inode_content, inode_content_nlink, inode_with_content, is_run, run_versions
from chronicle.store.store import Store
from tests.storeutil import A, write

_HEAD = struct.Struct("<IIIIQqqqIB")


def fixed_form(a: Attrs) -> bytes:
    """The inode record as format 4 wrote every inode before packing (``Attrs.encode``'s fixed form)."""
    flags = (1 if a.content else 0) | (2 if a.target else 0) | (4 if a.xattrs else 0)
    parts = [_HEAD.pack(a.mode, a.uid, a.gid, a.nlink, a.size, a.atime_ns, a.mtime_ns, a.ctime_ns, a.rdev, flags),
             a.content]
    if a.target:
        parts += [struct.pack("<I", len(a.target)), a.target]
    if a.xattrs:
        parts.append(struct.pack("<I", len(a.xattrs)))
        for name, value in a.xattrs:
            parts += [struct.pack("<HI", len(name), len(value)), name, value]
    return b"".join(parts)


_TYPES = [0, stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]
_I64 = st.integers(-(1 << 63), (1 << 63) - 1)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(_TYPES), perm=st.integers(0, 0o7777), uid=st.integers(0, (1 << 32) - 1),
       gid=st.integers(0, (1 << 32) - 1), nlink=st.integers(0, (1 << 32) - 1), size=st.integers(0, (1 << 64) - 1),
       atime=_I64, mtime=_I64, ctime=_I64, rdev=st.integers(0, (1 << 32) - 1),
       content=st.sampled_from([b"", PRUNED_ID, EMPTY_CONTENT_ID, bytes(range(32))]), target=st.binary(max_size=20),
       xattrs=st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=2))
def test_every_inode_record_reads_back_and_the_fixed_form_still_reads(kind, perm, uid, gid, nlink, size, atime,
                                                                     mtime, ctime, rdev, content, target, xattrs):
    a = Attrs(kind | perm, uid, gid, nlink, size, atime, mtime, ctime, rdev, content, target, tuple(xattrs))
    raw = a.encode()
    fixed = fixed_form(a)
    assert Attrs.decode(raw) == a
    assert Attrs.decode(fixed) == a
    assert a.encode_fixed() == fixed
    if not kind:
        assert raw == fixed               # no type bits: the fixed form (a packed form's second byte tells it)
    assert len(raw) <= len(fixed)
    for form in (raw, fixed):             # gc's in-place reads and rewrite (gc.prune, gc.unversioned)
        assert inode_content_nlink(form) == (content, nlink)
        assert inode_content(form) == content
        if content:
            other = bytes(reversed(range(32)))
            assert Attrs.decode(inode_with_content(form, other)) == a.replace(content=other)
            if form[0] != 0x03:           # (the empty content's record stores no id: it grows one)
                assert len(inode_with_content(form, other)) == len(form)


def test_a_file_record_is_packed_shorter_with_its_content_id_at_a_fixed_place():
    now = time.time_ns()
    a = Attrs(stat.S_IFREG | 0o644, 1000, 1000, 1, 12_345, now, now, now, content=bytes(range(32)))
    raw = a.encode()
    assert raw[0] == 0x02 and raw[4:36] == a.content and raw[36] == 1
    assert len(raw) == 61 < len(fixed_form(a)) == 85
    many = a.replace(nlink=300)           # nlink past a MessagePack fixint: still read right
    assert inode_content_nlink(many.encode()) == (a.content, 300)


def test_a_new_file_record_leaves_out_the_empty_content_id_and_gc_reads_it_in_place():
    now = time.time_ns()
    a = Attrs(stat.S_IFREG | 0o644, 1000, 1000, 1, 0, now, now, now, content=EMPTY_CONTENT_ID)
    raw = a.encode()
    assert raw[0] == 0x03 and EMPTY_CONTENT_ID not in raw and len(raw) <= 28
    assert Attrs.decode(raw) == a and inode_content_nlink(raw) == (EMPTY_CONTENT_ID, 1)
    assert inode_content_nlink(a.replace(nlink=200).encode()) == (EMPTY_CONTENT_ID, 200)
    pruned = inode_with_content(raw, PRUNED_ID)          # gc prunes an empty version too
    assert pruned[0] == 0x02 and Attrs.decode(pruned) == a.replace(content=PRUNED_ID)
    assert Attrs.decode(fixed_form(a)) == a and Attrs.decode(a.replace(content=bytes(32)).encode()).content == \
        bytes(32)


def test_directory_records_are_packed_and_a_store_of_fixed_records_reads_the_same(tmp_path):
    store = Store.init(tmp_path / "s")
    ws = store.open_workspace("w", writable=True, create=True)
    d, _ = ws.mkdir(ws.root, b"dir", 0o755, A)
    for i in range(5):
        write(ws, d, b"f%d" % i, b"x" * i)
    ws.symlink(d, b"ln", b"f1", A)
    db = store.dbs["inodes"]
    with store.env.begin() as txn:
        records = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
    dirs = [(k, v) for k, v in records if Attrs.decode(v).is_dir and not is_run(v)]
    assert len(dirs) >= 2 and all(len(v) < _HEAD.size for _k, v in dirs)

    def versions(items):                                 # key -> attrs, a run's versions each under its own key
        return {schema.inode_key(schema.U32.unpack_from(k)[0], schema.U64.unpack_from(k, 4)[0], seq): a
                for k, v in items for seq, a in run_versions(v, schema.inode_key_seq(k))}

    before = versions(records)
    assert len(before) >= len(records) + 4              # the directories' older versions are in runs
    listing = ws.readdir(d)
    attrs = ws.getattr(d)
    store.close()
    store = Store.open(tmp_path / "s")
    db = store.dbs["inodes"]
    with store.env.begin(write=True) as txn:           # every record as main wrote it: one a version, fixed
        txn.drop(db, delete=False)
        for k, a in before.items():
            txn.put(k, fixed_form(a), db=db)
    with store.env.begin() as txn:
        assert {bytes(k): Attrs.decode(v) for k, v in txn.cursor(db=db)} == before
    ws = store.open_workspace("w")
    assert ws.readdir(d) == listing and ws.getattr(d) == attrs
    store.close()
    assert fsck(Store.open(tmp_path / "s")).clean


@settings(max_examples=300, deadline=None)
@given(pack_no=st.integers(0, (1 << 64) - 1), offset=st.integers(0, (1 << 64) - 1),
       stored=st.integers(0, (1 << 32) - 1), raw_len=st.integers(0, (1 << 32) - 1), codec=st.integers(0, 255),
       refcount=st.integers(0, (1 << 32) - 1), base=st.none() | st.binary(min_size=32, max_size=32))
def test_chunk_records_pack_and_the_fixed_form_still_reads(pack_no, offset, stored, raw_len, codec, refcount, base):
    record = ChunkRecord(pack_no, offset, stored, raw_len, codec, refcount, base)
    assert ChunkRecord.decode(record.encode()) == record
    assert ChunkRecord.decode(record.encode_fixed()) == record
    assert len(record.encode()) <= len(record.encode_fixed())
    packed = record.encode_packed()                  # the MessagePack form stores wrote before varints
    if packed is not None:
        assert ChunkRecord.decode(packed) == record
        if len(packed) < len(record.encode_fixed()):
            assert len(record.encode()) <= len(packed)


def test_a_chunk_record_is_varints_shorter_than_messagepack():
    base = bytes(range(32))
    plain = ChunkRecord(0xDA85E86903BD, 427_088, 8_533, 12_345, 1, 2)
    delta = ChunkRecord(0xDA85E86903BD, 427_088, 85, 12_345, 2, 1, base)
    for record, size in ((plain, 17), (delta, 48)):
        raw = record.encode()
        assert raw[0] == 0x02 and len(raw) == size < len(record.encode_packed())
        assert ChunkRecord.decode(raw) == record
    for bad in (b"\x02\x80", b"\x02" + b"\x01" * 6 + b"\x00" * 5, b"\x02" + b"\xff" * 12):
        try:
            ChunkRecord.decode(bad)
        except Corrupt:
            pass
        else:
            raise AssertionError(bad)


def _history(store: Store) -> dict[int, dict[bytes, bytes]]:
    ws = store.open_workspace("w", writable=True, create=True)
    trees, tree = {}, {}
    for i in range(12):
        path = b"f%d" % (i % 3)
        tree[path] = bytes([i + 1]) * 20_000 + os.urandom(64)
        write(ws, ws.root, path, tree[path])
        if path == b"f0" and b"hard" in tree:
            tree[b"hard"] = tree[path]        # the same inode (nlink 2)
        if i == 7:
            ws.link(ws.lookup(ws.root, b"f0")[0], ws.root, b"hard", A)
            tree[b"hard"] = tree[b"f0"]
        if i == 9:
            ws.unlink(ws.root, b"f1", A)
            del tree[b"f1"]
        trees[ws.head_seq] = dict(tree)
    return trees


def test_gc_prunes_a_store_of_fixed_records_as_one_of_packed_records(tmp_path):
    """The same history in two stores, one with every inode, content and path
    entry record rewritten to the form main wrote: the dry run promises what gc does, gc
    prunes and frees the same in both, the records left decode the same, the
    kept versions read back and fsck is clean."""
    later = time.time_ns() + 400 * 86400 * 10**9
    outcome = []
    for name, to_fixed in (("packed", False), ("fixed", True)):
        store = Store.init(tmp_path / name)
        try:
            trees = _history(store)
            db = store.dbs["inodes"]
            with store.env.begin(write=True) as txn:
                records = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                packed = [v for _k, v in records if v[:1] == b"\x02"]
                assert to_fixed or packed        # new file records are packed
                contents = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store.dbs["contents"])]
                assert len(contents) > 5
                if to_fixed:                     # and every content record stores its hash, as main wrote it
                    for k, v in records:         # (a run's versions each under its own key)
                        ws_id, ino = schema.U32.unpack_from(k)[0], schema.U64.unpack_from(k, 4)[0]
                        for seq, a in run_versions(v, schema.inode_key_seq(k)):
                            txn.put(schema.inode_key(ws_id, ino, seq), fixed_form(a), db=db)
                    for k, v in contents:
                        txn.put(k, ContentRecord.decode(v, k).encode(), db=store.dbs["contents"])
                    changed = 0
                    for k, v in list(txn.cursor(db=store.dbs["paths"])):   # seq and path in the fragment
                        old = PathEntry.decode(v, k).encode()
                        changed += old != bytes(v)
                        txn.put(k, old, db=store.dbs["paths"])
                    assert changed > 5
            ws = store.open_workspace("w")
            dryrun.set_policy(store, ws.id, Policy(keep_last=1))
            promised = dryrun.dry_run(store, ["w"], now_ns=later)
            result = collect.collect(store, ["w"], now_ns=later)
            assert result["pruned_versions"] > 0
            assert promised["workspaces"][0]["dropped_versions"] == result["pruned_versions"]
            assert promised["freed_bytes"] == result["freed_bytes"] > 0
            for seq, files in trees.items():
                for path, data in files.items():
                    view = ws.view(seq)
                    with ws.read_txn() as txn:
                        attrs = view.attrs(txn, view.resolve(txn, path)[0])
                    try:
                        assert store.content_map(attrs.content).read(0, attrs.size) == data
                    except Pruned:
                        assert seq != max(trees)
            with store.env.begin() as txn:
                left = {(bytes(k), seq): a for k, v in txn.cursor(db=db)
                        for seq, a in run_versions(v, schema.inode_key_seq(k))}
            report = fsck(store)
            assert report.clean, [(p.kind, p.message) for p in report.problems]
            outcome.append(({k: result[k] for k in ("pruned_versions", "freed_contents", "freed_chunks")},
                            sorted((a.content == PRUNED_ID, a.nlink, a.size) for a in left.values())))
        finally:
            store.close()
    assert outcome[0] == outcome[1]


def test_a_content_record_leaves_out_a_hash_that_is_its_key_and_the_stored_hash_still_reads():
    cid, other = bytes(range(32)), bytes(reversed(range(32)))
    record = ContentRecord(70_000, cid, other + cid, array("Q", [65_536, 4_464]), refcount=3, v4=True)
    old = record.encode()                      # as main wrote it: the hash stored
    new = record.encode(cid)
    assert len(new) == len(old) - 32 - 8                # and the last length (the size less the others')
    for raw in (old, new):
        assert ContentRecord.decode(raw, cid) == record
        assert schema.content_header(raw, cid) == (70_000, 3, cid)
        assert schema.content_header(schema.content_with_refcount(raw, 5), cid) == (70_000, 5, cid)
        assert schema.content_is_dense_v4(raw)
    assert ContentRecord.decode(old) == record          # a stored hash needs no key
    try:
        ContentRecord.decode(new)
    except ValueError:
        pass
    else:
        raise AssertionError("a record whose hash is its key decoded without the key")
    assert record.encode(other)[17:49] == cid and len(record.encode(other)) == len(old) - 8   # hash stored
    assert ContentRecord.decode(record.encode(other), other) == record
    sparse = ContentRecord(10, None, other, array("Q", [10]))
    assert len(sparse.encode(cid)) == len(sparse.encode()) - 8 and schema.content_header(sparse.encode(cid))[2] is None
    assert ContentRecord.decode(sparse.encode(cid), cid) == sparse


def test_a_flat_content_record_leaves_out_its_last_length_where_the_lengths_add_up():
    cid, a, b = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
    for lengths in ([4_096], [65_536, 4_464], [100, 0, 7]):
        record = ContentRecord(sum(lengths), cid, (a + b + a)[:32 * len(lengths)], array("Q", lengths), refcount=2)
        new, old = record.encode(cid), record.encode()       # (without the key: every length, as main wrote it)
        assert len(new) == len(old) - 32 - 8
        for raw in (new, old):
            assert ContentRecord.decode(raw, cid) == record
            assert schema.content_header(schema.content_with_refcount(raw, 7), cid) == (record.size, 7, cid)
    odd = ContentRecord(50, cid, a, array("Q", [40]))       # lengths short of the size: all stored
    assert ContentRecord.decode(odd.encode(cid), cid) == odd and len(odd.encode(cid)) == len(odd.encode()) - 32
    empty = schema.empty_record()
    assert ContentRecord.decode(empty.encode(cid), cid) == empty


def test_a_store_writes_content_records_without_their_hash(tmp_path):
    store = Store.init(tmp_path / "s")
    try:
        ws = store.open_workspace("w", writable=True, create=True)
        data = os.urandom(100_000)
        write(ws, ws.root, b"f", data)
        attrs = ws.lookup(ws.root, b"f")[1]
        with store.env.begin() as txn:
            raw = bytes(txn.get(attrs.content, db=store.dbs["contents"]))
        assert attrs.content not in raw
        assert schema.content_header(raw, attrs.content)[2] == attrs.content
        assert store.content_map(attrs.content).read(0, len(data)) == data
        assert fsck(store).clean
    finally:
        store.close()
