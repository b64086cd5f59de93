"""The metadata backup Chronicle keeps: compacted copies of ``data.mdb``.

LMDB keeps no checksums and two meta pages; when both are damaged, or the
main database (the table of named databases) is, nothing of the file can be
opened (``meta.recovery`` rewrites *one* damaged meta page from the other).
So the store keeps a few **generations** of its metadata:

    <store>/meta-backup/<txnid, 16 digits>/data.mdb      a compacting mdb_env_copy
    <store>/meta-backup/<txnid, 16 digits>/backup.json   {"txnid", "time", "heads": {workspace: seq}}

**Policy** (:func:`take`, called by the mount daemon): at a clean unmount and
every :data:`INTERVAL` seconds (``$CHRONICLE_BACKUP_INTERVAL``, default 600)
while commits happen, keeping the :data:`KEEP` newest (3). A copy is taken in
one read transaction (LMDB: ``mdb_env_copy2`` with ``MDB_CP_COMPACT``, which
writes only the pages in use and never blocks writers), checked page by page
(``meta.pages``) and only then renamed into place, so a generation is always
a sound file. **Cost**: the copy reads and writes the metadata in use once
(about 1 ms per MiB on an SSD), and the backups take up to :data:`KEEP`
times that space.

**Falling back** (:func:`restore`, from ``Store.open`` when the live file
cannot be opened and no other process has the store open): the newest sound
generation is copied in place of ``data.mdb``; the damaged file is kept as
``meta/backup/data.mdb.damaged-<time>``; ``meta/restored.json`` records
which generation is in use and what may be lost — every change after the
generation's head seqs — and ``chronicle fsck`` reports it until
``fsck --repair`` acknowledges it. The packs are untouched: the data of the
lost changes is there, unreferenced (GC frees it).

Threads: :func:`take` may run in a worker thread beside the writer; the
others run while the store is being opened.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from chronicle.store.meta import schema
from chronicle.store.meta.journal import iso_time
from chronicle.store.meta.pages import PageWalk
from chronicle.store.meta.recovery import forget_synced

log = logging.getLogger(__name__)

BACKUP_DIR = "meta-backup"
RESTORED_FILE = "restored.json"
KEEP = 3
INTERVAL = float(os.environ.get("CHRONICLE_BACKUP_INTERVAL", "600"))


@dataclass
class Generation:
    """One backup: its directory, the transaction it copied, when, and each
    workspace's head seq then."""

    path: Path
    txnid: int
    time: str
    heads: dict[str, int]

    def lost_text(self) -> str:
        """What a fall back to this generation may lose, for a message."""
        heads = ", ".join(f"{name!r} after seq {seq}" for name, seq in sorted(self.heads.items()))
        return f"the changes made after {self.time} ({heads or 'no workspaces'}), if any, are lost"


def _heads(txn: lmdb.Transaction, dbs: dict) -> dict[str, int]:
    out = {}
    with txn.cursor(db=dbs["workspaces"]) as cur:
        for _key, value in cur:
            rec = schema.WorkspaceRecord.decode(value)
            raw = txn.get(schema.ws_key(rec.id), db=dbs["heads"])
            out[rec.name] = schema.U64.unpack(raw)[0] if raw else 0
    return out


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` (a rename or unlink in it is durable). Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take(env: lmdb.Environment, dbs: dict, store_path: Path, modes) -> Generation | None:
    """Take a generation of ``env`` (the store's environment; ``dbs`` its
    named databases) into ``store_path/meta-backup`` with the store's
    ``modes`` (``chronicle.store.modes.StoreModes``), and drop all but the
    :data:`KEEP` newest. Returns it, or None if the newest one already holds
    this transaction (or another process took it at the same moment). Raises ``OSError``/``lmdb.Error`` from the disk, and
    ``ValueError`` if the copy is not sound (the metadata is damaged: run fsck)."""
    root = store_path / BACKUP_DIR
    modes.mkdir(root)
    with env.begin() as txn:
        txnid = txn.id()
        newest = generations(store_path)
        if newest and newest[0].txnid == txnid:
            return None
        heads = _heads(txn, dbs)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{txnid}-", dir=root))   # one per taker
        try:
            env.copy(str(work), compact=True, txn=txn)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    try:
        with PageWalk(work / "data.mdb") as walk:
            for name in schema.DATABASES:
                for _record in walk.items(name):
                    pass
            if walk.damaged or walk.meta_problem:
                raise ValueError(f"the metadata copy is not sound ({(walk.damaged or [walk.meta_problem])[0]}); "
                                 "the live metadata may be damaged: run chronicle fsck")
        gen = Generation(root / f"{txnid:016d}", txnid, iso_time(time.time_ns()), heads)
        modes.write_file(work / "backup.json", json.dumps({"txnid": txnid, "time": gen.time, "heads": heads}).encode())
        modes.fix_path(work, True)
        modes.fix_path(work / "data.mdb", False)
        for name in ("data.mdb", "backup.json"):
            fd = os.open(work / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if (gen.path / "backup.json").exists():     # another process took this generation meanwhile
            shutil.rmtree(work, ignore_errors=True)
            return None
        shutil.rmtree(gen.path, ignore_errors=True)   # what a crashed drop of old generations left
        try:
            os.rename(work, gen.path)
        except OSError as exc:                  # another process took this generation at the same moment
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(work, ignore_errors=True)
            return None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for old in generations(store_path)[KEEP:]:
        shutil.rmtree(old.path, ignore_errors=True)
    fsync_dir(root)
    return gen


def generations(store_path: Path) -> list[Generation]:
    """The generations under ``store_path/meta-backup``, newest first
    (those whose ``backup.json`` reads and whose ``data.mdb`` exists)."""
    out = []
    try:
        entries = list((store_path / BACKUP_DIR).iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.name.startswith(".") or not (path / "data.mdb").is_file():
            continue
        try:
            doc = json.loads((path / "backup.json").read_text())
            out.append(Generation(path, int(doc["txnid"]), str(doc["time"]), dict(doc["heads"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda g: g.txnid, reverse=True)


def unopenable(meta_dir: Path) -> str | None:
    """Why LMDB must not open ``meta_dir/data.mdb`` (both meta pages
    damaged, or the main database — the table of named databases — on a
    damaged page: LMDB would fail, or create the lost databases empty), or
    None. Reads only the meta pages and the main database (``meta.pages``).
    Call while no other process has the store open."""
    data = meta_dir / "data.mdb"
    try:
        if data.stat().st_size < 2 * os.sysconf("SC_PAGE_SIZE"):
            return None
    except FileNotFoundError:
        return None
    with PageWalk(data) as walk:
        if walk.meta_problem:
            return f"both meta pages are damaged ({walk.meta_problem})"
        walk.databases()
        if walk.damaged:
            return f"the table of databases is damaged ({walk.damaged[0].error})"
    return None


def restore(store_path: Path, reason: str, modes) -> Generation | None:
    """Put the newest sound generation in place of ``store_path/meta/data.mdb``
    (module docstring), because of ``reason`` (why the live file cannot be
    opened). No other process may have the store open. Returns the
    generation, or None if there is none. Logs a WARNING naming it and what
    may be lost. Raises ``OSError`` from the disk."""
    meta = store_path / "meta"
    for gen in generations(store_path):
        with PageWalk(gen.path / "data.mdb") as walk:
            for name in schema.DATABASES:
                for _record in walk.items(name):
                    pass
            if walk.damaged or walk.meta_problem:
                continue
        tmp = meta / "data.mdb.restoring"
        shutil.copyfile(gen.path / "data.mdb", tmp)
        modes.fix_path(tmp, False)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        kept = None
        if (meta / "data.mdb").exists():
            modes.mkdir(meta / "backup")
            kept = meta / "backup" / f"data.mdb.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(meta / "data.mdb", kept)
        os.replace(tmp, meta / "data.mdb")
        forget_synced(meta)
        note = {"generation": str(gen.path), "txnid": gen.txnid, "time": gen.time, "heads": gen.heads,
                "reason": reason, "restored": iso_time(time.time_ns()), "damaged_file": str(kept) if kept else None}
        modes.write_file(meta / RESTORED_FILE, json.dumps(note).encode())
        fsync_dir(meta)
        log.warning("the store's metadata could not be opened (%s): it was restored from the backup of %s "
                    "(transaction %d); %s", reason, gen.time, gen.txnid, gen.lost_text())
        return gen
    return None


def restored_note(store_path: Path) -> dict | None:
    """``meta/restored.json`` (:func:`restore`), or None if the metadata in
    use is the store's own."""
    try:
        return json.loads((store_path / "meta" / RESTORED_FILE).read_text())
    except (OSError, ValueError):
        return None


def acknowledge(store_path: Path) -> None:
    """Forget that the metadata came from a backup (``fsck --repair``)."""
    (store_path / "meta" / RESTORED_FILE).unlink(missing_ok=True)
