"""Receipts: a Merkle root of a workspace's whole tree at a seq, kept up to date incrementally.

Vocabulary:

- a **receipt** is ``{"version": 1, "workspace", "seq", "root", "files",
  "dirs", "others", "bytes", "time", "computed"}``: ``root`` is the lowercase
  hex **tree hash** of the workspace's tree at ``seq`` (below); ``files``,
  ``dirs`` (below the root), ``others`` (symlinks and special files) and
  ``bytes`` (the regular files' sizes) count what it covers; ``time`` is when
  it was made; ``computed`` says how: ``{"base": the seq of the receipt it
  was made from or null, "dirs": directory hashes recomputed, "entries":
  directory entries read, "full": null or why it was made from scratch,
  "ms"}``. Database ``receipts`` (ws u32, seq u64 → JSON).
- the **tree hash** (the construction a third party recomputes, e.g. with
  ``tools/receipt.py`` from a checkout; README "Receipts"): a directory's
  hash is ``BLAKE3(b"chronicle-receipt-v1 dir\\n" || entry || entry ...)``
  over its entries sorted by name (bytewise), each entry being
  ``u32be(len(name)) || name || kind || u32be(mode) || digest(32 bytes)``:

  ========================  =====  =============================  =========================================
  what                      kind   mode                           digest
  ========================  =====  =============================  =========================================
  regular file              ``f``  ``st_mode & 0o7777``           its dense content hash (``chronicle hash --dense``)
  directory                 ``d``  ``st_mode & 0o7777``           its directory hash (recursively)
  symbolic link             ``l``  0                              BLAKE3 of its target bytes
  FIFO, socket, device      ``o``  ``st_mode`` (type and perms)   BLAKE3 of ``u64be(st_rdev)``
  ========================  =====  =============================  =========================================

  The root is the root directory's hash (its own mode, owner and times are
  not in it). Owners, times, xattrs and link counts are not hashed (a
  copy made by another user, or one that sets its own times, still matches); each
  name of a hard-linked file is an entry of its own; an empty directory is
  an entry whose digest is the hash of no entries; ``.chronicle`` is not in
  the tree.
- a **directory sum** is one directory's hash and counts (``files``,
  ``dirs``, ``others``, ``bytes`` of its subtree), stored in
  ``receipt_dirs`` under (ws u32, directory ino u64, ~seq u64) for every
  directory a receipt recomputed (:class:`DirSum`).
- a **listing** is a directory's hashed entries with each one's counts
  (:class:`Listing`); ``receipt_entries`` keeps the latest of each directory
  of at least :data:`LISTING_MIN_ENTRIES` entries (ws u32, ino u64).

**Incremental.** A receipt at seq P starts from the latest stored receipt
at or before P (its **base** B; a fork with none of its own takes its
parent's at or before the fork seq) and recomputes only the **dirty**
directories: those on the path (resolved in the tree at each event's seq)
to the directory of each event in ``(B, P]`` — the event's ``path``, and its
``from``. Every other directory keeps its latest sum at or before B. Each
receipt writes the sums of all the directories it recomputed at P, so the
latest sum at or before any receipt's seq is that directory's sum there (a
receipt made later at an earlier seq recomputes a subset of the directories
that changed, and writes them at its own seq). A dirty directory whose
stored listing hashes to its sum at B (so it *is* its entries at B) reads
again only the names the events named or went through in it, and splices
them into the listing; any other dirty directory reads all its entries.
Cost: per event, one lookup per path component; per dirty directory, its
changed names (with a listing) or its entries (without), and one pass of
BLAKE3 over its entry bytes (about 80 bytes an entry). From
scratch (``computed.full`` says why): the first receipt, a whole-tree
restore, an event no path names (its writer did not know the path: an
inode a process reached through the store API without looking it up from
the root; the mount daemon knows every path, and a file unlinked while open
makes no events), and a change to the content or mode of a
file with more than one link (no index leads from an inode to its other
names).

**Content hashes** are Chronicle's content hash of the file's bytes read
densely (the tree hash over BLAKE3 chunk ids, ``chronicle.store.chunks.tree``,
with no holes: what ``chronicle hash --dense FILE`` prints for any copy): a
format-4 content's id when it has no holes (``ContentRecord.holes``). A sparse
content, or one written by format 3 (keyed by its whole-file BLAKE3, chunked
differently), is read here once and hashed from scratch, and the result kept
in ``receipt_hashes`` (content id → content hash; store-wide): unchanged
files are never read again. Upgrading a store to format 4 drops the receipts
and sums made in format 3 (their file digests were whole-file BLAKE3s), so
every receipt after it is made with this construction.

**Ignored paths** keep their latest content only (``chronicle.store.gc.ignore``),
and a past tree shows that content: a past receipt covering one stops
verifying once that file changes again.

Who writes: any process may (a receipt is a function of the tree at its
seq, so two writers write the same value; each receipt and its sums go in
one write transaction). Turn ends write one (``turns.TurnLog.record_end``).

Errors: :class:`NotFound` (a seq after the head, no stored receipt to
verify), :class:`Corrupt` (a tree record missing or damaged).

Threads: a :class:`Receipts` holds no transaction; each call opens its own
read transaction, then one write transaction. Any thread; it reads only
committed records, so the FUSE loop runs it in a worker thread.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import blake3
import lmdb

from chronicle.errors import Corrupt, NotADirectory, NotFound
from chronicle.store.chunks import tree as chunk_tree
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID
from chronicle.store.meta import schema
from chronicle.store.meta.journal import iso_time
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import KIND_DIR, Attrs

if TYPE_CHECKING:       # types only: namespace imports history (paths), so history imports no namespace
    from chronicle.store.namespace.workspace import Workspace

RECEIPT_VERSION = 1
DIR_DOMAIN = b"chronicle-receipt-v1 dir\n"
EMPTY_DIR = blake3.blake3(DIR_DOMAIN).digest()

# Events that change only names (their path and from name every entry they change).
NAMESPACE_EVENTS = frozenset({"create", "mkdir", "symlink", "mknod", "link", "rename", "delete", "rmdir"})
# Events that change nothing a tree hash covers (owners, times, xattrs).
UNHASHED_EVENTS = frozenset({"chown", "utimens", "setxattr", "removexattr"})

_NAME_LEN = struct.Struct(">I")
_MODE = struct.Struct(">I")
_RDEV = struct.Struct(">Q")
_SUM = struct.Struct("<QQQQ")
_KEY = struct.Struct(">IQQ")
_WS_INO = struct.Struct(">IQ")
# Directories with fewer entries are read again whole when they change (cheaper than keeping a listing).
LISTING_MIN_ENTRIES = 256


# -- the construction ----------------------------------------------------------------------


def entry_bytes(name: bytes, kind: bytes, mode: int, digest: bytes) -> bytes:
    """One directory entry as hashed (module docstring): ``u32be(len(name)) ||
    name || kind || u32be(mode) || digest``."""
    return b"".join((_NAME_LEN.pack(len(name)), name, kind, _MODE.pack(mode), digest))


def dir_hash(entries: list[bytes]) -> bytes:
    """The directory hash of ``entries`` (:func:`entry_bytes`, sorted by name)."""
    hasher = blake3.blake3(DIR_DOMAIN)
    for entry in entries:
        hasher.update(entry)
    return hasher.digest()


def symlink_digest(target: bytes) -> bytes:
    """The digest of a symlink entry: BLAKE3 of its target."""
    return blake3.blake3(target).digest()


def special_digest(rdev: int) -> bytes:
    """The digest of a FIFO, socket or device entry: BLAKE3 of ``u64be(rdev)``."""
    return blake3.blake3(_RDEV.pack(rdev)).digest()


@dataclass(slots=True)
class DirSum:
    """One directory's hash (32 bytes) and the counts of its subtree."""

    digest: bytes
    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes: int = 0

    def encode(self) -> bytes:
        """The ``receipt_dirs`` value: digest, then files, dirs, others, bytes (u64 little-endian)."""
        return self.digest + _SUM.pack(self.files, self.dirs, self.others, self.bytes)

    @classmethod
    def decode(cls, raw: bytes) -> DirSum:
        """From :meth:`encode`'s bytes. Raises ``Corrupt`` if damaged."""
        if len(raw) != 32 + _SUM.size:
            raise Corrupt("damaged receipt directory record")
        return cls(bytes(raw[:32]), *_SUM.unpack(raw[32:]))


def _sum_key(ws: int, ino: int, seq: int) -> bytes:
    return _KEY.pack(ws, ino, schema.inv(seq))


def _listing_key(ws: int, ino: int) -> bytes:
    return _WS_INO.pack(ws, ino)


def _digest(entries: bytes) -> bytes:
    hasher = blake3.blake3(DIR_DOMAIN)
    hasher.update(entries)
    return hasher.digest()


@dataclass(slots=True)
class Listing:
    """A directory's entries as hashed: ``entries``, their concatenation
    (sorted by name); ``lengths`` (``array('I')``), each one's length;
    ``counts`` (``array('Q')``, 4 per entry), each one's files, dirs,
    others, bytes; ``digest``, the directory hash they give. Database
    ``receipt_entries`` keeps the latest listing of each directory of at
    least :data:`LISTING_MIN_ENTRIES` entries (ws u32, ino u64 → :meth:`encode`);
    a listing whose digest is a directory's sum at the base is its entries
    there, so only the names that changed are read again."""

    digest: bytes
    lengths: array
    counts: array
    entries: bytes

    def encode(self) -> bytes:
        """digest (32), entry count u32, lengths (u32 each), counts (u64 each), entries (little-endian)."""
        return b"".join((self.digest, struct.pack("<I", len(self.lengths)), self.lengths.tobytes(),
                         self.counts.tobytes(), self.entries))

    @classmethod
    def decode(cls, raw: bytes) -> Listing:
        """From :meth:`encode`'s bytes. Raises ``Corrupt`` if damaged."""
        try:
            (n,) = struct.unpack_from("<I", raw, 32)
            lengths, counts = array("I"), array("Q")
            pos = 36 + 4 * n
            lengths.frombytes(raw[36:pos])
            counts.frombytes(raw[pos:pos + 32 * n])
        except (struct.error, ValueError):
            raise Corrupt("damaged receipt listing") from None
        entries = bytes(raw[pos + 32 * n:])
        if len(lengths) != n or len(counts) != 4 * n or sum(lengths) != len(entries) or lengths.itemsize != 4:
            raise Corrupt("damaged receipt listing")
        return cls(bytes(raw[:32]), lengths, counts, entries)

    def merge(self, changes: dict[bytes, tuple[bytes, tuple] | None]) -> tuple[Listing, list[int]]:
        """This listing with ``changes`` applied (name → ``(entry, counts)``,
        or None: gone), and the change to the counts. O(changes × log
        entries) lookups and one copy of the bytes."""
        offsets = list(accumulate(self.lengths, initial=0))
        n, data = len(self.lengths), self.entries

        def name_at(i: int) -> bytes:
            off = offsets[i]
            return data[off + 4:off + 4 + _NAME_LEN.unpack_from(data, off)[0]]

        pieces, lengths, counts = [], array("I"), array("Q")
        delta = [0, 0, 0, 0]
        done = 0
        for name in sorted(changes):
            i = bisect_left(range(n), name, lo=done, key=name_at)
            pieces.append(data[offsets[done]:offsets[i]])
            lengths.extend(self.lengths[done:i])
            counts.extend(self.counts[4 * done:4 * i])
            done = i
            if i < n and name_at(i) == name:
                for k in range(4):
                    delta[k] -= self.counts[4 * i + k]
                done = i + 1
            new = changes[name]
            if new is not None:
                entry, contribution = new
                pieces.append(entry)
                lengths.append(len(entry))
                counts.extend(contribution)
                for k in range(4):
                    delta[k] += contribution[k]
        pieces.append(data[offsets[done]:])
        lengths.extend(self.lengths[done:])
        counts.extend(self.counts[4 * done:])
        entries = b"".join(pieces)
        return Listing(_digest(entries), lengths, counts, entries), delta


@dataclass(slots=True)
class _Frame:
    """A directory being recomputed: its work (``(name, ino)`` of every entry;
    or, with ``listing``, its listing at the base, ``(name, None)`` of each
    name that changed) and what is done so far."""

    ino: int
    work: list
    name: bytes = b""
    mode: int = 0
    listing: Listing | None = None
    before: DirSum | None = None
    index: int = 0
    parts: list = field(default_factory=list)
    lengths: array = field(default_factory=lambda: array("I"))
    counts: array = field(default_factory=lambda: array("Q"))
    changes: dict = field(default_factory=dict)

    def put(self, name: bytes, entry: bytes | None, contribution: tuple | None) -> None:
        """Entry ``name`` is ``entry`` (None: there is none) with ``contribution`` to the counts."""
        if self.listing is not None:
            self.changes[name] = None if entry is None else (entry, contribution)
        elif entry is not None:
            self.parts.append(entry)
            self.lengths.append(len(entry))
            self.counts.extend(contribution)

    def finish(self) -> tuple[DirSum, Listing]:
        """The directory's sum and listing."""
        if self.listing is None:
            entries = b"".join(self.parts)
            listing = Listing(_digest(entries), self.lengths, self.counts, entries)
            totals = [sum(self.counts[k::4]) for k in range(4)]
        else:
            listing, delta = self.listing.merge(self.changes)
            before = self.before
            totals = [before.files + delta[0], before.dirs + delta[1], before.others + delta[2],
                      before.bytes + delta[3]]
        return DirSum(listing.digest, *totals), listing


class Receipts:
    """Receipts of one workspace (module docstring). ``ws`` may be read-only."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.store = ws.store
        self.env: lmdb.Environment = ws.store.env
        self.dbs = ws.dbs
        self._new_hashes: dict[bytes, bytes] = {}

    # -- reading stored receipts -------------------------------------------------------

    def get(self, seq: int) -> dict | None:
        """The stored receipt of the tree at ``seq`` (through the fork layers), or None."""
        with self.env.begin() as txn:
            found = self._latest(txn, seq)
        return found if found is not None and found["seq"] == seq else None

    def latest(self, seq: int | None = None) -> dict | None:
        """The stored receipt with the greatest seq at or before ``seq``
        (default: the head), through the fork layers, or None."""
        with self.env.begin() as txn:
            return self._latest(txn, self.ws.head_seq if seq is None else seq)

    def _latest(self, txn: lmdb.Transaction, seq: int) -> dict | None:
        db = self.dbs["receipts"]
        with txn.cursor(db=db) as cur:
            for layer in self._layers(seq):
                prefix = schema.ws_key(layer.ws)
                bound = min(seq, layer.bound)
                found = cur.set_range(schema.event_key(layer.ws, bound + 1)) if bound < schema.SEQ_MAX else False
                moved = cur.prev() if found else cur.last()
                if moved and cur.key()[:4] == prefix:
                    return json.loads(cur.value())
        return None

    def _layers(self, seq: int):
        return TreeView(self.dbs, self.ws.chain, self.ws.root, seq).layers

    # -- making receipts ---------------------------------------------------------------

    def make(self, seq: int | None = None) -> dict:
        """The receipt of the tree at ``seq`` (default: the committed head):
        the stored one if there is one, else computed from the latest receipt
        before it (module docstring) and stored. Raises :class:`NotFound` (a
        seq after the head), :class:`Corrupt`."""
        seq = self.ws.head_seq if seq is None else seq
        if seq > self.ws.head_seq or seq < 0:
            raise NotFound(f"seq {seq} does not exist yet (head is {self.ws.head_seq})")
        started = time.perf_counter()
        with self.env.begin() as txn:
            base = self._latest(txn, seq)
            if base is not None and base["seq"] == seq:
                if base["workspace"] == self.ws.name:
                    return base
                receipt = {**base, "workspace": self.ws.name, "time": iso_time(time.time_ns()),
                           "computed": {"base": seq, "dirs": 0, "entries": 0, "full": None, "ms": 0.0}}
                self._write(receipt, {}, {})      # a fork's own copy of its parent's tree's receipt
                return receipt
            if base is None:
                dirty, full = set(), "no receipt before it"
            else:
                dirty, full = self._dirty(txn, base["seq"], seq)
            sums, listings, stats = self._compute(txn, seq, dirty, full is not None, base["seq"] if base else None)
            ahead = self._latest(txn, self.ws.head_seq)
            if ahead is not None and ahead["seq"] > seq:
                listings = {}                   # keep the listings of the later tree: the next receipt's base
        receipt = self._receipt(seq, sums[self.ws.root], {
            "base": base["seq"] if base else None, "dirs": stats[0], "entries": stats[1], "full": full,
            "ms": round((time.perf_counter() - started) * 1000, 3)})
        self._write(receipt, sums, listings)
        return receipt

    def compute(self, seq: int | None = None) -> dict:
        """The receipt of the tree at ``seq`` (default: the head) computed from
        scratch, reading no stored sum and storing nothing (what
        :meth:`verify` compares with). Raises as :meth:`make`."""
        seq = self.ws.head_seq if seq is None else seq
        if seq > self.ws.head_seq or seq < 0:
            raise NotFound(f"seq {seq} does not exist yet (head is {self.ws.head_seq})")
        started = time.perf_counter()
        with self.env.begin() as txn:
            sums, _listings, stats = self._compute(txn, seq, {}, True, None)
        return self._receipt(seq, sums[self.ws.root], {
            "base": None, "dirs": stats[0], "entries": stats[1], "full": "asked to recompute",
            "ms": round((time.perf_counter() - started) * 1000, 3)})

    def verify(self, seq: int | None = None) -> dict:
        """Check the stored receipt at ``seq`` (default: the latest stored one)
        against the stored tree, recomputed from scratch. Returns ``{"ok":
        bool, "seq", "root" (the stored root), "recomputed" (the root of the
        tree now), "receipt" (the stored receipt)}``. Raises :class:`NotFound`
        if no receipt is stored there, :class:`Corrupt`."""
        stored = self.latest() if seq is None else self.get(seq)
        if stored is None:
            where = "in this workspace" if seq is None else f"at seq {seq}"
            raise NotFound(f"no receipt is stored {where} (make one with: chronicle receipt"
                           + ("" if seq is None else f" --at {seq}") + ")")
        fresh = self.compute(stored["seq"])
        return {"ok": fresh["root"] == stored["root"], "seq": stored["seq"], "root": stored["root"],
                "recomputed": fresh["root"], "receipt": stored}

    def _receipt(self, seq: int, root: DirSum, computed: dict) -> dict:
        return {"version": RECEIPT_VERSION, "workspace": self.ws.name, "seq": seq, "root": root.digest.hex(),
                "files": root.files, "dirs": root.dirs, "others": root.others, "bytes": root.bytes,
                "time": iso_time(time.time_ns()), "computed": computed}

    def _write(self, receipt: dict, sums: dict[int, DirSum], listings: dict[int, Listing]) -> None:
        seq = receipt["seq"]
        with self.env.begin(write=True) as txn:
            key = schema.event_key(self.ws.id, seq)
            if txn.get(key, db=self.dbs["receipts"]) is not None:
                return                                  # another writer was first: the same tree
            dirs = self.dbs["receipt_dirs"]
            for ino, total in sums.items():
                txn.put(_sum_key(self.ws.id, ino, seq), total.encode(), db=dirs)
            for ino, listing in listings.items():
                if len(listing.lengths) >= LISTING_MIN_ENTRIES:
                    txn.put(_listing_key(self.ws.id, ino), listing.encode(), db=self.dbs["receipt_entries"])
            for content, digest in self._new_hashes.items():
                txn.put(content, digest, db=self.dbs["receipt_hashes"])
            txn.put(key, json.dumps(receipt).encode(), db=self.dbs["receipts"])
        self._new_hashes.clear()
        self.store.note_commit()

    # -- which directories changed -------------------------------------------------------

    def _dirty(self, txn: lmdb.Transaction, since: int, seq: int) -> tuple[dict[int, set[bytes]], str | None]:
        """The directories events in ``(since, seq]`` may have changed — ino
        → the names in it those events went through or named — and None; or
        ``({}, why)`` if the receipt must be made from scratch (module docstring)."""
        dirty: dict[int, set[bytes]] = {}
        for event_seq, line in self.ws.history.log_entries(txn, since + 1, seq):
            event = json.loads(line)
            kind, path = event.get("event"), event.get("path")
            if kind == "restore" and "at" in event:
                return {}, f"a whole-tree restore at seq {event_seq}"
            if kind in UNHASHED_EVENTS:
                continue
            if path is None:            # its writer did not know the path: which directory changed is unknown
                return {}, f"a {kind} event at seq {event_seq} names no path"
            view = TreeView(self.dbs, self.ws.chain, self.ws.root, event_seq)
            names = [os.fsencode(path)]
            if kind in ("rename", "link"):
                origin = event.get("from")
                if origin is None and kind == "rename":
                    return {}, f"a rename at seq {event_seq} without its old path"
                if origin is not None and kind == "rename":
                    names.append(os.fsencode(origin))
            for name in names:
                if not self._add_parents(txn, view, name, dirty):
                    return {}, f"the directory of {path!r} (seq {event_seq}) is not in its tree"
            if kind not in NAMESPACE_EVENTS and names[0] and self._linked_elsewhere(txn, view, names[0]):
                return {}, f"a file with more than one link changed at seq {event_seq}"
        return dirty, None

    @staticmethod
    def _add_parents(txn: lmdb.Transaction, view: TreeView, path: bytes, dirty: dict[int, set[bytes]]) -> bool:
        """Mark the directories from the root to ``path``'s parent (in
        ``view``) dirty, each with the name of the next step (the parent
        with the path's last name); False if one is missing."""
        ino = view.root
        names = dirty.setdefault(ino, set())
        parts = [p for p in path.split(b"/") if p and p != b"."]
        for i, part in enumerate(parts):
            names.add(part)
            if i == len(parts) - 1:
                break
            found = view.lookup(txn, ino, part)
            if found is None or found[1] != KIND_DIR:
                return False
            ino = found[0]
            names = dirty.setdefault(ino, set())
        return True

    @staticmethod
    def _linked_elsewhere(txn: lmdb.Transaction, view: TreeView, path: bytes) -> bool:
        """True if ``path`` is a non-directory with more than one link in ``view``."""
        try:
            ino, kind = view.resolve(txn, path)
        except (NotFound, NotADirectory):
            return False
        if kind == KIND_DIR:
            return False
        attrs = view.attrs(txn, ino)
        return attrs is not None and attrs.nlink > 1

    # -- summing the tree ---------------------------------------------------------------

    def _compute(self, txn: lmdb.Transaction, seq: int, dirty: dict[int, set[bytes]], full: bool,
                 base: int | None) -> tuple[dict[int, DirSum], dict[int, Listing], tuple[int, int]]:
        """The sums and listings of the directories recomputed for the tree
        at ``seq`` (the root's under its ino), and ``(directories recomputed,
        entries read)``. Unless ``full``, a directory not in ``dirty`` keeps
        its latest sum at or before ``base``, and a dirty one whose listing
        at ``base`` is known re-reads only its names in ``dirty``.
        Iterative (paths may be deeper than Python's recursion limit)."""
        view = TreeView(self.dbs, self.ws.chain, self.ws.root, seq)
        base_layers = self._layers(base) if base is not None and not full else []
        sums: dict[int, DirSum] = {}
        listings: dict[int, Listing] = {}
        read = 0
        with txn.cursor(db=self.dbs["receipt_dirs"]) as cur:
            stack = [self._frame(txn, cur, view, base_layers, dirty, view.root, b"", 0)]
            while True:
                frame = stack[-1]
                if frame.index == len(frame.work):
                    total, listing = frame.finish()
                    sums[frame.ino], listings[frame.ino] = total, listing
                    stack.pop()
                    if not stack:
                        return sums, listings, (len(sums), read)
                    stack[-1].put(frame.name, entry_bytes(frame.name, b"d", frame.mode, total.digest),
                                  (total.files, total.dirs + 1, total.others, total.bytes))
                    continue
                name, child = frame.work[frame.index]
                frame.index += 1
                read += 1
                if child is None:                   # a name that changed: what is it now?
                    found = view.lookup(txn, frame.ino, name)
                    if found is None:
                        frame.put(name, None, None)
                        continue
                    child = found[0]
                attrs = view.attrs(txn, child)
                if attrs is None:
                    raise Corrupt(f"no inode record of ino {child} (entry {name!r} of directory ino {frame.ino})")
                mode = attrs.mode
                if stat.S_ISDIR(mode):
                    known = None if child in dirty else self._stored(cur, base_layers, child)
                    if known is None:
                        stack.append(self._frame(txn, cur, view, base_layers, dirty, child, name, mode & 0o7777))
                        continue
                    frame.put(name, entry_bytes(name, b"d", mode & 0o7777, known.digest),
                              (known.files, known.dirs + 1, known.others, known.bytes))
                elif stat.S_ISREG(mode):
                    frame.put(name, entry_bytes(name, b"f", mode & 0o7777, self._content_digest(txn, attrs)),
                              (1, 0, 0, attrs.size))
                elif stat.S_ISLNK(mode):
                    frame.put(name, entry_bytes(name, b"l", 0, symlink_digest(attrs.target)), (0, 0, 1, 0))
                else:
                    frame.put(name, entry_bytes(name, b"o", mode & 0o177777, special_digest(attrs.rdev)),
                              (0, 0, 1, 0))

    def _frame(self, txn: lmdb.Transaction, cur: lmdb.Cursor, view: TreeView, base_layers: list,
               dirty: dict[int, set[bytes]], ino: int, name: bytes, mode: int) -> _Frame:
        """The work of recomputing directory ``ino``: only its changed names if
        its listing at the base is known (its digest is the base's sum), else
        every entry."""
        before = self._stored(cur, base_layers, ino) if base_layers else None
        if before is not None:
            listing = self._listing(txn, ino)
            if listing is not None and listing.digest == before.digest:
                return _Frame(ino, [(n, None) for n in sorted(dirty.get(ino, ()))], name, mode, listing, before)
        return _Frame(ino, [(n, child) for n, child, _kind in view.entries(txn, ino)], name, mode)

    def _listing(self, txn: lmdb.Transaction, ino: int) -> Listing | None:
        """The latest listing stored for directory ``ino`` in any of the workspace's layers."""
        for ws_id, _fork in self.ws.chain:
            raw = txn.get(_listing_key(ws_id, ino), db=self.dbs["receipt_entries"])
            if raw is not None:
                return Listing.decode(raw)
        return None

    @staticmethod
    def _stored(cur: lmdb.Cursor, layers: list, ino: int) -> DirSum | None:
        """The latest sum of directory ``ino`` in ``layers`` (the base's), or None."""
        for layer in layers:
            if cur.set_range(_sum_key(layer.ws, ino, layer.bound)):
                key = cur.key()
                if key[:12] == _listing_key(layer.ws, ino):
                    return DirSum.decode(cur.value())
        return None

    def _content_digest(self, txn: lmdb.Transaction, attrs: Attrs) -> bytes:
        """The BLAKE3 of a regular file's content (module docstring: too sparse ones)."""
        content = attrs.content
        if not content or content == EMPTY_CONTENT_ID:
            return EMPTY_CONTENT_ID
        raw = txn.get(content, db=self.dbs["contents"])
        if raw is None:
            raise Corrupt(f"content {content.hex()} is referenced but missing")
        if schema.content_is_dense_v4(raw):
            return schema.content_header(raw, content)[2]
        digest = self._new_hashes.get(content) or txn.get(content, db=self.dbs["receipt_hashes"])
        if digest is None:
            digest = self._new_hashes[content] = self._hash_by_reading(content)
        return bytes(digest)

    def _hash_by_reading(self, content: bytes) -> bytes:
        """The content hash of a content's bytes read densely (its holes as
        zeros, ``chunks.tree.extents_of`` with no holes): a format-3 content, or
        a sparse one."""
        cm = self.store.content_map(content)
        return chunk_tree.hash_extents(cm.size, chunk_tree.extents_of(cm.read, cm.size))


def _add(total: DirSum, child: DirSum, *, dirs: int) -> None:
    total.files += child.files
    total.dirs += child.dirs + dirs
    total.others += child.others
    total.bytes += child.bytes


__all__ = ["DIR_DOMAIN", "DirSum", "EMPTY_DIR", "NAMESPACE_EVENTS", "RECEIPT_VERSION", "Receipts",
           "UNHASHED_EVENTS", "dir_hash", "entry_bytes", "special_digest", "symlink_digest"]
