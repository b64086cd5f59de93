"""Delta chunks (``chunks.index``, ``codec.CODEC_DELTA``): a chunk that
replaces another is stored as a zstd delta against it when that pays, reads
back through its base, and holds a reference on its base while it lives."""

from __future__ import annotations

import os
import struct

import pytest

from chronicle.errors import Corrupt
from chronicle.store.chunks import codec
from chronicle.store.chunks.ids import hash_bytes
from chronicle.store.chunks.index import MAX_DELTA_DEPTH
from chronicle.store.meta.schema import ChunkRecord, read_totals
from tests.store.chunks.test_index import commit, content, env  # noqa: F401 - the fixture


def edited(data: bytes, at: int, patch: bytes = b"0123456789") -> tuple[bytes, bytes]:
    new = data[:at] + patch + data[at + len(patch):]
    return hash_bytes(new), new


def refcount(cs, chunk_id: bytes) -> int:
    return cs.record(chunk_id).refcount


def drop(cs, env, rec) -> list[bytes]:
    with env.env.begin(write=True) as txn:
        return cs.drop_refs(txn, rec)


def test_an_edited_chunk_of_random_data_is_stored_as_a_small_delta_and_reads_back(env):
    cs = env.store()
    old = os.urandom(40_000)
    old_id = hash_bytes(old)
    assert cs.put(old_id, old) == codec.CODEC_RAW
    commit(cs, env, content((old_id, len(old))))
    new_id, new = edited(old, 20_000)
    assert cs.put(new_id, new, base=old_id) == codec.CODEC_DELTA
    rec = cs.record(new_id)
    assert rec.base == old_id and rec.stored_len < 200            # 40 KiB of random bytes in < 200
    commit(cs, env, content((new_id, len(new))))
    cs.cache = type(cs.cache)(cs.cache.max_bytes)                 # nothing cached: read from the packs
    assert cs.get(new_id) == new
    assert refcount(cs, old_id) == 2                              # its content + the delta
    fresh = env.store()                                           # another process reads it too
    assert fresh.get(new_id) == new


def test_a_delta_is_used_only_when_it_is_at_most_half_of_plain_zstd(env):
    cs = env.store()
    old = os.urandom(30_000)
    old_id = hash_bytes(old)
    cs.put(old_id, old)
    commit(cs, env, content((old_id, len(old))))
    unrelated = os.urandom(30_000)
    assert cs.put(hash_bytes(unrelated), unrelated, base=old_id) == codec.CODEC_RAW
    text = b"".join(b"line %d of a text\n" % i for i in range(2000))
    assert cs.put(hash_bytes(text), text, base=old_id) == codec.CODEC_ZSTD      # plain zstd wins
    half = old[:15_000] + os.urandom(15_000)                      # the delta saves half: not enough
    assert cs.put(hash_bytes(half), half, base=old_id) == codec.CODEC_RAW
    plain = os.urandom(30_000)
    assert cs.put(hash_bytes(plain), plain, compress=False, base=old_id) == codec.CODEC_RAW


def test_a_base_that_is_dead_pending_or_unknown_is_not_used(env):
    cs = env.store()
    old = os.urandom(20_000)
    old_id = hash_bytes(old)
    cs.put(old_id, old)                                           # pending: not a base yet
    new_id, new = edited(old, 100)
    assert cs.put(new_id, new, base=old_id) == codec.CODEC_RAW
    other_id, other = edited(old, 5_000)
    assert cs.put(other_id, other, base=b"\x07" * 32) == codec.CODEC_RAW
    rec = content((old_id, len(old)))
    commit(cs, env, rec)
    drop(cs, env, rec)                                            # dead
    third_id, third = edited(old, 9_000)
    assert cs.put(third_id, third, base=old_id) == codec.CODEC_RAW


def test_delta_chains_stop_at_the_maximum_depth(env):
    cs = env.store()
    data = os.urandom(40_000)
    prev = hash_bytes(data)
    cs.put(prev, data)
    commit(cs, env, content((prev, len(data))))
    codecs, versions = [], [(prev, data)]
    for i in range(MAX_DELTA_DEPTH + 2):
        cid, data = edited(data, 1000 * (i + 1))
        codecs.append(cs.put(cid, data, base=prev))
        commit(cs, env, content((cid, len(data))))
        versions.append((cid, data))
        prev = cid
    assert codecs == [codec.CODEC_DELTA] * MAX_DELTA_DEPTH + [codec.CODEC_RAW, codec.CODEC_DELTA]
    cs.cache = type(cs.cache)(cs.cache.max_bytes)
    for cid, data in reversed(versions):
        assert cs.get(cid) == data


def test_freeing_a_delta_releases_its_base_cascading_and_the_totals_follow(env):
    cs = env.store()
    a = os.urandom(30_000)
    a_id = hash_bytes(a)
    cs.put(a_id, a)
    rec_a = content((a_id, len(a)))
    commit(cs, env, rec_a)
    b_id, b = edited(a, 10)
    cs.put(b_id, b, base=a_id)
    rec_b = content((b_id, len(b)))
    commit(cs, env, rec_b)
    c_id, c = edited(b, 20_000)
    assert cs.put(c_id, c, base=b_id) == codec.CODEC_DELTA
    rec_c = content((c_id, len(c)))
    commit(cs, env, rec_c)
    assert [refcount(cs, x) for x in (a_id, b_id, c_id)] == [2, 2, 1]
    assert drop(cs, env, rec_a) == [] and drop(cs, env, rec_b) == []      # still bases of a live delta
    assert [refcount(cs, x) for x in (a_id, b_id, c_id)] == [1, 1, 1]
    cs.cache = type(cs.cache)(cs.cache.max_bytes)
    assert cs.get(c_id) == c
    with env.env.begin() as txn:
        assert cs.freed_by(txn, {c_id: 1}) == [cs.record(x, txn) for x in (c_id, b_id, a_id)]
    assert drop(cs, env, rec_c) == [c_id, b_id, a_id]               # the whole chain dies with it
    with env.env.begin() as txn:
        totals = read_totals(txn, env.meta_db)
    assert totals["chunks"] == 0 and totals["stored_bytes"] == 0 and totals["unique_bytes"] == 0
    commit(cs, env, rec_c)                                          # a dead delta comes back: its bases too
    assert [refcount(cs, x) for x in (a_id, b_id, c_id)] == [1, 1, 1]
    with env.env.begin() as txn:
        assert read_totals(txn, env.meta_db)["chunks"] == 3


def test_an_uncommitted_delta_keeps_gc_from_dropping_its_base(env):
    cs = env.store()
    old = os.urandom(20_000)
    old_id = hash_bytes(old)
    cs.put(old_id, old)
    commit(cs, env, content((old_id, len(old))))
    new_id, new = edited(old, 3)
    cs.put(new_id, new, base=old_id)
    _packs, busy = cs.lease_state()
    assert busy is not None                                       # the base is leased until the commit
    commit(cs, env, content((new_id, len(new))))
    assert cs.lease_state()[1] is None


def test_a_damaged_base_makes_its_delta_unreadable_naming_both(env):
    cs = env.store()
    old = os.urandom(20_000)
    old_id = hash_bytes(old)
    cs.put(old_id, old)
    commit(cs, env, content((old_id, len(old))))
    new_id, new = edited(old, 700)
    cs.put(new_id, new, base=old_id)
    commit(cs, env, content((new_id, len(new))))
    base = cs.record(old_id)
    path = env.path / "store" / "packs"
    pack = next(path.rglob("*.pack"))
    with open(pack, "r+b") as f:
        f.seek(base.offset + 100)
        f.write(b"\xff" * 16)
    cs.cache = type(cs.cache)(cs.cache.max_bytes)
    with pytest.raises(Corrupt, match=f"{new_id.hex()} is stored as a delta of chunk {old_id.hex()[:16]}"):
        cs.get(new_id)


def test_a_delta_payload_decodes_only_against_its_own_base():
    old, other = os.urandom(10_000), os.urandom(10_000)
    new_id, new = edited(old, 10)
    payload = codec.encode_delta(new, hash_bytes(old), old)
    assert codec.delta_base(payload) == hash_bytes(old)
    assert codec.decode(codec.CODEC_DELTA, payload, len(new), new_id, base=old) == new
    with pytest.raises(Corrupt):
        codec.decode(codec.CODEC_DELTA, payload, len(new), new_id, base=other)
    with pytest.raises(Corrupt, match="base cannot be read"):
        codec.decode(codec.CODEC_DELTA, payload, len(new), new_id)


def test_old_29_byte_chunk_records_still_read_and_delta_records_round_trip():
    old = struct.pack("<QQIIBI", 7, 16, 100, 200, 1, 3)
    assert ChunkRecord.decode(old) == ChunkRecord(7, 16, 100, 200, 1, 3)
    assert ChunkRecord(7, 16, 100, 200, 1, 3).encode_fixed() == old
    assert len(ChunkRecord(7, 16, 100, 200, 1, 3).encode()) < 16          # packed (issue 9 §6)
    delta = ChunkRecord(7, 16, 100, 200, codec.CODEC_DELTA, 3, b"\x01" * 32)
    assert len(delta.encode_fixed()) == 61 and ChunkRecord.decode(delta.encode_fixed()) == delta
    assert len(delta.encode()) < 50 and ChunkRecord.decode(delta.encode()) == delta
    with pytest.raises(Corrupt):
        ChunkRecord.decode(old + b"\x00")
