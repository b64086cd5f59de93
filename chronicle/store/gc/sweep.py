"""Sweep and compaction: free what no version uses, and give the disk space back.

**Sweep.** A content record whose refcount (inode records) is 0 is deleted
and gives back what it holds (``meta.nodes.release``): a flat record one
reference on each distinct chunk it lists, a tree root one on each node it
lists — a node whose refcount reaches 0 is deleted too and gives back its
children, down to the chunks of the leaves freed; a chunk at refcount 0 is
**dead**: still in the index and in its pack, no longer in the running
totals. Batches of :data:`~chronicle.store.gc.prune.BATCH_SECONDS`, each
record re-read in the batch's write transaction (a commit may have used the
content again).

The sweep runs in two passes, each in one key order, so that a batch's
commit rewrites a few adjacent B-tree leaves rather than one leaf per record
(content ids and chunk ids are hashes: a batch's chunks are spread over the
whole index, and every leaf a commit rewrites is a page that cannot be
reused until every process's recovery pin has passed that commit —
``meta.recovery``; beside a mounted store that made the metadata file grow
4x during a gc):

1. the contents, in content id order: each batch deletes its contents and
   writes their nodes, and **records** the chunk references they held in
   ``gc_drops`` (one record per batch, appended: key = batch number, value
   = the chunk ids and counts in id order, :func:`encode_drops`) instead of
   giving them back;
2. the chunk references recorded, merged over every record in chunk id
   order (``heapq.merge``), given back (``ChunkStore.drop_chunk_refs``) in
   batches; each batch's commit also writes how far it went (``meta`` key
   :data:`DROPS_DONE_KEY`: the last chunk id given back). Once all are
   given back, the records and the mark are deleted (the mark last).
   Pass 2 runs at the end, and also whenever pass 1 has recorded
   :data:`GIVE_BACK_EVERY` chunks (then pass 1 goes on): the records take
   pages of their own until pass 2 deletes them (36 bytes a chunk: 36 MB
   for a million), and a pass 2 over 131,072 chunks still rewrites each
   leaf of the index it touches about once.

Crash safety: a chunk's refcount counts its recorded references until they
are given back (fsck counts ``gc_drops`` entries past the mark as uses,
:func:`pending_drops`), so a store killed at any point is consistent. A
killed pass 1 leaves whole batches (their contents gone, their references
recorded); a killed pass 2 leaves the mark, and the next sweep first
finishes pass 2 (entries up to the mark are skipped: the mark is the
largest chunk id given back, so after the last batch every entry left is
at or below it) before it starts a new pass 1. A commit that re-uses a
chunk meanwhile adds to its refcount, which stays above the references
still owed.

**Compaction** is restic's ``prune`` repack (``internal/repository/prune.go``:
"repack the packs with unused blobs, copying the used blobs to new packs,
write the new index, then delete the old packs"), made online with leases
(``gc.leases``) instead of restic's exclusive lock:

1. list the packs, *then* read the leases; packs a live process may still
   put pending chunks in (its lease's ``packs``) are left alone — if one
   holds dead chunks, that process is first asked to seal it
   (``leases.request_rotation``) and, once its lease no longer names it,
   the packs, leases and index are read again;
2. a pack no index record points at (a crashed writer's, a killed GC's
   copy) is deleted;
3. a pack whose live fraction (bytes of chunks with refcount > 0, with
   their record headers, over its size) is below ``threshold`` is
   rewritten: its live chunks are read, verified (BLAKE3) and appended to a
   new pack, which is made durable; then, in short write transactions,
   each live chunk's record is pointed at its copy and each dead chunk's
   record deleted — re-reading each record: a dead chunk a commit revived
   meanwhile keeps the old pack for the next run;
4. the metadata is synced (``Store.sync``), and only then are the old
   packs deleted: a crash at any point leaves either the old records and
   the old pack, or the new records and both packs (the old one, with no
   index record left, goes at step 2 of the next run).

**Delta chunks** (``chunks.index``) are copied as they are stored (their
base is named by id, so either may move). A live delta holds its base live
(the sweep frees a base only when its last delta dies, ``drop_refs``
cascading). A dead delta record still needs its base's record while it
exists (a commit may revive it, and fsck decodes it), so: a dead base of a
dead delta that stays in the index is copied like a live chunk, and a dead
base whose dead deltas go in the same run is dropped only after them, once
every pack is rewritten (a crash in between leaves a dead base without
deltas, which the next run drops).

Dead records are only dropped (step 3) when the leases say no process may
still count on them (:func:`~chronicle.store.gc.leases.writers_settled`
since the end of the sweep); otherwise compaction of packs with dead chunks
is deferred to a later run and the result says why. Readers in other
processes whose pack went away re-read the chunk's location
(``ChunkStore.get``); their cached descriptors of deleted packs are closed
by ``ChunkStore.release_deleted`` (the daemon calls it every few seconds).

Threads: synchronous; the caller runs it off any event loop.
"""

from __future__ import annotations

import heapq
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chronicle.errors import Busy, Corrupt, NoSpace, NotFound
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, ID_SIZE
from chronicle.store.chunks.packs import PACK_HEADER, RECORD_HEADER, ChunkLocation, PackWriter, pack_name
from chronicle.store.gc.leases import leased_packs, read_leases, request_rotation, writers_settled
from chronicle.store.gc.prune import BATCH_SECONDS, Maintain, next_batch_size
from chronicle.store.meta import nodes, schema
from chronicle.store.meta.schema import ChunkRecord, ContentRecord, add_totals

if TYPE_CHECKING:
    from chronicle.store.store import Store

THRESHOLD = 0.5             # rewrite a pack when less than half of it is live
SETTLE_WAIT = 5.0           # seconds compaction waits for other processes' leases to show they are settled
ROTATE_WAIT = 12.0          # seconds it waits for another process to seal a pack with dead chunks (sync + lease)

GIVE_BACK_EVERY = 131_072   # pass 2 runs once pass 1 recorded this many chunks (4.5 MiB of records)
DROPS_DONE_KEY = b"gc_drops_done"   # in meta: the last chunk id whose recorded references were given back
_DROPS_TAG = b"\x01"
_DROP = struct.Struct(f">{ID_SIZE}sI")

Progress = Callable[[str, int, int], None]


def _no_progress(_phase: str, _done: int, _total: int) -> None:
    pass


def sweep(store: Store, progress: Progress = _no_progress) -> dict:
    """Delete contents at refcount 0 and give back their chunk references
    (module docstring: first what a killed sweep left recorded, then pass 1,
    then pass 2). Returns ``{"contents", "logical_bytes", "chunks", "bytes"
    (stored), "raw_bytes"}``: what it freed. ``progress(phase, done, total)``
    after each commit: ``"sweep"`` (contents) in pass 1, ``"sweep chunks"``
    (chunk references) in pass 2.

    Pass 1 as ``prune.prune``: a batch is gathered in a read transaction
    (:func:`_gather`: the contents still at 0, the node and chunk references
    they give back, summed per node and per chunk) and applied in a write
    transaction in key order if no commit came between; otherwise (a commit
    may have used a content again) the batch's contents are released one by
    one inside the write transaction, each re-read there."""
    dbs = store.dbs
    out = {"contents": 0, "logical_bytes": 0, "chunks": 0, "bytes": 0, "raw_bytes": 0}
    give_back(store, out, progress)               # what a killed sweep recorded and did not give back
    with store.env.begin() as txn:
        with txn.cursor(db=dbs["contents"]) as cur:
            garbage = [bytes(k) for k, v in cur if k != EMPTY_CONTENT_ID and schema.content_header(v, k)[1] == 0]
    size = _FIRST_BATCH
    maintain = Maintain(store)
    owed = 0
    i = 0
    while i < len(garbage):
        if owed >= GIVE_BACK_EVERY:
            give_back(store, out, progress)       # the records stay small: the file does not grow by them
            owed = 0
        end = min(len(garbage), i + size)
        with store.env.begin() as rtxn:
            snapshot = rtxn.id()
            work = _gather(rtxn, dbs, garbage[i:end])
        applied = False
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            if txn.id() == snapshot + 1:
                _apply(store, txn, work)
                done = (work.contents, work.logical_bytes)
                applied, n, i = True, end - i, end
                owed += len(work.chunk_drops)
            else:                 # a commit came between: re-read each content in this transaction
                i, done, recorded = _sweep_in(store, txn, garbage, i, end)
                owed += recorded
            add_totals(txn, dbs["meta"], logical_bytes=-done[1], contents=-done[0])
            out["contents"] += done[0]
            out["logical_bytes"] += done[1]
            store.before_commit()
        if applied:               # the writer lock was held for the writes and the commit
            size = next_batch_size(size, n, time.monotonic() - start)
        store.note_commit()
        maintain()                  # syncs when due: the pin moves on, freed pages are reused
        progress("sweep", i, len(garbage))
    give_back(store, out, progress)
    return out


def encode_drops(drops: Mapping[bytes, int]) -> bytes:
    """A ``gc_drops`` value: the tag byte ``0x01``, then per chunk, in id
    order, its 32-byte id and the references to give back (u32 big-endian).
    Raises ``ValueError`` for a count outside 1..2**32-1."""
    bad = [n for n in drops.values() if not 0 < n < 1 << 32]
    if bad:
        raise ValueError(f"a recorded chunk reference count must be 1..2**32-1, not {bad[0]}")
    return _DROPS_TAG + b"".join([_DROP.pack(chunk_id, n) for chunk_id, n in sorted(drops.items())])


def decode_drops(raw: bytes) -> Iterator[tuple[bytes, int]]:
    """The ``(chunk id, count)`` entries of a ``gc_drops`` value, in id order
    (:func:`encode_drops`). Raises ``Corrupt`` for a value of another form."""
    raw = bytes(raw)
    if raw[:1] != _DROPS_TAG or (len(raw) - 1) % _DROP.size:
        raise Corrupt(f"a gc_drops record has an unknown form ({len(raw)} bytes, tag {raw[:1].hex() or 'none'})")
    return _DROP.iter_unpack(memoryview(raw)[1:])


def pending_drops(txn, dbs: dict) -> dict[bytes, int]:
    """The chunk references the sweep recorded and has not given back yet
    (module docstring), read in ``txn``: chunk id -> count. Each is a use of
    its chunk as far as refcounts go (fsck, the dry run). Raises ``Corrupt``
    for a damaged record."""
    done = txn.get(DROPS_DONE_KEY, db=dbs["meta"])
    done = bytes(done) if done is not None else b""
    owed: dict[bytes, int] = {}
    with txn.cursor(db=dbs["gc_drops"]) as cur:
        for _key, raw in cur:
            for chunk_id, n in decode_drops(raw):
                if chunk_id > done:
                    owed[chunk_id] = owed.get(chunk_id, 0) + n
    return owed


def _record_drops(txn, dbs: dict, drops: Mapping[bytes, int]) -> None:
    """Append one ``gc_drops`` record of ``drops`` (none if empty), in ``txn``."""
    if not drops:
        return
    with txn.cursor(db=dbs["gc_drops"]) as cur:
        last = schema.U64.unpack(cur.key())[0] if cur.last() else 0
    txn.put(schema.U64.pack(last + 1), encode_drops(drops), db=dbs["gc_drops"], append=True)


def _merged(records: list[tuple[bytes, bytes]], done: bytes) -> Iterator[tuple[bytes, int]]:
    """Every chunk id past ``done`` in the ``gc_drops`` values of ``records``,
    in id order, with its counts summed over them (``heapq.merge`` of the
    sorted values)."""
    last, total = None, 0
    for chunk_id, n in heapq.merge(*(decode_drops(raw) for _k, raw in records)):
        if chunk_id == last:
            total += n
            continue
        if last is not None and last > done:
            yield last, total
        last, total = chunk_id, n
    if last is not None and last > done:
        yield last, total


def give_back(store: Store, out: dict, progress: Progress = _no_progress) -> None:
    """Pass 2 (module docstring): give back every recorded chunk reference,
    in chunk id order, in batches of :data:`BATCH_SECONDS`, then delete the
    records; adds what died to ``out`` (``"chunks"``, ``"bytes"``,
    ``"raw_bytes"``). Raises ``Corrupt`` for a damaged record or a refcount
    that would go negative."""
    dbs = store.dbs
    with store.env.begin() as txn:             # copied out: no snapshot is held while the batches commit
        records = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=dbs["gc_drops"])]
        done = txn.get(DROPS_DONE_KEY, db=dbs["meta"])
        done = bytes(done) if done is not None else b""
    if not records:
        return
    todo = _merged(records, done)
    total = sum((len(raw) - 1) // _DROP.size for _k, raw in records)
    maintain = Maintain(store)
    entry = next(todo, None)
    given = 0
    while entry is not None:
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            batch: dict[bytes, int] = {}
            while entry is not None and (not batch or len(batch) % _CLOCK_EVERY
                                         or time.monotonic() - start < _GIVE_BACK_SECONDS):
                batch[entry[0]] = entry[1]
                entry = next(todo, None)
            totals: dict[str, int] = {}
            store.chunks.drop_chunk_refs(txn, batch, totals)     # in id order: adjacent leaves
            txn.put(DROPS_DONE_KEY, max(batch), db=dbs["meta"])
            if totals:
                add_totals(txn, dbs["meta"], **totals)
            store.before_commit()
        store.note_commit()
        out["chunks"] -= totals.get("chunks", 0)
        out["bytes"] -= totals.get("stored_bytes", 0)
        out["raw_bytes"] -= totals.get("unique_bytes", 0)
        given += len(batch)
        maintain()
        progress("sweep chunks", given, total)
    i = 0
    while i < len(records):                     # all given back: the records go, the mark with the last
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            first = i
            while i < len(records) and (i == first or time.monotonic() - start < _GIVE_BACK_SECONDS):
                txn.delete(records[i][0], db=dbs["gc_drops"])
                i += 1
            if i == len(records):
                txn.delete(DROPS_DONE_KEY, db=dbs["meta"])
            store.before_commit()
        store.note_commit()
        maintain()
        progress("sweep chunks", total, total)


@dataclass(slots=True)
class _SweepWork:
    """A gathered sweep batch: the contents to delete, the nodes' new
    values (None: deleted), the chunk references to drop, the figures."""

    contents: int = 0
    logical_bytes: int = 0
    deletes: list[bytes] = field(default_factory=list)
    nodes: dict[bytes, bytes | None] = field(default_factory=dict)
    chunk_drops: dict[bytes, int] = field(default_factory=dict)


def _gather(txn, dbs: dict, ids: list[bytes]) -> _SweepWork:
    """What releasing the contents ``ids`` still at refcount 0 writes, read
    in ``txn``: ``meta.nodes.releases`` over them (a node freed once its last
    holder among them and before goes, and then its children)."""
    work = _SweepWork()
    records: list[ContentRecord] = []
    for content_id in ids:
        raw = txn.get(content_id, db=dbs["contents"])
        if raw is None or schema.content_header(raw, content_id)[1] != 0:
            continue              # used again since the scan
        record = ContentRecord.decode(raw, content_id)
        records.append(record)
        work.deletes.append(content_id)
        work.contents += 1
        work.logical_bytes += record.size
    drops, stored = nodes.releases(txn, dbs["content_nodes"], records, work.chunk_drops)
    for key, n in drops.items():
        left = schema.node_refcount(stored[key]) - n
        work.nodes[key] = schema.node_with_refcount(stored[key], left) if left else None
    return work


def _apply(store: Store, txn, work: _SweepWork) -> None:
    """Write a gathered batch, each database's changes in key order; its
    chunk references are recorded (:func:`_record_drops`), given back later."""
    dbs = store.dbs
    with txn.cursor(db=dbs["contents"]) as cur:
        for content_id in sorted(work.deletes):
            if cur.set_key(content_id):
                cur.delete()
    with txn.cursor(db=dbs["content_nodes"]) as cur:
        for key, value in sorted(work.nodes.items()):
            if value is not None:
                cur.put(key, value)
            elif cur.set_key(key):
                cur.delete()
    _record_drops(txn, dbs, work.chunk_drops)


def _sweep_in(store: Store, txn, garbage: list[bytes], i: int, end: int) -> tuple[int, tuple[int, int], int]:
    """Release ``garbage[i:end]`` one by one in the write transaction
    ``txn``, re-reading each content, until :data:`BATCH_SECONDS` pass;
    returns the index of the first not done, (contents, logical bytes) freed
    and how many chunks' references it recorded."""
    dbs = store.dbs
    start = time.monotonic()
    contents = logical = 0
    drops: dict[bytes, int] = {}
    while i < end and time.monotonic() - start < BATCH_SECONDS:
        content_id = garbage[i]
        i += 1
        raw = txn.get(content_id, db=dbs["contents"])
        if raw is None or schema.content_header(raw, content_id)[1] != 0:
            continue              # used again since the scan
        record = ContentRecord.decode(raw, content_id)
        held, _freed_nodes = nodes.release(txn, dbs["content_nodes"], record)    # root -> nodes -> chunks
        for chunk_id, n in held.items():
            drops[chunk_id] = drops.get(chunk_id, 0) + n
        txn.delete(content_id, db=dbs["contents"])
        logical += record.size
        contents += 1
    _record_drops(txn, dbs, drops)
    return i, (contents, logical), len(drops)


_FIRST_BATCH = 256            # contents gathered for the first batch (then adapted, as prune's)
_CLOCK_EVERY = 64             # pass 2 reads the clock every this many chunks
_GIVE_BACK_SECONDS = BATCH_SECONDS      # pass 2's batches (at least one chunk, or one record deleted)


@dataclass(slots=True)
class _PackUse:
    live: list[tuple[bytes, ChunkRecord]] = field(default_factory=list)
    dead: list[bytes] = field(default_factory=list)
    live_bytes: int = PACK_HEADER.size


def settle(store: Store, since_ns: int, wait: float) -> str | None:
    """Wait up to ``wait`` seconds until no process may count on a chunk
    that died before ``since_ns`` (``leases.writers_settled``, and this
    process's own uncommitted dedup hits). None when settled, else why not."""
    deadline = time.monotonic() + wait
    while True:
        _packs, busy = store.chunks.lease_state()
        reason = None
        if busy is not None and busy <= since_ns:
            reason = "this process has uncommitted writes from before gc's sweep"
        reason = reason or writers_settled(read_leases(store.run_dir, exclude_pid=os.getpid()), since_ns)
        if reason is None or time.monotonic() >= deadline:
            return reason
        time.sleep(0.1)


def _survey(store: Store, swept_ns: int, wait: float) -> tuple[dict[int, int], str | None, dict[int, _PackUse],
                                                              dict[bytes, tuple[bytes, int]], dict[bytes, int]]:
    """``(pack sizes, why dead chunks must stay or None, use per pack, dead delta -> (base, pack), dead chunk -> pack)``:
    first the packs, then the leases (module docstring), then the index."""
    sizes = store.chunks.reader.list_packs()
    deferred = settle(store, swept_ns, wait)
    use: dict[int, _PackUse] = {}
    dead_deltas: dict[bytes, tuple[bytes, int]] = {}      # dead delta id -> (base id, its pack)
    dead_at: dict[bytes, int] = {}                        # dead chunk id -> its pack
    with store.env.begin() as txn:
        for chunk_id, record in store.chunks.iter_index(txn):
            pack = use.setdefault(record.pack_no, _PackUse())
            if record.refcount:
                pack.live.append((chunk_id, record))
                pack.live_bytes += RECORD_HEADER.size + record.stored_len
            else:
                pack.dead.append(chunk_id)
                dead_at[chunk_id] = record.pack_no
                if record.base is not None:
                    dead_deltas[chunk_id] = (record.base, record.pack_no)
    return sizes, deferred, use, dead_deltas, dead_at


def _rotate(store: Store, packs: set[int], wait: float) -> bool:
    """Ask the processes writing ``packs`` to seal them (``leases.request_rotation``)
    and wait up to ``wait`` s until no lease names them. True if none does."""
    request_rotation(store.run_dir, packs)
    deadline = time.monotonic() + wait
    while True:
        left = packs & leased_packs(read_leases(store.run_dir, exclude_pid=os.getpid()))
        if not left or time.monotonic() >= deadline:
            return not left
        time.sleep(0.2)


def compact(store: Store, swept_ns: int, *, threshold: float = THRESHOLD, wait: float = SETTLE_WAIT,
            progress: Progress = _no_progress, rotate_wait: float = ROTATE_WAIT) -> dict:
    """Rewrite packs whose live fraction is below ``threshold`` and delete
    packs nothing uses (module docstring). ``swept_ns``: when the sweep
    ended (dead chunks died before it). A pack another process is still
    writing that holds dead chunks is first sealed by that process
    (``leases.request_rotation``; up to ``rotate_wait`` s: its next sync and
    lease refresh), else left for a later run. Returns ``{"packs_deleted",
    "packs_written", "bytes_deleted", "bytes_written", "reclaimed_bytes",
    "deferred": why dead chunks were kept, or None}``."""
    out = {"packs_deleted": 0, "packs_written": 0, "bytes_deleted": 0, "bytes_written": 0, "deferred": None}
    sizes, deferred, use, dead_deltas, dead_at = _survey(store, swept_ns, wait)
    others = leased_packs(read_leases(store.run_dir, exclude_pid=os.getpid()))
    wanted = {p for p in others if p in use and use[p].dead}
    if wanted and deferred is not None:
        out["deferred"] = deferred                    # another process's pack holds dead chunks it may count on
    if wanted and deferred is None and _rotate(store, wanted, rotate_wait):
        sizes, deferred, use, dead_deltas, dead_at = _survey(store, swept_ns, wait)   # sealed and indexed now
    if any(use.get(p) is not None and use[p].dead for p in store.chunks.writer.open_packs()):
        store.chunks.writer.rotate()                  # our own pack being written holds dead chunks
        store.chunks.sync()
    own_packs, _busy = store.chunks.lease_state()
    protected = leased_packs(read_leases(store.run_dir, exclude_pid=os.getpid())) | own_packs
    doomed, rewrite = [], []
    for pack_no, size in sizes.items():
        if pack_no in protected:
            continue
        pack = use.get(pack_no)
        if pack is None:
            doomed.append(pack_no)                    # nothing in the index points into it
        elif pack.dead and deferred is None and (not pack.live or pack.live_bytes < threshold * size):
            rewrite.append(pack_no)
    if any(use[p].dead for p in use if p in sizes and p not in protected) and deferred is not None:
        out["deferred"] = deferred
    late = _hold_dead_bases(store, use, dead_deltas, dead_at, set(rewrite))
    for pack_no in doomed:
        _delete(store, pack_no, sizes[pack_no], out)
    rewrite.sort(key=lambda p: use[p].live_bytes)     # fully dead packs first: no space needed to free them
    keep: set[int] = set()
    writer = PackWriter(store.chunks.backend)
    try:
        for n, pack_no in enumerate(rewrite):
            try:
                moved = _copy_live(store, writer, use[pack_no].live)
            except NoSpace:
                keep.update(rewrite[n:])              # no room for the copies: the fully dead ones went first
                break
            if not _repoint(store, moved, [c for c in use[pack_no].dead if c not in late]):
                keep.add(pack_no)
            progress("compact", n + 1, len(rewrite))
    finally:
        writer.close()
    keep.update(_forget_late(store, late, dead_at, keep))
    for pack_no in writer.created:
        try:
            out["bytes_written"] += store.chunks.backend.size(pack_name(pack_no))
            out["packs_written"] += 1
        except NotFound:
            pass
    gone = [p for p in rewrite if p not in keep]
    if gone:
        store.sync()                                  # the new records are durable before the old packs go
        for pack_no in gone:
            _delete(store, pack_no, sizes[pack_no], out)
    store.chunks.backend.sync()
    store.chunks.release_deleted()
    out["reclaimed_bytes"] = out["bytes_deleted"] - out["bytes_written"]
    return out


def _hold_dead_bases(store: Store, use: dict[int, _PackUse], dead_deltas: dict[bytes, tuple[bytes, int]],
                     dead_at: dict[bytes, int], rewrite: set[int]) -> dict[bytes, list[bytes]]:
    """Delta bases among the dead chunks of the packs to ``rewrite`` (module
    docstring): a base of a dead delta that stays in the index (its pack is
    not rewritten) is moved to its pack's live list, to be copied, and so
    on down its chain; returns the others — ``{base: its dead deltas}``,
    dropped after them (:func:`_forget_late`)."""
    held: set[bytes] = set()
    staying = [d for d, (_b, pack_no) in dead_deltas.items() if pack_no not in rewrite]
    while staying:
        delta = staying.pop()
        base = dead_deltas[delta][0]
        if base in held or base not in dead_at:
            continue                                  # live (not dead), or held already
        held.add(base)
        if dead_at[base] in rewrite:
            pack = use[dead_at[base]]
            record = store.chunks.record(base)
            if record is not None and record.refcount == 0:
                pack.dead.remove(base)
                pack.live.append((base, record))
                pack.live_bytes += RECORD_HEADER.size + record.stored_len
        if base in dead_deltas:
            staying.append(base)                      # a held base that is a delta holds its own base
    late: dict[bytes, list[bytes]] = {}
    for delta, (base, pack_no) in dead_deltas.items():
        if pack_no in rewrite and delta not in held and base in dead_at and base not in held \
                and dead_at[base] in rewrite:
            late.setdefault(base, []).append(delta)
    return late


def _forget_late(store: Store, late: dict[bytes, list[bytes]], dead_at: dict[bytes, int],
                 keep: set[int]) -> set[int]:
    """Drop the dead bases held back by :func:`_hold_dead_bases`, each after
    every delta of it (deepest chains' ends first), if those are gone from
    the index and it is still dead; returns the packs of those that stay."""
    def height(base: bytes) -> int:
        return 1 + max((height(d) for d in late.get(base, ()) if d in late), default=0)

    stay: set[int] = set()
    db = store.dbs["chunks"]
    order = [b for b in sorted(late, key=height) if dead_at[b] not in keep]
    maintain = Maintain(store)
    i = 0
    while i < len(order):
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            while i < len(order) and time.monotonic() - start < BATCH_SECONDS:
                base = order[i]
                i += 1
                raw = txn.get(base, db=db)
                if raw is None:
                    continue
                if ChunkRecord.decode(raw).refcount or any(txn.get(d, db=db) is not None for d in late[base]):
                    stay.add(dead_at[base])           # revived, or a delta of it stayed: the pack stays
                else:
                    store.chunks.forget(txn, base)
            store.before_commit()
        store.note_commit()
        maintain()
    return stay


def _delete(store: Store, pack_no: int, size: int, out: dict) -> None:
    try:
        store.chunks.backend.delete(pack_name(pack_no))
    except Busy:
        return                                        # being written after all (our own writer)
    out["packs_deleted"] += 1
    out["bytes_deleted"] += size


def _copy_live(store: Store, writer: PackWriter, live: list[tuple[bytes, ChunkRecord]]) -> list[tuple[bytes, ChunkRecord, ChunkLocation]]:
    """Copy each live chunk, verified, into ``writer``'s packs; flushed on return."""
    moved = []
    for chunk_id, record in live:
        payload = store.chunks.reader.read(ChunkLocation(record.pack_no, record.offset, record.stored_len))
        store.chunks.decode_payload(chunk_id, record, payload)    # verified; a delta decodes against its base
        location = writer.append(chunk_id, record.codec, record.raw_len, payload)
        moved.append((chunk_id, record, location))
    writer.sync()                                     # the copies are durable before any record points at them
    for _chunk_id, _record, location in moved:
        writer.check(location)
    return moved


def _repoint(store: Store, moved: list[tuple[bytes, ChunkRecord, ChunkLocation]], dead: list[bytes]) -> bool:
    """Point moved chunks at their copies and drop the dead records, in short
    write transactions; False if a dead chunk was revived (keep the pack)."""
    items: list[tuple[bytes, ChunkRecord | None, ChunkLocation | None]] = [(c, r, loc) for c, r, loc in moved]
    items += [(c, None, None) for c in dead]
    items.sort(key=lambda item: item[0])          # key order: a batch dirties adjacent leaves, not one per record
    ok = True
    db = store.dbs["chunks"]
    maintain = Maintain(store)
    i = 0
    while i < len(items):
        with store.env.begin(write=True) as txn, txn.cursor(db=db) as cur:
            start = time.monotonic()
            while i < len(items) and time.monotonic() - start < BATCH_SECONDS:
                chunk_id, old, location = items[i]
                i += 1
                if not cur.set_key(chunk_id):
                    continue
                now = ChunkRecord.decode(cur.value())     # read once: the cursor is on it for the write
                if old is None:
                    if now.refcount:
                        ok = False            # revived since the scan: its bytes stay where they are
                    else:
                        cur.delete()          # (ChunkStore.forget, without looking it up again)
                elif (now.pack_no, now.offset) == (old.pack_no, old.offset):
                    now.pack_no, now.offset, now.stored_len = location.pack_no, location.offset, location.stored_len
                    cur.put(chunk_id, now.encode())     # (ChunkStore.relocate, keeping the refcount read here)
            store.before_commit()
        store.note_commit()
        maintain()                # syncs when due or the file grew: the pin moves on, freed pages are reused
    return ok
