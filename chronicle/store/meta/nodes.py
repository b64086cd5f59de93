"""Extent-tree nodes in LMDB (``content_nodes``, format 4): reading, walking, references.

The tree itself is defined in ``chronicle.store.chunks.tree``. Here:

- :class:`NodeStore` reads nodes by hash (an LRU of decoded nodes; nodes
  never change, so the cache needs no invalidation), walks a content's
  extents (:meth:`NodeStore.iter_extents`, the one iterator every reader of
  a content's extents uses), and loads the inner levels of a tree for
  ``ContentMap`` and ``build_content`` (:meth:`NodeStore.levels`);
- :func:`reference` and :func:`release` keep the reference counts when a
  content record is written or freed. **References**: a chunk's refcount is
  the number of distinct holders (flat content records and leaves) that
  list it; a node's is the number of distinct holders (tree roots and inner
  nodes) that list it. Writing a content puts only its nodes that are new
  and references their children; freeing one cascades: root -> the nodes
  whose refcount reaches 0 -> the chunks they held.

Threads: a :class:`NodeStore` is safe to use from any thread; :func:`reference`
and :func:`release` run inside the caller's write transaction.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator

import lmdb

from chronicle.errors import Corrupt
from chronicle.store.chunks.ids import HOLE_ID, to_hex
from chronicle.store.chunks.tree import Entry
from chronicle.store.meta import schema
from chronicle.store.meta.schema import ContentRecord

CACHE_NODES = 16384


class NodeStore:
    """The ``content_nodes`` database ``db`` of ``env``, read through a cache."""

    def __init__(self, env: lmdb.Environment, db: lmdb._Database, cache_nodes: int = CACHE_NODES):
        self._env = env
        self.db = db
        self._cache: OrderedDict[bytes, tuple[int, list[Entry]]] = OrderedDict()
        self._max = cache_nodes
        self._lock = threading.Lock()

    def get(self, key: bytes, txn: lmdb.Transaction | None = None) -> tuple[int, list[Entry]]:
        """``(height, entries)`` of node ``key``. Raises ``Corrupt`` if it is missing or damaged."""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            if txn is None:
                with self._env.begin(buffers=False) as own:
                    raw = own.get(key, db=self.db)
            else:
                raw = txn.get(key, db=self.db)
        except lmdb.Error as exc:
            raise Corrupt(f"content node {to_hex(key)} is on a damaged metadata page ({exc})") from None
        if raw is None:
            raise Corrupt(f"content node {to_hex(key)} is missing from the store")
        _refcount, height, entries = schema.decode_node(bytes(raw))
        self.remember(key, height, entries)
        return height, entries

    def remember(self, key: bytes, height: int, entries: list[Entry]) -> None:
        """Cache a node (a commit's new nodes, so reading the new version needs no LMDB read)."""
        with self._lock:
            self._cache[key] = (height, entries)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)

    def iter_extents(self, record: ContentRecord, txn: lmdb.Transaction | None = None) -> Iterator[Entry]:
        """Every extent ``(chunk id or HOLE_ID, length, 1)`` of a content, in order."""
        if not record.height:
            ids, lengths = record.ids, record.lengths
            for i, length in enumerate(lengths):
                yield ids[i * 32:(i + 1) * 32], length, 1
            return
        stack = [(record.height, list(reversed(record.root)))]
        while stack:
            height, todo = stack[-1]
            if not todo:
                stack.pop()
                continue
            ref = todo.pop()
            child_height, entries = self.get(ref[0], txn)
            if child_height != height:
                raise Corrupt(f"content node {to_hex(ref[0])} has height {child_height}, expected {height}")
            if height == 1:
                yield from entries
            else:
                stack.append((height - 1, list(reversed(entries))))

    def flat(self, record: ContentRecord, txn: lmdb.Transaction | None = None) -> ContentRecord:
        """``record`` with its extents inline (itself if flat already). Raises ``Corrupt``."""
        if not record.height:
            return record
        out = schema.flat_record(record.size, record.hash, list(self.iter_extents(record, txn)))
        out.refcount = record.refcount
        return out

    def levels(self, record: ContentRecord, txn: lmdb.Transaction | None = None
               ) -> tuple[list[list[Entry]], list[list[int]]]:
        """The inner levels of a tree content, for ``chunks.tree.update``:
        ``levels[j]`` (``1 <= j <= height``) the level-``j`` entries, and
        ``ends[j]`` (``j < height``) the cumulative end indices of level
        ``j``'s nodes (``ends[0]`` from the leaves' extent counts). Reads the
        inner nodes only (about one per 40 leaves), not the leaves."""
        h = record.height
        levels: list[list[Entry]] = [[] for _ in range(h + 1)]
        ends: list[list[int]] = [[] for _ in range(h)]
        levels[h] = list(record.root)
        for j in range(h, 1, -1):
            out: list[Entry] = []
            cut: list[int] = []
            for ref in levels[j]:
                height, entries = self.get(ref[0], txn)
                if height != j:
                    raise Corrupt(f"content node {to_hex(ref[0])} has height {height}, expected {j}")
                out.extend(entries)
                cut.append(len(out))
            levels[j - 1] = out
            ends[j - 1] = cut
        if h:
            total = 0
            for ref in levels[1]:
                total += ref[2]
                ends[0].append(total)
        return levels, ends


def _holds(height: int, entries) -> set[bytes]:
    return {e[0] for e in entries} - ({HOLE_ID} if height == 0 else set())


def root_entries(record: ContentRecord) -> tuple[int, set[bytes]]:
    """``(level, distinct ids)`` a content record holds directly: chunk ids
    (level 0, holes left out) or node hashes."""
    if record.height:
        return record.height, _holds(record.height, record.root)
    ids = record.ids
    return 0, {ids[i:i + 32] for i in range(0, len(ids), 32)} - {HOLE_ID}


def reference(txn: lmdb.Transaction, db: lmdb._Database, record: ContentRecord,
              new_nodes: dict[bytes, tuple[int, list[Entry]]]) -> Counter:
    """A new content record ``record`` is being written: put its nodes that
    are not stored yet (from ``new_nodes``), count the references it and
    they add, and return the chunk references to add (chunk id -> count,
    for ``ChunkStore.add_chunk_refs``). Raises ``Corrupt`` for a node that
    is neither stored nor new."""
    chunks: Counter = Counter()
    level, held = root_entries(record)
    if level == 0:
        chunks.update(held)
        return chunks
    work = list(held)
    while work:
        key = work.pop()
        raw = txn.get(key, db=db)
        if raw is not None:
            txn.put(key, schema.node_with_refcount(raw, schema.node_refcount(raw) + 1), db=db)
            continue
        try:
            height, entries = new_nodes[key]
        except KeyError:
            raise Corrupt(f"content node {to_hex(key)} is referenced but was never stored") from None
        txn.put(key, schema.encode_node(1, height, entries), db=db)
        children = _holds(height - 1, entries)
        if height == 1:
            chunks.update(children)
        else:
            work.extend(children)
    return chunks


def releases(txn: lmdb.Transaction, db: lmdb._Database, records: Iterable[ContentRecord],
             chunk_drops: dict[bytes, int]) -> tuple[dict[bytes, int], dict[bytes, bytes]]:
    """What deleting the content records ``records`` together gives back,
    read in ``txn`` and nothing written: :func:`release` summed over them (a
    node is freed once its last holder among them, or a node freed before,
    goes; then what it holds goes too). Chunk references to drop are added
    to ``chunk_drops`` (chunk id -> count); returns ``(drops, raw)``: the
    references dropped per node and each such node's stored bytes (a node
    with ``drops`` equal to its refcount is freed). The sweep writes this,
    the dry run counts it. Raises ``Corrupt`` for a missing node or a
    refcount that would go negative."""
    pending: list[bytes] = []
    for record in records:
        level, held = root_entries(record)
        if level == 0:
            for chunk_id in held:
                chunk_drops[chunk_id] = chunk_drops.get(chunk_id, 0) + 1
        else:
            pending.extend(held)
    drops: dict[bytes, int] = {}
    stored: dict[bytes, bytes] = {}
    while pending:
        key = pending.pop()
        raw = stored.get(key)
        if raw is None:
            raw = txn.get(key, db=db)
            if raw is None:
                raise Corrupt(f"content node {to_hex(key)} is referenced but missing")
            raw = stored[key] = bytes(raw)
        drops[key] = drops.get(key, 0) + 1
        left = schema.node_refcount(raw) - drops[key]
        if left < 0:
            raise Corrupt("content node refcount would go negative")
        if left:
            continue
        _rc, height, entries = schema.decode_node(raw)
        children = _holds(height - 1, entries)
        if height == 1:
            for chunk_id in children:
                chunk_drops[chunk_id] = chunk_drops.get(chunk_id, 0) + 1
        else:
            pending.extend(children)
    return drops, stored


def release(txn: lmdb.Transaction, db: lmdb._Database, record: ContentRecord) -> tuple[Counter, int]:
    """A content record is being deleted (GC): drop the references it
    holds, deleting every node whose refcount reaches 0 and dropping what
    that node held. Returns ``(chunk references to drop, nodes freed)``.
    Raises ``Corrupt`` for a missing node or a negative refcount."""
    chunks: Counter = Counter()
    level, held = root_entries(record)
    if level == 0:
        chunks.update(held)
        return chunks, 0
    freed = 0
    work = list(held)
    while work:
        key = work.pop()
        raw = txn.get(key, db=db)
        if raw is None:
            raise Corrupt(f"content node {to_hex(key)} is referenced but missing")
        refcount = schema.node_refcount(raw) - 1
        if refcount > 0:
            txn.put(key, schema.node_with_refcount(raw, refcount), db=db)
            continue
        _rc, height, entries = schema.decode_node(bytes(raw))
        txn.delete(key, db=db)
        freed += 1
        children = _holds(height - 1, entries)
        if height == 1:
            chunks.update(children)
        else:
            work.extend(children)
    return chunks, freed
