"""Writing one event: the records a mutation leaves, in one LMDB transaction.

Every mutation of a workspace is one **event** with the next **seq**, written
by one :class:`EventWriter` inside one write transaction:

- inode records (``inodes``, keyed by seq) — each counts one reference on the
  content it names;
- directory entries (``dirents`` head table and ``dirent_hist``);
- the event's ``.chronicle/log`` line (``events``), stored compact
  (``meta.events``: rendered back to the same JSON);
- one path entry per path the event concerns (``paths``), with that path's
  version number (``path_heads``); both keyed by path key
  (``schema.path_ident``: a digest past ``schema.PATH_KEY_MAX`` bytes), so
  any path can be recorded. A record that cannot be written raises, and the
  whole event is aborted: a version is never committed without its entry.

**Version numbers.** Each path's history (``chronicle.store.history.paths``) is a
list of entries; entries flagged ``P_BUMPS`` (new content at the path) get
the next number. A rename to a free path continues the history of the path
it came from (as ``git log --follow``), so it keeps that path's number.
``path_heads`` caches the last number per path; a missing entry is
recomputed from the history. A directory arriving at a path invalidates the
cached numbers below it (their followed histories changed).

**The log line** (``.chronicle/log``, SPEC §4) is one JSON object per
event: ``seq``, ``time``, ``event``, ``path`` (None for an event no known
path names), then the event's own fields in the order given to
:meth:`EventWriter.log` (None values left out), then ``turn`` (the open
turn label or None) and ``pid``.

Times are ISO-8601 UTC with microseconds and a ``Z`` (SPEC §4).

Atomicity: the writer only puts records into the caller's transaction; the
event exists once that transaction commits, with all of its records, or not
at all (LMDB transactions are atomic). Committing, and moving the
workspace's head seq, is the caller's (``Workspace.event``).

**Ignored paths** (``chronicle.store.gc.ignore``; :attr:`EventWriter.ignored`
says which) keep their latest content only. A new version of one (an entry
with ``P_BUMPS`` and ``P_CONTENT``) *replaces* the path's earlier entries in
the workspace's own layer (those that bumped or carried content: its versions,
its chmods, its arrival) and is flagged ``P_UNVERSIONED``; its inode's
earlier own-layer records go too, but the oldest, which now holds the new
content (a past tree shows the latest content). Each record removed or
rewritten gives back its reference on its old content, so refcounts stay
what fsck counts and contents no inode uses any more wait for GC. A file with
more than one link keeps its history (another name may be versioned).

Threads: an EventWriter lives inside one synchronous function on one thread.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import lmdb

from chronicle.errors import Corrupt, Pruned
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, PRUNED_ID, to_hex
from chronicle.store.meta import events, schema
from chronicle.store.meta.events import iso_time
from chronicle.store.meta.schema import (P_ARRIVED, P_BUMPS, P_CONTENT, P_DIR, P_GONE, P_UNVERSIONED, PathEntry,
                                         PathHead)
from chronicle.store import model
from chronicle.store.model import Attrs

if TYPE_CHECKING:               # history.paths reads what this module writes (and imports it): a cycle at runtime
    from chronicle.store.history.paths import History

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_iso_time(text: str) -> int:
    """ns since the epoch from an ISO-8601 time (naive times are UTC), exact
    to the microsecond.

    Raises ``ValueError`` (one line) on bad input, and for a time that is not
    in UTC years 1 to 9999 (what :func:`iso_time` and the log can write).
    """
    given = text = text.strip()
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        dt.astimezone(timezone.utc)          # the UTC year must be 1 .. 9999 too
    except (OverflowError, ValueError):
        raise ValueError(f"{given!r} is outside the years 0001 to 9999 UTC") from None
    # Integer arithmetic: dt.timestamp() is a float, which rounds microseconds away far from 1970.
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000


def path_text(path: bytes) -> str:
    """A path as JSON shows it (``os.fsdecode``: undecodable bytes become
    lone surrogates, SPEC §4)."""
    return os.fsdecode(path)


class EventWriter:
    """The records of one event (see the module docstring).

    ``txn``: the open write transaction; ``dbs``: the store's named
    databases (``schema.DATABASES``); ``ws``: the workspace id; ``seq``: this
    event's seq (the head seq + 1); ``is_fork`` makes removals write
    whiteouts in the head table; ``turn``: the open turn label, logged with
    every line; ``pid``: the actor's; ``history``: the workspace's path
    history, to number versions of paths without a cached head; ``now_ns``:
    the event's time in ns since the epoch (default: now).
    """

    def __init__(self, txn: lmdb.Transaction, dbs: dict, ws: int, seq: int, *, is_fork: bool,
                 turn: dict | None, pid: int, history: History, now_ns: int | None = None):
        self.txn = txn
        self.dbs = dbs
        self.ws = ws
        self.seq = seq
        self.is_fork = is_fork
        self.turn = turn
        self.pid = pid
        self.now_ns = now_ns if now_ns is not None else time.time_ns()
        self.time = iso_time(self.now_ns)
        self._history = history           # chronicle.store.history.paths.History of this workspace
        self.logged = False
        # the workspace's ignore rules (module docstring): ignored(txn, path), read in this event's transaction
        self.ignored: Callable[[lmdb.Transaction, bytes], bool] | None = None

    # -- inodes ------------------------------------------------------------------

    def put_attrs(self, ino: int, attrs: Attrs) -> None:
        """Record ``attrs`` as the inode's state from this seq on. Counts a
        reference on its content (the empty content is never freed and not counted)."""
        if attrs.content and attrs.content != EMPTY_CONTENT_ID:
            self.addref_content(attrs.content)
        key = schema.inode_key(self.ws, ino, self.seq)
        if not attrs.content:
            self._fold_previous(ino, key)
        self.txn.put(key, attrs.encode(), db=self.dbs["inodes"])

    def _fold_previous(self, ino: int, key: bytes) -> None:
        """Before a new record of ``ino`` without content goes in at ``key``: its
        record before this seq, the newest until now, joins the run record just
        older than it (``model.run_append``), or becomes a run of one that the
        next versions join (while only its times and link count change). So a
        directory's versions take one record per ``model.RUN_MAX_BYTES`` of run
        (~60 versions), and the newest stays a record of its own
        (gc and salvage read it as one). Records with content are left alone."""
        db = self.dbs["inodes"]
        prefix = key[:12]
        with self.txn.cursor(db=db) as cur:
            if not cur.set_range(key):
                return
            prev_key = bytes(cur.key())
            if prev_key == key or prev_key[:12] != prefix:
                return                  # folded at this seq's first record already, or a new inode
            prev_raw = bytes(cur.value())
            if model.is_run(prev_raw) or model.inode_content(prev_raw):
                return
            prev_seq = schema.inode_key_seq(prev_key)
            prev = Attrs.decode(prev_raw)
            if cur.next() and cur.key()[:12] == prefix and model.is_run(cur.value()):
                run_key = bytes(cur.key())
                joined = model.run_append(bytes(cur.value()), schema.inode_key_seq(run_key), prev_seq, prev)
                if joined is not None:
                    self.txn.put(run_key, joined, db=db)
                    self.txn.delete(prev_key, db=db)
                    return
        self.txn.put(prev_key, model.encode_run(prev), db=db)

    def addref_content(self, content_id: bytes) -> None:
        """Count one more reference on content ``content_id``. Raises
        ``Corrupt`` if its record is missing (the empty content's may be)."""
        if content_id == PRUNED_ID:
            raise Pruned("that version was pruned by gc: the retention policy no longer keeps its content")
        db = self.dbs["contents"]
        raw = self.txn.get(content_id, db=db)
        if raw is None:
            if content_id != EMPTY_CONTENT_ID:
                raise Corrupt(f"content {to_hex(content_id)} is referenced but missing")
            raw = schema.empty_record().encode()
        _size, refcount, _hash = schema.content_header(raw, content_id)
        self.txn.put(content_id, schema.content_with_refcount(raw, refcount + 1), db=db)

    # -- directory entries ---------------------------------------------------------

    def put_dirent(self, parent: int, name: bytes, ino: int, kind: int) -> None:
        """Make ``parent/name`` name ``ino`` (of ``model.KIND_*`` ``kind``)
        from this seq on: the head table and its history."""
        value = schema.encode_dirent(ino, kind)
        self.txn.put(schema.dirent_key(self.ws, parent, name), value, db=self.dbs["dirents"])
        self._put_hist(parent, name, value)

    def del_dirent(self, parent: int, name: bytes) -> None:
        """Remove ``parent/name`` from this seq on (a whiteout in a fork, which
        must hide its parent's entry)."""
        key = schema.dirent_key(self.ws, parent, name)
        if self.is_fork:
            self.txn.put(key, b"", db=self.dbs["dirents"])    # whiteout over the parent's entry
        else:
            self.txn.delete(key, db=self.dbs["dirents"])
        self._put_hist(parent, name, b"")

    def _put_hist(self, parent: int, name: bytes, value: bytes) -> None:
        """The ``dirent_hist`` record of ``parent/name`` at this seq. The name's
        record before it, its newest until now, first joins the run just older
        than it (``schema.hist_run_append``) or becomes a run of one that the
        next join: a name's history takes one record per
        ``schema.HIST_RUN_MAX_BYTES`` of run, and its newest stays a record of its own."""
        db = self.dbs["dirent_hist"]
        key = schema.dirent_hist_key(self.ws, parent, name, self.seq)
        prefix = key[:-8]
        with self.txn.cursor(db=db) as cur:
            if cur.set_range(key) and cur.key()[:-8] == prefix and len(cur.key()) == len(key) and cur.key() != key:
                prev_key, prev = bytes(cur.key()), bytes(cur.value())
                prev_seq = schema.split_dirent_hist_key(prev_key)[1]
                if not schema.is_hist_run(prev):
                    joined = None
                    if cur.next() and cur.key()[:-8] == prefix and len(cur.key()) == len(key) \
                            and schema.is_hist_run(cur.value()):
                        run_key = bytes(cur.key())
                        joined = schema.hist_run_append(bytes(cur.value()), schema.split_dirent_hist_key(run_key)[1],
                                                        prev_seq, schema.decode_dirent(prev))
                    if joined is not None:
                        self.txn.put(run_key, joined, db=db)
                        self.txn.delete(prev_key, db=db)
                    else:
                        self.txn.put(prev_key, schema.encode_hist_run([(prev_seq, schema.decode_dirent(prev))]), db=db)
        self.txn.put(key, value, db=db)

    # -- the log line --------------------------------------------------------------

    def log(self, event: str, path: bytes | None, **fields) -> None:
        """Write this seq's ``.chronicle/log`` line. ``fields`` in the order
        given (``from``/``to`` are passed as ``from_``/``to``); None values are left out."""
        line: dict = {"seq": self.seq, "time": self.time, "event": event,
                      "path": path_text(path) if path is not None else None}
        for key, value in fields.items():
            if value is not None:
                line[key.rstrip("_")] = value
        line["turn"] = self.turn
        line["pid"] = self.pid
        self.txn.put(schema.event_key(self.ws, self.seq), events.encode(self.now_ns // 1000 * 1000, line),
                     db=self.dbs["events"])
        self.logged = True

    # -- path history --------------------------------------------------------------

    def path_entry(self, path: bytes, event: str, *, ino: int, flags: int, content: bytes = b"",
                   size: int | None = None, origin: bytes = b"", fold_seq: int | None = None,
                   **fields) -> int:
        """Add an entry to ``path``'s history; returns its version number.

        ``flags`` are ``schema.P_*``. ``origin``: for a rename to a free path,
        the path the history continues at. ``fold_seq``: the seq of a
        ``create`` entry of the same open: if no version of the path came
        after it, it stops counting as one (it is removed if nothing came
        after it at all), so a file created and first written by one open
        has its written content as version 1.
        """
        if not content:
            flags &= ~P_CONTENT            # no content id to carry (PathEntry encodes it only with the flag)
        if flags & P_BUMPS and flags & P_CONTENT and self.ignored is not None and self.ignored(self.txn, path) \
                and self._replace_history(path, ino, content):
            flags |= P_UNVERSIONED
            fold_seq = None
        head = self.path_head(path)
        version = head.version if head else 0
        if fold_seq is not None and head is not None and self._fold_create(path, fold_seq, ino):
            version -= 1
        recount = False
        if flags & P_ARRIVED and origin:
            if head is None:
                origin_head = self.path_head(origin)
                version = origin_head.version if origin_head else 0
            else:
                recount = True             # the path's own history, then the origin's: count them once
        if flags & P_BUMPS:
            version += 1
        obj: dict = {"seq": self.seq, "time": self.time, "event": event, "path": path_text(path)}
        for key, value in fields.items():
            if value is not None:
                obj[key.rstrip("_")] = value
        if flags & P_CONTENT and content:
            obj["size"] = size
            obj["hash"] = self.content_hash(content)
        elif size is not None:
            obj["size"] = size
        obj["turn"] = self.turn
        obj["pid"] = self.pid
        fragment = json.dumps(obj)[1:].encode()
        long_path = path if schema.is_long(path) else b""
        entry = PathEntry(flags, ino, content if flags & P_CONTENT else b"", origin, fragment, long_path)
        key = schema.path_key(self.ws, path, self.seq)
        self.txn.put(key, entry.encode(key), db=self.dbs["paths"])
        if recount:
            counted = self._history.compute_head(self.txn, path)
            version = counted.version if counted else version
        self.txn.put(schema.path_head_key(self.ws, path), PathHead(version, self.seq, ino, long_path).encode(),
                     db=self.dbs["path_heads"])
        return version

    def _replace_history(self, path: bytes, ino: int, content: bytes) -> bool:
        """Make the coming entry of ignored ``path`` its only version (module
        docstring). Returns False, changing nothing, if ``ino`` has more than one link."""
        raw = self.txn.get(schema.inode_key(self.ws, ino, self.seq), db=self.dbs["inodes"])
        current = Attrs.decode(raw) if raw is not None else None
        if current is None or current.nlink > 1:
            return False
        db = self.dbs["paths"]
        prefix = schema.path_prefix(self.ws, path)
        long_path = schema.is_long(path)
        with self.txn.cursor(db=db) as cur:
            if cur.set_range(prefix):
                while cur.key()[:len(prefix)] == prefix and schema.path_key_seq(cur.key()) < self.seq:
                    entry = PathEntry.decode(cur.value(), cur.key())
                    if (entry.flags & (P_BUMPS | P_CONTENT)) and (not long_path or entry.path == path):
                        if not cur.delete():
                            break
                    elif not cur.next():
                        break
        self.txn.delete(schema.path_head_key(self.ws, path), db=self.dbs["path_heads"])
        self._replace_inode_records(ino, current, content)
        return True

    def _replace_inode_records(self, ino: int, current: Attrs, content: bytes) -> None:
        """Drop ``ino``'s own-layer records before this seq but the oldest,
        which takes ``content``; refcounts follow (module docstring)."""
        db = self.dbs["inodes"]
        prefix = schema.inode_prefix(self.ws, ino)
        older: list[tuple[bytes, Attrs]] = []
        with self.txn.cursor(db=db) as cur:
            if cur.set_range(schema.inode_key(self.ws, ino, self.seq - 1)):
                for key, value in cur:
                    if key[:len(prefix)] != prefix:
                        break
                    older.append((bytes(key), Attrs.decode(value)))
        if not older:
            return
        *dropped, (oldest_key, oldest) = older
        for key, attrs in dropped:
            self._release_content(attrs.content)
            self.txn.delete(key, db=db)
        if oldest.is_file and oldest.content != content:
            self._release_content(oldest.content)
            if content != EMPTY_CONTENT_ID:
                self.addref_content(content)
            self.txn.put(oldest_key, oldest.replace(content=content, size=current.size).encode(), db=db)

    def _release_content(self, content_id: bytes) -> None:
        """Give back one reference on ``content_id`` (not on the empty content)."""
        if not content_id or content_id in (EMPTY_CONTENT_ID, PRUNED_ID):
            return
        db = self.dbs["contents"]
        raw = self.txn.get(content_id, db=db)
        if raw is None:
            raise Corrupt(f"content {to_hex(content_id)} is referenced but missing")
        refcount = schema.content_header(raw, content_id)[1]
        self.txn.put(content_id, schema.content_with_refcount(raw, max(0, refcount - 1)), db=db)

    def _fold_create(self, path: bytes, create_seq: int, ino: int) -> bool:
        """Turn the ``create`` entry at ``create_seq`` into a plain event (no
        version, no content), unless a version came after it. Returns True if done."""
        db = self.dbs["paths"]
        key = schema.path_key(self.ws, path, create_seq)
        raw = self.txn.get(key, db=db)
        if raw is None:
            return False
        entry = PathEntry.decode(raw, key)
        if entry.ino != ino or not entry.flags & P_BUMPS:
            return False
        prefix = schema.path_prefix(self.ws, path)
        later_entries = 0
        with self.txn.cursor(db=db) as cur:
            if cur.set_range(schema.path_key(self.ws, path, create_seq + 1)):
                for later_key, later in cur:
                    if later_key[:len(prefix)] != prefix:
                        break
                    if PathEntry.decode(later, later_key).flags & P_BUMPS:
                        return False
                    later_entries += 1
        if not later_entries:
            self.txn.delete(key, db=db)        # create + first write read as one version
            return True
        obj = json.loads(b"{" + entry.fragment)
        obj.pop("hash", None)
        folded = PathEntry(entry.flags & ~(P_BUMPS | P_CONTENT), entry.ino, b"", entry.origin,
                           json.dumps(obj)[1:].encode(), entry.path)
        self.txn.put(key, folded.encode(key), db=db)
        return True

    def path_head(self, path: bytes) -> PathHead | None:
        """``path``'s last version number, last seq and inode (cached, or
        recomputed from its history), or None if it has no history."""
        raw = self.txn.get(schema.path_head_key(self.ws, path), db=self.dbs["path_heads"])
        if raw is not None:
            head = PathHead.decode(raw)
            if not schema.is_long(path) or head.path == path:
                return head
        return self._history.compute_head(self.txn, path)

    def forget_heads_below(self, path: bytes) -> None:
        """Drop cached version numbers of paths below directory ``path``
        (long paths too: ``schema.below_prefix``)."""
        below, exact = schema.below_prefix(path)
        prefix = schema.ws_key(self.ws) + below
        base = path + b"/"
        db = self.dbs["path_heads"]
        with self.txn.cursor(db=db) as cur:
            if not cur.set_range(prefix):
                return
            while cur.key()[:len(prefix)] == prefix:
                if exact or PathHead.decode(cur.value()).path.startswith(base):
                    if not cur.delete():
                        break
                elif not cur.next():
                    break

    def content_hash(self, content: bytes) -> str | None:
        """Lowercase hex BLAKE3 of a content, or None while it is not known."""
        if content == EMPTY_CONTENT_ID:
            return to_hex(content)
        raw = self.txn.get(content, db=self.dbs["contents"])
        if raw is None:
            return None
        digest = schema.content_header(raw, content)[2]
        return to_hex(digest) if digest else None


# Re-exported for the modules that build entries.
__all__ = ["EventWriter", "iso_time", "parse_iso_time", "path_text", "P_ARRIVED", "P_BUMPS", "P_CONTENT",
           "P_DIR", "P_GONE", "P_UNVERSIONED"]
