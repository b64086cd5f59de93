"""Prune: drop the versions a policy no longer keeps, in short write transactions.

A **candidate** is a version :func:`~chronicle.store.gc.policy.select`
dropped: a path entry ``(path, seq)`` flagged ``P_BUMPS | P_CONTENT`` with its
inode and content. Pruning it changes records, never removes a seq:

- the inode records that carry the dropped content — the record written at
  the version's seq and the newer records of the same inode with the same
  content (a chmod, a rename) — get the content :data:`PRUNED_ID`, and each
  gives back its reference on the content (``contents`` refcount), unless
  a **pin** falls in the seq range where that record is the inode's state
  (``[its seq, the next record's seq)``; the inode's newest record is the
  head's and is never touched). So no tree at any seq shows content that
  was not there: a pruned record reads as :class:`~chronicle.errors.Pruned`
  (``ENODATA`` in the mount), a pinned tree reads as before;
- the path entry keeps its seq and version number (later numbers do not
  move) and becomes a **pruned mark**: flag ``P_PRUNED``, no content, its
  JSON without ``hash`` and with ``"pruned": true`` — what
  ``.chronicle/query``, ``chronicle log <path>`` and ``versions`` show;
- the event's ``.chronicle/log`` line loses its ``hash`` and gains
  ``"pruned": true`` (the log keeps one line per seq: times still bisect).

Files with more than one link are left alone (another name may keep them).

**Transactions.** Candidates are pruned in batches; a batch is one write
transaction that ends after :data:`BATCH_SECONDS` (the daemon's FUSE loop
shares LMDB's single writer: a gc transaction never holds it long). Each
batch re-reads the pins (leases of open ``at/`` handles come and go) and
re-checks every record, so a killed GC leaves whole batches, and the next
run skips what is done: pruning is idempotent.

:func:`records_to_prune` is pure reading, shared with the dry run
(``dryrun``), so the dry run promises what GC frees.

Threads: synchronous; each function takes the caller's transaction or opens its own.
"""

from __future__ import annotations

import json
import re
import struct
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb

from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, ID_SIZE, PRUNED_ID
from chronicle.store.meta import events, schema
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, P_HASH_CUT, P_PRUNED, PathEntry
from chronicle.store.model import Attrs

if TYPE_CHECKING:
    from chronicle.store.store import Store

BATCH_SECONDS = 0.010     # at most this long in one write transaction (then commit and go on)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A dropped version: workspace, path, seq, inode and content of its entry."""

    ws: int
    path: bytes
    seq: int
    ino: int
    content: bytes


@dataclass(slots=True)
class PruneResult:
    """What a prune did: versions marked pruned, inode records rewritten,
    content references given back, candidates left as they were."""

    versions: int = 0
    records: int = 0
    released: int = 0
    skipped: int = 0

    def as_dict(self) -> dict:
        return {"versions": self.versions, "records": self.records, "released": self.released,
                "skipped": self.skipped}


def records_to_prune(txn: lmdb.Transaction, dbs: dict, cand: Candidate,
                     pins: Sequence[int]) -> list[tuple[bytes, Attrs]]:
    """The inode records pruning ``cand`` rewrites (module docstring), oldest
    first; empty if the candidate is already pruned, changed, has more than
    one link, or its own record is pinned. ``pins``: the workspace's pinned
    seqs, sorted."""
    with txn.cursor(db=dbs["inodes"]) as cur:
        found = _check(txn, dbs, cur, cand, pins)
    return [] if found is None else [(key, Attrs.decode(raw)) for key, raw in found[2]]


def _check(txn: lmdb.Transaction, dbs: dict, cur: lmdb.Cursor, cand: Candidate,
           pins: Sequence[int]) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """``(path key, raw path entry, [(inode key, raw inode record)...])`` of what
    pruning ``cand`` rewrites (:func:`records_to_prune`, undecoded), or None
    if nothing: the records start with ``cand``'s own. ``cur``: a cursor of
    ``txn`` on ``inodes`` (any position)."""
    path_key = schema.path_key(cand.ws, cand.path, cand.seq)
    raw = txn.get(path_key, db=dbs["paths"])
    if raw is None:
        return None
    flags = raw[0]
    if flags & P_PRUNED or not flags & P_CONTENT or raw[_ENTRY_HEAD:_ENTRY_HEAD + ID_SIZE] != cand.content:
        return None
    entry = bytes(raw)
    if cand.content == EMPTY_CONTENT_ID:
        return None               # the empty content holds nothing
    key = schema.inode_key(cand.ws, cand.ino, cand.seq)
    prefix = schema.inode_prefix(cand.ws, cand.ino)
    out: list[tuple[bytes, bytes]] = []
    if not cur.set_key(key):
        return None
    value = bytes(cur.value())
    if not _holds(value, cand.content):
        return None
    seq, current = cand.seq, (key, value)
    while True:
        if not cur.prev() or cur.key()[:len(prefix)] != prefix:
            break                 # ``current`` is the inode's newest record: the head's
        next_key = bytes(cur.key())
        next_seq = schema.inode_key_seq(next_key)
        i = bisect_left(pins, seq)
        if i < len(pins) and pins[i] < next_seq:
            break                 # a pinned tree shows this record
        out.append(current)
        following = bytes(cur.value())
        if not _holds(following, cand.content):
            break
        seq, current = next_seq, (next_key, following)
    return (path_key, entry, out) if out else None


# An inode record (``Attrs.encode``) is a fixed head (nlink the u32 at byte 12)
# then, when the file has content, its 32-byte id: pruning compares and swaps
# those bytes instead of decoding and re-encoding the record.
_ATTRS_HEAD = len(Attrs(0, 0, 0, 0, 0, 0, 0, 0).encode())
_HAS_CONTENT = Attrs(0, 0, 0, 0, 0, 0, 0, 0, content=PRUNED_ID).encode()[_ATTRS_HEAD - 1]   # its flag bit
_NLINK = struct.Struct("<I")


def _holds(raw: bytes, content: bytes) -> bool:
    """True if the inode record ``raw`` has ``content`` and one link, as
    ``Attrs.decode(raw)`` would say."""
    return (len(raw) >= _ATTRS_HEAD + ID_SIZE and raw[_ATTRS_HEAD - 1] & _HAS_CONTENT
            and raw[_ATTRS_HEAD:_ATTRS_HEAD + ID_SIZE] == content and _NLINK.unpack_from(raw, 12)[0] <= 1)


# A path entry (``PathEntry.encode``) is a fixed head (flags the first byte,
# then ino, origin and path lengths), the content id (with ``P_CONTENT``),
# origin, path, fragment: the pruned mark is cut from those bytes.
_ENTRY_HEAD = len(PathEntry(0, 0, b"", b"", b"").encode())
_ENTRY_LENGTHS = struct.Struct("<II")          # origin, path lengths: the head's last 8 bytes
_ENTRY_FIELDS = struct.Struct("<QII")          # ino, origin and path lengths, after the flags


def content_entry_fields(raw: bytes) -> tuple[int, bytes, bytes, bytes]:
    """``(ino, content, path, fragment)`` of a path entry flagged ``P_CONTENT``
    (``PathEntry.decode``'s fields, without building one: plan reads millions)."""
    if raw[0] & P_HASH_CUT:                     # the hash cut out of the fragment (schema.PathEntry.encode)
        entry = PathEntry.decode(raw)
        return entry.ino, entry.content, entry.path, entry.fragment
    ino, origin_len, path_len = _ENTRY_FIELDS.unpack_from(raw, 1)
    start = _ENTRY_HEAD + ID_SIZE + origin_len
    if start + path_len > len(raw):
        raise ValueError("damaged path entry")
    return (ino, bytes(raw[_ENTRY_HEAD:_ENTRY_HEAD + ID_SIZE]), bytes(raw[start:start + path_len]),
            bytes(raw[start + path_len:]))


def _marked_entry(raw: bytes) -> bytes:
    """The pruned mark of the path entry ``raw`` (which has content): what
    ``PathEntry((flags & ~P_CONTENT) | P_PRUNED, ino, b"", origin,
    mark_pruned(fragment), path).encode()`` gives."""
    if raw[0] & P_HASH_CUT:
        e = PathEntry.decode(raw)
        return PathEntry((e.flags & ~P_CONTENT) | P_PRUNED, e.ino, b"", e.origin, mark_pruned(e.fragment),
                         e.path).encode()
    origin_len, path_len = _ENTRY_LENGTHS.unpack_from(raw, _ENTRY_HEAD - _ENTRY_LENGTHS.size)
    fragment = _ENTRY_HEAD + ID_SIZE + origin_len + path_len
    return b"".join((bytes(((raw[0] & ~P_CONTENT) | P_PRUNED,)), raw[1:_ENTRY_HEAD],
                     raw[_ENTRY_HEAD + ID_SIZE:fragment], mark_pruned(raw[fragment:])))


def _pruned_record(raw: bytes) -> bytes:
    """The inode record ``raw`` (which has content) with content :data:`PRUNED_ID`."""
    return b"".join((raw[:_ATTRS_HEAD], PRUNED_ID, raw[_ATTRS_HEAD + ID_SIZE:]))


def prune(store: Store, candidates: Sequence[Candidate], pins_of: Callable[[], dict[int, list[int]]],
          progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Prune ``candidates`` in batches (module docstring). ``pins_of()``
    gives each workspace's pinned seqs, sorted; it is called before every
    batch. ``progress(done, total)`` after every batch. Content refcounts
    are given back once per content per batch (a content record holds the
    extent list: it is rewritten once, not once per inode record)."""
    result = PruneResult()
    dbs = store.dbs
    fields = _PathFields()
    i = 0
    while i < len(candidates):
        pins = pins_of()
        released: dict[bytes, int] = {}
        with store.env.begin(write=True) as txn, txn.cursor(db=dbs["inodes"]) as cur:
            start = time.monotonic()
            while i < len(candidates) and time.monotonic() - start < BATCH_SECONDS:
                cand = candidates[i]
                i += 1
                found = _check(txn, dbs, cur, cand, pins.get(cand.ws, ()))
                if found is None:
                    result.skipped += 1
                    continue
                path_key, entry, records = found
                _apply(txn, dbs, cand, path_key, entry, records, fields(cand.path))
                released[cand.content] = released.get(cand.content, 0) + len(records)
                result.versions += 1
                result.records += len(records)
                result.released += len(records)
            _release(txn, dbs, released)
            store.before_commit()
        store.note_commit()
        store.maintain()          # syncs when due: the pin moves on, freed pages are reused
        if progress is not None:
            progress(i, len(candidates))
    return result


def _apply(txn: lmdb.Transaction, dbs: dict, cand: Candidate, key: bytes, entry: bytes,
           records: list[tuple[bytes, bytes]], path_field: bytes) -> None:
    for inode_key, raw in records:
        txn.put(inode_key, _pruned_record(raw), db=dbs["inodes"])
    txn.put(key, _marked_entry(entry), db=dbs["paths"])
    event_key = schema.event_key(cand.ws, cand.seq)
    line = txn.get(event_key, db=dbs["events"])
    if line is not None and line[:1] == bytes((events.PACKED,)):      # a compact record (meta.events)
        if not events.is_pruned(cand.seq, line) and path_field in events.render(cand.seq, line):
            txn.put(event_key, events.mark_pruned(cand.seq, line, mark_pruned), db=dbs["events"])
    elif line is not None and _PRUNED not in line and path_field in line:
        txn.put(event_key, mark_pruned(bytes(line)), db=dbs["events"])


def _release(txn: lmdb.Transaction, dbs: dict, released: dict[bytes, int]) -> None:
    """Give back ``released`` references (content id -> count), one rewrite per content."""
    for content, count in released.items():
        raw = txn.get(content, db=dbs["contents"])
        if raw is not None:
            refcount = schema.content_header(raw)[1]
            txn.put(content, schema.content_with_refcount(raw, max(0, refcount - count)), db=dbs["contents"])


class _PathFields:
    """``_path_field`` of the last path asked (candidates come path by path)."""

    def __init__(self) -> None:
        self.path: bytes | None = None
        self.field = b""

    def __call__(self, path: bytes) -> bytes:
        if path != self.path:
            self.path, self.field = path, _path_field(path)
        return self.field


_HASH_FIELD = re.compile(rb', "hash": (?:"[0-9a-f]*"|null)')
_PRUNED = b', "pruned": true}'
_HASH_KEY = b', "hash": '
_HEX = re.compile(rb"[0-9a-f]*")


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
