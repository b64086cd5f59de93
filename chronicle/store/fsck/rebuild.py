"""``fsck`` of damaged metadata: the checks read a salvaged copy; what a
salvage at open and a fall back to a backup lost, reported.

The salvage itself — reading ``data.mdb`` by hand, deriving what damaged
records said, swapping the copy in — is ``chronicle.store.meta.salvage``
(``Store.open`` salvages too); :class:`SoundCopy` lets fsck's checks read
the copy as they read a store.

Threads: one fsck run, one thread.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from chronicle.store.chunks.index import ChunkStore
from chronicle.store.fsck.damage import describe_damage
from chronicle.store.fsck.report import _NAMED_IN_MESSAGE, ERROR, WARNING, FsckReport, Problem
from chronicle.store.meta import backup, salvage, schema
from chronicle.store.meta.pages import PageWalk
from chronicle.store.meta.salvage import Rebuilt, build, scan, swap_in

if TYPE_CHECKING:
    from chronicle.store.store import Store

__all__ = ["Rebuilt", "SoundCopy", "build", "check_damaged", "report_salvage_and_backups", "scan", "swap_in"]


class SoundCopy:
    """The metadata built in ``work`` (:func:`build`) beside ``store``'s
    packs, as the checks read a store: ``path``, ``meta_dir``, ``modes``,
    ``env``, ``dbs``, ``chunks``. Read-only; :meth:`close` it."""

    def __init__(self, store, work: Path, names: tuple[str, ...] = schema.DATABASES):
        self.path, self.meta_dir, self.modes = store.path, store.meta_dir, store.modes
        self.env = lmdb.open(str(work), max_dbs=len(names) + 2, readonly=True, lock=False)
        self.dbs = {name: self.env.open_db(name.encode(), create=False) for name in names}
        self.chunks = ChunkStore(self.env, self.dbs["chunks"], store.chunks.backend, meta_db=self.dbs["meta"])

    def close(self) -> None:
        self.env.close()


def check_damaged(store: Store, walk: PageWalk, repair: bool, checker: Callable) -> FsckReport:
    """fsck of a store whose metadata file has damaged pages (``walk``
    found them): every readable record goes into a fresh file with what the
    damaged ones said derived again (``fsck.rebuild``), the checks run on
    that file, and each damaged range is reported with what it held. With
    ``repair``, the fresh file replaces the damaged one; the caller closes
    the store and checks it again (``report.metadata_rebuilt``).
    ``checker(copy)``: fsck's checker over a store-like copy (its ``run()``
    returns the report; ``workspaces`` names them)."""
    work = store.meta_dir / f"check-{os.getpid()}"
    built = build(walk, work, store.env.info()["map_size"], store.modes.file_mode)
    copy = SoundCopy(store, work)
    try:
        checker = checker(copy)
        report = checker.run()
        names = {ws: rec.name for ws, rec in checker.workspaces.items()}
    finally:
        copy.close()
    report.repair = repair
    damage = [Problem("meta-damaged", message, ERROR, False, details)
              for message, details in describe_damage(built.ranges, names)]
    report.problems[:0] = damage
    if built.lost_paths:
        report.problems.append(Problem(
            "names-lost", f"{len(built.lost_paths)} path(s) the history says exist are not in the tree without "
            "the damaged records (their history is still in query/ and versions/): " + ", ".join(
                f"{ws}:{path}" for ws, path in built.lost_paths[:_NAMED_IN_MESSAGE])
            + (f" and {len(built.lost_paths) - _NAMED_IN_MESSAGE} more" if len(built.lost_paths) > _NAMED_IN_MESSAGE
               else ""), ERROR, False, {"paths": [{"workspace": ws, "path": p} for ws, p in built.lost_paths]}))
    report.metadata_lost = built.lost
    report.metadata_derived = built.derived
    if not repair:
        shutil.rmtree(work, ignore_errors=True)
        for p in damage:
            p.message += f" [fsck --repair drops them: {built.summary()}]"
        return report
    backup = swap_in(store.meta_dir, work)
    for p in damage:
        p.repaired = True
        p.message += (f" [repaired: the unreadable records were dropped, {sum(built.copied.values())} readable ones "
                      f"copied into a new metadata file (the damaged one is kept at {backup}); {built.summary()}]")
    report.metadata_rebuilt = str(backup)
    return report


def report_salvage_and_backups(store: Store, report: FsckReport, repair: bool) -> None:
    """What ``Store.open`` did to damaged metadata — each range a salvage
    lost (``meta.salvage``), and a fall back to a backup generation (a
    warning) — until repair acknowledges it; and the backups kept (``meta.backup``)."""
    note = salvage.salvage_note(store.meta_dir)
    for done in (note or {}).get("salvages", []):
        ranges = salvage.damaged_ranges({"salvages": [done]})
        for message, details in describe_damage(ranges, {}):
            p = Problem("meta-damaged", f"{message} [salvaged when the store was opened on {done['time']}: "
                        f"{done['summary']}; the damaged file is kept at {done['damaged_file']}]", ERROR, False,
                        details)
            report.problems.append(p)
            if repair:
                p.repaired = True
                p.message += " [acknowledged: fsck no longer reports it]"
        if done.get("lost_paths"):
            report.problems.append(Problem(
                "names-lost", f"{len(done['lost_paths'])} path(s) the history says exist were lost with the damaged "
                "pages (their history is in query/ and versions/): " + ", ".join(
                    f"{p['workspace']}:{p['path']}" for p in done["lost_paths"][:_NAMED_IN_MESSAGE]), ERROR,
                repair, {"paths": done["lost_paths"]}))
        report.metadata_lost = done.get("lost", {})
        report.metadata_derived = done.get("derived", {})
    if note is not None and repair:
        salvage.acknowledge(store.meta_dir)
    kept = backup.generations(store.path)
    report.metadata_backups = len(kept)
    report.metadata_backup_newest = kept[0].time if kept else None
    note = backup.restored_note(store.path)
    if note is None:
        return
    report.metadata_in_use = f"backup of {note.get('time')} (transaction {note.get('txnid')})"
    heads = ", ".join(f"{name!r} after seq {seq}" for name, seq in sorted((note.get("heads") or {}).items()))
    p = Problem("metadata-from-backup", f"the metadata in use is the backup of {note.get('time')}, restored on "
                f"{note.get('restored')} because the store's own could not be opened ({note.get('reason')}); "
                f"changes made after the backup ({heads}) are lost; the damaged file is kept at "
                f"{note.get('damaged_file')}", WARNING, False, dict(note))
    report.problems.append(p)
    if repair:
        backup.acknowledge(store.path)
        p.repaired = True
        p.message += " [acknowledged: fsck no longer reports it]"
