"""One GC run: plan, prune, sweep, compact; its result is kept in the store.

:func:`collect` is what ``chronicle gc`` and the daemon's background GC
call. Under :class:`~chronicle.store.gc.leases.GcLock` (one GC at a time per
store) it

1. writes the marks a killed run left pending (``prune.finish_marks``),
   then plans: the versions each workspace's policy drops (``dryrun.plan``,
   the same selection the dry run shows), with the pins of open ``at/``
   handles from the leases;
2. prunes them (``prune``: the inode records and refcounts, re-reading
   the leases' pins before each batch; then the path entries and log lines,
   each in key order),
   drops the records of deleted ignored paths and their superseded log
   lines (``unversioned.drop``), then rewrites the deleted files' last
   records no process reads (``prune.prune_dead``);
3. sweeps contents and chunks nothing uses any more (``sweep.sweep``);
4. compacts packs (``sweep.compact``): disk space comes back.

Every step is a sequence of short, idempotent transactions, so ``kill -9``
at any point leaves a consistent store and the next run finishes the job.
The result (figures and timings) is stored in ``meta`` under
:data:`LAST_GC_KEY` as JSON, with each pruned workspace's figures
(``stats.after_gc``), and shown by ``chronicle stats``.

``freed_bytes`` (stored bytes of the chunks the run made dead) is what the
dry run promised (``dryrun.dry_run``'s ``freed_bytes``) when nothing else
changed the store in between; ``reclaimed_bytes`` is what compaction gave
back on disk (pack bytes deleted minus written).

Threads: synchronous; runs in the caller's thread (the daemon: a worker).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from chronicle.store.gc import dryrun
from chronicle.store.gc.stats import LAST_GC_KEY, after_gc, head_bytes
from chronicle.store.gc.leases import GcLock, read_leases
from chronicle.errors import NotFound
from chronicle.store.gc.prune import Keep, PruneResult, finish_marks, prune, prune_dead
from chronicle.store.gc.sweep import SETTLE_WAIT, THRESHOLD, compact, sweep
from chronicle.store.gc.unversioned import drop
from chronicle.store.meta.journal import iso_time

if TYPE_CHECKING:
    from chronicle.store.store import Store

HEAD_WALK_SECONDS = 2.0               # at most this long walking the head trees for the stats cache
SETTLE_MARGIN_NS = 1_000_000_000      # dead chunks died before the end of the sweep + this (clock margin)

Progress = Callable[[str, int, int], None]


def _no_progress(_phase: str, _done: int, _total: int) -> None:
    pass


def collect(store: Store, names: list[str] | None = None, *, now_ns: int | None = None,
            progress: Progress = _no_progress, threshold: float = THRESHOLD, wait: float = SETTLE_WAIT,
            prune_only: bool = False) -> dict:
    """Run GC over the workspaces ``names`` (None: all); see the module
    docstring. Prunes only those workspaces; sweeps and compacts the whole
    store (chunks are shared). ``prune_only`` stops after pruning (the
    daemon's ENOSPC path prunes, then sweeps and compacts separately).
    Returns ``{"time", "workspaces", "pruned_versions", "pruned_records"
    (inode records rewritten, dead records included), "deleted_records"
    (deleted files' last records, ``prune.DeadRecord``), "dropped_inodes",
    "dropped_inode_records", "dropped_lines" (``unversioned``),
    "freed_contents", "freed_logical_bytes", "freed_chunks", "freed_bytes",
    "freed_raw_bytes", "packs_deleted", "packs_written", "reclaimed_bytes",
    "deferred", "seconds": {phase: s}}``. Raises :class:`~chronicle.errors.Busy`
    if another GC runs, :class:`~chronicle.errors.NotFound` for an unknown workspace."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    seconds: dict[str, float] = {}
    with GcLock(store.run_dir):
        t = time.monotonic()
        finish_marks(store)           # marks a killed run left pending (``prune.finish_marks``)
        planned_ns = time.time_ns()
        with store.env.begin() as txn:
            plan = dryrun.plan(store, names, now_ns, txn, read_leases(store.run_dir))
        base_pins = plan.pins
        seconds["plan"] = time.monotonic() - t

        def keep_of() -> Keep:
            leases = read_leases(store.run_dir)
            leased = dryrun.lease_pins(_workspace_records(store), leases)
            pins = {ws: sorted(set(seqs) | leased.get(ws, set())) for ws, seqs in base_pins.items()}
            return Keep(pins, plan.held, dryrun.deleted_files(store, leases).may_drop)

        t = time.monotonic()
        pruned = prune(store, plan.candidates, keep_of, lambda done, total: progress("prune", done, total))
        dropped = drop(store, plan.unversioned, keep_of)
        dead = prune_dead(store, plan.dead, keep_of)
        seconds["prune"] = time.monotonic() - t
        result = {"time": iso_time(time.time_ns()), "workspaces": [w["workspace"] for w in plan.report["workspaces"]],
                  "pruned_versions": pruned.versions, "pruned_records": pruned.records + dead,
                  "deleted_records": dead, "dropped_inodes": dropped["inodes"],
                  "dropped_inode_records": dropped["records"], "dropped_lines": dropped["lines"]}
        if prune_only:
            return result
        t = time.monotonic()
        swept = sweep(store, progress)
        swept_ns = time.time_ns() + SETTLE_MARGIN_NS
        seconds["sweep"] = time.monotonic() - t
        result.update({"freed_contents": swept["contents"], "freed_logical_bytes": swept["logical_bytes"],
                       "freed_chunks": swept["chunks"], "freed_bytes": swept["bytes"],
                       "freed_raw_bytes": swept["raw_bytes"]})
        t = time.monotonic()
        compacted = compact(store, swept_ns, threshold=threshold, wait=wait, progress=progress)
        seconds["compact"] = time.monotonic() - t
        result.update({k: compacted[k] for k in ("packs_deleted", "packs_written", "reclaimed_bytes", "deferred")})
        result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        _store_result(store, result, plan, pruned, planned_ns)
    return result


def _workspace_records(store: Store) -> list:
    with store.env.begin() as txn:
        return dryrun.workspace_records(store, txn)


def _store_result(store: Store, result: dict, plan: dryrun.Plan, pruned: PruneResult, planned_ns: int) -> None:
    """Store the run's result and each pruned workspace's figures (``gc.stats``)."""
    heads: dict[int, int | None] = {}
    deadline = time.monotonic() + HEAD_WALK_SECONDS
    for ws_report, ws_id in zip(plan.report["workspaces"], plan.pins):
        try:
            heads[ws_id] = head_bytes(store.open_workspace(ws_report["workspace"]), plan.heads[ws_id], deadline)
        except (TimeoutError, NotFound):
            heads[ws_id] = None
    with store.env.begin(write=True) as txn:
        txn.put(LAST_GC_KEY, json.dumps(result).encode(), db=store.dbs["meta"])
        for ws_report, ws_id in zip(plan.report["workspaces"], plan.pins):
            back = pruned.kept_back.get(ws_id, [0, 0])
            after_gc(store, txn, ws_id, planned_ns, plan.heads[ws_id], ws_report["kept_bytes"] + back[1],
                     ws_report["kept_versions"] + back[0], heads[ws_id])
        store.before_commit()
    store.note_commit()


def last_result(store: Store) -> dict | None:
    """The stored result of the last GC run that finished, or None."""
    with store.env.begin() as txn:
        raw = txn.get(LAST_GC_KEY, db=store.dbs["meta"])
    return json.loads(raw) if raw is not None else None
