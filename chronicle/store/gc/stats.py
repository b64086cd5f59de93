"""The retention figures of ``chronicle stats`` and ``.chronicle/stats``, cached.

What a policy would free is a dry run (``dryrun.dry_run``): a walk of the
workspace's whole path index and of every content record, seconds on a
store with a million events. So it is never run where the figures are
read: :func:`figures` reads a **cache** (one ``meta`` record per workspace,
``gc:stats:<ws id>``) and says how fresh it is — ``retention_as_of`` (when
it was computed), ``retention_as_of_seq`` (the workspace's head seq then)
and ``retention_behind`` (events committed since). The cache is written

- by every GC run (``collect``): what the run kept, and nothing left to
  free at the plan's time (the dry run then promises what the run did);
- by :func:`refresh`: a dry run and a walk of the head tree, abandoned
  (``TimeoutError``, the cache left as it was) past a deadline, so
  ``chronicle stats`` costs at most :data:`CLI_DEADLINE` seconds on a big store;
- by :func:`refresh_in_background`: the same in a worker thread (one at a
  time per store), started when a ``.chronicle/stats`` handle is closed
  (so the figures a read shows do not change under the next one) and the cache is behind
  the head (or a minute old), at most every :data:`REFRESH_INTERVAL`
  seconds and :data:`REFRESH_COST` times as long as the last one took (a
  6 s dry run: every 2 minutes at most) — the FUSE loop only reads the
  record; the next read shows the new figures.

Threads: :func:`figures` and :func:`refresh` run in the caller's thread;
:func:`refresh_in_background` starts a daemon thread.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

import lmdb

from chronicle.store.gc import dryrun
from chronicle.store.meta import schema
from chronicle.store.meta.journal import iso_time, parse_iso_time
from chronicle.store.model import KIND_FILE

if TYPE_CHECKING:
    from chronicle.store.namespace.workspace import Workspace
    from chronicle.store.store import Store

CLI_DEADLINE = 10.0         # seconds ``chronicle stats`` spends on a dry run before showing the cached figures
BACKGROUND_DEADLINE = 120.0  # seconds a background refresh may take
REFRESH_INTERVAL = 30.0     # seconds between two background refreshes of one workspace, at least
REFRESH_COST = 20           # ... and at least this many times as long as the last one took
LAST_GC_KEY = b"gc:last"

_running: set[tuple[str, int]] = set()      # (store path, ws id) being refreshed in the background
_started: dict[tuple[str, int], float] = {}   # monotonic time the next refresh may start
_lock = threading.Lock()


def cache_key(ws_id: int) -> bytes:
    """The ``meta`` key of workspace ``ws_id``'s cached figures."""
    return b"gc:stats:" + schema.ws_key(ws_id)


def figures(store: Store, ws: Workspace) -> dict:
    """The retention figures of ``ws`` from the cache (no dry run): ``{"head_logical_bytes",
    "history_logical_bytes", "history_versions", "policy_would_drop_versions",
    "policy_would_drop_logical_bytes", "policy_would_free_bytes", "policy_would_free_chunks",
    "retention_as_of", "retention_as_of_seq", "retention_behind", "last_gc"}``
    (figures None until first computed); ``last_gc`` is ``collect``'s stored
    result with ``duration_seconds``, or None."""
    with store.env.begin() as txn:
        raw = txn.get(cache_key(ws.id), db=store.dbs["meta"])
        last = txn.get(LAST_GC_KEY, db=store.dbs["meta"])
        head = store.head_seq(txn, ws.id)
    cached = json.loads(raw) if raw is not None else {}
    out = {key: cached.get(key) for key in _FIGURES}
    out["retention_as_of"] = cached.get("as_of")
    out["retention_as_of_seq"] = cached.get("as_of_seq")
    out["retention_behind"] = head - cached["as_of_seq"] if "as_of_seq" in cached else None
    gc = json.loads(last) if last is not None else None
    if gc is not None:
        gc["duration_seconds"] = round(sum((gc.get("seconds") or {}).values()), 3)
    out["last_gc"] = gc
    return out


_FIGURES = ("head_logical_bytes", "history_logical_bytes", "history_versions", "policy_would_drop_versions",
            "policy_would_drop_logical_bytes", "policy_would_free_bytes", "policy_would_free_chunks")


def refresh(store: Store, ws: Workspace, deadline: float | None = None, now_ns: int | None = None) -> dict:
    """Compute ``ws``'s figures now (a dry run and a walk of the head tree),
    store them in the cache and return :func:`figures`. ``deadline``:
    ``time.monotonic()`` past which ``TimeoutError`` is raised."""
    with store.env.begin() as txn:
        seq = store.head_seq(txn, ws.id)
    started = time.time_ns()
    report = dryrun.dry_run(store, [ws.name], now_ns=now_ns, deadline=deadline)
    mine = report["workspaces"][0]
    doc = {"as_of": iso_time(started), "as_of_seq": seq, "head_logical_bytes": head_bytes(ws, seq, deadline),
           "history_logical_bytes": mine["kept_bytes"], "history_versions": mine["kept_versions"],
           "policy_would_drop_versions": mine["dropped_versions"],
           "policy_would_drop_logical_bytes": mine["dropped_bytes"],
           "policy_would_free_bytes": report["freed_bytes"], "policy_would_free_chunks": report["freed_chunks"]}
    _put(store, ws.id, doc)
    return figures(store, ws)


def after_gc(store: Store, txn: lmdb.Transaction, ws_id: int, as_of_ns: int, as_of_seq: int, kept_bytes: int,
             kept_versions: int, head_logical_bytes: int | None) -> None:
    """Cache what a GC run left (in its write transaction ``txn``): the kept
    history, nothing more to free as of its plan."""
    doc = {"as_of": iso_time(as_of_ns), "as_of_seq": as_of_seq, "head_logical_bytes": head_logical_bytes,
           "history_logical_bytes": kept_bytes, "history_versions": kept_versions,
           "policy_would_drop_versions": 0, "policy_would_drop_logical_bytes": 0,
           "policy_would_free_bytes": 0, "policy_would_free_chunks": 0}
    txn.put(cache_key(ws_id), json.dumps(doc).encode(), db=store.dbs["meta"])


def current(store: Store, ws: Workspace, deadline: float | None = None) -> dict:
    """:func:`figures`, refreshed first if the cache is behind the head or
    aged (a minute: the time rules move with the clock) and the refresh ends
    by ``deadline`` (else the cached figures, which say how old they are)."""
    cached = figures(store, ws)
    if cached["retention_behind"] == 0 and not _aged(cached["retention_as_of"]):
        return cached
    try:
        return refresh(store, ws, deadline)
    except TimeoutError:
        return cached


def workspace_figures(store: Store, ws: Workspace, retention: dict) -> dict:
    """What ``chronicle stats --json`` and ``.chronicle/stats`` show: the
    store's figures (``Store.stats``), the workspace's
    (``Store.workspace_stats``) and ``retention`` (:func:`figures`)."""
    out = store.stats()
    out.update(store.workspace_stats(ws))
    out.update(retention)
    return out


def _put(store: Store, ws_id: int, doc: dict) -> None:
    with store.env.begin(write=True) as txn:
        raw = txn.get(cache_key(ws_id), db=store.dbs["meta"])
        if raw is not None and json.loads(raw).get("as_of_seq", -1) > doc["as_of_seq"]:
            return                # a GC stored newer figures meanwhile
        txn.put(cache_key(ws_id), json.dumps(doc).encode(), db=store.dbs["meta"])
        store.before_commit()
    store.note_commit()


def head_bytes(ws: Workspace, seq: int | None = None, deadline: float | None = None) -> int:
    """Bytes of the regular files of ``ws``'s tree at ``seq`` (default the
    head); a hard-linked file counts once. Raises ``TimeoutError`` past ``deadline``."""
    seen: set[int] = set()
    total = 0
    view = ws.view(seq)
    with ws.read_txn() as txn:
        for n, (_path, ino, kind) in enumerate(view.walk(txn)):
            if deadline is not None and n % 1024 == 0 and time.monotonic() > deadline:
                raise TimeoutError("the walk of the head tree passed its deadline")
            if kind == KIND_FILE and ino not in seen:
                seen.add(ino)
                attrs = view.attrs(txn, ino)
                total += attrs.size if attrs else 0
    return total


def refresh_in_background(store: Store, ws: Workspace) -> bool:
    """Start a :func:`refresh` of ``ws`` in a worker thread if its cache is
    behind the head (or aged), none runs, and the pacing allows (module
    docstring). True if one is running after the call."""
    key = (str(store.path), ws.id)
    with _lock:
        if key in _running:
            return True
        if time.monotonic() < _started.get(key, 0.0):
            return False
        current = figures(store, ws)
        if current["retention_behind"] == 0 and not _aged(current["retention_as_of"]):
            return False
        _running.add(key)
        _started[key] = time.monotonic() + REFRESH_INTERVAL
    threading.Thread(target=_background, args=(store, ws.name, key), name="chronicle-stats", daemon=True).start()
    return True


def _aged(as_of: str | None) -> bool:
    """True if figures from ``as_of`` may have changed with time alone
    (``keep_within`` and the buckets move with the clock): older than a minute."""
    return as_of is None or time.time_ns() - parse_iso_time(as_of) > 60 * 10**9


def _background(store: Store, name: str, key: tuple[str, int]) -> None:
    started = time.monotonic()
    try:                          # its own read-only Workspace: the caller's caches belong to its thread
        refresh(store, store.open_workspace(name), deadline=started + BACKGROUND_DEADLINE)
    except Exception:             # noqa: BLE001 - a closed store, a full disk: the cache stays as it was
        pass
    finally:
        took = time.monotonic() - started
        with _lock:
            _running.discard(key)
            _started[key] = max(_started.get(key, 0.0), started + REFRESH_COST * took)


def refreshing(store: Store, ws: Workspace) -> bool:
    """True while a background refresh of ``ws`` runs."""
    with _lock:
        return (str(store.path), ws.id) in _running
