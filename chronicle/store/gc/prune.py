"""Prune: drop the versions a policy no longer keeps, in short write transactions.

A **candidate** is a version :func:`~chronicle.store.gc.policy.select`
dropped: a path entry ``(path, seq)`` flagged ``P_BUMPS | P_CONTENT`` with its
inode and content. Pruning it changes records, never removes a seq:

- the inode records that carry the dropped content — the record written at
  the version's seq and the newer records of the same inode with the same
  content while it stays at that path (a chmod, a utimens: their path
  entries are marked too) — get the content :data:`PRUNED_ID`, and each
  gives back its reference on the content (``contents`` refcount), unless
  a **pin** or a version the policy keeps (:class:`Keep`) falls in the seq
  range where that record is the inode's state (``[its seq, the next
  record's seq)``; the inode's newest record is the head's and is never
  touched, unless the file was deleted: :class:`DeadRecord`). So no tree
  at any seq shows content that was not there: a pruned record reads as
  :class:`~chronicle.errors.Pruned` (``ENODATA`` in the mount), a pinned
  tree reads as before. Empty versions are pruned like others (the empty
  content has no refcount);
- the path entry keeps its seq and version number (later numbers do not
  move) and becomes a **pruned mark**: flag ``P_PRUNED``, no content, its
  JSON without ``hash`` and with ``"pruned": true`` — what
  ``.chronicle/query``, ``chronicle log <path>`` and ``versions`` show;
- the event's ``.chronicle/log`` line loses its ``hash`` and gains
  ``"pruned": true`` (the log keeps one line per seq: times still bisect).

Files with more than one link are left alone (another name may keep them).

**Transactions.** Candidates are pruned in batches; a batch is gathered
in a read transaction (the checks and the new bytes of every record) and
applied in one write transaction, each database's puts in key order, that
holds LMDB's single writer (shared with the daemon's FUSE loop) about
:data:`BATCH_SECONDS`, commit included (:func:`next_batch_size`). The
gathered puts are applied only if no commit came between the two
transactions; otherwise the write transaction checks the candidates again
itself (:func:`prune`). Each batch re-reads the pins (leases of open
``at/`` handles come and go), so a killed GC leaves whole batches, and the
next run skips what is done: pruning is idempotent. A batch's log lines
are not marked in its transaction: a path's events are spread over the
whole ``events`` database (one leaf page dirtied per line), so the batch
records them as **pending marks** (``gc_marks``, committed with the inode
records) and :func:`finish_marks` marks them once every batch is done, in
``events`` key order; a killed GC leaves the records, and the next one
(``collect``, before it plans) marks what is left. Until then a pruned
version's log line still shows its hash. Pages a commit frees
are reused only once every reader older than it is gone (``Store.sync``
moves this process's pin on): gc syncs once the metadata file grew
:data:`SYNC_GROWTH_PAGES` pages (:class:`Maintain`).

:func:`records_to_prune` and :func:`dead_record_goes` are pure reading,
shared with the dry run (``dryrun``, which replays the candidates in GC's
order), so the dry run promises what GC prunes and frees.

Threads: synchronous; each function takes the caller's transaction or opens its own.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb
import msgpack

from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, ID_SIZE, PRUNED_ID
from chronicle.store.gc.leases import never_drop
from chronicle.store.meta import events, schema
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, P_HASH_CUT, P_PRUNED, PathEntry
from chronicle.store.model import Attrs, inode_content_nlink, inode_with_content

if TYPE_CHECKING:
    from chronicle.store.store import Store

BATCH_SECONDS = 0.010     # at most this long in one write transaction (then commit and go on)

SYNC_GROWTH_PAGES = 1024  # gc syncs (its pin moves on) once the metadata file grew this many pages since

DropDeleted = Callable[[int, int, int], bool]     # (ws, ino, deleted ns) -> may its last record go


@dataclass(frozen=True, slots=True)
class Candidate:
    """A dropped version: workspace, path, seq, inode, content and size (bytes) of its entry."""

    ws: int
    path: bytes
    seq: int
    ino: int
    content: bytes
    size: int = 0


@dataclass(slots=True)
class PruneResult:
    """What a prune did: versions marked pruned, inode records rewritten,
    content references given back, candidates left as they were."""

    versions: int = 0
    records: int = 0
    released: int = 0
    skipped: int = 0
    kept_back: dict[int, list[int]] = field(default_factory=dict)    # ws -> [versions, bytes] skipped

    def as_dict(self) -> dict:
        return {"versions": self.versions, "records": self.records, "released": self.released,
                "skipped": self.skipped}


@dataclass(slots=True)
class Keep:
    """What pruning leaves alone: ``pins``, each workspace's pinned seqs
    (sorted); ``held``, per (workspace, inode), the seqs of the versions the
    policy keeps (sorted: the inode record current at each stays, whichever
    path it had); ``may_drop(ws, ino, deleted ns)``, whether a deleted file's
    last record may go (``leases.DeletedFiles.may_drop``; default: never)."""

    pins: dict[int, list[int]]
    held: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    may_drop: DropDeleted = never_drop


def records_to_prune(txn: lmdb.Transaction, dbs: dict, cand: Candidate, keep: Keep,
                     rewritten: set[bytes] | None = None) -> list[tuple[bytes, Attrs]] | None:
    """The inode records pruning ``cand`` rewrites (module docstring), oldest
    first; ``[]`` if only its path entry is marked (an earlier candidate's
    records reached its own); None if GC leaves it alone: already pruned,
    changed, more than one link, its own record pinned, held or the head's.
    ``rewritten``: inode keys to take as already rewritten (the dry run
    replays the candidates in order; it adds what this one rewrites)."""
    keys = keys_to_prune(txn, dbs, cand, keep, rewritten)
    if keys is None:
        return None
    return [(key, Attrs.decode(txn.get(key, db=dbs["inodes"]))) for key in keys]


def keys_to_prune(txn: lmdb.Transaction, dbs: dict, cand: Candidate, keep: Keep,
                  rewritten: set[bytes] | None = None) -> list[bytes] | None:
    """The keys of :func:`records_to_prune`'s records, undecoded (what the dry
    run counts; it reads a million of them)."""
    with txn.cursor(db=dbs["inodes"]) as cur:
        found = _check(txn, dbs, cur, cand, keep, rewritten)
    if found is None:
        return None
    keys = [key for key, _raw in found.records]
    if rewritten is not None:
        rewritten.update(keys)
    return keys


def _check(txn: lmdb.Transaction, dbs: dict, cur: lmdb.Cursor, cand: Candidate, keep: Keep,
           rewritten: set[bytes] | None = None) -> _Found | None:
    """What pruning ``cand`` rewrites (:func:`records_to_prune`, undecoded),
    or None if nothing: the records start with ``cand``'s own. ``cur``: a
    cursor of ``txn`` on ``inodes`` (any position).

    The records followed are those of the same inode holding the same
    content, while its path stays: at each, the path's entry at that seq is
    a new version (the same bytes written again) or a continuation (chmod,
    utimens, xattr: a ``P_CONTENT`` entry without ``P_BUMPS``, marked with
    the version); where the path has no entry of this inode (a rename away)
    or the file was deleted (nlink 0: :class:`DeadRecord`) the walk stops."""
    path_key = schema.path_key(cand.ws, cand.path, cand.seq)
    raw = txn.get(path_key, db=dbs["paths"])
    if raw is None:
        return None
    flags = raw[0]
    if flags & P_PRUNED or not flags & P_CONTENT or raw[_ENTRY_HEAD:_ENTRY_HEAD + ID_SIZE] != cand.content:
        return None
    entry = bytes(raw)
    key = schema.inode_key(cand.ws, cand.ino, cand.seq)
    prefix = schema.inode_prefix(cand.ws, cand.ino)
    out: list[tuple[bytes, bytes]] = []
    marks: list[tuple[int, bytes, bytes]] = []
    if not cur.set_key(key):
        return None
    value = bytes(cur.value())
    if (rewritten is not None and key in rewritten) or _holds(value, PRUNED_ID):
        return _Found(path_key, entry, [], [])    # an earlier candidate rewrote its record: mark the entry
    if not _holds(value, cand.content):
        return None
    pins = keep.pins.get(cand.ws, ())
    held = keep.held.get((cand.ws, cand.ino), ())
    seq, current = cand.seq, (key, value)
    while True:
        if not cur.prev() or cur.key()[:len(prefix)] != prefix:
            break                 # ``current`` is the inode's newest record: the head's
        next_key = bytes(cur.key())
        next_seq = schema.inode_key_seq(next_key)
        if _any_in(pins, seq, next_seq) or _any_in(held, seq, next_seq):
            break                 # a pinned tree, or a version the policy keeps, shows this record
        out.append(current)
        following = bytes(cur.value())
        if not _holds(following, cand.content) or (rewritten is not None and next_key in rewritten):
            break
        if inode_content_nlink(following)[1] == 0:
            break                 # deleted here: a :class:`DeadRecord` (``prune_dead``)
        at = schema.path_key(cand.ws, cand.path, next_seq)
        there = txn.get(at, db=dbs["paths"])
        if there is None or not there[0] & P_CONTENT or _ENTRY_FIELDS.unpack_from(there, 1)[0] != cand.ino:
            break                 # the file is at another path from here (renamed): that path's history
        if not there[0] & P_BUMPS:
            marks.append((next_seq, at, bytes(there)))
        seq, current = next_seq, (next_key, following)
    return _Found(path_key, entry, out, marks) if out else None


@dataclass(slots=True)
class _Found:
    """What pruning a candidate rewrites: its path entry (key, raw), the
    inode records (key, raw) oldest first, and the continuation entries
    marked with it (seq, key, raw)."""

    path_key: bytes
    entry: bytes
    records: list[tuple[bytes, bytes]]
    marks: list[tuple[int, bytes, bytes]]


def _any_in(seqs: Sequence[int], lo: int, hi: int) -> bool:
    """True if the sorted ``seqs`` have one in ``[lo, hi)``."""
    i = bisect_left(seqs, lo)
    return i < len(seqs) and seqs[i] < hi


# An inode record's content id and nlink are read, and its content id swapped,
# in place (``model.inode_content_nlink``, ``model.inode_with_content``)
# instead of decoding and re-encoding the record.


@dataclass(frozen=True, slots=True)
class DeadRecord:
    """A deleted file's last inode record (nlink 0, the inode's newest) that
    still holds its content: workspace, inode, seq, content. No tree from
    its seq on reaches it, so it holds the content only for a process that
    still has the file open; once none can (``Keep.may_drop``) it is
    rewritten to :data:`PRUNED_ID` and gives its reference back, so a
    deleted file keeps its content only in the versions the policy keeps."""

    ws: int
    ino: int
    seq: int
    content: bytes


def dead_record(txn: lmdb.Transaction, dbs: dict, ws: int, ino: int) -> DeadRecord | None:
    """The :class:`DeadRecord` of inode ``ino`` of workspace ``ws``, if its
    newest record is one."""
    prefix = schema.inode_prefix(ws, ino)
    with txn.cursor(db=dbs["inodes"]) as cur:
        if not cur.set_range(prefix) or cur.key()[:len(prefix)] != prefix:
            return None
        key, raw = bytes(cur.key()), cur.value()
    content, nlink = inode_content_nlink(raw)
    if not content or nlink or content in (PRUNED_ID, EMPTY_CONTENT_ID):
        return None
    return DeadRecord(ws, ino, schema.inode_key_seq(key), content)


def dead_record_goes(txn: lmdb.Transaction, dbs: dict, dead: DeadRecord, keep: Keep) -> bytes | None:
    """The raw record of ``dead`` if GC rewrites it now (still the inode's
    newest, nlink 0, with that content; no process may read it), else None."""
    found = dead_record(txn, dbs, dead.ws, dead.ino)
    if found != dead:
        return None
    raw = bytes(txn.get(schema.inode_key(dead.ws, dead.ino, dead.seq), db=dbs["inodes"]))
    return raw if keep.may_drop(dead.ws, dead.ino, Attrs.decode(raw).ctime_ns) else None


def prune_dead(store: Store, dead: Sequence[DeadRecord], keep_of: Callable[[], Keep]) -> int:
    """Rewrite the :class:`DeadRecord` s no process may read any more, in
    batches of :data:`BATCH_SECONDS`; returns how many were rewritten."""
    dbs = store.dbs
    done = i = 0
    while i < len(dead):
        keep = keep_of()
        released: dict[bytes, int] = {}
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            while i < len(dead) and time.monotonic() - start < BATCH_SECONDS:
                item = dead[i]
                i += 1
                raw = dead_record_goes(txn, dbs, item, keep)
                if raw is None:
                    continue
                txn.put(schema.inode_key(item.ws, item.ino, item.seq), _pruned_record(raw), db=dbs["inodes"])
                released[item.content] = released.get(item.content, 0) + 1
                done += 1
            release_contents(txn, dbs, released)
            store.before_commit()
        store.note_commit()
        store.maintain()
    return done


def _holds(raw: bytes, content: bytes) -> bool:
    """True if the inode record ``raw`` has ``content`` and one link, as
    ``Attrs.decode(raw)`` would say."""
    held, nlink = inode_content_nlink(raw)
    return held == content and nlink <= 1


# A path entry (``PathEntry.encode``) is a fixed head (flags the first byte,
# then ino, origin and path lengths), the content id (with ``P_CONTENT``),
# origin, path, fragment: the pruned mark is cut from those bytes.
_ENTRY_HEAD = len(PathEntry(0, 0, b"", b"", b"").encode())
_ENTRY_LENGTHS = struct.Struct("<II")          # origin, path lengths: the head's last 8 bytes
_ENTRY_FIELDS = struct.Struct("<QII")          # ino, origin and path lengths, after the flags
_MARK_HEAD = struct.Struct("<BQII")            # flags, ino, origin and path lengths (PathEntry.encode's head)


def content_entry_fields(raw: bytes, key: bytes, packed: bool = False) -> tuple[int, bytes, bytes, bytes]:
    """``(ino, content, path, fragment)`` of a path entry flagged ``P_CONTENT``
    stored under ``key`` (``PathEntry.decode``'s fields, without building one
    where it is text: plan reads millions). ``packed``: a packed fragment is
    given as stored (``events.pack_fragment``'s bytes, starting with
    ``events.PACKED``: ``events.fragment_facts`` reads it) instead of rendered."""
    flags = raw[0]
    if flags & P_HASH_CUT or (schema.entry_is_packed(raw) and not packed):    # cut or packed (PathEntry.encode)
        entry = PathEntry.decode(raw, key)
        return entry.ino, entry.content, entry.path, entry.fragment
    ino, origin_len, path_len = _ENTRY_FIELDS.unpack_from(raw, 1)
    start = _ENTRY_HEAD + ID_SIZE + origin_len
    if start + path_len > len(raw):
        raise ValueError("damaged path entry")
    fragment = bytes(raw[start + path_len:])
    if fragment[:1] == _TEXT_TAG:                  # text behind the tag (PathEntry.encode)
        fragment = fragment[1:]
    return (ino, bytes(raw[_ENTRY_HEAD:_ENTRY_HEAD + ID_SIZE]), bytes(raw[start:start + path_len]), fragment)


_TEXT_TAG = b"\x02"


def _marked_entry(raw: bytes, key: bytes, seq: int = 0, marked_line: bytes | None = None) -> bytes:
    """The pruned mark of the path entry ``raw`` (which has content) stored
    under ``key``: what ``PathEntry((flags & ~P_CONTENT) | P_PRUNED, ino, b"",
    origin, mark_pruned(fragment), path).encode(key)`` gives, or an encoding
    of the same entry: a text entry of before packed fragments
    (``P_HASH_CUT``) whose event ``seq`` has the marked packed log line
    ``marked_line`` gets the fragment made of that line where it renders as
    the marked text (``events.fragment_of_line``: a render instead of
    ``pack_fragment``'s JSON parse, checks and render)."""
    if raw[0] & P_HASH_CUT and marked_line is not None:
        marked = _cut_entry_mark(raw, seq, marked_line)
        if marked is not None:
            return marked
    marked = schema.pruned_entry(raw)          # packed (schema.PathEntry.encode): marked in its own form
    if marked is not None:
        return marked
    if raw[0] & P_HASH_CUT or schema.entry_is_packed(raw):
        e = PathEntry.decode(raw, key)
        fragment = mark_pruned(e.fragment)
        if marked_line is not None and raw[0] & P_HASH_CUT:
            packed = events.fragment_of_line(seq, marked_line, fragment)
            if packed is not None:
                return b"".join((_MARK_HEAD.pack((e.flags & ~P_CONTENT) | P_PRUNED, e.ino, len(e.origin),
                                                 len(e.path)), e.origin, e.path, packed))
        return PathEntry((e.flags & ~P_CONTENT) | P_PRUNED, e.ino, b"", e.origin, fragment, e.path).encode(key)
    origin_len, path_len = _ENTRY_LENGTHS.unpack_from(raw, _ENTRY_HEAD - _ENTRY_LENGTHS.size)
    fragment = _ENTRY_HEAD + ID_SIZE + origin_len + path_len
    return b"".join((bytes(((raw[0] & ~P_CONTENT) | P_PRUNED,)), raw[1:_ENTRY_HEAD],
                     raw[_ENTRY_HEAD + ID_SIZE:fragment], mark_pruned(raw[fragment:])))


def _cut_entry_mark(raw: bytes, seq: int, marked_line: bytes) -> bytes | None:
    """:func:`_marked_entry` of a ``P_HASH_CUT`` entry (``PathEntry.encode_text``,
    read, no longer written: head, content id, the u16 offset where the hash
    was cut out of the text, origin, path, the text) from its bytes: where
    the text before the cut has no ``, "hash": `` the text mark is the text
    with ``"pruned": true`` at its end (``mark_pruned`` drops the cut hash,
    the first). None where that or ``events.fragment_of_line`` does not
    apply (the caller decodes the entry)."""
    flags, ino, origin_len, path_len = _MARK_HEAD.unpack_from(raw)
    start = _ENTRY_HEAD + ID_SIZE + _CUT_AT.size
    text = start + origin_len + path_len
    at = _CUT_AT.unpack_from(raw, _ENTRY_HEAD + ID_SIZE)[0]
    if text + at > len(raw):
        return None
    prefix = raw[text:text + at]
    suffix = raw[text + at:]
    end = suffix.rfind(b"}")
    if _HASH_KEY in prefix or end < 0:
        return None
    packed = events.fragment_of_line(seq, marked_line, prefix + suffix[:end] + _PRUNED)
    if packed is None:
        return None
    return b"".join((_MARK_HEAD.pack((flags & ~(P_CONTENT | P_HASH_CUT)) | P_PRUNED, ino, origin_len, path_len),
                     raw[start:text], packed))


_CUT_AT = struct.Struct("<H")


def _pruned_record(raw: bytes) -> bytes:
    """The inode record ``raw`` (which has content) with content :data:`PRUNED_ID`."""
    return inode_with_content(raw, PRUNED_ID)


def prune(store: Store, candidates: Sequence[Candidate], keep_of: Callable[[], Keep],
          progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Prune ``candidates`` in batches (module docstring). ``keep_of()``
    gives what must stay (:class:`Keep`); it is called before every batch.
    ``progress(done, total)`` after every batch.

    A batch is **gathered** in a read transaction (:func:`_gather`: the
    checks, the records' new bytes, the content refcounts given back, one
    per content) and **applied** in a write transaction, each database's
    puts in key order (few leaf pages dirtied per commit), with the batch's
    **pending marks** (:func:`finish_marks`). The write transaction applies
    the gathered puts only if no commit came between the two (its txnid is
    the read's + 1: every byte read is still what the store holds);
    otherwise it checks the batch's candidates again inside itself, one by
    one (:func:`_prune_in`), as long as :data:`BATCH_SECONDS` allows. The
    batch size adapts so that applying takes about :data:`BATCH_SECONDS`.
    Once every batch is done the pending marks are written
    (:func:`finish_marks`)."""
    result = PruneResult()
    dbs = store.dbs
    size = _FIRST_BATCH
    maintain = Maintain(store)
    i = 0
    while i < len(candidates):
        keep = keep_of()
        with store.env.begin() as rtxn:
            snapshot = rtxn.id()
            work = _gather(rtxn, dbs, candidates, i, min(len(candidates), i + size), keep)
        applied = False
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            if txn.id() == snapshot + 1:
                _put_sorted(txn, dbs, work)
                work.add_to(result)
                i = work.end
                applied = True
            else:                 # a commit came between: check again, in this transaction
                i = _prune_in(txn, dbs, candidates, i, work.end, keep, result)
            store.before_commit()
        if applied:               # the writer lock was held for the puts and the commit
            size = next_batch_size(size, work.end - work.start, time.monotonic() - start)
        store.note_commit()
        maintain()                  # syncs when due: the pin moves on, freed pages are reused
        if progress is not None:
            progress(i, len(candidates))
    finish_marks(store, maintain)
    return result


_FIRST_BATCH = 256            # candidates gathered for the first batch (then adapted: next_batch_size)
_MAX_BATCH = 8192


def next_batch_size(size: int, done: int, seconds: float) -> int:
    """The next batch's size (items): about :data:`BATCH_SECONDS` of holding
    the writer lock (puts and commit) at the rate just measured (``done``
    items in ``seconds``), at most twice ``size``."""
    if done < size:
        return size
    rate = done / max(seconds, 1e-4)
    return max(16, min(_MAX_BATCH, 2 * size, int(0.8 * BATCH_SECONDS * rate)))


class Maintain:
    """``Store.maintain`` after each of gc's commits, and a sync once the
    metadata file grew :data:`SYNC_GROWTH_PAGES` pages since this began or
    last synced: until this process's pin moves on (``Store.sync``), every
    page gc's commits free stays unusable and each commit takes new pages,
    and a few large commits reach ``SYNC_COMMITS`` late."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mark = store.env.info()["last_pgno"]

    def __call__(self) -> None:
        last = self.store.env.info()["last_pgno"]
        if last - self.mark >= SYNC_GROWTH_PAGES:
            self.store.sync()
            self.mark = last
        self.store.maintain()


@dataclass(slots=True)
class _Work:
    """A gathered batch, candidates ``[start, end)``: the new bytes per
    database (key -> value), the marks it leaves pending, the content
    references given back and the figures."""

    start: int
    end: int = 0
    puts: dict[str, dict[bytes, bytes]] = field(default_factory=lambda: {"inodes": {}, "paths": {}, "contents": {}})
    marks: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)     # (ws, path) -> seqs to mark
    released: dict[bytes, int] = field(default_factory=dict)
    versions: int = 0
    records: int = 0
    skipped: list[Candidate] = field(default_factory=list)

    def add_to(self, result: PruneResult) -> None:
        result.versions += self.versions
        result.records += self.records
        result.released += self.records
        for cand in self.skipped:
            _kept_back(result, cand)


def _kept_back(result: PruneResult, cand: Candidate) -> None:
    result.skipped += 1
    back = result.kept_back.setdefault(cand.ws, [0, 0])
    back[0] += 1
    back[1] += cand.size


def _gather(txn: lmdb.Transaction, dbs: dict, candidates: Sequence[Candidate], start: int, end: int,
            keep: Keep) -> _Work:
    """What pruning ``candidates[start:end]`` one after the other writes,
    read in ``txn`` (it does not see the batch's own writes: the inode keys
    the batch rewrites are replayed as ``rewritten``, as the dry run does)."""
    work = _Work(start, end)
    rewritten: set[bytes] = set()
    inodes, paths = work.puts["inodes"], work.puts["paths"]
    with txn.cursor(db=dbs["inodes"]) as cur:
        for n in range(start, end):
            cand = candidates[n]
            found = _check(txn, dbs, cur, cand, keep, rewritten)
            if found is None:
                work.skipped.append(cand)
                continue
            records = found.records
            for inode_key, raw in records:
                inodes[inode_key] = _pruned_record(raw)
                rewritten.add(inode_key)
            paths[found.path_key] = _entry_mark(txn, dbs, found.path_key, cand.seq, found.entry, cand.path)
            for seq, key, raw in found.marks:
                paths[key] = _entry_mark(txn, dbs, key, seq, raw, cand.path)
            _add_marks(work.marks, cand, found)
            if records and cand.content != EMPTY_CONTENT_ID:          # (not refcounted)
                work.released[cand.content] = work.released.get(cand.content, 0) + len(records)
            work.versions += 1
            work.records += len(records)
    contents = work.puts["contents"]
    for content, count in work.released.items():
        raw = txn.get(content, db=dbs["contents"])
        if raw is not None:
            refcount = schema.content_header(raw, content)[1]
            contents[content] = schema.content_with_refcount(raw, max(0, refcount - count))
    return work


def _add_marks(marks: dict[tuple[int, bytes], list[int]], cand: Candidate, found: _Found) -> None:
    """The seqs whose path entry and log line pruning ``cand`` marks: its own and its continuations'."""
    seqs = marks.get((cand.ws, cand.path))
    if seqs is None:
        seqs = marks[(cand.ws, cand.path)] = []
    seqs.append(cand.seq)
    seqs.extend(seq for seq, _key, _raw in found.marks)


def _put_sorted(txn: lmdb.Transaction, dbs: dict, work: _Work) -> None:
    """Write ``work``'s records, each database's in key order, and its pending marks."""
    for name, puts in work.puts.items():
        if puts:
            with txn.cursor(db=dbs[name]) as cur:
                cur.putmulti(sorted(puts.items()))
    put_marks(txn, dbs, work.marks)


def _prune_in(txn: lmdb.Transaction, dbs: dict, candidates: Sequence[Candidate], i: int, end: int, keep: Keep,
              result: PruneResult) -> int:
    """Prune ``candidates[i:end]`` one by one in the write transaction
    ``txn``, checking each in it, until :data:`BATCH_SECONDS` pass; returns
    the index of the first not done."""
    released: dict[bytes, int] = {}
    marks: dict[tuple[int, bytes], list[int]] = {}
    start = time.monotonic()
    with txn.cursor(db=dbs["inodes"]) as cur:
        while i < end and time.monotonic() - start < BATCH_SECONDS:
            cand = candidates[i]
            i += 1
            found = _check(txn, dbs, cur, cand, keep)
            if found is None:
                _kept_back(result, cand)
                continue
            records = found.records
            for inode_key, raw in records:
                txn.put(inode_key, _pruned_record(raw), db=dbs["inodes"])
            txn.put(found.path_key, _entry_mark(txn, dbs, found.path_key, cand.seq, found.entry, cand.path),
                    db=dbs["paths"])
            for seq, key, raw in found.marks:
                txn.put(key, _entry_mark(txn, dbs, key, seq, raw, cand.path), db=dbs["paths"])
            _add_marks(marks, cand, found)
            if records and cand.content != EMPTY_CONTENT_ID:          # (not refcounted)
                released[cand.content] = released.get(cand.content, 0) + len(records)
            result.versions += 1
            result.records += len(records)
            result.released += len(records)
    release_contents(txn, dbs, released)
    put_marks(txn, dbs, marks)
    return i


# --- pending marks ----------------------------------------------------------------------------
#
# Each prune batch commits its inode records, refcounts and path entries
# (candidates come path by path: ``paths`` and ``inodes`` keys in order) with
# a record of the log lines it leaves to mark (``gc_marks``): a path's events
# are spread over the whole ``events`` database, so marking them with the
# batch dirtied one page per line. They are marked afterwards, in key order
# (:func:`finish_marks`).

_MARKS_KEY = struct.Struct(">IQ")       # ws u32, batch number u64


def encode_marks(marks: list[tuple[bytes, list[int]]]) -> bytes:
    """A ``gc_marks`` value: MessagePack ``[[path, seqs], ...]`` where ``seqs``
    is the seqs as little-endian u64s (bytes)."""
    return msgpack.packb([[path, struct.pack(f"<{len(seqs)}Q", *seqs)] for path, seqs in marks])


def decode_marks(raw: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
    """:func:`encode_marks`'s ``(path, seqs)`` pairs. Raises ``ValueError`` if damaged."""
    try:
        return [(bytes(path), struct.unpack(f"<{len(seqs) // 8}Q", seqs)) for path, seqs in msgpack.unpackb(raw)]
    except (ValueError, TypeError, struct.error, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged gc_marks record ({type(exc).__name__}: {exc})") from None


def put_marks(txn: lmdb.Transaction, dbs: dict, marks: dict[tuple[int, bytes], list[int]]) -> None:
    """Record ``marks`` ((ws, path) -> seqs) as pending in ``txn``: one ``gc_marks`` record per workspace,
    numbered after the workspace's last."""
    by_ws: dict[int, list[tuple[bytes, list[int]]]] = {}
    for (ws, path), seqs in marks.items():
        by_ws.setdefault(ws, []).append((path, seqs))
    for ws, items in by_ws.items():
        prefix = schema.ws_key(ws)
        number = 0
        with txn.cursor(db=dbs["gc_marks"]) as cur:            # after the workspace's last record
            at = cur.prev() if cur.set_range(prefix + b"\xff" * 9) else cur.last()
            if at and cur.key()[:4] == prefix:
                number = _MARKS_KEY.unpack(cur.key())[1] + 1
        txn.put(_MARKS_KEY.pack(ws, number), encode_marks(items), db=dbs["gc_marks"])


def pending_marks(txn: lmdb.Transaction, dbs: dict) -> tuple[list[bytes], dict[int, dict[bytes, set[int]]]]:
    """The ``gc_marks`` keys and what they hold: ws -> path -> seqs."""
    keys: list[bytes] = []
    out: dict[int, dict[bytes, set[int]]] = {}
    with txn.cursor(db=dbs["gc_marks"]) as cur:
        for key, raw in cur:
            keys.append(bytes(key))
            by_path = out.setdefault(_MARKS_KEY.unpack(key)[0], {})
            for path, seqs in decode_marks(raw):
                by_path.setdefault(path, set()).update(seqs)
    return keys, out


def finish_marks(store: Store, maintain: Callable[[], None] | None = None) -> int:
    """Write the pending marks (``gc_marks``, left by :func:`prune`'s batches
    or by a GC killed before it wrote them): the log lines, in ``events`` key
    order, in batches of about :data:`BATCH_SECONDS` (gathered in a read
    transaction and applied as :func:`prune` applies its batches); then the
    records go. Marking is idempotent (a line marked already, or naming
    another path, stays as it is), so a killed run leaves the records and the
    next one writes what is left. ``maintain``: called after each commit
    (default a new :class:`Maintain`). Returns how many lines were marked."""
    dbs = store.dbs
    maintain = Maintain(store) if maintain is None else maintain
    with store.env.begin() as txn:
        keys, pending = pending_marks(txn, dbs)
    if not keys:
        return 0
    done = 0
    for ws, by_path in pending.items():
        paths = list(by_path)
        fields = [_path_field(path) for path in paths]
        width = len(paths)
        order = sorted(seq * width + n for n, path in enumerate(paths) for seq in by_path[path])
        lines = [(schema.event_key(ws, item // width), fields[item % width]) for item in order]
        done += _mark_all(store, maintain, "events", lines, _line_mark)
    with store.env.begin(write=True) as txn:
        for key in keys:
            txn.delete(key, db=dbs["gc_marks"])
        store.before_commit()
    store.note_commit()
    maintain()
    return done


def _line_mark(txn: lmdb.Transaction, dbs: dict, key: bytes, path_field: bytes) -> bytes | None:
    return _marked_line(txn.get(key, db=dbs["events"]), path_field)


def _entry_mark(txn: lmdb.Transaction, dbs: dict, key: bytes, seq: int, raw: bytes, path: bytes) -> bytes:
    """The pruned mark of the path entry ``raw`` stored under ``key`` (``seq``
    the key's; :func:`_marked_entry`); a text entry of before packed
    fragments (``P_HASH_CUT``) is marked from its log line's mark."""
    line = None
    if raw[0] & P_HASH_CUT:
        line = _marked_line(txn.get(schema.event_key(schema.U32.unpack_from(key)[0], seq), db=dbs["events"]),
                            _path_field(path))
    return _marked_entry(raw, key, seq, line)


def _mark_all(store: Store, maintain: Callable[[], None], name: str, items: list[tuple[bytes, object]],
              mark: Callable[[lmdb.Transaction, dict, bytes, object], bytes | None]) -> int:
    """Rewrite the records of database ``name`` under the keys of ``items``
    (``(key, arg)`` in key order) to ``mark(txn, dbs, key, arg)`` (None: left
    as it is), in batches; returns how many were rewritten."""
    dbs = store.dbs
    size = _FIRST_BATCH
    done = i = 0
    while i < len(items):
        end = min(len(items), i + size)
        with store.env.begin() as rtxn:
            snapshot = rtxn.id()
            puts = _gather_marks(rtxn, dbs, items, i, end, mark)
        with store.env.begin(write=True) as txn:
            start = time.monotonic()
            if txn.id() == snapshot + 1:
                applied = True
            else:                 # a commit came between: mark again, in this transaction
                applied = False
                puts = []
                while i < end and time.monotonic() - start < BATCH_SECONDS:
                    key, arg = items[i]
                    i += 1
                    value = mark(txn, dbs, key, arg)
                    if value is not None:
                        puts.append((key, value))
                end = i
            if puts:
                with txn.cursor(db=dbs[name]) as cur:
                    cur.putmulti(puts)
            store.before_commit()
        if applied:
            size = next_batch_size(size, end - i, time.monotonic() - start)
        done += len(puts)
        i = end
        store.note_commit()
        maintain()
    return done


def _gather_marks(txn: lmdb.Transaction, dbs: dict, items: list[tuple[bytes, object]], start: int, end: int,
                  mark: Callable[[lmdb.Transaction, dict, bytes, object], bytes | None]) -> list[tuple[bytes, bytes]]:
    """``(key, marked value)`` of ``items[start:end]`` that change, read in ``txn``."""
    out = []
    for n in range(start, end):
        key, arg = items[n]
        value = mark(txn, dbs, key, arg)
        if value is not None:
            out.append((key, value))
    return out


def _marked_line(line: bytes | None, path_field: bytes) -> bytes | None:
    """The log line ``line`` (a stored ``events`` record) marked pruned, or
    None if it is missing, marked already or names another path."""
    if line is not None and line[:1] == bytes((events.PACKED,)):      # a compact record (meta.events)
        return events.mark_pruned_if_at(line, _path_text(path_field))
    if line is not None and _PRUNED not in line and path_field in line:
        return mark_pruned(bytes(line))
    return None


def release_contents(txn: lmdb.Transaction, dbs: dict, released: dict[bytes, int]) -> None:
    """Give back ``released`` references (content id -> count), one rewrite per content."""
    for content, count in released.items():
        raw = txn.get(content, db=dbs["contents"])
        if raw is not None:
            refcount = schema.content_header(raw, content)[1]
            txn.put(content, schema.content_with_refcount(raw, max(0, refcount - count)), db=dbs["contents"])


_HASH_FIELD = re.compile(rb', "hash": (?:"[0-9a-f]*"|null)')
_PRUNED = b', "pruned": true}'
_HASH_KEY = b', "hash": '
_HEX = re.compile(rb"[0-9a-f]*")


@functools.lru_cache(maxsize=64)
def _path_text(path_field: bytes) -> str:
    """The path text of a ``_path_field`` (candidates come path by path: one parse a path)."""
    return json.loads(path_field[len(b'"path": '):-1])


def _path_field(path: bytes) -> bytes:
    return b'"path": ' + json.dumps(path_text(path)).encode() + b","


def mark_pruned(text: bytes) -> bytes:
    """A log line or path-entry fragment (a JSON object's text, as
    ``journal`` writes it) without its ``"hash"`` and with ``"pruned": true``
    at the end — text edits, no JSON parse (GC rewrites millions of them)."""
    # The first ``, "hash": `` is the field (inside a JSON string its quotes
    # would be escaped); find and slice instead of the regex where its value
    # is what journal writes (hex or null), which is what nearly all are.
    start = text.find(_HASH_KEY)
    if start >= 0:
        value = start + len(_HASH_KEY)
        if text.startswith(b"null", value):
            text = text[:start] + text[value + 4:]
        else:
            end = text.find(b'"', value + 1) if text.startswith(b'"', value) else -1
            if end >= 0 and _HEX.fullmatch(text, value + 1, end):
                text = text[:start] + text[end + 1:]
            else:
                text = _HASH_FIELD.sub(b"", text, count=1)
    return text[:text.rindex(b"}")] + _PRUNED


def is_pruned(entry: PathEntry) -> bool:
    """True for a pruned mark (a version whose content GC dropped)."""
    return bool(entry.flags & P_PRUNED and entry.flags & P_BUMPS)
