"""``chronicle.store.chunks.packs``: the pack format over a chunk backend —
records written by :class:`PackWriter` are found again by
:class:`PackReader`'s range reads and scans; a torn tail ends a scan, a bad
header is ``Corrupt``; names and numbers round-trip."""

from __future__ import annotations

import errno
import os

import pytest

from chronicle.errors import Corrupt, NoSpace, NotFound
from chronicle.store.chunks import codec
from chronicle.store.chunks.backends.base import ObjectInfo
from chronicle.store.chunks.backends.local import LocalBackend
from chronicle.store.chunks.ids import hash_bytes
from chronicle.store.chunks.packs import (PACK_HEADER, RECORD_HEADER, ChunkLocation, PackReader, PackWriter,
                                          pack_name, pack_path, parse_pack_name)


@pytest.fixture
def backend(tmp_path):
    backend = LocalBackend(tmp_path / "store")
    yield backend
    backend.close()


def records(n: int, size: int = 1000) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        data = bytes([i % 251]) * size + i.to_bytes(4, "little")
        out.append((hash_bytes(data), data))
    return out


def test_names_round_trip(tmp_path):
    for pack_no in (1, 0x1234, (1 << 48) - 1):
        assert parse_pack_name(pack_name(pack_no)) == pack_no
    assert pack_name(0x1234) == "packs/000012/0000001234.pack"
    assert pack_path(tmp_path / "packs", 0x1234) == tmp_path / "packs" / "000012" / "0000001234.pack"
    for other in ("packs/000012/0000001234.pack.tmp", "packs/000013/0000001234.pack", "packs/x.pack",
                  "packs/000012/00000001234.pack"):
        assert parse_pack_name(other) is None


def test_written_records_are_read_and_scanned(backend):
    writer = PackWriter(backend)
    locations = [writer.append(cid, codec.CODEC_RAW, len(data), data) for cid, data in records(20)]
    writer.flush()
    reader = PackReader(backend)
    assert len({loc.pack_no for loc in locations}) == 1
    for (cid, data), loc in zip(records(20), locations):
        assert reader.read(loc) == data
        assert reader.read_header(loc) == (codec.CODEC_RAW, len(data), cid)
    scanned = list(reader.scan(locations[0].pack_no))
    assert [r.chunk_id for r in scanned] == [cid for cid, _ in records(20)]
    assert [r.location for r in scanned] == locations
    writer.close()
    size = PACK_HEADER.size + sum(RECORD_HEADER.size + len(d) for _, d in records(20))
    assert reader.list_packs() == {locations[0].pack_no: size}
    assert list(backend.list("packs/")) == [ObjectInfo(pack_name(locations[0].pack_no), size)]


def test_a_full_pack_is_sealed_and_a_new_one_started(backend):
    numbers = iter(range(0x100, 0x200))
    writer = PackWriter(backend, allocate_pack_no=lambda: next(numbers), max_pack_size=5000)
    locations = [writer.append(cid, codec.CODEC_RAW, len(data), data) for cid, data in records(12)]
    writer.sync()
    assert sorted({loc.pack_no for loc in locations}) == [0x100, 0x101, 0x102]     # 4 records of 1048 bytes each
    assert all(size <= 5000 for size in PackReader(backend).list_packs().values())
    writer.close()


def test_a_taken_pack_number_is_skipped(backend):
    backend.put(pack_name(0x100), b"someone else's")
    numbers = iter([0x100, 0x101])
    writer = PackWriter(backend, allocate_pack_no=lambda: next(numbers))
    assert writer.append(b"\x01" * 32, codec.CODEC_RAW, 3, b"abc").pack_no == 0x101
    writer.close()


def test_torn_tail_ends_the_scan_and_a_bad_header_is_corrupt(backend):
    writer = PackWriter(backend)
    loc = writer.append(b"\x02" * 32, codec.CODEC_RAW, 3, b"abc")
    writer.close()
    path = backend.path(pack_name(loc.pack_no))
    with open(path, "ab") as f:
        f.write(RECORD_HEADER.pack(b"CK", 0, 0, 5000, 5000, bytes(32)) + b"partial")
    reader = PackReader(backend)
    assert [r.location for r in reader.scan(loc.pack_no)] == [loc]
    with open(path, "r+b") as f:
        f.seek(loc.offset - RECORD_HEADER.size)
        f.write(b"XX")
    with pytest.raises(Corrupt, match="bad record header"):
        list(reader.scan(loc.pack_no))
    with pytest.raises(Corrupt, match="no chunk record"):
        reader.read_header(loc)


def test_missing_and_short_packs_are_corrupt(backend):
    writer = PackWriter(backend)
    loc = writer.append(b"\x03" * 32, codec.CODEC_RAW, 3, b"abc")
    writer.close()
    reader = PackReader(backend)
    with pytest.raises(Corrupt, match="truncated"):
        reader.read(ChunkLocation(loc.pack_no, loc.offset, 4))
    with pytest.raises(Corrupt, match="no chunk record"):            # a damaged index record's offset
        reader.read(ChunkLocation(loc.pack_no, 1 << 63, 4))
    backend.delete(pack_name(loc.pack_no))
    with pytest.raises(Corrupt, match="missing"):
        reader.read(loc)
    with pytest.raises(NotFound):
        list(reader.scan(loc.pack_no))


def test_a_failed_write_of_the_flusher_loses_only_its_records_and_says_so(backend, monkeypatch):
    """A write error retires the pack: the records it lost are named by
    ``check`` (to the caller that would use them), earlier ones stay good,
    and the next record goes to a new pack."""
    writer = PackWriter(backend)
    good = writer.append(b"\x04" * 32, codec.CODEC_RAW, 3, b"abc")
    writer.flush()
    sink = writer._sink

    def full(buffers):
        raise NoSpace("no space left (test)")

    monkeypatch.setattr(sink, "append", full)
    big = b"\x05" * (5 << 20)                         # more than the write buffer: handed to the flusher
    lost = writer.append(hash_bytes(big), codec.CODEC_RAW, len(big), big)
    later = writer.append(b"\x06" * 32, codec.CODEC_RAW, 3, b"def")   # same pack, queued after the failure
    writer.flush()                                     # the error is not thrown at whoever flushes next
    writer.check(good)
    for location in (lost, later):
        with pytest.raises(NoSpace):
            writer.check(location)
    monkeypatch.undo()
    again = writer.append(b"\x06" * 32, codec.CODEC_RAW, 3, b"def")
    assert again.pack_no != good.pack_no
    writer.close()
    writer.check(again)
    reader = PackReader(backend)
    assert reader.read(good) == b"abc" and reader.read(again) == b"def"
    assert [r.location for r in reader.scan(good.pack_no)] == [good]


def test_a_short_write_on_a_full_disk_is_rolled_back(backend, monkeypatch):
    """ENOSPC after part of a write (what a filling disk does): the pack file
    is truncated back to its last complete write, so no location handed out
    points past the bytes that are there, and a new pack takes the next record."""
    import chronicle.store.chunks.backends.local as local

    writer = PackWriter(backend)
    first = writer.append(b"\x01" * 32, codec.CODEC_RAW, 5, b"first")
    writer.flush()
    path = pack_path(backend.root / "packs", first.pack_no)
    size_before = path.stat().st_size
    real_writev = os.writev

    def filling(fd, buffers):
        real_writev(fd, [bytes(buffers[0])[:7]])     # part of the first buffer fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.os, "writev", filling)
    second = writer.append(b"\x02" * 32, codec.CODEC_RAW, 6, b"second")
    writer.flush()
    monkeypatch.undo()
    assert path.stat().st_size == size_before
    with pytest.raises(NoSpace):
        writer.check(second)
    third = writer.append(b"\x02" * 32, codec.CODEC_RAW, 6, b"second")
    writer.sync()
    writer.check(third)
    reader = PackReader(backend)
    assert reader.read(first) == b"first" and reader.read(third) == b"second"
    assert third.pack_no != first.pack_no
    writer.close()


def test_a_pack_whose_first_write_failed_is_removed(backend, monkeypatch):
    import chronicle.store.chunks.backends.local as local

    writer = PackWriter(backend)
    monkeypatch.setattr(local.os, "writev", lambda fd, bufs: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    lost = writer.append(b"\x01" * 32, codec.CODEC_RAW, 5, b"first")
    writer.flush()
    monkeypatch.undo()
    with pytest.raises(NoSpace):
        writer.check(lost)
    good = writer.append(b"\x01" * 32, codec.CODEC_RAW, 5, b"first")
    writer.sync()
    assert list(PackReader(backend).list_packs()) == [good.pack_no]
    writer.close()



def test_a_rotated_pack_is_closed_whole_without_a_sync(backend):
    """GC asked the writer to seal its pack (``rotate``); ``close_sealed``
    closes it once its queued records are written: no longer an open pack,
    every record readable, and the next record starts a new pack."""
    numbers = iter(range(0x300, 0x400))
    writer = PackWriter(backend, allocate_pack_no=lambda: next(numbers))
    first = [writer.append(cid, codec.CODEC_RAW, len(data), data) for cid, data in records(50, 100_000)]
    writer.rotate()
    assert writer.open_packs() == {0x300}                 # sealed, not closed: still open until ...
    writer.close_sealed()
    assert writer.open_packs() == set()                   # ... now, without a sync
    reader = PackReader(backend)
    assert [r.location for r in reader.scan(0x300)] == first
    for (_cid, data), loc in zip(records(50, 100_000), first):
        assert reader.read(loc) == data
    later = writer.append(b"\x01" * 32, codec.CODEC_RAW, 3, b"new")
    assert later.pack_no == 0x301 and writer.open_packs() == {0x301}
    writer.close()
    assert reader.read(later) == b"new"


def test_append_many_writes_what_appends_one_by_one_write(tmp_path):
    """A batch appended at once (a stream's put_many) lands in the same packs
    at the same places as one append each, sealing full packs on the way,
    and every record reads back."""
    batch = records(40, size=3000)
    writers = []
    for name in ("one", "many"):
        backend = LocalBackend(tmp_path / name)
        numbers = iter(range(100, 200))
        writers.append((backend, PackWriter(backend, allocate_pack_no=lambda n=numbers: next(n),
                                            max_pack_size=16 * 1024)))
    (b1, one), (b2, many) = writers
    singles = [one.append(cid, codec.CODEC_RAW, len(data), data) for cid, data in batch]
    at_once = many.append_many([(cid, codec.CODEC_RAW, len(data), data) for cid, data in batch])
    assert [(loc.pack_no, loc.offset, loc.stored_len) for loc in singles] == at_once
    assert len({pack_no for pack_no, _, _ in at_once}) > 5          # several packs were filled
    many.flush()
    reader = PackReader(b2)
    for (cid, data), (pack_no, offset, stored) in zip(batch, at_once):
        assert reader.read(ChunkLocation(pack_no, offset, stored)) == data
    for backend, writer in writers:
        writer.close()
        backend.close()
