"""The chunk store: put and get chunks by id, once per store.

Vocabulary: a **chunk** is a piece of file content cut by CDC, named by the
BLAKE3 of its bytes (its **chunk id**). The **chunk index** (LMDB ``chunks``)
maps a chunk id to its pack location and **refcount** (how many content
records use it). A chunk written to a pack but not yet in the index is
**pending**: the transaction that records the version using it inserts it.

Writing (:meth:`ChunkStore.put`, or :meth:`~ChunkStore.put_many` for a
stream's batch: one dedup read for all, zstd on two threads) happens outside
any LMDB write transaction, usually in a worker thread: hash, dedup check,
compress, append to a pack.
The metadata transaction then calls :meth:`ChunkStore.add_refs` with the new
content record, which turns pending chunks into index entries. Before that
transaction commits, :meth:`ChunkStore.flush` hands pack data to the kernel, so
metadata never refers to chunk bytes a killed process had only buffered.

**Delta chunks.** :meth:`ChunkStore.put` with a ``base`` (the chunk the new
one replaces: the same region of the previous version of the file) stores
the chunk as a zstd delta against the base (``codec.CODEC_DELTA``) when that
is at most :data:`DELTA_RATIO` of plain zstd, the base is live and its chain
is shorter than :data:`MAX_DELTA_DEPTH`. A delta chunk in the index **holds
one reference on its base** while it is live: a chunk's refcount counts the
contents that use it *and* the live delta chunks whose base it is. So
:meth:`~ChunkStore.add_refs` takes a reference on the base when a delta
enters the index or comes back from the dead (a dead base comes back too,
cascading), and :meth:`~ChunkStore.drop_refs` gives it back when a delta
dies (cascading: a base that dies with it is freed too, and returned).
Reading a delta reads its base first (through the cache, so the bases of a
sequential reader stay decoded).

Reading (:meth:`ChunkStore.get`) goes through an LRU cache of decoded chunks;
a miss reads the chunk's byte range of its pack from the chunk backend
(``packs.PackReader``, ``ChunkBackend.read``) and verifies its BLAKE3 (see
``codec``). :meth:`ChunkStore.prefetch` tells the backend which pack ranges a
sequential reader will want next (``ChunkBackend.advise``; locally
``posix_fadvise(WILLNEED)``): it reads them ahead asynchronously, so the next
``pread``s hit the page cache — no threads, no GIL.

The chunk store knows packs only by number and location; their names, format
and bytes belong to ``packs`` and the backend.

**GC** (``chronicle.store.gc``) makes chunks **dead** (refcount 0, still in
the index and in their pack) and later drops dead records while it rewrites
packs. So: :meth:`ChunkStore.put` counts only a chunk with refcount > 0 as
stored (a dead one is written again, a fresh pending copy, which
:meth:`~ChunkStore.add_refs` prefers); a dedup hit is remembered with its
time until the commit that uses it (:meth:`~ChunkStore.lease_state`, which
the process's lease publishes: GC does not drop chunks that died after a hit
still waiting for its commit); a reader whose pack was compacted away while
it read re-reads the chunk's location from a fresh transaction
(:meth:`~ChunkStore.get`).

Threads: every method is safe to call from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import lmdb

from chronicle.errors import Corrupt
from chronicle.store.chunks import codec
from chronicle.store.chunks.backends.base import ChunkBackend
from chronicle.store.chunks.ids import HOLE_ID, ID_SIZE, to_hex
from chronicle.store.chunks.packs import ChunkLocation, PackReader, PackWriter
from chronicle.store.meta.schema import ChunkRecord, ContentRecord, add_totals

DEFAULT_CACHE_BYTES = 128 * 1024 * 1024
HIT_TTL_NS = 3600 * 1_000_000_000     # a dedup hit older than this no longer holds GC back (README)
# A delta is stored only when it is at most this fraction of plain zstd: a 10-byte
# edit of a 40 KiB chunk gives ~70 bytes (1/600 of random data, 1/15 of text), an
# unrelated chunk gives no gain at all; between them, a delta costs one more read
# (the base) for little space.
DELTA_RATIO = 0.5
# Longest chain of deltas (a delta of a delta of ...). Reading a chunk at depth d
# reads and decodes d + 1 records (~30 us each for 40 KiB, plus a pack read when
# the base is not cached), and a chain keeps every base in it alive as long as its
# newest delta is: after 4 deltas of the same chunk the next one is stored plain.
MAX_DELTA_DEPTH = 4


class DeltaBaseLost(Corrupt):
    """A delta chunk cannot be read because its base cannot be (fsck names it
    ``chunk-base-lost``)."""


class ChunkCache:
    """LRU of decoded chunks, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            data = self._data.get(chunk_id)
            if data is None:
                self.misses += 1
                return None
            self.hits += 1
            self._data.move_to_end(chunk_id)
            return data

    def contains(self, chunk_id: bytes) -> bool:
        return chunk_id in self._data

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return
        with self._lock:
            if chunk_id in self._data:
                return
            self._data[chunk_id] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._bytes -= len(old)


class ChunkStore:
    """Chunks of one store: packs in ``backend`` plus the ``chunks`` index in LMDB.

    ``db`` is the ``chunks`` database of ``env``; ``meta_db``, if given, the
    ``meta`` database whose running totals :meth:`add_refs` keeps. The chunk
    store owns ``backend``: :meth:`close` closes it. ``writer`` and
    ``reader`` (``packs``) are public for fsck.
    """

    def __init__(self, env: lmdb.Environment, db: lmdb._Database, backend: ChunkBackend,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, level: int = codec.DEFAULT_LEVEL,
                 meta_db: lmdb._Database | None = None):
        self._env = env
        self._db = db
        self._meta_db = meta_db
        self.backend = backend
        self.writer = PackWriter(backend)
        self.reader = PackReader(backend)
        self.cache = ChunkCache(cache_bytes)
        self._level = level
        self._pending: dict[bytes, ChunkRecord] = {}
        self._pending_lock = threading.Lock()
        self._hits: dict[bytes, int] = {}      # dedup hits not yet committed: chunk id -> time (ns)
        self.announce: Callable[[], None] | None = None   # called before the first write (the lease)
        self._announced = False

    # -- writing ---------------------------------------------------------------

    def put(self, chunk_id: bytes, data: bytes | memoryview, *, compress: bool = True,
            base: bytes | None = None) -> int | None:
        """Store ``data`` under ``chunk_id`` unless the store has it already.

        ``data`` must stay unchanged until the next :meth:`flush` (it may be
        written from the caller's buffer). ``compress=False`` stores it raw
        without trying zstd. ``base``: the id of the chunk this one replaces
        (the same region of the file's previous version); the chunk is then
        stored as a delta against it when that pays (module docstring), else
        as usual. Returns the codec of the newly written record, or None if
        the store had the chunk already. Raises ``NoSpace`` on a full disk.
        """
        if not self._announced and self.announce is not None:
            self.announce()
            self._announced = True
        with self._pending_lock:
            lost = self._pending.get(chunk_id)
        if lost is not None and not self._lost(lost):
            return None               # written (or being written) by another put
        seen_ns = time.time_ns()      # before the read: a GC sweep committed after it is seen as later
        with self._env.begin(db=self._db, buffers=True) as txn:
            raw = txn.get(chunk_id)
            if raw is not None and ChunkRecord.decode(raw).refcount > 0:
                with self._pending_lock:
                    self._hits.setdefault(chunk_id, seen_ns)
                return None           # a dead chunk (refcount 0) is written again (module docstring)
            if base is not None and (not compress or base == chunk_id or not self._can_base(txn, base)):
                base = None
        plain = None
        if base is not None:
            payload, plain = self._delta(data, base)
            if payload is None:
                base = None
        if base is not None:
            codec_id = codec.CODEC_DELTA
        elif plain is not None:
            codec_id, payload = plain
        elif compress:
            codec_id, payload = codec.encode(data, self._level)
        else:
            codec_id, payload = codec.CODEC_RAW, data
        return self._append(chunk_id, data, codec_id, payload, lost, base, seen_ns)

    def put_many(self, chunks: list[tuple[bytes, bytes | memoryview]], compress: list[bool], *,
                 sample: bool = True, bases: list[bytes | None] | None = None) -> list[int | None]:
        """:meth:`put` of each ``(chunk_id, data)`` of ``chunks``, in order, as
        a stream's batch does: one index read for all their dedup checks, and
        zstd of those with ``compress[i]`` on two cores
        (``codec.encode_many``; ``sample`` as there). ``bases``: each chunk's
        :meth:`put` ``base`` (None: none), tried first (delta rules as in
        :meth:`put`). Returns each one's :meth:`put` result (a chunk twice in
        ``chunks``: None the second time). Raises ``NoSpace`` on a full disk."""
        if not self._announced and self.announce is not None:
            self.announce()
            self._announced = True
        with self._pending_lock:
            get_pending = self._pending.get
            losts = [get_pending(chunk_id) for chunk_id, _data in chunks]
        results: list[int | None] = [None] * len(chunks)
        todo: list[int] = []
        taken: set[bytes] = set()
        hits: list[bytes] = []
        seen_ns = time.time_ns()
        with self._env.begin(db=self._db, buffers=True) as txn:
            get = txn.get
            for i, (chunk_id, _data) in enumerate(chunks):
                lost = losts[i]
                if chunk_id in taken or (lost is not None and not self._lost(lost)):
                    continue
                raw = get(chunk_id)
                if raw is not None and ChunkRecord.decode(raw).refcount > 0:
                    hits.append(chunk_id)
                    continue
                taken.add(chunk_id)
                todo.append(i)
            if hits:
                with self._pending_lock:
                    for chunk_id in hits:
                        self._hits.setdefault(chunk_id, seen_ns)
            usable = {}
            if bases is not None:
                for i in todo:
                    base = bases[i]
                    if base is not None and compress[i] and base != chunks[i][0] and self._can_base(txn, base):
                        usable[i] = base
        encoded: dict[int, tuple[int, bytes | memoryview]] = {}
        deltas: dict[int, bytes] = {}
        for i, base in usable.items():
            payload, plain = self._delta(chunks[i][1], base)
            if payload is not None:
                deltas[i] = base
                encoded[i] = (codec.CODEC_DELTA, payload)
            elif plain is not None:
                encoded[i] = plain
        squeeze = [i for i in todo if compress[i] and i not in encoded]
        encoded.update(zip(squeeze, codec.encode_many([chunks[i][1] for i in squeeze], self._level,
                                                      sample=sample)))
        records = []
        for i in todo:
            chunk_id, data = chunks[i]
            codec_id, payload = encoded.get(i, (codec.CODEC_RAW, data))
            records.append((chunk_id, codec_id, len(data), payload))
        locations = self.writer.append_many(records)
        with self._pending_lock:          # one acquisition for the batch (as _append does per chunk)
            pending, hit_times = self._pending, self._hits
            for i, (chunk_id, codec_id, raw_len, _payload), (pack_no, offset, stored_len) in zip(
                    todo, records, locations):
                if pending.get(chunk_id, losts[i]) is not losts[i]:
                    continue      # another thread won the race; our copy is unreferenced pack space
                base = deltas.get(i)
                pending[chunk_id] = ChunkRecord(pack_no, offset, stored_len, raw_len, codec_id, 0, base)
                if base is not None:
                    hit_times.setdefault(base, seen_ns)   # GC keeps the base until the commit (lease_state)
                results[i] = codec_id
        return results

    def _append(self, chunk_id: bytes, data: bytes | memoryview, codec_id: int, payload: bytes | memoryview,
                lost: ChunkRecord | None, base: bytes | None, seen_ns: int) -> int | None:
        """Write one new chunk record and make it pending (unless another
        thread's copy won meanwhile); returns ``codec_id`` or None."""
        location = self.writer.append(chunk_id, codec_id, len(data), payload)
        record = ChunkRecord(location.pack_no, location.offset, location.stored_len, len(data), codec_id, 0, base)
        with self._pending_lock:
            if self._pending.get(chunk_id, lost) is not lost:
                return None       # another thread won the race; our copy is unreferenced pack space
            self._pending[chunk_id] = record       # replaces a copy a write error lost
            if base is not None:
                self._hits.setdefault(base, seen_ns)   # GC keeps the base until the commit (lease_state)
        return codec_id

    def _can_base(self, txn: lmdb.Transaction, base: bytes) -> bool:
        """True if ``base`` is live in the index and a delta of it stays within
        :data:`MAX_DELTA_DEPTH` (walks the base's chain: at most that many reads)."""
        raw = txn.get(base)
        if raw is None:
            return False
        record = ChunkRecord.decode(raw)
        if record.refcount == 0:
            return False
        depth = 0
        while record.base is not None:
            depth += 1
            if depth >= MAX_DELTA_DEPTH:
                return False
            raw = txn.get(record.base)
            if raw is None:
                return False
            record = ChunkRecord.decode(raw)
        return True

    def _delta(self, data: bytes | memoryview, base: bytes) -> tuple[bytes | None, tuple | None]:
        """``(delta, plain)``: the ``CODEC_DELTA`` payload of ``data`` against
        ``base`` if it is at most :data:`DELTA_RATIO` of the raw and of the
        plain zstd size, else None; and ``codec.encode(data)`` if it was
        computed to decide, else None."""
        try:
            base_data = self.get(base)
        except Corrupt:
            return None, None         # a damaged base: the chunk is stored plain
        payload = codec.encode_delta(data, base, base_data, self._level)
        if len(payload) > DELTA_RATIO * len(data):
            return None, None
        plain = codec.encode(data, self._level)
        if plain[0] != codec.CODEC_RAW and len(payload) > DELTA_RATIO * len(plain[1]):
            return None, plain
        return payload, None

    def flush(self) -> None:
        """Hand written chunk data to the kernel (call before committing metadata)."""
        self.writer.flush()

    def sync(self) -> None:
        """Make written chunk data durable: this process's packs and (on a
        local store) those of every other process writing to it
        (``PackWriter.sync``, ``ChunkBackend.sync``). Raises ``NoSpace``."""
        self.writer.sync()

    def needs_sync(self) -> bool:
        """False when no chunk data of this process awaits a :meth:`sync`
        (``PackWriter.needs_sync``)."""
        return self.writer.needs_sync()

    def add_refs(self, txn: lmdb.Transaction, content: ContentRecord) -> list[bytes]:
        """Count one more reference from a flat ``content`` to each distinct chunk it uses
        (see :meth:`add_chunk_refs`)."""
        return self.add_chunk_refs(txn, dict.fromkeys(_distinct_ids(content), 1))

    def add_chunk_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int]) -> list[bytes]:
        """Add ``counts[id]`` references to each chunk (a content's new holders:
        ``meta.nodes.reference``).

        Runs inside the caller's write transaction; pending chunks become index
        entries, and their ids are returned: pass them to :meth:`committed` once
        the transaction has committed. A delta chunk that enters the index or
        comes back from the dead takes a reference on its base (module
        docstring). Raises :class:`Corrupt` for a chunk that is neither
        indexed nor pending, or a delta whose base is missing.
        """
        inserted = []
        came_back = [0, 0, 0]         # raw bytes, stored bytes, chunks counted again in the totals
        ids = sorted(counts)
        # One lock for all of them (a big file's first commit names ~25 new chunks per MiB).
        with self._pending_lock:
            pendings = [self._pending.get(chunk_id) for chunk_id in ids]
            for chunk_id in ids:
                self._hits.pop(chunk_id, None)
        # The packs a write error retired (PackWriter.check): the caller flushed before
        # this commit, so none of these chunks' writes is still under way.
        retired = self.writer.retired_packs()
        get, put, db = txn.get, txn.put, self._db
        for chunk_id, pending in zip(ids, pendings):
            raw = get(chunk_id, db=db)
            if raw is None and pending is not None and pending.pack_no not in retired:
                # the common case: a new chunk enters the index
                record = ChunkRecord(pending.pack_no, pending.offset, pending.stored_len, pending.raw_len,
                                     pending.codec, counts[chunk_id], pending.base)
                put(chunk_id, record.encode(), db=db)
                inserted.append(chunk_id)
                _count(came_back, record)
                if record.base is not None:
                    with self._pending_lock:
                        self._hits.pop(record.base, None)
                    self._hold(txn, record.base, came_back)
                continue
            record = ChunkRecord.decode(raw) if raw is not None else None
            revived = False
            if record is not None and record.refcount == 0:
                # a dead chunk comes back: its fresh copy if there is one, else its old record
                if pending is not None and not self._lost(pending):
                    record = None
                else:
                    revived = True
            if record is None:
                if pending is None:
                    raise Corrupt(f"chunk {to_hex(chunk_id)} is referenced but was never stored")
                self._check_pending(chunk_id, pending)
                record = ChunkRecord(pending.pack_no, pending.offset, pending.stored_len, pending.raw_len,
                                     pending.codec, 0, pending.base)
                inserted.append(chunk_id)
                revived = True
                if record.base is not None:
                    with self._pending_lock:
                        self._hits.pop(record.base, None)
            record.refcount += counts[chunk_id]
            put(chunk_id, record.encode(), db=db)
            if revived:
                _count(came_back, record)
                if record.base is not None:
                    self._hold(txn, record.base, came_back)
        if came_back[2] and self._meta_db is not None:
            add_totals(txn, self._meta_db, unique_bytes=came_back[0], stored_bytes=came_back[1], chunks=came_back[2])
        return inserted

    def _hold(self, txn: lmdb.Transaction, base: bytes, came_back: list[int]) -> None:
        """One more reference on ``base`` from a delta that came alive; a dead
        base comes back too, and takes one on its own base (cascading)."""
        for _depth in range(MAX_DELTA_DEPTH + 1):
            raw = txn.get(base, db=self._db)
            if raw is None:
                raise Corrupt(f"chunk {to_hex(base)} is the base of a delta chunk but missing from the index")
            record = ChunkRecord.decode(raw)
            record.refcount += 1
            txn.put(base, record.encode(), db=self._db)
            if record.refcount > 1:
                return
            _count(came_back, record)
            if record.base is None:
                return
            base = record.base
        raise Corrupt(f"chunk {to_hex(base)} is in a delta chain longer than {MAX_DELTA_DEPTH}")

    def _check_pending(self, chunk_id: bytes, pending: ChunkRecord) -> None:
        """Raise the write error (``NoSpace``) that lost a pending chunk's
        bytes (``PackWriter.check``). The chunk stays pending and lost, so a
        retry of the same commit fails the same way, until :meth:`put`
        writes it again."""
        self.writer.check(ChunkLocation(pending.pack_no, pending.offset, pending.stored_len))

    def _lost(self, pending: ChunkRecord) -> bool:
        """True if a write error lost this pending chunk's bytes."""
        try:
            self.writer.check(ChunkLocation(pending.pack_no, pending.offset, pending.stored_len))
        except Exception:         # noqa: BLE001 - the error goes to the commit that uses it
            return True
        return False

    def committed(self, inserted: list[bytes]) -> None:
        """The transaction in which :meth:`add_refs` returned ``inserted`` has
        committed: those chunks are index entries now, no longer pending."""
        with self._pending_lock:
            for chunk_id in inserted:
                self._pending.pop(chunk_id, None)

    def release_hits(self, chunk_ids: Iterable[bytes]) -> None:
        """A commit that used ``chunk_ids`` (the chunks a build passed to
        :meth:`put` / :meth:`put_many`, and their delta bases) has landed,
        or found its content unchanged or stored already: the dedup hits on
        them no longer hold GC back (:meth:`lease_state`'s ``busy_since``).
        Without this, a commit that references no new chunk (the same bytes
        written again, a content another version has) left its hits for
        :data:`HIT_TTL_NS`, and GC could drop no dead chunk for an hour."""
        with self._pending_lock:
            for chunk_id in chunk_ids:
                self._hits.pop(chunk_id, None)

    def drop_refs(self, txn: lmdb.Transaction, content: ContentRecord,
                  totals: dict[str, int] | None = None) -> list[bytes]:
        """Undo :meth:`add_refs` for a flat ``content`` (see :meth:`drop_chunk_refs`)."""
        return self.drop_chunk_refs(txn, dict.fromkeys(_distinct_ids(content), 1), totals)

    def drop_chunk_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int],
                        totals: dict[str, int] | None = None) -> list[bytes]:
        """Drop ``counts[id]`` references from each chunk (GC's sweep, via
        ``meta.nodes.release``); returns the ids whose refcount reached 0
        (dead: the running totals count them no more), the bases of delta
        chunks that died with them included (module docstring). With
        ``totals`` the running-total deltas are added to that dict (name ->
        delta) for the caller to write once per transaction (``add_totals``)
        instead of being written here."""
        freed: list[bytes] = []
        gone = [0, 0, 0]
        for chunk_id in sorted(counts):
            self._release(txn, chunk_id, freed, gone, counts[chunk_id])
        if freed and totals is not None:
            for name, delta in (("unique_bytes", -gone[0]), ("stored_bytes", -gone[1]), ("chunks", -gone[2])):
                totals[name] = totals.get(name, 0) + delta
        elif freed and self._meta_db is not None:
            add_totals(txn, self._meta_db, unique_bytes=-gone[0], stored_bytes=-gone[1], chunks=-gone[2])
        return freed

    def _release(self, txn: lmdb.Transaction, chunk_id: bytes, freed: list[bytes], gone: list[int],
                 n: int = 1) -> None:
        """``n`` references less on ``chunk_id``; a delta that dies releases its base (one reference, cascading)."""
        for _depth in range(MAX_DELTA_DEPTH + 2):
            raw = txn.get(chunk_id, db=self._db)
            if raw is None:
                raise Corrupt(f"chunk {to_hex(chunk_id)} is referenced but missing from the index")
            record = ChunkRecord.decode(raw)
            record.refcount -= n
            n = 1                                     # a dead delta gives back one reference on its base
            if record.refcount < 0:
                raise Corrupt(f"chunk {to_hex(chunk_id)} has a negative refcount")
            txn.put(chunk_id, record.encode(), db=self._db)
            if record.refcount:
                return
            freed.append(chunk_id)
            _count(gone, record)
            if record.base is None:
                return
            chunk_id = record.base
        raise Corrupt(f"chunk {to_hex(chunk_id)} is in a delta chain longer than {MAX_DELTA_DEPTH}")

    def freed_by(self, txn: lmdb.Transaction, drops: dict[bytes, int]) -> list[ChunkRecord]:
        """The records of the chunks that :meth:`drop_refs` would free if
        ``drops`` (chunk id -> references given back) were given back,
        cascades to delta bases included; changes nothing (``gc.dryrun``).
        Chunks already dead are not counted."""
        left: dict[bytes, int] = {}
        records: dict[bytes, ChunkRecord] = {}
        freed: list[ChunkRecord] = []
        work = list(drops.items())
        while work:
            chunk_id, n = work.pop()
            record = records.get(chunk_id)
            if record is None:
                raw = txn.get(chunk_id, db=self._db)
                if raw is None:
                    continue
                record = records[chunk_id] = ChunkRecord.decode(raw)
                left[chunk_id] = record.refcount
            before = left[chunk_id]
            left[chunk_id] = before - n
            if before > 0 >= left[chunk_id]:
                freed.append(record)
                if record.base is not None:
                    work.append((record.base, 1))
        return freed

    def recover_lost(self) -> int:
        """Write again the pending chunks a failed pack write lost (a full
        disk), from the copies the pack writer kept (``PackWriter.lost_payload``,
        verified against their BLAKE3), once space was freed; returns how many.
        Raises ``NoSpace`` if the disk is still full."""
        packs = self.writer.lost_packs()
        if not packs:
            return 0
        with self._pending_lock:
            items = list(self._pending.items())
        recovered = 0
        for chunk_id, record in items:
            location = ChunkLocation(record.pack_no, record.offset, record.stored_len)
            if record.pack_no not in packs or not self._lost(record):
                continue
            payload = self.writer.lost_payload(location)
            if payload is None:
                continue
            try:
                self.decode_payload(chunk_id, record, payload)
            except Corrupt:
                continue              # the caller's buffer changed since: that chunk stays lost
            new = self.writer.append(chunk_id, record.codec, record.raw_len, payload)
            with self._pending_lock:
                if self._pending.get(chunk_id) is record:
                    self._pending[chunk_id] = ChunkRecord(new.pack_no, new.offset, new.stored_len, record.raw_len,
                                                          record.codec, 0, record.base)
                    recovered += 1
        self.writer.flush()
        self.writer.forget_lost(packs)
        return recovered

    def relocate(self, txn: lmdb.Transaction, chunk_id: bytes, location: ChunkLocation) -> None:
        """Point chunk ``chunk_id``'s index record at ``location`` (a copy GC
        wrote), keeping its refcount. Raises :class:`Corrupt` if it has no record."""
        raw = txn.get(chunk_id, db=self._db)
        if raw is None:
            raise Corrupt(f"chunk {to_hex(chunk_id)} is missing from the index")
        record = ChunkRecord.decode(raw)
        record.pack_no, record.offset, record.stored_len = location.pack_no, location.offset, location.stored_len
        txn.put(chunk_id, record.encode(), db=self._db)

    def forget(self, txn: lmdb.Transaction, chunk_id: bytes) -> None:
        """Delete the index record of a dead chunk (GC, before it deletes the
        chunk's pack). Raises :class:`Corrupt` if the chunk is not dead."""
        raw = txn.get(chunk_id, db=self._db)
        if raw is None:
            return
        if ChunkRecord.decode(raw).refcount:
            raise Corrupt(f"chunk {to_hex(chunk_id)} is in use: it cannot be forgotten")
        txn.delete(chunk_id, db=self._db)

    def lease_state(self) -> tuple[set[int], int | None]:
        """``(packs, busy_since)`` for this process's lease (``gc.leases``):
        the packs that may hold chunks not yet in the index (pending ones,
        the pack being written, packs sealed but not yet closed) and the
        time (ns) of the oldest dedup hit not yet committed (younger than
        :data:`HIT_TTL_NS`), or None."""
        now = time.time_ns()
        with self._pending_lock:
            packs = {record.pack_no for record in self._pending.values()}
            stale = [cid for cid, t in self._hits.items() if now - t > HIT_TTL_NS]
            for cid in stale:
                del self._hits[cid]
            busy = min(self._hits.values()) if self._hits else None
        packs.update(self.writer.open_packs())
        return packs, busy

    def release_deleted(self) -> None:
        """Close read descriptors of packs GC deleted, so their space comes back (``ChunkBackend``)."""
        release = getattr(self.backend, "release_deleted", None)
        if release is not None:
            release()

    # -- reading ---------------------------------------------------------------

    def record(self, chunk_id: bytes, txn: lmdb.Transaction | None = None) -> ChunkRecord | None:
        """The index record of a chunk (pending ones included), or None."""
        if txn is not None:
            raw = txn.get(chunk_id, db=self._db)
        else:
            with self._env.begin(db=self._db) as rtxn:
                raw = rtxn.get(chunk_id)
        if raw is not None:
            return ChunkRecord.decode(raw)
        with self._pending_lock:
            return self._pending.get(chunk_id)

    def get(self, chunk_id: bytes, txn: lmdb.Transaction | None = None) -> bytes:
        """The bytes of a chunk. Raises :class:`Corrupt` if it is missing or
        damaged, or is a delta whose base is."""
        return self._get(chunk_id, txn, 0)

    def _get(self, chunk_id: bytes, txn: lmdb.Transaction | None, depth: int) -> bytes:
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        return self._load(chunk_id, txn, depth)

    def prefetch(self, chunk_ids: list[bytes]) -> None:
        """Ask the kernel to read ahead the pack ranges holding ``chunk_ids``
        (those not cached); cheap, asynchronous, never raises."""
        ranges: dict[int, list[int]] = {}
        with self._env.begin(db=self._db, buffers=True) as txn:
            for chunk_id in chunk_ids:
                if self.cache.contains(chunk_id):
                    continue
                raw = txn.get(chunk_id)
                if raw is None:
                    continue
                rec = ChunkRecord.decode(raw)
                span = ranges.setdefault(rec.pack_no, [rec.offset, rec.offset + rec.stored_len])
                span[0] = min(span[0], rec.offset)
                span[1] = max(span[1], rec.offset + rec.stored_len)
        for pack_no, (start, end) in ranges.items():
            self.reader.advise(pack_no, start, end - start)

    def _load(self, chunk_id: bytes, txn: lmdb.Transaction | None, depth: int = 0) -> bytes:
        record = self.record(chunk_id, txn)
        if record is None:
            raise Corrupt(f"chunk {to_hex(chunk_id)} is missing from the store")
        if record.refcount == 0:
            self.writer.flush()          # a pending chunk may still be in the writer's buffer
            self._check_pending(chunk_id, record)
        try:
            data = self._read_record(chunk_id, record, True, txn, depth)
        except Corrupt:
            # GC may have moved the chunk to another pack and deleted this one
            # (module docstring): read its location again, in a fresh transaction.
            fresh = self.record(chunk_id)
            if fresh is None or (fresh.pack_no, fresh.offset) == (record.pack_no, record.offset):
                raise
            data = self._read_record(chunk_id, fresh, True, None, depth)
        self.cache.put(chunk_id, data)
        return data

    def read_record(self, chunk_id: bytes, record: ChunkRecord, *, verify: bool = True,
                    txn: lmdb.Transaction | None = None) -> bytes:
        """Read and decode a chunk from its pack, bypassing the cache (a
        delta's base is read through it). Raises :class:`Corrupt`."""
        return self._read_record(chunk_id, record, verify, txn, 0)

    def _read_record(self, chunk_id: bytes, record: ChunkRecord, verify: bool, txn: lmdb.Transaction | None,
                     depth: int) -> bytes:
        payload = self.reader.read(ChunkLocation(record.pack_no, record.offset, record.stored_len))
        return self._decode(chunk_id, record, payload, verify, txn, depth)

    def decode_payload(self, chunk_id: bytes, record: ChunkRecord, payload: bytes,
                       txn: lmdb.Transaction | None = None) -> bytes:
        """Decode and verify (BLAKE3) a payload read for ``record``; a delta
        reads its base through the cache. Raises :class:`Corrupt`."""
        return self._decode(chunk_id, record, payload, True, txn, 0)

    def _decode(self, chunk_id: bytes, record: ChunkRecord, payload: bytes, verify: bool,
                txn: lmdb.Transaction | None, depth: int) -> bytes:
        base_data = None
        if record.codec == codec.CODEC_DELTA:
            if record.base is None or codec.delta_base(payload) != record.base:
                raise Corrupt(f"chunk {to_hex(chunk_id)} is a delta whose pack record names another base")
            if depth >= MAX_DELTA_DEPTH:
                raise Corrupt(f"chunk {to_hex(chunk_id)} is in a delta chain longer than {MAX_DELTA_DEPTH}")
            try:
                base_data = self._get(record.base, txn, depth + 1)
            except Corrupt as exc:
                raise DeltaBaseLost(f"chunk {to_hex(chunk_id)} is stored as a delta of chunk "
                                    f"{to_hex(record.base)[:16]}, which cannot be read ({exc})") from None
        return codec.decode(record.codec, payload, record.raw_len, chunk_id, verify=verify, base=base_data)

    def iter_index(self, txn: lmdb.Transaction) -> Iterable[tuple[bytes, ChunkRecord]]:
        """Every ``(chunk_id, record)`` of the index, in id order."""
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                yield bytes(key), ChunkRecord.decode(value)

    def close(self) -> None:
        """Sync and close the current pack, then close the backend. Idempotent."""
        self.writer.close()
        self.backend.close()


def _count(acc: list[int], record: ChunkRecord) -> None:
    """Add one chunk to ``[raw bytes, stored bytes, chunks]``."""
    acc[0] += record.raw_len
    acc[1] += record.stored_len
    acc[2] += 1


def _distinct_ids(content: ContentRecord) -> list[bytes]:
    ids = content.ids
    seen = {ids[i:i + ID_SIZE] for i in range(0, len(ids), ID_SIZE)}
    seen.discard(HOLE_ID)
    return sorted(seen)
