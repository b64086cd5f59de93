"""The chunk store: put and get chunks by id, once per store.

Vocabulary: a **chunk** is a piece of file content cut by CDC, named by the
BLAKE3 of its bytes (its **chunk id**). The **chunk index** (LMDB ``chunks``)
maps a chunk id to its pack location and **refcount** (how many content
records use it). A chunk written to a pack but not yet in the index is
**pending**: the transaction that records the version using it inserts it.

Writing (:meth:`ChunkStore.put`) happens outside any LMDB write transaction,
usually in a worker thread: hash, dedup check, compress, append to a pack.
The metadata transaction then calls :meth:`ChunkStore.add_refs` with the new
content record, which turns pending chunks into index entries. Before that
transaction commits, :meth:`ChunkStore.flush` hands pack data to the kernel, so
metadata never refers to chunk bytes a killed process had only buffered.

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

    def put(self, chunk_id: bytes, data: bytes | memoryview, *, compress: bool = True) -> int | None:
        """Store ``data`` under ``chunk_id`` unless the store has it already.

        ``data`` must stay unchanged until the next :meth:`flush` (it may be
        written from the caller's buffer). ``compress=False`` stores it raw
        without trying zstd. Returns the codec of the newly written record,
        or None if the store had the chunk already. Raises ``NoSpace`` on a full disk.
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
        if compress:
            codec_id, payload = codec.encode(data, self._level)
        else:
            codec_id, payload = codec.CODEC_RAW, data
        location = self.writer.append(chunk_id, codec_id, len(data), payload)
        record = ChunkRecord(location.pack_no, location.offset, location.stored_len, len(data), codec_id, 0)
        with self._pending_lock:
            if self._pending.get(chunk_id, lost) is not lost:
                return None       # another thread won the race; our copy is unreferenced pack space
            self._pending[chunk_id] = record       # replaces a copy a write error lost
        return codec_id

    def flush(self) -> None:
        """Hand written chunk data to the kernel (call before committing metadata)."""
        self.writer.flush()

    def sync(self) -> None:
        """Make written chunk data durable: this process's packs and (on a
        local store) those of every other process writing to it
        (``PackWriter.sync``, ``ChunkBackend.sync``). Raises ``NoSpace``."""
        self.writer.sync()

    def add_refs(self, txn: lmdb.Transaction, content: ContentRecord) -> list[bytes]:
        """Count one more reference from a flat ``content`` to each distinct chunk it uses
        (see :meth:`add_chunk_refs`)."""
        return self.add_chunk_refs(txn, dict.fromkeys(_distinct_ids(content), 1))

    def add_chunk_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int]) -> list[bytes]:
        """Add ``counts[id]`` references to each chunk (a content's new holders:
        ``meta.nodes.reference``).

        Runs inside the caller's write transaction; pending chunks become index
        entries, and their ids are returned: pass them to :meth:`committed` once
        the transaction has committed. Raises :class:`Corrupt` for a chunk that
        is neither indexed nor pending.
        """
        inserted = []
        new_raw = new_stored = counted = 0
        revived = False
        for chunk_id in sorted(counts):
            raw = txn.get(chunk_id, db=self._db)
            with self._pending_lock:
                pending = self._pending.get(chunk_id)
                self._hits.pop(chunk_id, None)
            record = ChunkRecord.decode(raw) if raw is not None else None
            if record is not None and record.refcount == 0:
                # a dead chunk comes back: its fresh copy if there is one, else its old record
                if pending is not None and not self._lost(pending):
                    record = None
                else:
                    new_raw += record.raw_len
                    new_stored += record.stored_len
                    revived = True
            if record is None:
                if pending is None:
                    raise Corrupt(f"chunk {to_hex(chunk_id)} is referenced but was never stored")
                self._check_pending(chunk_id, pending)
                record = ChunkRecord(pending.pack_no, pending.offset, pending.stored_len, pending.raw_len,
                                     pending.codec, 0)
                inserted.append(chunk_id)
                new_raw += record.raw_len
                new_stored += record.stored_len
                revived = True
            record.refcount += counts[chunk_id]
            txn.put(chunk_id, record.encode(), db=self._db)
            if revived:
                counted += 1
            revived = False
        if counted and self._meta_db is not None:
            add_totals(txn, self._meta_db, unique_bytes=new_raw, stored_bytes=new_stored, chunks=counted)
        return inserted

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

    def drop_refs(self, txn: lmdb.Transaction, content: ContentRecord,
                  totals: dict[str, int] | None = None) -> list[bytes]:
        """Undo :meth:`add_refs` for a flat ``content`` (see :meth:`drop_chunk_refs`)."""
        return self.drop_chunk_refs(txn, dict.fromkeys(_distinct_ids(content), 1), totals)

    def drop_chunk_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int],
                        totals: dict[str, int] | None = None) -> list[bytes]:
        """Drop ``counts[id]`` references from each chunk (GC's sweep, via
        ``meta.nodes.release``); returns the ids
        whose refcount reached 0 (dead: the running totals count them no more).
        With ``totals`` the running-total deltas are added to that dict
        (name -> delta) for the caller to write once per transaction
        (``add_totals``) instead of being written here."""
        freed = []
        gone_raw = gone_stored = 0
        for chunk_id in sorted(counts):
            raw = txn.get(chunk_id, db=self._db)
            if raw is None:
                raise Corrupt(f"chunk {to_hex(chunk_id)} is referenced but missing from the index")
            record = ChunkRecord.decode(raw)
            record.refcount -= counts[chunk_id]
            if record.refcount < 0:
                raise Corrupt(f"chunk {to_hex(chunk_id)} has a negative refcount")
            txn.put(chunk_id, record.encode(), db=self._db)
            if record.refcount == 0:
                freed.append(chunk_id)
                gone_raw += record.raw_len
                gone_stored += record.stored_len
        if freed and totals is not None:
            for name, delta in (("unique_bytes", -gone_raw), ("stored_bytes", -gone_stored), ("chunks", -len(freed))):
                totals[name] = totals.get(name, 0) + delta
        elif freed and self._meta_db is not None:
            add_totals(txn, self._meta_db, unique_bytes=-gone_raw, stored_bytes=-gone_stored, chunks=-len(freed))
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
                codec.decode(record.codec, payload, record.raw_len, chunk_id, verify=True)
            except Corrupt:
                continue              # the caller's buffer changed since: that chunk stays lost
            new = self.writer.append(chunk_id, record.codec, record.raw_len, payload)
            with self._pending_lock:
                if self._pending.get(chunk_id) is record:
                    self._pending[chunk_id] = ChunkRecord(new.pack_no, new.offset, new.stored_len, record.raw_len,
                                                          record.codec, 0)
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
        """The bytes of a chunk. Raises :class:`Corrupt` if it is missing or damaged."""
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        return self._load(chunk_id, txn)

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

    def _load(self, chunk_id: bytes, txn: lmdb.Transaction | None) -> bytes:
        record = self.record(chunk_id, txn)
        if record is None:
            raise Corrupt(f"chunk {to_hex(chunk_id)} is missing from the store")
        if record.refcount == 0:
            self.writer.flush()          # a pending chunk may still be in the writer's buffer
            self._check_pending(chunk_id, record)
        try:
            data = self.read_record(chunk_id, record)
        except Corrupt:
            # GC may have moved the chunk to another pack and deleted this one
            # (module docstring): read its location again, in a fresh transaction.
            fresh = self.record(chunk_id)
            if fresh is None or (fresh.pack_no, fresh.offset) == (record.pack_no, record.offset):
                raise
            data = self.read_record(chunk_id, fresh)
        self.cache.put(chunk_id, data)
        return data

    def read_record(self, chunk_id: bytes, record: ChunkRecord, *, verify: bool = True) -> bytes:
        """Read and decode a chunk from its pack, bypassing the cache."""
        payload = self.reader.read(ChunkLocation(record.pack_no, record.offset, record.stored_len))
        return codec.decode(record.codec, payload, record.raw_len, chunk_id, verify=verify)

    def iter_index(self, txn: lmdb.Transaction) -> Iterable[tuple[bytes, ChunkRecord]]:
        """Every ``(chunk_id, record)`` of the index, in id order."""
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                yield bytes(key), ChunkRecord.decode(value)

    def close(self) -> None:
        """Sync and close the current pack, then close the backend. Idempotent."""
        self.writer.close()
        self.backend.close()


def _distinct_ids(content: ContentRecord) -> list[bytes]:
    ids = content.ids
    seen = {ids[i:i + ID_SIZE] for i in range(0, len(ids), ID_SIZE)}
    seen.discard(HOLE_ID)
    return sorted(seen)
