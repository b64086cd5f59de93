"""``chronicle.store.namespace.content``: a content record read as bytes
across chunk boundaries and holes, and ``build_content`` turning an overlay
into a new record that reuses what did not change."""

from __future__ import annotations

import random
from array import array

import blake3

from chronicle.store.chunks.tree import hash_data
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, HOLE_ID, hash_bytes
from chronicle.store.meta.schema import ContentRecord
from chronicle.store.namespace.content import MIN_HOLE, ContentMap, build_content
from chronicle.store.namespace.staging import Overlay



def content_of(store, pieces: list[bytes | int]) -> tuple[ContentMap, bytes]:
    """A ContentMap of chunks (bytes) and holes (int: length), and the bytes it must read as."""
    ids, lengths, model = [], array("Q"), bytearray()
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(HOLE_ID)
            lengths.append(piece)
            model += bytes(piece)
        else:
            chunk_id = hash_bytes(piece)
            store.chunks.put(chunk_id, piece)
            ids.append(chunk_id)
            lengths.append(len(piece))
            model += piece
    store.chunks.flush()
    record = ContentRecord(len(model), blake3.blake3(bytes(model)).digest(), b"".join(ids), lengths)
    with store.env.begin(write=True) as txn:
        store.chunks.committed(store.chunks.add_refs(txn, record))
    return ContentMap(record.hash, record, store.chunks), bytes(model)


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- reading -------------------------------------------------------------------------------


def test_reads_across_chunk_boundaries_and_holes_match_the_bytes(store):
    cm, model = content_of(store, [noise(5000, 1), 7000, noise(1, 2), noise(4096, 3), 9000, noise(300, 4)])
    assert cm.size == len(model)
    rng = random.Random(0)
    for _ in range(300):
        offset = rng.randrange(len(model) + 10)
        size = rng.choice([1, 17, 4096, 5000, 12000, 1 << 20])
        assert cm.read(offset, size) == model[offset:offset + size]
    assert cm.read(0, len(model) + 100) == model                 # short at the end
    assert cm.read(len(model), 10) == b""


def test_sequential_reads_prefetch_and_still_return_the_bytes(store):
    cm, model = content_of(store, [noise(64 * 1024, i) for i in range(6)])
    got = b"".join(cm.read(off, 4096) for off in range(0, len(model), 4096))
    assert got == model


def test_extent_index_and_allocated_bytes(store):
    cm, _ = content_of(store, [noise(100, 1), 50, noise(10, 2)])
    assert [cm.extent_index(o) for o in (0, 99, 100, 149, 150, 159)] == [0, 0, 1, 1, 2, 2]
    assert cm.extent_span(1) == (100, 150)
    assert cm.allocated_bytes_cached() == 110                    # holes are not allocated
    empty = ContentMap.empty(store.chunks)
    assert (empty.id, empty.size, empty.read(0, 10)) == (EMPTY_CONTENT_ID, 0, b"")


# -- building ------------------------------------------------------------------------------


def overlay_on(store, base: ContentMap) -> Overlay:
    return Overlay(str(store.staging_dir), base, None)           # no chunk store: never streams


def test_a_built_content_reads_back_and_is_keyed_by_its_blake3(store):
    overlay = overlay_on(store, ContentMap.empty(store.chunks))
    data = noise(300_000, 7)
    overlay.write(0, data)
    built = build_content(overlay, store.chunks)
    store.chunks.flush()
    assert built.id == built.record.hash == hash_data(data)
    assert built.record.size == len(data) and built.new_bytes == len(data)
    assert ContentMap(built.id, built.record, store.chunks).read(0, 1 << 20) == data
    overlay.close()


def built_map(store, data: bytes) -> ContentMap:
    """A committed-like ContentMap of ``data`` (canonical chunks, format 4)."""
    overlay = overlay_on(store, ContentMap.empty(store.chunks))
    overlay.write(0, data)
    built = build_content(overlay, store.chunks)
    overlay.close()
    store.chunks.flush()
    return ContentMap(built.id, built.record, store.chunks)


def test_a_small_edit_of_a_large_file_reuses_the_untouched_extents(store):
    data = noise(2_000_000, 8)
    base = built_map(store, data)
    overlay = overlay_on(store, base)
    overlay.write(1_000_000, b"EDIT" * 1024)
    built = build_content(overlay, store.chunks)
    store.chunks.flush()
    expected = data[:1_000_000] + b"EDIT" * 1024 + data[1_004_096:]
    assert ContentMap(built.id, built.record, store.chunks).read(0, 1 << 22) == expected
    assert built.id == hash_data(expected)
    assert built.reused_extents >= base.extent_count - 4 and built.new_bytes <= 4 * 128 * 1024   # only the touched ones
    overlay.close()


def test_holes_of_a_sparse_file_become_hole_extents(store):
    overlay = overlay_on(store, ContentMap.empty(store.chunks))
    overlay.write(0, b"head")
    overlay.write(5 << 20, b"tail")
    built = build_content(overlay, store.chunks)
    store.chunks.flush()
    ids = [built.record.chunk_id(i) for i in range(built.record.extent_count)]
    assert built.id == hash_data(b"head" + bytes((5 << 20) - 4) + b"tail", holes=[(4096, 5 << 20)])
    assert HOLE_ID in ids
    holes = sum(built.record.lengths[i] for i, cid in enumerate(ids) if cid == HOLE_ID)
    assert holes >= MIN_HOLE
    cm = ContentMap(built.id, built.record, store.chunks)
    assert cm.size == (5 << 20) + 4 and cm.read(0, 4) == b"head" and cm.read(5 << 20, 10) == b"tail"
    assert cm.read(4096, 8) == bytes(8)
    assert cm.allocated_bytes_cached() < 1 << 20
    overlay.close()


def test_a_sparse_file_is_hashed_by_its_holes_not_their_zeros(store):
    overlay = overlay_on(store, ContentMap.empty(store.chunks))
    overlay.write(8 << 20, b"far out")
    built = build_content(overlay, store.chunks)
    assert built.id == built.record.hash == hash_data(bytes(8 << 20) + b"far out", holes=[(0, 8 << 20)])
    assert built.id != hash_data(bytes(8 << 20) + b"far out")        # the hole is part of what is hashed
    overlay.close()


def test_an_append_to_a_big_file_rebuilds_one_leaf_and_is_the_hash_of_the_bytes(store):
    data = noise(3 << 20, 9)
    overlay = overlay_on(store, ContentMap.empty(store.chunks))
    overlay.write(0, data)
    first = build_content(overlay, store.chunks)
    assert first.record.is_tree and first.nodes                    # ~80 extents: more than a root holds
    base = ContentMap(first.id, first.record, store.chunks)
    overlay = overlay_on(store, base)
    overlay.write(len(data), b"appended")
    built = build_content(overlay, store.chunks)
    assert built.id == hash_data(data + b"appended")
    assert built.new_chunks <= 2 and len(set(built.nodes) - set(first.nodes)) <= 2
    assert ContentMap(built.id, built.record, store.chunks).read(0, 4 << 20) == data + b"appended"
    overlay.close()


def test_a_long_flat_extent_list_reads_in_pieces_as_a_tree_does(store):
    """A format-3 record of thousands of extents is decoded 1,024 extents at a time, not all at open."""
    rng = random.Random(5)
    pieces = [5000 if i % 97 == 5 else rng.randbytes(rng.randint(1, 3000)) for i in range(3000)]
    cm, model = content_of(store, pieces)
    assert cm.extent_count == 3000 and len(cm._leaves) == 0          # nothing decoded yet
    for _ in range(500):
        offset, size = rng.randrange(len(model)), rng.randint(1, 20000)
        assert cm.read(offset, size) == model[offset:offset + size]
    assert cm.read(0, len(model)) == model
    assert cm.allocated_bytes_cached() == len(model) - 5000 * sum(1 for p in pieces if isinstance(p, int))
