"""Compact metadata records (issue 9 §6): inode records without content are
packed; records as main wrote them (the fixed form) still read the same."""

from __future__ import annotations

import stat
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.store.chunks.ids import PRUNED_ID
from chronicle.store.fsck.checks import fsck
from chronicle.store.meta.schema import ChunkRecord
from chronicle.store.model import Attrs
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
       content=st.sampled_from([b"", PRUNED_ID, bytes(range(32))]), target=st.binary(max_size=20),
       xattrs=st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=2))
def test_every_inode_record_reads_back_and_the_fixed_form_still_reads(kind, perm, uid, gid, nlink, size, atime,
                                                                     mtime, ctime, rdev, content, target, xattrs):
    a = Attrs(kind | perm, uid, gid, nlink, size, atime, mtime, ctime, rdev, content, target, tuple(xattrs))
    raw = a.encode()
    assert Attrs.decode(raw) == a
    assert Attrs.decode(fixed_form(a)) == a
    if content or not kind:
        assert raw == fixed_form(a)       # gc reads records with content in place (gc.prune, gc.unversioned)
    assert len(raw) <= len(fixed_form(a))


def test_gc_layout_constants_are_those_of_the_fixed_form():
    # gc.prune/gc.unversioned take the head length and content flag from these encodings
    assert len(Attrs(0, 0, 0, 0, 0, 0, 0, 0).encode()) == _HEAD.size
    assert Attrs(0, 0, 0, 0, 0, 0, 0, 0, content=PRUNED_ID).encode()[_HEAD.size - 1] == 1


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
    dirs = [(k, v) for k, v in records if Attrs.decode(v).is_dir]
    assert len(dirs) >= 6 and all(len(v) < _HEAD.size for _k, v in dirs)
    before = {k: Attrs.decode(v) for k, v in records}
    listing = ws.readdir(d)
    attrs = ws.getattr(d)
    store.close()
    store = Store.open(tmp_path / "s")
    db = store.dbs["inodes"]
    with store.env.begin(write=True) as txn:           # every record as main wrote it
        for k, v in records:
            txn.put(k, fixed_form(Attrs.decode(v)), db=db)
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
