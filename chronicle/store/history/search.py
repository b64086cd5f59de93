"""History-wide queries: content by hash, grep, what a turn changed (SPEC §2, §4).

- :func:`hash_lookup` — ``.chronicle/hash/<hex>``: every path, version and
  turn whose content had a BLAKE3 hash. It scans the workspace's path entries
  (through its fork layers) once, testing each entry's stored JSON for
  ``"hash": "<prefix>`` (or, for an entry stored with its hash cut out, its
  content id) before decoding it: no index is kept, so the cost is
  O(path entries) — about 2 µs an entry (20,000 versions: 35 ms measured),
  and the store format is unchanged.
- :func:`grep` — the lines matching a Python :mod:`re` pattern (bytes
  regex: ``re.search`` on each line, ``\\n`` removed) in the files of the head
  tree, or in every kept version (``history``) of every path, in a seq range.
  A version shows once, under the first path whose (rename-following)
  history holds it: paths at the head first, then deleted ones (so a file
  renamed ``a`` → ``b`` shows its old versions as ``b@N``, not twice).
  Each distinct content is read and searched once (dedupe by content id),
  whichever paths and versions share it; binary contents
  (:func:`~chronicle.store.history.blame.is_binary`) are skipped.
- :func:`turn_changes` — ``.chronicle/turns/<agent>/<n>``: a turn's label,
  its record's status and summary, and the file events in its seq range that
  carry its label.

Permissions: as everywhere in the views, only what the caller could read:
versions it may not read are left out of hash answers and history grep;
head grep skips directories it may not list and files it may not read;
a turn's events about paths it may not see are left out.

Threads: as the views (each call opens and closes its own read transaction).
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chronicle.errors import InvalidArgument, NotADirectory, NotFound
from chronicle.store.chunks.ids import ID_SIZE, PRUNED_ID
from chronicle.store.history.access import R_OK, X_OK, permits
from chronicle.store.history.blame import is_binary
from chronicle.store.history.reads import ReadLog
from chronicle.store.history.turns import TurnLog
from chronicle.store.meta import schema
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT, P_HASH_CUT, PathEntry
from chronicle.store.model import KIND_DIR, KIND_FILE

if TYPE_CHECKING:
    import lmdb

    from chronicle.store.history.views import HistoryViews

HASH_MIN = 8                # hex digits a hash prefix needs
HASH_LEN = 64
_HEX = frozenset(string.hexdigits.lower())


# -- every path entry ----------------------------------------------------------------------


def _entries(views: HistoryViews, txn: lmdb.Transaction) -> Iterator[tuple[bytes, int, bytes, bytes]]:
    """``(path key, seq, raw value, key)`` of every path entry the workspace sees
    (oldest layer first; within a layer by path key then seq)."""
    db = views.ws.dbs["paths"]
    with txn.cursor(db=db) as cur:
        for layer in reversed(views.ws.history.layers):
            prefix = schema.ws_key(layer.ws)
            if not cur.set_range(prefix):
                continue
            for key, value in cur:
                if key[:4] != prefix:
                    break
                seq = schema.path_key_seq(key)
                if seq > layer.bound:
                    continue
                ident = schema.path_key_ident(key)
                yield ident, seq, value, key   # decoded by the caller, if it wants it


# a packed fragment's hash other than its content id: MessagePack ext 8, 32 bytes, type 1 (meta.events)
_PACKED_HASH = b"\xc7\x20\x01"


def _cut_hash(value: bytes) -> str:
    """The hex hash of an entry stored with its hash cut out (``schema.P_HASH_CUT``, or packed with the
    content mark): its content id."""
    return bytes(value[schema.PATH_ENTRY_CONTENT_AT:schema.PATH_ENTRY_CONTENT_AT + ID_SIZE]).hex()


def _decode(ident: bytes, value: bytes, key: bytes) -> tuple[bytes, PathEntry]:
    entry = PathEntry.decode(value, key)
    return (entry.path if schema.ident_is_long(ident) else ident), entry


def all_paths(views: HistoryViews, txn: lmdb.Transaction) -> list[bytes]:
    """Every path with an entry (deleted ones too), sorted."""
    out = set()
    for ident, _seq, value, key in _entries(views, txn):
        out.add(ident if not schema.ident_is_long(ident) else PathEntry.decode(value, key).path)
    return sorted(out)


# -- hash --------------------------------------------------------------------------------------


def parse_hash(text: str) -> str:
    """A hash or hash prefix: 8 to 64 hex digits (any case; returned lower).
    Raises :class:`InvalidArgument`."""
    low = text.lower()
    if not HASH_MIN <= len(low) <= HASH_LEN or not set(low) <= _HEX:
        raise InvalidArgument(f"a content hash is {HASH_MIN} to {HASH_LEN} hex digits (BLAKE3), not {text!r}")
    return low


def hash_lookup(views: HistoryViews, text: str) -> dict:
    """``{"hash": full hex, "versions": [{"path", "version", "seq", "time", "turn"}, ...]}``,
    ordered by seq, of the versions whose content has the hash ``text``
    names (the whole hash, or a prefix of at least :data:`HASH_MIN` digits
    that only one hash has).

    Raises :class:`InvalidArgument` (not a hash; a prefix several hashes
    share — the message names them), :class:`NotFound` (no version the
    caller may read has it).
    """
    prefix = parse_hash(text)
    needle = b'"hash": "' + prefix.encode()
    hits: dict[str, list[tuple[bytes, int]]] = {}
    with views.ws.read_txn() as txn:
        for ident, seq, value, key in _entries(views, txn):
            if needle not in value and not (value[0] & P_HASH_CUT and _cut_hash(value).startswith(prefix)) \
                    and not (value[0] & P_CONTENT and schema.entry_is_packed(value)
                             and (_cut_hash(value).startswith(prefix) or _PACKED_HASH in value)):
                continue
            path, entry = _decode(ident, value, key)
            if not (entry.flags & P_CONTENT and entry.flags & P_BUMPS):
                continue
            frag = json.loads(b"{" + entry.fragment)
            full = frag.get("hash") or ""
            if full.startswith(prefix):
                hits.setdefault(full, []).append((path, seq))
        found: dict[str, list[dict]] = {}
        for full, places in hits.items():
            rows = _readable_rows(views, txn, places)
            if rows:
                found[full] = rows
    if not found:
        raise NotFound(f"no version has content hash {prefix}")
    if len(found) > 1:
        names = ", ".join(sorted(found)[:4]) + (", ..." if len(found) > 4 else "")
        raise InvalidArgument(f"hash prefix {prefix} is ambiguous: {len(found)} hashes have it ({names})")
    (full, rows), = found.items()
    return {"hash": full, "versions": sorted(rows, key=lambda r: (r["seq"], r["path"]))}


def _readable_rows(views: HistoryViews, txn: lmdb.Transaction, places: list[tuple[bytes, int]]) -> list[dict]:
    """The rows of ``(path, seq)`` entries: numbered along each path's
    followed history (the version of a renamed path is counted there)."""
    rows = []
    by_path: dict[bytes, set[int]] = {}
    for path, seq in places:
        by_path.setdefault(path, set()).add(seq)
    for path, seqs in by_path.items():
        try:
            versions = views.ws.history.content_versions(txn, path)
        except NotFound:
            continue
        for v in versions.values():
            if v.seq in seqs and (views.access.everything or views.access.version(txn, path, v)):
                frag = json.loads(b"{" + v.entry.fragment)
                rows.append({"path": path_text(path), "version": v.version, "seq": v.seq,
                             "time": frag.get("time"), "turn": frag.get("turn")})
    return rows


# -- grep --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """One matching line: ``version`` None for the head tree; ``line`` 1-based."""

    path: bytes
    version: int | None
    line: int
    text: bytes


class Grep:
    """A grep over one workspace (:func:`grep` is the usual way in);
    ``contents_read`` counts the distinct contents read (the dedupe)."""

    def __init__(self, views: HistoryViews, pattern: str | bytes):
        raw = pattern.encode("utf-8", "surrogateescape") if isinstance(pattern, str) else pattern
        try:
            self.regex = re.compile(raw)
        except re.error as exc:
            raise InvalidArgument(f"bad regular expression {pattern!r}: {exc}") from None
        self.views = views
        self.contents_read = 0
        self._cache: dict[bytes, list[tuple[int, bytes]]] = {}

    def _search(self, content: bytes) -> list[tuple[int, bytes]]:
        found = self._cache.get(content)
        if found is None:
            cm = self.views.store.content_map(content)
            data = cm.read(0, cm.size)
            self.contents_read += 1
            found = [] if is_binary(data) else [
                (n, line) for n, line in enumerate(data.split(b"\n"), 1) if self.regex.search(line)]
            if found and data.endswith(b"\n") and found[-1][0] > data.count(b"\n"):
                found.pop()                     # the empty piece after the last newline is no line
            self._cache[content] = found
        return found

    def head(self, roots: list[bytes]) -> Iterator[Match]:
        """Matches in the files of the head tree under ``roots`` (b"" is the whole tree), by path."""
        files: list[tuple[bytes, bytes]] = []
        with self.views.ws.read_txn() as txn:
            view = self.views.ws.view()
            for root in roots:
                try:
                    ino, kind = view.resolve(txn, root)
                except (NotFound, NotADirectory):
                    raise NotFound(f"no {path_text(root) or '.'!r} in the workspace") from None
                self._walk(txn, view, root, ino, kind, files)
        for path, content in sorted(set(files)):
            for n, line in self._search(content):
                yield Match(path, None, n, line)

    def _walk(self, txn, view, path: bytes, ino: int, kind: int, out: list) -> None:
        attrs = view.attrs(txn, ino)
        if attrs is None:
            return
        everything = self.views.access.everything
        if kind == KIND_DIR:
            if not everything and not permits(attrs, self.views.caller, R_OK | X_OK):
                return
            for name, child, child_kind in view.entries(txn, ino):
                self._walk(txn, view, path + b"/" + name if path else name, child, child_kind, out)
        elif kind == KIND_FILE and attrs.is_file and attrs.content != PRUNED_ID and (
                everything or permits(attrs, self.views.caller, R_OK)):
            out.append((path, attrs.content))

    def history(self, roots: list[bytes], lo: int = 0, hi: int | None = None) -> Iterator[Match]:
        """Matches in every kept version with seq in ``[lo, hi]`` of every path
        under ``roots``, by path then version."""
        with self.views.ws.read_txn() as txn:
            picked = []
            seen: set[tuple[int, bytes]] = set()
            view = self.views.ws.view()
            paths = [p for p in all_paths(self.views, txn)
                     if any(not r or p == r or p.startswith(r + b"/") for r in roots)]
            live = {p for p in paths if _exists(txn, view, p)}
            for path in sorted(live) + [p for p in paths if p not in live]:
                try:
                    versions = self.views.ws.history.content_versions(txn, path)
                except NotFound:
                    continue
                for n in sorted(versions):
                    v = versions[n]
                    if (v.seq, v.entry.fragment) in seen or v.seq < lo or (hi is not None and v.seq > hi):
                        continue
                    if self.views.access.everything or self.views.access.version(txn, path, v):
                        seen.add((v.seq, v.entry.fragment))
                        picked.append((path, n, v.entry.content))
        for path, n, content in sorted(picked):
            for line_no, line in self._search(content):
                yield Match(path, n, line_no, line)


def _exists(txn: lmdb.Transaction, view, path: bytes) -> bool:
    try:
        view.resolve(txn, path)
    except (NotFound, NotADirectory):
        return False
    return True


def grep(views: HistoryViews, pattern: str | bytes, roots: list[bytes] | None = None, *, history: bool = False,
         lo: int = 0, hi: int | None = None) -> Iterator[Match]:
    """The matches of ``pattern`` (module docstring). Raises :class:`InvalidArgument`
    (a bad pattern), :class:`NotFound` (a root not in the head tree, head mode)."""
    searcher = Grep(views, pattern)
    roots = roots or [b""]
    return searcher.history(roots, lo, hi) if history else searcher.head(roots)


# -- turns -------------------------------------------------------------------------------------

_RECORD_SUMMARY = ("status", "kind", "time", "end_time", "duration_ms", "error", "reply", "steps")


def turn_changes(views: HistoryViews, agent: str, turn: int) -> dict:
    """What turn ``turn`` of ``agent`` did in this workspace::

        {"agent", "turn", "status", "begin_seq", "end_seq", "begin_time", "end_time",
         "record": {status, kind, time, end_time, duration_ms, error, reply, steps (count)} | null,
         "paths": [changed paths, sorted], "events": [log records of its file events],
         "receipt": hex root of the tree at its end (``receipts``) | null,
         "reads": [its read-set: the reads of chronicle.store.history.reads]}

    ``status`` is the record's, else ``"ended"``/``"open"`` from the label;
    ``reads`` holds the files the caller may read now whose version read the
    caller could read (``access``).
    Raises :class:`NotFound` (no such turn in this workspace).
    """
    ws = views.ws
    label = ws.store.get_turn(ws, agent, turn)
    if label is None:
        raise NotFound(f"no turn {turn} of agent {agent!r} in workspace {ws.name!r}")
    from_log = _record(views, agent, turn)
    begin, end = label.get("begin_seq"), label.get("end_seq")
    events = []
    if begin is not None and (end is None or end >= begin):
        with ws.read_txn() as txn:
            for seq, line in ws.history.log_entries(txn, begin, end if end is not None else ws.head_seq):
                event = json.loads(line)
                tag = event.get("turn") or {}
                if tag.get("agent") != agent or tag.get("turn") != turn:
                    continue
                if views.access.everything or views.access.log_line(txn, seq, line):
                    events.append(event)
    status = (from_log or {}).get("status") or ("ended" if end is not None else "open")
    paths = sorted({p for e in events for p in (e.get("path"), e.get("to")) if isinstance(p, str)})
    return {"agent": agent, "turn": turn, "status": status, "begin_seq": begin, "end_seq": end,
            "begin_time": label.get("begin_time"), "end_time": label.get("end_time"), "record": from_log,
            "paths": paths, "events": events, "receipt": label.get("receipt"),
            "reads": _turn_reads(views, agent, turn)}


def _turn_reads(views: HistoryViews, agent: str, turn: int) -> list[dict]:
    """The read-set of the turn (kept in the layer it ran in), as the caller may see it."""
    ws, access = views.ws, views.access
    log = ReadLog(ws.store)
    with ws.read_txn() as txn:
        for layer in ws.history.layers:               # the layer whose label this workspace sees (TurnLog.label)
            raw = txn.get(schema.turn_key(layer.ws, agent.encode(), turn), db=ws.dbs["turns"])
            end = json.loads(raw).get("end_seq") if raw is not None else None
            if raw is not None and (layer.ws == ws.id or (end is not None and end <= layer.bound)):
                reads = log.layer_reads(txn, layer.ws, agent, turn)
                break
        else:
            return []
        if access.everything:
            return reads
        out = []
        for read in reads:
            path = os.fsencode(read["path"])
            if not access.now(txn, path, R_OK):
                continue
            if read.get("version") is not None:
                try:
                    found = [v for v in ws.history.versions(txn, path) if v.version == read["version"]
                             and v.entry.flags & P_BUMPS]
                except NotFound:
                    continue
                if not found or not access.version(txn, path, found[-1]):
                    continue
            out.append(read)
        return out


def _record(views: HistoryViews, agent: str, turn: int) -> dict | None:
    record = TurnLog(views.store).record(agent, turn)
    if record is None:
        return None
    out = {k: record.get(k) for k in _RECORD_SUMMARY if k in record}
    if isinstance(out.get("steps"), list):
        out["steps"] = len(out["steps"])
    return out


def turn_agents(views: HistoryViews) -> dict[str, list[int]]:
    """Agent name → its turn numbers this workspace sees (labels), sorted."""
    out: dict[str, set[int]] = {}
    for label in views.store.turns(views.ws):
        out.setdefault(label["agent"], set()).add(label["turn"])
    return {a: sorted(t) for a, t in sorted(out.items())}
