"""History of paths and of a workspace: the read side of the path index.

A path's **history** is the list of its path entries, oldest first, each
numbered with the path's version after it (``chronicle.store.meta.journal``
explains the numbering). History **follows renames** as ``git log --follow``:

- where the path's newest occupant arrived by a rename to a free path, the
  history before that rename is the history of the path it came from;
- where an ancestor directory arrived by such a rename, the history before
  it is that of the same relative path under the directory's old path,
  unless the file itself was created after the move.

A rename over an existing file does not follow: the path keeps its own
history and the rename is a new version of it (an editor's atomic save).
Deleted paths keep their history, and nothing recorded drops out of it: when
something arrives at a path that has history of its own (``rm g; mv f g``),
the history is the path's own entries before the arrival, then the followed
history, then the arrival and what came after — each entry once, numbered
on. A fork's history is its parent's up to the fork seq, then its own.

Paths of any length: long ones are keyed by digest (``schema.path_ident``);
readers compare the whole path kept in the entry.

Threads: a :class:`History` holds no transaction; methods take ``txn``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from chronicle.errors import NotFound
from chronicle.store.meta import events, schema
from chronicle.store.meta.journal import iso_time, path_text
from chronicle.store.meta.schema import P_ARRIVED, P_BUMPS, P_CONTENT, P_GONE, P_UNVERSIONED, PathEntry, PathHead
from chronicle.store.meta.tree import Layer, TreeView

_MAX_FOLLOW = 256


def _joined(*parts: list[tuple[int, bytes, PathEntry]]) -> list[tuple[int, bytes, PathEntry]]:
    """The parts one after the other, each entry (recorded path and seq) once."""
    seen: set[tuple[int, bytes]] = set()
    out = []
    for part in parts:
        for item in part:
            if (item[0], item[1]) not in seen:
                seen.add((item[0], item[1]))
                out.append(item)
    return out


@dataclass(frozen=True, slots=True)
class Version:
    """One numbered entry of a path's history."""

    version: int
    seq: int
    entry: PathEntry


class History:
    """Path histories and the event log of one workspace (read through its fork layers)."""

    def __init__(self, dbs: dict, chain: list[tuple[int, int | None]]):
        self.dbs = dbs
        self.chain = chain
        self.layers: list[Layer] = TreeView._layers(chain, None)

    # -- raw entries -------------------------------------------------------------

    def own_entries(self, txn: lmdb.Transaction, path: bytes, before: int | None = None) -> list[tuple[int, PathEntry]]:
        """``(seq, entry)`` recorded under ``path`` itself with seq < ``before``, oldest first."""
        out: list[tuple[int, PathEntry]] = []
        db = self.dbs["paths"]
        long_path = schema.is_long(path)
        with txn.cursor(db=db) as cur:
            for layer in reversed(self.layers):
                prefix = schema.path_prefix(layer.ws, path)
                if not cur.set_range(prefix):
                    continue
                for key, value in cur:
                    if key[:len(prefix)] != prefix:      # paths hold no NUL: the prefix is exact
                        break
                    seq = schema.path_key_seq(key)
                    if seq > layer.bound or (before is not None and seq >= before):
                        break
                    entry = PathEntry.decode(value, key)
                    if long_path and entry.path != path:
                        continue                         # a digest key of another path (never seen)
                    out.append((seq, entry))
        return out

    # -- followed history --------------------------------------------------------

    def followed(self, txn: lmdb.Transaction, path: bytes, before: int | None = None) -> list[tuple[int, PathEntry]]:
        """The history of ``path`` with renames followed back (module docstring), oldest first."""
        return [(seq, entry) for seq, _path, entry in self._followed(txn, path, before, 0, {})]

    def _followed(self, txn: lmdb.Transaction, path: bytes, before: int | None, depth: int,
                  memo: dict) -> list[tuple[int, bytes, PathEntry]]:
        """``(seq, recorded path, entry)`` of :meth:`followed`. What the path
        itself recorded before the arrival that is followed comes first (a
        path deleted and then arrived at keeps its own history), then the
        followed history (entries already listed are not repeated), then the
        path's own entries from the arrival on. ``memo`` keeps each
        ``(path, before)`` computed once (names renamed back and forth would
        otherwise branch exponentially)."""
        found = memo.get((path, before))
        if found is None:
            found = memo[(path, before)] = self._follow_once(txn, path, before, depth, memo)
        return found

    def _follow_once(self, txn: lmdb.Transaction, path: bytes, before: int | None, depth: int,
                     memo: dict) -> list[tuple[int, bytes, PathEntry]]:
        own = [(seq, path, entry) for seq, entry in self.own_entries(txn, path, before)]
        if depth >= _MAX_FOLLOW:
            return own
        own_cut = None
        for seq, _path, entry in reversed(own):
            if entry.flags & P_ARRIVED:
                if entry.origin:
                    own_cut = (seq, entry.origin)
                break
        anc = self._ancestor_arrival(txn, path, before)
        if own_cut and (anc is None or own_cut[0] >= anc[0]):
            seq, origin = own_cut
            return _joined(self._followed(txn, path, seq, depth + 1, memo),
                           self._followed(txn, origin, seq, depth + 1, memo), [item for item in own if item[0] >= seq])
        if anc is not None:
            seq, old_path = anc
            after = [item for item in own if item[0] >= seq]
            if after and after[0][2].flags & P_ARRIVED:
                return own          # created after the directory moved: not the same file
            earlier = self._followed(txn, old_path, seq, depth + 1, memo)
            if not after and (not earlier or earlier[-1][2].flags & P_GONE):
                return own
            return _joined(self._followed(txn, path, seq, depth + 1, memo), earlier, after)
        return own

    def _ancestor_arrival(self, txn: lmdb.Transaction, path: bytes, before: int | None) -> tuple[int, bytes] | None:
        """The latest rename of an ancestor directory of ``path`` to a free path,
        before ``before``: ``(seq, path of `path` under the old directory name)``."""
        best = None
        parts = path.split(b"/")
        for depth in range(1, len(parts)):
            ancestor = b"/".join(parts[:depth])
            for seq, entry in reversed(self.own_entries(txn, ancestor, before)):
                if entry.flags & P_ARRIVED:
                    if entry.origin and (best is None or seq > best[0]):
                        best = (seq, entry.origin + b"/" + b"/".join(parts[depth:]))
                    break
        return best

    def versions(self, txn: lmdb.Transaction, path: bytes) -> list[Version]:
        """Every entry of the followed history, numbered. Raises :class:`NotFound`
        if the path never existed."""
        items = self.followed(txn, path)
        if not items:
            raise NotFound(f"no history for {path_text(path)!r}: it never existed")
        out = []
        version = 0
        for seq, entry in items:
            if entry.flags & P_BUMPS:
                version += 1
            out.append(Version(version, seq, entry))
        return out

    def content_versions(self, txn: lmdb.Transaction, path: bytes) -> dict[int, Version]:
        """Version number → the entry that created it, for versions with file content."""
        found = {}
        for v in self.versions(txn, path):
            if v.entry.flags & P_BUMPS and v.entry.flags & P_CONTENT:
                found[v.version] = v
        return found

    def compute_head(self, txn: lmdb.Transaction, path: bytes) -> PathHead | None:
        items = self.followed(txn, path)
        if not items:
            return None
        version = sum(1 for _, e in items if e.flags & P_BUMPS)
        return PathHead(version, items[-1][0], items[-1][1].ino)

    def render_query(self, txn: lmdb.Transaction, path: bytes) -> bytes:
        """The JSON of ``.chronicle/query/<path>`` (SPEC §4). An ignored path
        whose latest version replaced the others (``P_UNVERSIONED``) shows
        ``"unversioned": true`` and its entries from that version on."""
        versions = self.versions(txn, path)
        last = next((v for v in reversed(versions) if v.entry.flags & P_BUMPS), None)
        head = b'{"path": ' + json.dumps(path_text(path)).encode()
        if last is not None and last.entry.flags & P_UNVERSIONED:
            versions = [v for v in versions if v.seq >= last.seq]
            head += b', "unversioned": true'
        parts = [b'{"version": %d, ' % v.version + v.entry.fragment for v in versions]
        return head + b', "versions": [' + b", ".join(parts) + b"]}\n"

    def has_history(self, txn: lmdb.Transaction, path: bytes) -> bool:
        return bool(self.followed(txn, path))

    def children_with_history(self, txn: lmdb.Transaction, directory: bytes) -> set[bytes]:
        """Names directly below ``directory`` that have path entries (including
        deleted ones), at any path length (``schema.below_prefix``).

        One seek per name where the key shows the whole name: past
        ``name/`` (to ``name0``) or past ``name``'s own entries (to
        ``name\\x01``); where a digest key cuts the name off, the whole path
        comes from the entry and the scan steps to the next key."""
        names: set[bytes] = set()
        db = self.dbs["paths"]
        below, exact = schema.below_prefix(directory)
        base = directory + b"/" if directory else b""
        with txn.cursor(db=db) as cur:
            for layer in self.layers:
                prefix = schema.ws_key(layer.ws) + below
                if not cur.set_range(prefix):
                    continue
                while True:
                    key = cur.key()
                    if key[:len(prefix)] != prefix:
                        break
                    ident = schema.path_key_ident(key)
                    if schema.ident_is_long(ident):
                        shown = ident[len(below) if exact else 0:schema.PATH_KEY_MAX]
                        if not exact or b"/" not in shown:
                            whole = PathEntry.decode(cur.value(), key).path
                            if whole.startswith(base):
                                names.add(whole[len(base):].split(b"/", 1)[0])
                            if not cur.next():
                                break
                            continue
                        name = shown.split(b"/", 1)[0]
                        after = b"0"
                    else:
                        name, slash, _ = ident[len(below):].partition(b"/")
                        after = b"0" if slash else b"\x01"     # past name/..., or past name's own entries
                    if name:
                        names.add(name)
                    if not cur.set_range(prefix + name + after):
                        break
        return names

    # -- the event log -------------------------------------------------------------

    def log_lines(self, txn: lmdb.Transaction, since: int = 0, until: int | None = None) -> Iterator[bytes]:
        """``.chronicle/log`` lines (no newline) with ``since <= seq <= until``, oldest first."""
        for _seq, line in self.log_entries(txn, since, until):
            yield line

    def log_entries(self, txn: lmdb.Transaction, since: int = 0,
                    until: int | None = None) -> Iterator[tuple[int, bytes]]:
        """``(seq, log line without newline)`` with ``since <= seq <= until``,
        oldest first, through the fork layers. Each call seeks (O(log n)), so
        a reader can stop and resume at any seq."""
        db = self.dbs["events"]
        with txn.cursor(db=db) as cur:
            for layer in reversed(self.layers):
                prefix = schema.ws_key(layer.ws)
                if not cur.set_range(schema.event_key(layer.ws, since)):
                    continue
                for key, value in cur:
                    if key[:4] != prefix:
                        break
                    seq = schema.event_key_seq(key)
                    if seq > layer.bound or (until is not None and seq > until):
                        break
                    yield seq, events.render(seq, value)

    def event(self, txn: lmdb.Transaction, seq: int) -> dict | None:
        """The log record of one seq, or None."""
        for layer in self.layers:
            if seq <= layer.bound:
                raw = txn.get(schema.event_key(layer.ws, seq), db=self.dbs["events"])
                if raw is not None:
                    return events.decode(seq, raw)
        return None

    def seq_at_time(self, txn: lmdb.Transaction, time_ns: int) -> int:
        """The last seq whose event time is at or before ``time_ns`` (0 if none)."""
        target = iso_time(time_ns)
        lo_seq = 0
        # Events are in time order; scan layer by layer with a bisection on seq.
        for layer in reversed(self.layers):
            keys = self._layer_seq_range(txn, layer)
            if keys is None:
                continue
            lo, hi = keys
            if self._time_of(txn, layer.ws, lo) > target:
                break
            while lo < hi:
                mid = (lo + hi + 1) // 2
                t = self._time_of(txn, layer.ws, mid)
                if t is None or t <= target:
                    lo = mid
                else:
                    hi = mid - 1
            lo_seq = lo
        return lo_seq

    def _layer_seq_range(self, txn: lmdb.Transaction, layer: Layer) -> tuple[int, int] | None:
        db = self.dbs["events"]
        with txn.cursor(db=db) as cur:
            if not cur.set_range(schema.ws_key(layer.ws)):
                return None
            key = cur.key()
            if key[:4] != schema.ws_key(layer.ws):
                return None
            first = schema.event_key_seq(key)
            if not cur.set_range(schema.event_key(layer.ws, min(layer.bound, schema.SEQ_MAX - 1) + 1)):
                cur.last()
            else:
                cur.prev()
            key = cur.key()
            if key[:4] != schema.ws_key(layer.ws):
                return None
            last = min(schema.event_key_seq(key), layer.bound)
            return (first, last) if first <= last else None

    def _time_of(self, txn: lmdb.Transaction, ws: int, seq: int) -> str | None:
        raw = txn.get(schema.event_key(ws, seq), db=self.dbs["events"])
        if raw is None:
            # a seq inside a run GC summarised (``gc.unversioned``): the time of the line before it
            with txn.cursor(db=self.dbs["events"]) as cur:
                moved = cur.prev() if cur.set_range(schema.event_key(ws, seq)) else cur.last()
                if not moved or cur.key()[:4] != schema.ws_key(ws):
                    return None
                seq, raw = schema.event_key_seq(cur.key()), cur.value()
        return events.time_of(seq, raw)
