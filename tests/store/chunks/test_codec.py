"""``chronicle.store.chunks.codec``: zstd when it saves at least 1/32, raw
otherwise; decoding gives the bytes back or raises ``Corrupt`` naming the
chunk."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronicle.errors import Corrupt
from chronicle.store.chunks import codec
from chronicle.store.chunks.ids import hash_bytes, to_hex


@given(st.binary(max_size=70_000), st.integers(min_value=1, max_value=19))
@settings(max_examples=60, deadline=None)
def test_round_trip(data, level):
    codec_id, payload = codec.encode(data, level)
    assert codec_id in codec.CODECS
    assert codec.decode(codec_id, bytes(payload), len(data), hash_bytes(data)) == data


def test_compressible_data_is_zstd():
    data = b"the same line again\n" * 5000
    codec_id, payload = codec.encode(data)
    assert codec_id == codec.CODEC_ZSTD and len(payload) < len(data) // 10
    assert codec.decode(codec_id, payload, len(data), hash_bytes(data)) == data


def test_incompressible_data_stays_raw_and_is_not_copied():
    data = os.urandom(64 * 1024)
    codec_id, payload = codec.encode(data)
    assert codec_id == codec.CODEC_RAW and payload is data
    view = memoryview(bytearray(data))
    assert codec.encode(view)[1] is view


def test_a_saving_below_one_32nd_is_not_worth_it():
    # half random, half zeros compresses by ~1/2; 31/32 random saves less than 1/32
    assert codec.encode(os.urandom(32_000) + bytes(32_000))[0] == codec.CODEC_ZSTD
    assert codec.encode(os.urandom(31_000) + bytes(900))[0] == codec.CODEC_RAW


def test_damaged_payloads_are_corrupt_naming_the_chunk():
    data = b"some chunk " * 1000
    cid = hash_bytes(data)
    codec_id, payload = codec.encode(data)
    assert codec_id == codec.CODEC_ZSTD
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(Corrupt, match=to_hex(cid)):
        codec.decode(codec_id, bytes(damaged), len(data), cid)
    with pytest.raises(Corrupt, match="does not decompress"):
        codec.decode(codec_id, b"not zstd at all", len(data), cid)
    with pytest.raises(Corrupt, match="expected"):
        codec.decode(codec_id, payload, len(data) + 1, cid)          # the index disagrees on the length
    raw = bytearray(data)
    raw[7] ^= 1
    with pytest.raises(Corrupt, match="does not match its hash"):
        codec.decode(codec.CODEC_RAW, bytes(raw), len(data), cid)
    assert codec.decode(codec.CODEC_RAW, bytes(raw), len(data), cid, verify=False) == bytes(raw)
    with pytest.raises(Corrupt, match="unknown codec 7"):
        codec.decode(7, payload, len(data), cid)


def test_a_chunk_whose_two_ends_do_not_compress_is_stored_raw_without_compressing_it(monkeypatch):
    random_chunk = os.urandom(40_000)
    middle_text = os.urandom(4096) + b"words and more words " * 1500 + os.urandom(4096)
    assert codec.encode(random_chunk) == (codec.CODEC_RAW, random_chunk)
    assert codec.encode(middle_text)[0] == codec.CODEC_RAW              # the sample's one blind spot
    assert codec.encode(middle_text, sample=False)[0] == codec.CODEC_ZSTD
    assert codec.encode(os.urandom(20_000) + bytes(20_000))[0] == codec.CODEC_ZSTD   # one end compresses
    sizes = []
    real = codec._compressor

    class Spy:
        def __init__(self, comp):
            self.comp = comp

        def compress(self, data):
            sizes.append(len(data))
            return self.comp.compress(data)

    monkeypatch.setattr(codec, "_compressor", lambda level: Spy(real(level)))
    codec.encode(random_chunk)
    assert sizes == [codec.SAMPLE, codec.SAMPLE]                       # the 40 KB were never compressed
    sizes.clear()
    codec.encode(os.urandom(codec.SAMPLE_MIN - 1))
    assert sizes == [codec.SAMPLE_MIN - 1]                              # a small chunk: compressed whole


def test_encode_many_gives_what_encode_gives_in_order():
    datas = [os.urandom(30_000) if i % 3 else (b"chunk %d " % i) * 4000 for i in range(40)]
    for sample in (True, False):
        assert codec.encode_many(datas, sample=sample) == [codec.encode(d, sample=sample) for d in datas]
    assert codec.encode_many(datas[:2]) == [codec.encode(d) for d in datas[:2]]
    assert codec.encode_many([]) == []


def test_encode_many_works_in_a_forked_child_after_the_parent_used_its_pool():
    datas = [(b"chunk %d " % i) * 4000 for i in range(8)]
    assert codec.encode_many(datas)[0][0] == codec.CODEC_ZSTD         # the parent's pool thread exists
    pid = os.fork()
    if pid == 0:
        ok = codec.encode_many(datas) == [codec.encode(d) for d in datas]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("count", [0, 1, codec.PARALLEL_MIN - 1, codec.PARALLEL_MIN, 17])
def test_hash_many_is_each_chunks_id_in_order(count):
    """hash_many (half of the batch on the pool thread) gives every chunk's
    BLAKE3 in input order, bytes and memoryviews alike."""
    datas = [os.urandom(1000 + 3000 * i) for i in range(count)]
    datas = [memoryview(d) if i % 2 else d for i, d in enumerate(datas)]
    assert codec.hash_many(datas) == [hash_bytes(d) for d in datas]
