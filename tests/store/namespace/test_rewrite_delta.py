"""Delta bases for a file rewritten whole (issue 9's click replay): each new
version of a small text file, written by truncate + write, by unlink +
create at the same path (as ``git checkout`` does) or by a temporary file
renamed over it, is stored as a zstd delta of the previous version's chunk
when that pays; every version reads back, and GC + fsck stay clean after
the old versions are pruned."""

from __future__ import annotations

import random

import pytest
import zstandard

from chronicle.store.chunks import codec
from chronicle.store.chunks.index import MAX_DELTA_DEPTH
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import Policy
from chronicle.store.namespace.files import temp_targets
from chronicle.store.namespace.stream import DELTA_MISSES
from tests.store.gc.test_collect import LATER, read_at
from tests.store.gc.test_delta_gc import clean, stored_chunks
from tests.storeutil import A

VERSIONS = 20


def source(rng: random.Random, lines: int = 220) -> list[bytes]:
    words = [b"def", b"return", b"self", b"value", b"click", b"option", b"if", b"None", b"name", b"ctx"]
    return [b"    " * rng.randrange(3) + b" ".join(rng.choice(words) for _ in range(rng.randrange(3, 9)))
            + b"  # %d\n" % rng.randrange(10**6) for _ in range(lines)]


def rewrite(ws, how: str, data: bytes) -> None:
    """One whole-file rewrite of ``f`` (open, write, close), ``how`` as named."""
    if how == "truncate":
        ino, _ = ws.resolve(b"f")
        ws.files.open(ino, truncate=True)
    else:
        if how == "unlink":
            ws.unlink(ws.root, b"f", A)
            name = b"f"
        else:
            name = b".f.tmp"
        ino, _ = ws.create(ws.root, name, 0o100644, A)
        ws.files.open(ino, created=True)
    ws.files.write(ino, 0, data, A.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    if how == "rename":
        ws.rename(ws.root, b".f.tmp", ws.root, b"f", 0, A)


@pytest.mark.parametrize("how", ["truncate", "unlink", "rename"])
def test_a_file_rewritten_whole_twenty_times_stores_deltas(store, ws, how):
    rng = random.Random(9)
    lines = source(rng)
    ino, _ = ws.create(ws.root, b"f", 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 0, b"".join(lines), A.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    versions = {ws.head_seq: b"".join(lines)}
    compressed = len(zstandard.ZstdCompressor(level=3).compress(b"".join(lines)))
    before, _ = stored_chunks(store)
    for _ in range(VERSIONS):
        lines[rng.randrange(len(lines))] = source(rng, 1)[0]          # a one-line edit
        data = b"".join(lines)
        rewrite(ws, how, data)
        versions[ws.head_seq] = data
    grown, codecs = stored_chunks(store)
    grown -= before
    # without a base: VERSIONS whole zstd chunks; with one, every (MAX_DELTA_DEPTH + 1)-th is plain
    plain_ones = VERSIONS // (MAX_DELTA_DEPTH + 1)
    assert codecs.get(codec.CODEC_DELTA, 0) >= VERSIONS - plain_ones
    assert grown < (plain_ones + 2) * compressed, (grown, compressed)
    assert grown < VERSIONS * compressed / 3
    store.chunks.cache = type(store.chunks.cache)(store.chunks.cache.max_bytes)
    for seq, expected in versions.items():
        assert read_at(ws, seq, b"f") == expected
    clean(store)

    dryrun.set_policy(store, ws.id, Policy(keep_last=1))
    result = collect.collect(store, ["w"], now_ns=LATER, wait=0)
    assert result["pruned_versions"] >= VERSIONS - 1
    store.chunks.cache = type(store.chunks.cache)(store.chunks.cache.max_bytes)
    assert read_at(ws, ws.head_seq, b"f") == data                 # the head's bases were kept
    clean(store)


def test_delta_chains_stay_within_the_depth_limit(store, ws):
    rng = random.Random(2)
    lines = source(rng)
    ino, _ = ws.create(ws.root, b"f", 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 0, b"".join(lines), A.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    for _ in range(12):
        lines[rng.randrange(len(lines))] = source(rng, 1)[0]
        rewrite(ws, "truncate", b"".join(lines))
    with store.env.begin() as txn:
        records = dict(store.chunks.iter_index(txn))
    for record in records.values():
        depth = 0
        while record.base is not None:
            depth += 1
            record = records[record.base]
        assert depth <= MAX_DELTA_DEPTH


def test_a_new_file_with_no_prior_content_stores_plain_chunks(store, ws):
    ino, _ = ws.create(ws.root, b"g", 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 0, b"".join(source(random.Random(3))), A.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    _, codecs = stored_chunks(store)
    assert codecs.get(codec.CODEC_DELTA, 0) == 0


def test_temp_targets_names_what_a_temporary_file_replaces():
    assert temp_targets(b".f.txt.swp") == [b"f.txt.swp", b"f.txt", b"f"]
    assert b"f.txt" in temp_targets(b"f.txt.tmp")
    assert temp_targets(b"f.txt~") == [b"f.txt", b"f"]
    assert temp_targets(b"plain") == []


def test_a_stream_unlike_what_it_replaces_stops_trying_its_bases(store, ws, monkeypatch):
    rng = random.Random(4)
    ino, _ = ws.create(ws.root, b"big", 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 0, b"".join(source(rng, 60_000)), A.pid)     # ~2.6 MB of text
    ws.files.commit(ino)
    ws.files.release(ino)
    tried = []
    real = store.chunks._delta
    monkeypatch.setattr(store.chunks, "_delta", lambda data, base: tried.append(base) or real(data, base))
    data = b"".join(source(random.Random(5), 60_000))                # as much text, none of it shared
    ws.files.open(ino, truncate=True)
    ws.files.write(ino, 0, data, A.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    extents = store.content_map(ws.head_attrs(ino).content).extent_count
    assert extents > 20
    assert len(tried) <= DELTA_MISSES + 16 < extents
    assert read_at(ws, ws.head_seq, b"big") == data
