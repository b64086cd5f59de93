"""``chronicle.store.chunks.index``: the chunk index and cache over a chunk
backend — put and get, dedup, pending chunks becoming index entries when
their transaction commits, refcounts, and damaged or missing chunks reported
as ``Corrupt`` naming the chunk."""

from __future__ import annotations

import os
from array import array

import lmdb
import pytest

from chronicle.errors import Corrupt, NoSpace
from chronicle.store.chunks import codec
from chronicle.store.chunks.backends.local import LocalBackend
from chronicle.store.chunks.ids import HOLE_ID, hash_bytes, to_hex
from chronicle.store.chunks.index import ChunkStore
from chronicle.store.chunks.packs import pack_name
from chronicle.store.meta.schema import ContentRecord, read_totals


class Env:
    """An LMDB environment with the ``chunks`` and ``meta`` databases, and
    chunk stores over one local backend directory."""

    def __init__(self, path):
        self.path = path
        self.env = lmdb.open(str(path / "meta"), max_dbs=4, map_size=1 << 28, subdir=True)
        self.chunks_db = self.env.open_db(b"chunks")
        self.meta_db = self.env.open_db(b"meta")
        self.stores: list[ChunkStore] = []

    def store(self, **kw) -> ChunkStore:
        cs = ChunkStore(self.env, self.chunks_db, LocalBackend(self.path / "store"), meta_db=self.meta_db, **kw)
        self.stores.append(cs)
        return cs

    def close(self) -> None:
        for cs in self.stores:
            cs.close()
        self.env.close()


@pytest.fixture
def env(tmp_path):
    (tmp_path / "meta").mkdir()
    e = Env(tmp_path)
    yield e
    e.close()


def chunk(seed: int, size: int = 20_000, compressible: bool = True) -> tuple[bytes, bytes]:
    data = (f"chunk {seed} ".encode() * size)[:size] if compressible else os.urandom(size)
    return hash_bytes(data), data


def content(*ids_and_lengths: tuple[bytes, int]) -> ContentRecord:
    ids = b"".join(i for i, _ in ids_and_lengths)
    lengths = array("Q", [n for _, n in ids_and_lengths])
    return ContentRecord(sum(lengths), None, ids, lengths)


def commit(cs: ChunkStore, env: Env, rec: ContentRecord) -> list[bytes]:
    cs.flush()
    with env.env.begin(write=True) as txn:
        inserted = cs.add_refs(txn, rec)
    cs.committed(inserted)
    return inserted


def test_put_get_and_dedup(env):
    cs = env.store()
    cid, data = chunk(1)
    assert cs.put(cid, data) == codec.CODEC_ZSTD
    assert cs.put(cid, data) is None                    # pending already: stored once
    assert cs.get(cid) == data                          # readable while pending
    pending = cs.record(cid)
    assert pending.refcount == 0 and pending.raw_len == len(data) and pending.stored_len < len(data)
    assert commit(cs, env, content((cid, len(data)))) == [cid]
    assert cs.put(cid, data) is None                    # in the index now: still stored once
    rid, raw = chunk(2, compressible=False)
    assert cs.put(rid, raw) == codec.CODEC_RAW
    nid, plain = chunk(3)
    assert cs.put(nid, plain, compress=False) == codec.CODEC_RAW
    commit(cs, env, content((rid, len(raw)), (nid, len(plain))))
    assert cs.get(rid) == raw and cs.get(nid) == plain
    assert len(cs.reader.list_packs()) == 1


def test_refcounts_count_contents_not_extents(env):
    cs = env.store()
    a, da = chunk(1)
    b, db = chunk(2)
    cs.put(a, da)
    cs.put(b, db)
    first = content((a, len(da)), (b, len(db)), (a, len(da)), (HOLE_ID, 4096))
    assert sorted(commit(cs, env, first)) == sorted([a, b])
    assert commit(cs, env, content((a, len(da)))) == []      # a second content using a: no new entry
    assert cs.record(a).refcount == 2 and cs.record(b).refcount == 1
    with env.env.begin() as txn:
        totals = read_totals(txn, env.meta_db)
        assert totals["chunks"] == 2 and totals["unique_bytes"] == len(da) + len(db)
        assert dict(cs.iter_index(txn)).keys() == {a, b}
    with env.env.begin(write=True) as txn:
        assert cs.drop_refs(txn, first) == [b]
    assert cs.record(a).refcount == 1 and cs.record(b).refcount == 0
    with env.env.begin(write=True) as txn:
        with pytest.raises(Corrupt, match="negative refcount"):
            cs.drop_refs(txn, content((b, len(db))))
        txn.abort()


def test_a_chunk_never_stored_cannot_be_referenced(env):
    cs = env.store()
    missing = hash_bytes(b"never stored")
    with env.env.begin(write=True) as txn:
        with pytest.raises(Corrupt, match=to_hex(missing)):
            cs.add_refs(txn, content((missing, 12)))
        txn.abort()
    with pytest.raises(Corrupt, match=to_hex(missing)):
        cs.get(missing)


def test_an_aborted_transaction_leaves_the_chunk_pending(env):
    cs = env.store()
    cid, data = chunk(1)
    cs.put(cid, data)
    cs.flush()
    with env.env.begin(write=True) as txn:
        assert cs.add_refs(txn, content((cid, len(data)))) == [cid]
        txn.abort()                                      # committed() is not called
    assert cs.record(cid).refcount == 0
    assert commit(cs, env, content((cid, len(data)))) == [cid]
    assert cs.record(cid).refcount == 1


def test_committed_chunks_outlive_the_chunk_store(env):
    cs = env.store()
    cid, data = chunk(1)
    cs.put(cid, data)
    commit(cs, env, content((cid, len(data))))
    cs.sync()
    cs.close()
    again = env.store()
    assert again.get(cid) == data
    assert again.put(cid, data) is None


def test_a_damaged_chunk_is_corrupt_naming_it(env):
    cs = env.store(cache_bytes=0)
    cid, data = chunk(1, compressible=False)
    cs.put(cid, data)
    commit(cs, env, content((cid, len(data))))
    assert cs.get(cid) == data
    rec = cs.record(cid)
    with open(cs.backend.path(pack_name(rec.pack_no)), "r+b") as f:
        f.seek(rec.offset + 100)
        byte = f.read(1)
        f.seek(rec.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(Corrupt, match=f"chunk {to_hex(cid)} does not match its hash"):
        cs.get(cid)
    assert cs.read_record(cid, rec, verify=False) != data       # fsck's unverified read


def test_a_missing_pack_is_corrupt(env):
    cs = env.store(cache_bytes=0)
    cid, data = chunk(1)
    cs.put(cid, data)
    commit(cs, env, content((cid, len(data))))
    cs.sync()
    cs.close()
    again = env.store(cache_bytes=0)
    again.backend.delete(pack_name(again.record(cid).pack_no))
    with pytest.raises(Corrupt, match="missing"):
        again.get(cid)


def test_the_cache_answers_without_the_pack(env):
    cs = env.store()
    cid, data = chunk(1)
    cs.put(cid, data)
    commit(cs, env, content((cid, len(data))))
    cs.sync()
    assert cs.get(cid) == data
    hits = cs.cache.hits
    os.unlink(cs.backend.path(pack_name(cs.record(cid).pack_no)))
    assert cs.get(cid) == data and cs.cache.hits == hits + 1
    cs.prefetch([cid, hash_bytes(b"unknown")])                   # never raises


def test_a_chunk_lost_to_a_full_disk_fails_its_commit_and_is_written_again(env, monkeypatch):
    """The commit that refers to a chunk whose write failed gets ``NoSpace``
    (not the next caller, not success); the index never points at bytes that
    are not there; once there is space, the same chunk is written again."""
    cs = env.store()
    cid, data = chunk(7, compressible=False)
    sink_cls = type(cs.backend.create("packs/000000/0000000000.pack"))
    real_append = sink_cls.append

    def full(self, buffers):
        raise NoSpace("no space left (test)")

    monkeypatch.setattr(sink_cls, "append", full)
    cs.put(cid, data)
    cs.flush()
    with env.env.begin(write=True) as txn:
        with pytest.raises(NoSpace):
            cs.add_refs(txn, content((cid, len(data))))
        txn.abort()
    monkeypatch.setattr(sink_cls, "append", real_append)
    assert cs.put(cid, data) is not None                 # written again, not deduplicated to the lost copy
    assert commit(cs, env, content((cid, len(data)))) == [cid]
    cs.cache = type(cs.cache)()
    assert cs.get(cid) == data


def test_put_many_stores_dedups_and_reads_back_like_put(env):
    cs = env.store()
    chunks = [chunk(i, compressible=i % 2 == 0) for i in range(20)]
    old_id, old = chunks[3]
    assert cs.put(old_id, old) == codec.CODEC_RAW
    commit(cs, env, content((old_id, len(old))))                 # in the index already
    pending_id, pending = chunks[5]
    cs.put(pending_id, pending)                                  # pending already
    batch = chunks + [chunks[0]]                                 # and one twice in the batch
    compress = [i != 2 for i in range(len(batch))]
    results = cs.put_many(batch, compress)
    assert results[3] is None and results[5] is None and results[20] is None
    assert results[0] == codec.CODEC_ZSTD and results[1] == codec.CODEC_RAW
    assert results[2] == codec.CODEC_RAW                         # compress=False: stored raw
    assert all(r is not None for i, r in enumerate(results[:20]) if i not in (3, 5))
    assert cs.lease_state()[1] is not None                       # the dedup hit waits for its commit
    commit(cs, env, content(*[(cid, len(data)) for cid, data in chunks]))
    cs.cache = type(cs.cache)(cs.cache.max_bytes)
    for cid, data in chunks:
        assert cs.get(cid) == data and cs.record(cid).refcount == (2 if cid == old_id else 1)
