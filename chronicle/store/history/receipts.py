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
  regular file              ``f``  ``st_mode & 0o7777``           BLAKE3 of its content
  directory                 ``d``  ``st_mode & 0o7777``           its directory hash (recursively)
  symbolic link             ``l``  0                              BLAKE3 of its target bytes
  FIFO, socket, device      ``o``  ``st_mode`` (type and perms)   BLAKE3 of ``u64be(st_rdev)``
  ========================  =====  =============================  =========================================

  The root is the root directory's hash (its own mode, owner and times are
  not in it). Owners, times, xattrs and link counts are not hashed (a
  checkout by another user or ``cp`` without ``-a`` still matches); each
  name of a hard-linked file is an entry of its own; an empty directory is
  an entry whose digest is the hash of no entries; ``.chronicle`` is not in
  the tree.
- a **directory sum** is one directory's hash and counts (``files``,
  ``dirs``, ``others``, ``bytes`` of its subtree), stored in
  ``receipt_dirs`` under (ws u32, directory ino u64, ~seq u64) for every
  directory a receipt recomputed (:class:`DirSum`).

**Incremental.** A receipt at seq P starts from the latest stored receipt
at or before P (its **base** B; a fork with none of its own takes its
parent's at or before the fork seq) and recomputes only the **dirty**
directories: those on the path (resolved in the tree at each event's seq)
to the directory of each event in ``(B, P]`` — the event's ``path``, and its
``from``. Every other directory keeps its latest sum at or before B. Each
receipt writes the sums of all the directories it recomputed at P, so the
latest sum at or before any receipt's seq is that directory's sum there (a
receipt made later at an earlier seq recomputes a subset of the directories
that changed, and writes them at its own seq). Cost: the entries of the
dirty directories plus, per event, one lookup per path component. From
scratch (``computed.full`` says why): the first receipt, a whole-tree
restore, a namespace event no path names, and a change to the content or
mode of a file with more than one link (no index leads from an inode to
its other names). An event no path names that is not a namespace event
changed an inode no name reaches (an unlinked open file): it is in no tree.

**Content hashes** are the content records' whole-file BLAKE3. A file too
sparse to hash at commit (``ContentRecord.hash`` None) is hashed here once,
reading its chunks and hashing its holes as zeros, and kept in
``receipt_hashes`` (content id → BLAKE3; store-wide): unchanged files are
never read again.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3
import lmdb

from chronicle.errors import Corrupt, NotADirectory, NotFound
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, HOLE_ID
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
_ZEROS = bytes(1 << 20)


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


@dataclass(slots=True)
class _Frame:
    """A directory being summed: its entries, how far along, what is hashed so far."""

    ino: int
    entries: list
    name: bytes = b""
    mode: int = 0
    index: int = 0
    parts: list = field(default_factory=list)
    total: DirSum = field(default_factory=lambda: DirSum(b""))


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
                self._write(receipt, {})          # a fork's own copy of its parent's tree's receipt
                return receipt
            if base is None:
                dirty, full = set(), "no receipt before it"
            else:
                dirty, full = self._dirty(txn, base["seq"], seq)
            sums, stats = self._compute(txn, seq, dirty, full is not None, base["seq"] if base else None)
        receipt = self._receipt(seq, sums[self.ws.root], {
            "base": base["seq"] if base else None, "dirs": stats[0], "entries": stats[1], "full": full,
            "ms": round((time.perf_counter() - started) * 1000, 3)})
        self._write(receipt, sums)
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
            sums, stats = self._compute(txn, seq, set(), True, None)
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

    def _write(self, receipt: dict, sums: dict[int, DirSum]) -> None:
        seq = receipt["seq"]
        with self.env.begin(write=True) as txn:
            key = schema.event_key(self.ws.id, seq)
            if txn.get(key, db=self.dbs["receipts"]) is not None:
                return                                  # another writer was first: the same tree
            dirs = self.dbs["receipt_dirs"]
            for ino, total in sums.items():
                txn.put(_sum_key(self.ws.id, ino, seq), total.encode(), db=dirs)
            for content, digest in self._new_hashes.items():
                txn.put(content, digest, db=self.dbs["receipt_hashes"])
            txn.put(key, json.dumps(receipt).encode(), db=self.dbs["receipts"])
        self._new_hashes.clear()
        self.store.note_commit()

    # -- which directories changed -------------------------------------------------------

    def _dirty(self, txn: lmdb.Transaction, since: int, seq: int) -> tuple[set[int], str | None]:
        """The inos of the directories events in ``(since, seq]`` may have
        changed, and None; or ``(set(), why)`` if the receipt must be made
        from scratch (module docstring)."""
        dirty: set[int] = set()
        for event_seq, line in self.ws.history.log_entries(txn, since + 1, seq):
            event = json.loads(line)
            kind, path = event.get("event"), event.get("path")
            if kind == "restore" and "at" in event:
                return set(), f"a whole-tree restore at seq {event_seq}"
            if path is None:
                if kind in NAMESPACE_EVENTS:
                    return set(), f"a {kind} event at seq {event_seq} names no path"
                continue                        # an inode no name reaches: in no tree
            if kind in UNHASHED_EVENTS:
                continue
            view = TreeView(self.dbs, self.ws.chain, self.ws.root, event_seq)
            names = [os.fsencode(path)]
            if kind in ("rename", "link"):
                origin = event.get("from")
                if origin is None and kind == "rename":
                    return set(), f"a rename at seq {event_seq} without its old path"
                if origin is not None and kind == "rename":
                    names.append(os.fsencode(origin))
            for name in names:
                if not self._add_parents(txn, view, name, dirty):
                    return set(), f"the directory of {path!r} (seq {event_seq}) is not in its tree"
            if kind not in NAMESPACE_EVENTS and names[0] and self._linked_elsewhere(txn, view, names[0]):
                return set(), f"a file with more than one link changed at seq {event_seq}"
        return dirty, None

    @staticmethod
    def _add_parents(txn: lmdb.Transaction, view: TreeView, path: bytes, dirty: set[int]) -> bool:
        """Add the inos of the directories from the root to ``path``'s parent
        (in ``view``) to ``dirty``; False if one is missing."""
        ino = view.root
        dirty.add(ino)
        parts = [p for p in path.split(b"/") if p and p != b"."]
        for part in parts[:-1]:
            found = view.lookup(txn, ino, part)
            if found is None or found[1] != KIND_DIR:
                return False
            ino = found[0]
            dirty.add(ino)
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

    def _compute(self, txn: lmdb.Transaction, seq: int, dirty: set[int], full: bool,
                 base: int | None) -> tuple[dict[int, DirSum], tuple[int, int]]:
        """The sums of the directories recomputed for the tree at ``seq``
        (the root's under its ino), and ``(directories recomputed, entries
        read)``. A directory not in ``dirty`` keeps its latest sum at or
        before ``base`` unless ``full``. Iterative (paths may be deeper than
        Python's recursion limit)."""
        view = TreeView(self.dbs, self.ws.chain, self.ws.root, seq)
        base_layers = self._layers(base) if base is not None and not full else []
        sums: dict[int, DirSum] = {}
        entries_read = 0
        with txn.cursor(db=self.dbs["receipt_dirs"]) as cur:
            stack = [_Frame(view.root, view.entries(txn, view.root))]
            while True:
                frame = stack[-1]
                if frame.index == len(frame.entries):
                    total = frame.total
                    total.digest = dir_hash(frame.parts)
                    sums[frame.ino] = total
                    stack.pop()
                    if not stack:
                        return sums, (len(sums), entries_read)
                    parent = stack[-1]
                    parent.parts.append(entry_bytes(frame.name, b"d", frame.mode, total.digest))
                    _add(parent.total, total, dirs=1)
                    continue
                name, child, _kind = frame.entries[frame.index]
                frame.index += 1
                entries_read += 1
                attrs = view.attrs(txn, child)
                if attrs is None:
                    raise Corrupt(f"no inode record of ino {child} (entry {name!r} of directory ino {frame.ino})")
                mode = attrs.mode
                if stat.S_ISDIR(mode):
                    known = None if full or child in dirty else self._stored(cur, base_layers, child)
                    if known is None:
                        stack.append(_Frame(child, view.entries(txn, child), name, mode & 0o7777))
                        continue
                    frame.parts.append(entry_bytes(name, b"d", mode & 0o7777, known.digest))
                    _add(frame.total, known, dirs=1)
                elif stat.S_ISREG(mode):
                    frame.parts.append(entry_bytes(name, b"f", mode & 0o7777, self._content_digest(txn, attrs)))
                    frame.total.files += 1
                    frame.total.bytes += attrs.size
                elif stat.S_ISLNK(mode):
                    frame.parts.append(entry_bytes(name, b"l", 0, symlink_digest(attrs.target)))
                    frame.total.others += 1
                else:
                    frame.parts.append(entry_bytes(name, b"o", mode & 0o177777, special_digest(attrs.rdev)))
                    frame.total.others += 1

    @staticmethod
    def _stored(cur: lmdb.Cursor, layers: list, ino: int) -> DirSum | None:
        """The latest sum of directory ``ino`` in ``layers`` (the base's), or None."""
        for layer in layers:
            if cur.set_range(_sum_key(layer.ws, ino, layer.bound)):
                key = cur.key()
                if key[:12] == _KEY.pack(layer.ws, ino, 0)[:12]:
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
        digest = schema.content_header(raw)[2]
        if digest is not None:
            return digest
        digest = self._new_hashes.get(content) or txn.get(content, db=self.dbs["receipt_hashes"])
        if digest is None:
            digest = self._new_hashes[content] = self._hash_by_reading(content)
        return bytes(digest)

    def _hash_by_reading(self, content: bytes) -> bytes:
        """BLAKE3 of a content read chunk by chunk, its holes hashed as zeros."""
        record = self.store.content_map(content).record
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for i, length in enumerate(record.lengths):
            chunk = record.chunk_id(i)
            if chunk == HOLE_ID:
                while length > 0:
                    step = min(length, len(_ZEROS))
                    hasher.update(_ZEROS if step == len(_ZEROS) else _ZEROS[:step])
                    length -= step
            else:
                hasher.update(self.store.chunks.get(chunk))
        return hasher.digest()


def _add(total: DirSum, child: DirSum, *, dirs: int) -> None:
    total.files += child.files
    total.dirs += child.dirs + dirs
    total.others += child.others
    total.bytes += child.bytes


__all__ = ["DIR_DOMAIN", "DirSum", "EMPTY_DIR", "NAMESPACE_EVENTS", "RECEIPT_VERSION", "Receipts",
           "UNHASHED_EVENTS", "dir_hash", "entry_bytes", "special_digest", "symlink_digest"]
