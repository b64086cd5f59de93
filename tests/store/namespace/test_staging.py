"""The write overlay against a model: a plain ``bytearray``.

A hypothesis state machine writes (appends, overwrites, writes past the end),
truncates, reads, punches holes and commits through one ``Overlay`` — entering
and leaving streaming mode as a real writer would — and checks after every
step that the overlay reads back exactly the model, and after every commit
that the new content record holds the model's bytes and hash and that the
unchanged parts reused their extents.
"""

from __future__ import annotations

import blake3
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chronicle.store.chunks.tree import hash_data
from chronicle.store.namespace import stream as stream_module
from chronicle.store.chunks import tree
from chronicle.store.chunks.tree import MIN_HOLE
from chronicle.store.meta import nodes
from chronicle.store.namespace.content import ContentMap
from chronicle.store.namespace.staging import Overlay
from chronicle.store.store import Store

MAX = 3 * 1024 * 1024


def commit(store, overlay):
    built = overlay.build(store.chunks)
    store.chunks.flush()
    with store.env.begin(write=True) as txn:
        held = nodes.reference(txn, store.dbs["content_nodes"], built.record, built.nodes)
        inserted = store.chunks.add_chunk_refs(txn, held)
    store.chunks.committed(inserted)
    base = ContentMap(built.id, built.record, store.chunks)
    overlay.rebase(base)
    return built


class OverlayModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="overlay-")
        self.saved_batch = stream_module.BATCH
        stream_module.BATCH = 64 * 1024          # batches, carries and chaining on small files
        self.store = Store.init(self.dir + "/store")
        self.overlay = Overlay(str(self.store.staging_dir), ContentMap.empty(self.store.chunks), self.store.chunks)
        self.model = bytearray()
        self.unwritten = bytearray()     # 1 where a byte was never written (a sparse file's holes)
        self.seed = 0

    def teardown(self):
        stream_module.BATCH = self.saved_batch
        self.overlay.close()
        self.store.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def _data(self, n: int) -> bytes:
        self.seed += 1
        return blake3.blake3(str(self.seed).encode()).digest(length=n)

    @rule(n=st.integers(1, 400_000))
    def append(self, n):
        data = self._data(n)
        if len(self.model) + n > MAX:
            return
        self.overlay.write(len(self.model), data)
        self.model += data
        self.unwritten += bytes(n)
        self._written(len(self.model) - n, n)

    @rule(off=st.integers(0, MAX), n=st.integers(1, 70_000))
    def write_anywhere(self, off, n):
        off = min(off, len(self.model) + 100_000)
        data = self._data(n)
        self.overlay.write(off, data)
        if off > len(self.model):
            self.unwritten += b"\x01" * (off - len(self.model))
            self.model += bytes(off - len(self.model))
        self.model[off:off + n] = data
        self.unwritten += bytes(len(self.model) - len(self.unwritten))
        self._written(off, n)

    @rule(size=st.integers(0, MAX))
    def truncate(self, size):
        self.overlay.truncate(size)
        if size < len(self.model):
            del self.model[size:]
            del self.unwritten[size:]
        else:
            self.unwritten += b"\x01" * (size - len(self.model))
            self.model += bytes(size - len(self.model))

    @precondition(lambda self: len(self.model) > 0)
    @rule(off=st.integers(0, MAX), n=st.integers(1, 200_000))
    def punch(self, off, n):
        off %= len(self.model)
        self.overlay.punch_hole(off, n)
        end = min(off + n, len(self.model))
        self.model[off:end] = bytes(end - off)
        self._written(off, end - off)

    def _written(self, off: int, n: int) -> None:
        """A write marks the whole pages it touches as data (materialized pages, staging blocks)."""
        lo, hi = off // 4096 * 4096, min(len(self.unwritten), -(-(off + n) // 4096) * 4096)
        self.unwritten[lo:hi] = bytes(hi - lo)

    def holes(self) -> list[tuple[int, int]]:
        """Never-written runs, page-aligned inward, of at least MIN_HOLE bytes (``chunks.tree``)."""
        out, pos, n = [], 0, len(self.unwritten)
        while pos < n:
            s = self.unwritten.find(1, pos)
            if s < 0:
                break
            e = self.unwritten.find(0, s)
            e = n if e < 0 else e
            a, b = -(-s // 4096) * 4096, e // 4096 * 4096
            if b - a >= MIN_HOLE:
                out.append((a, b))
            pos = e
        return out

    @rule()
    def commit(self):
        built = commit(self.store, self.overlay)
        assert built.record.size == len(self.model)
        holes = self.holes()
        assert built.id == built.record.hash == hash_data(self.model, holes)
        data_ranges, pos = [], 0
        for a, b in holes + [(len(self.model), len(self.model))]:
            if a > pos:
                data_ranges.append((pos, a))
            pos = b
        expected = tree.extents_of(lambda o, n: bytes(self.model[o:o + n]), len(self.model), data_ranges)
        assert list(self.store.nodes.iter_extents(built.record)) == expected     # the extents, not only the hash
        self.unwritten = bytearray(len(self.model))
        for a, b in holes:
            self.unwritten[a:b] = b"\x01" * (b - a)
        assert self.overlay.read(0, len(self.model) + 1) == bytes(self.model)

    @rule(off=st.integers(0, MAX), n=st.integers(0, 300_000))
    def read(self, off, n):
        assert self.overlay.read(off, n) == bytes(self.model[off:off + n])

    @invariant()
    def size_matches(self):
        assert self.overlay.size == len(self.model)


OverlayModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestOverlayModel = OverlayModel.TestCase


def test_streaming_write_is_chunked_before_close(tmp_path, monkeypatch):
    """A file written front to back is chunked while it is written: by close,
    most of it is already in packs, and the result equals a one-shot build."""
    monkeypatch.setattr(stream_module, "BATCH", 256 * 1024)
    store = Store.init(tmp_path / "store")
    overlay = Overlay(str(store.staging_dir), ContentMap.empty(store.chunks), store.chunks)
    data = blake3.blake3(b"x").digest(length=5 * 1024 * 1024)
    for off in range(0, len(data), 128 * 1024):
        overlay.write(off, data[off:off + 128 * 1024])
    assert overlay.stream is not None and overlay._fd is None      # no staging file was needed
    overlay.stream.wait()
    assert overlay.stream.emitted > 4 * 1024 * 1024                 # chunked before close
    built = commit(store, overlay)
    assert built.record.hash == hash_data(data)
    assert overlay.read(0, len(data)) == data
    store.close()


def test_append_after_commit_hashes_only_the_new_bytes(tmp_path, monkeypatch):
    """After a commit, an append's commit re-reads none of the kept chunks
    but the last one (format 4: no whole-file hash to resume)."""
    store = Store.init(tmp_path / "store")
    overlay = Overlay(str(store.staging_dir), ContentMap.empty(store.chunks), store.chunks)
    first = blake3.blake3(b"a").digest(length=4 * 1024 * 1024)
    overlay.write(0, first)
    commit(store, overlay)
    reads = []
    real_get = store.chunks.get
    monkeypatch.setattr(store.chunks, "get", lambda cid, txn=None: reads.append(cid) or real_get(cid, txn))
    more = b"appended line\n" * 100
    overlay.write(len(first), more)
    built = commit(store, overlay)
    assert built.record.hash == hash_data(first + more)
    # at most the last extent: cut again with the new bytes, and the delta base of the chunk replacing it
    assert len(set(reads)) <= 1
    store.close()


def test_stream_chunks_equal_one_cut_of_the_whole(tmp_path, monkeypatch):
    """Writes of every size (tiny, under and over the chunker's maximum,
    exactly it, 1 MiB) streamed in batches give the chunks of one CDC cut of
    the whole file: the stream cuts each large write in place and only
    joins the bytes around write boundaries."""
    import random

    from chronicle.store.chunks.chunker import MAX_SIZE, Chunker
    from chronicle.store.chunks.ids import hash_bytes
    from chronicle.store.namespace.stream import Stream

    monkeypatch.setattr(stream_module, "BATCH", 3 * 1024 * 1024)
    store = Store.init(tmp_path / "store")
    rng = random.Random(7)
    sizes = [1, 100, MAX_SIZE - 1, MAX_SIZE, MAX_SIZE + 1, 1 << 20, 5000, 3 * MAX_SIZE, 17, 1 << 20]
    sizes += [rng.choice([rng.randint(1, 9000), rng.randint(1, 400_000), 1 << 20]) for _ in range(40)]
    data = blake3.blake3(b"split").digest(length=sum(sizes))
    stream = Stream(store.chunks)
    pos = 0
    for n in sizes:
        stream.append(data[pos:pos + n])
        pos += n
    ids, lengths = stream.finish()
    pieces = Chunker().split(data)
    assert list(lengths) == [len(p) for p in pieces]
    assert ids == [hash_bytes(p) for p in pieces]
    assert sum(lengths) == len(data) and stream.emitted == len(data)
    store.close()
