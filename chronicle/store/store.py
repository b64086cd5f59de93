"""A Chronicle store: one directory, many workspaces, chunks shared by all.

Layout of a store directory::

    store.json      format version, backend, creation time, shared group (if any)
    meta/           the LMDB environment (chronicle.store.meta.schema), synced.rec
    packs/          pack files (chronicle.store.chunks.packs, kept by backends.local)
    cache/s3/       an S3 store's spool, outbox and read cache (backends.s3; its packs are in the bucket)
    staging/        anonymous staging files of open files (O_TMPFILE)
    run/            locks, mount registrations, open-pack registrations (backends.local)

Any number of processes may open a store; each workspace has at most one
writer at a time (``run/ws-<id>.lock``, taken by :meth:`Store.open_workspace`
with ``writable=True``), which is what lets the writer cache the head.

Modes: private (directories 0700, files 0600) or shared with one group
(``chronicle.store.modes``); opening a store puts its files to its modes,
with a warning if others could read it.

Durability: metadata commits do not flush the disk; :meth:`Store.sync` does
(see ``chronicle.store.meta.recovery`` for why that is crash-safe), on fsync, on
the ``sync`` ctl command, at unmount and every few seconds while dirty. A sync
holds the LMDB writer lock only to read the txnid it makes durable, so commits
go on while the disk flushes (the mount shares one sync among the fsyncs that
arrive meanwhile: ``chronicle.fs.groupsync``).

Threads: a Store may be shared by threads; ``sync`` may run in a worker
while the FUSE loop commits.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb

from chronicle.errors import (Busy, Corrupt, Exists, NoSpace, NotFound, Pruned, StoreError, StoreLocked,
                              StoreNotFound, UsageError)
from chronicle.procs import alive as process_alive
from chronicle.store.chunks.backends.local import LocalBackend
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, PRUNED_ID, to_hex
from chronicle.store.chunks.index import ChunkStore
from chronicle.store.gc.leases import Lease, gc_running
from chronicle.store.history import points
from chronicle.store.history.turns import TurnLog
from chronicle.store.meta import backup, compact, salvage, schema
from chronicle.store.meta.journal import iso_time
from chronicle.store.meta.recovery import (SYNCED_RECORD, MetaReserve, SyncRecorder, is_no_space, recover_after_crash,
                                           repair_meta_pages)
from chronicle.store.meta.nodes import NodeStore
from chronicle.store.meta.schema import ContentRecord, WorkspaceRecord
from chronicle.store.model import Attrs
from chronicle.store.modes import PRIVATE, SUBDIRS, StoreModes, tighten
from chronicle.store.namespace.content import ContentMap
from chronicle.store.namespace.workspace import Workspace

log = logging.getLogger(__name__)

STORE_FILE = "store.json"
MAP_SIZE = 1 << 40
SYNC_INTERVAL = float(os.environ.get("CHRONICLE_SYNC_INTERVAL", "5"))   # seconds, like ext4's commit=5
GC_PIN_INTERVAL = 0.2       # seconds: how often an idle process renews its pin while a GC runs
SYNC_COMMITS = 256
WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$")


def default_store_path() -> Path:
    """``$CHRONICLE_HOME/store``, default ``~/.local/share/chronicle/store``."""
    home = os.environ.get("CHRONICLE_HOME")
    if home:
        return Path(home) / "store"
    return Path(os.path.expanduser("~/.local/share/chronicle")) / "store"


def check_workspace_name(name: str) -> None:
    if not WORKSPACE_NAME.match(name or ""):
        raise UsageError(f"invalid workspace name {name!r}: use letters, digits and ._@+=- (at most 128, "
                         "starting with a letter or digit)")


@dataclass
class WorkspaceInfo:
    """A line of ``chronicle workspaces``."""

    name: str
    id: int
    head_seq: int
    created: str
    parent: str | None
    fork_seq: int | None
    mounted: dict | None


class Store:
    """An open store. Use :meth:`init` to create one and :meth:`open` to open it."""

    def __init__(self, path: Path, env: lmdb.Environment, dbs: dict, config: dict):
        self.path = path
        self.env = env
        self.dbs = dbs
        self.config = config
        self.modes = StoreModes.of(config)
        self.meta_dir = path / "meta"
        self._meta_sound = False                # set by open: the metadata was found sound (salvage)
        self.staging_dir = path / "staging"
        self.run_dir = path / "run"
        self.packs_dir = path / "packs"
        backend = _make_backend(path, config, self.modes)
        self.chunks = ChunkStore(env, dbs["chunks"], backend, meta_db=dbs["meta"])
        self.nodes = NodeStore(env, dbs["content_nodes"])     # extent-tree nodes (format 4)
        self.chunks.nodes = self.nodes                        # ContentMap and build_content read trees through it
        # what this process uses, for GC in other processes (gc.leases)
        self.lease = Lease(self.run_dir, self.chunks.lease_state, self.modes)
        self.chunks.announce = self.lease.announce
        self.chunks.writer.on_new_pack = self.lease.announce_pack
        self.lease.on_rotate = self.chunks.writer.rotate      # a GC in another process asks (gc.leases)
        self._content_cache: OrderedDict[bytes, ContentMap] = OrderedDict()
        self._content_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._dirty = False
        self._committed = False                 # this process committed since it opened the store
        self._commits_since_sync = 0
        self._last_sync = time.monotonic()
        self._commits_since_backup = 0
        self._last_backup = time.monotonic()
        self._page_size = env.stat()["psize"]
        self._recorder = SyncRecorder(self.meta_dir, self._page_size)    # synced.rec (recovery)
        self._synced_txnid: int | None = None   # the txnid this process's last sync recorded
        self._flusher = _PairFlusher()          # runs the pack flush beside the data.mdb flush
        self._reserve = MetaReserve(self.meta_dir / "data.mdb", self._page_size)
        self._pin = env.begin()
        self._pin_time = time.monotonic()
        # key ranges whose records a salvage at open lost (meta.salvage): their lookups answer Corrupt
        self.damaged = salvage.damaged_ranges(salvage.salvage_note(self.meta_dir))
        self._locks: dict[int, int] = {}
        self._closed = False
        self._users = 0

    # -- creating and opening --------------------------------------------------------

    @classmethod
    def init(cls, path: os.PathLike | str, backend: str = "file", shared_group: str | None = None, *,
             endpoint: str | None = None, region: str | None = None, cache_size: int | None = None) -> Store:
        """Create an empty store at ``path``: private (directories 0700, files
        0600), or shared with ``shared_group`` (a group name or gid:
        directories 2770, files 0660; ``chronicle.store.modes``). Raises
        :class:`Exists` if one is there, :class:`UsageError` for an unknown group.

        ``backend`` is ``file`` (packs under ``path``) or
        ``s3://BUCKET/PREFIX`` (``chunks.backends.s3``: packs in the bucket,
        ``endpoint`` an ``http(s)://HOST:PORT`` URL for a non-AWS server,
        ``region``, and ``cache_size`` bytes of local read cache). An S3
        location is checked first (:func:`~chronicle.store.chunks.backends.s3.check_new_location`:
        the bucket answers, the prefix holds no packs); credentials are not
        recorded (boto3 finds them)."""
        path = Path(path)
        modes = StoreModes.shared(shared_group) if shared_group is not None else PRIVATE
        extra = {}
        if backend.startswith("s3://"):
            from chronicle.store.chunks.backends import s3      # boto3 is loaded only for S3 stores

            location = s3.S3Location.parse(backend, endpoint, region)
            if (path / STORE_FILE).exists():
                raise Exists(f"a store already exists at {path}")
            s3.check_new_location(location)
            extra = {"s3": {"endpoint": endpoint, "region": region,
                            "cache_size": s3.DEFAULT_CACHE_SIZE if cache_size is None else int(cache_size)}}
            backend = location.url
        elif backend != "file":
            raise UsageError(f"unsupported backend {backend!r}: use 'file' or s3://BUCKET/PREFIX")
        if (path / STORE_FILE).exists():
            raise Exists(f"a store already exists at {path}")
        if path.exists() and not path.is_dir():
            raise Exists(f"{path} exists and is not a directory")
        if path.exists() and any(path.iterdir()):
            raise Exists(f"{path} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        modes.fix_path(path, True)
        for sub in SUBDIRS:
            modes.mkdir(path / sub)
        config = {"format": schema.FORMAT_VERSION, "backend": backend, "created": iso_time(time.time_ns()),
                  **modes.record(), **extra}
        modes.write_file(path / STORE_FILE, (json.dumps(config, indent=2) + "\n").encode())
        store = cls.open(path)
        with store.env.begin(write=True) as txn:
            txn.put(schema.META_FORMAT, str(schema.FORMAT_VERSION).encode(), db=store.dbs["meta"])
            txn.put(schema.META_NEXT_INO, schema.U64.pack(16), db=store.dbs["meta"])
            txn.put(schema.META_NEXT_WS, schema.U32.pack(1), db=store.dbs["meta"])
            txn.put(EMPTY_CONTENT_ID, schema.empty_record().encode(EMPTY_CONTENT_ID), db=store.dbs["contents"])
            schema.add_totals(txn, store.dbs["meta"], contents=1)
        store.sync()
        return store

    _registry: dict[str, Store] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def open(cls, path: os.PathLike | str, *, create: bool = False) -> Store:
        """Open the store at ``path`` (``create``: make it if missing).

        Within one process a store is opened once: opening it again returns
        the same object (LMDB allows one environment per file per process),
        and only the last :meth:`close` closes it.

        Raises :class:`StoreNotFound` if there is none, :class:`StoreError` if
        it cannot be opened.
        """
        path = Path(path)
        if create and not (path / STORE_FILE).exists():
            return cls.init(path)                # init opens (and registers) it
        key = str(path.resolve())
        with cls._registry_lock:
            shared = cls._registry.get(key)
            if shared is not None:
                shared._users += 1
                return shared
        store = cls._open(path, create=create)
        with cls._registry_lock:
            shared = cls._registry.get(key)
            if shared is not None:               # another thread opened it meanwhile
                shared._users += 1
                store._really_close()
                return shared
            store._users = 1
            cls._registry[key] = store
        return store

    @classmethod
    def _open(cls, path: Path, *, create: bool) -> Store:
        if not (path / STORE_FILE).exists():
            if create:
                return cls.init(path)
            raise StoreNotFound(f"no Chronicle store at {path} (create one with: chronicle init {path})")
        try:
            config = json.loads((path / STORE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path / STORE_FILE}: {exc}") from None
        old_format = config.get("format") if config.get("format") in schema.OLD_FORMATS else None
        if config.get("format") != schema.FORMAT_VERSION and old_format is None:
            raise StoreError(f"store format {config.get('format')} is not supported (expected {schema.FORMAT_VERSION})")
        modes = StoreModes.of(config)
        for sub in SUBDIRS:
            modes.mkdir(path / sub)
        open_lock = os.open(path / "run" / "open.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, modes.file_mode)
        modes.fix_fd(open_lock)
        alone = True                                # no other process has the store open
        try:
            fcntl.flock(open_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            recover_after_crash(path / "meta")      # nobody else has it open
            repair_meta_pages(path / "meta", os.sysconf("SC_PAGE_SIZE"))
            problem = backup.unopenable(path / "meta")
            if problem is not None and backup.restore(path, problem, modes) is None:
                os.close(open_lock)
                raise StoreError(f"cannot open the store's metadata at {path / 'meta'}: {problem}, and there is "
                                 f"no sound metadata backup in {path / backup.BACKUP_DIR}")
            salvage.verify_or_salvage(path / "meta", modes, MAP_SIZE)     # LMDB must not read a damaged page
            sound = salvage.is_verified(path / "meta") or salvage.is_new(path / "meta")
        except BlockingIOError:
            alone = False
            sound = True                            # the process that has it open checked it (or inherited that)
            # Wait out a process that holds the lock exclusively (checking the file at open, or swapping in a
            # compacted copy at close, meta.compact) before LMDB opens the file it may replace.
            fcntl.flock(open_lock, fcntl.LOCK_SH)
        try:
            try:
                env, dbs = cls._open_env(path, modes)
            except lmdb.Error as exc:
                if not alone or backup.restore(path, f"{type(exc).__name__}: {exc}", modes) is None:
                    raise
                env, dbs = cls._open_env(path, modes)
        except lmdb.Error as exc:
            os.close(open_lock)
            raise StoreError(f"cannot open the store's metadata at {path / 'meta'}: {exc} (and no sound metadata "
                             f"backup in {path / backup.BACKUP_DIR} could be used)") from None
        fcntl.flock(open_lock, fcntl.LOCK_SH)
        store = cls(path, env, dbs, config)
        if old_format is not None:
            store._upgrade_format()
        store.tighten_modes(warn=True)
        store._open_lock = open_lock
        store._meta_sound = sound
        with env.begin() as txn:
            if txn.get(schema.META_FORMAT, db=dbs["meta"]) is None and txn.get(
                    schema.META_NEXT_INO, db=dbs["meta"]) is None:
                pass   # being initialised by Store.init
        return store

    @staticmethod
    def _open_env(path: Path, modes: StoreModes) -> tuple[lmdb.Environment, dict]:
        """The store's LMDB environment and its named databases (created if
        missing). Raises ``lmdb.Error``."""
        env = lmdb.open(str(path / "meta"), map_size=MAP_SIZE, max_dbs=len(schema.DATABASES) + 2,
                        max_readers=1024, sync=False, metasync=False, readahead=False, meminit=False,
                        lock=True, mode=modes.file_mode)
        try:
            return env, {name: env.open_db(name.encode()) for name in schema.DATABASES}
        except lmdb.Error:
            env.close()
            raise

    def _upgrade_format(self) -> None:
        """Upgrade a format-3 store to :data:`schema.FORMAT_VERSION` in place
        (README "Differences from SPEC.md"): format 4 adds the
        ``content_nodes`` database (made when the environment opened) and new
        content-record flags; format-3 content records stay readable and keep
        their ids. The receipts and their sums made in format 3 are dropped
        (their file digests were whole-file BLAKE3s: ``history.receipts``).
        The LMDB side commits and syncs before ``store.json`` says 4, so a
        crash in between upgrades again on the next open."""
        old = self.config.get("format")
        with self.env.begin(write=True) as txn:
            for name in ("receipts", "receipt_dirs", "receipt_entries", "receipt_hashes"):
                txn.drop(self.dbs[name], delete=False)
            txn.put(schema.META_FORMAT, str(schema.FORMAT_VERSION).encode(), db=self.dbs["meta"])
        self.env.sync(True)
        self.config = dict(self.config, format=schema.FORMAT_VERSION)
        self.modes.write_file(self.path / STORE_FILE, (json.dumps(self.config, indent=2) + "\n").encode())
        log.info("upgraded the store at %s from format %s to %s", self.path, old, schema.FORMAT_VERSION)

    def tighten_modes(self, *, warn: bool = False) -> int:
        """Put every directory and file of the store to its modes
        (``chronicle.store.modes.tighten``); with ``warn``, log a warning if
        others could read the store. Returns how many were changed."""
        done = tighten(self.path, self.modes)
        if warn and done.was_open:
            log.warning("the store at %s was readable by other users (%s); its directories are now %o and its "
                        "files %o (%d changed)", self.path, ", ".join(done.open_dirs), self.modes.dir_mode,
                        self.modes.file_mode, done.changed)
        return done.changed

    def close(self) -> None:
        """Close; syncs first if this process committed anything since its
        last sync (a read-only command flushes nothing). Safe to call twice.
        A store opened several times in this process closes at the last close."""
        if self._closed:
            return
        with Store._registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            Store._registry.pop(str(self.path.resolve()), None)
        self._really_close()

    def _really_close(self) -> None:
        if self._closed:
            return
        if self._dirty:
            self.sync()
        self._closed = True
        self.chunks.close()
        self.lease.close()
        with self._sync_lock:                   # not while _renew_idle_pin replaces it
            self._pin.abort()
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()
        self._flusher.close()
        self._recorder.close()
        self.env.close()
        try:                                    # the last user of the store: its file is what LMDB wrote
            fcntl.flock(self._open_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self._meta_sound:
                self._compact_after_close()
                salvage.trust_after_close(self.meta_dir, self.modes)
        except BlockingIOError:
            pass                                # another process still has it open: its close records it
        except OSError as exc:
            log.warning("could not record the store's metadata as sound: %s", exc)
        os.close(self._open_lock)

    def _compact_after_close(self) -> None:
        """With the environment closed and the open lock held exclusively: if
        this process committed, give a mostly free metadata file's space back
        (``meta.compact``). A failure is logged; the live file stays as it was."""
        if not self._committed:
            return
        try:
            compact.compact_if_mostly_free(self.meta_dir, MAP_SIZE, len(schema.DATABASES) + 2, self.modes.file_mode)
        except (OSError, lmdb.Error) as exc:
            log.warning("could not compact the metadata file: %s", exc)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- counters and heads -------------------------------------------------------------

    def allocate_ino(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(schema.META_NEXT_INO, db=self.dbs["meta"])
        ino = schema.U64.unpack(raw)[0] if raw else 16
        txn.put(schema.META_NEXT_INO, schema.U64.pack(ino + 1), db=self.dbs["meta"])
        return ino

    def head_seq(self, txn: lmdb.Transaction, ws_id: int) -> int:
        raw = txn.get(schema.ws_key(ws_id), db=self.dbs["heads"])
        return schema.U64.unpack(raw)[0] if raw else 0

    # -- workspaces ---------------------------------------------------------------------

    def workspace_record(self, name: str, txn: lmdb.Transaction | None = None) -> WorkspaceRecord:
        """Raises :class:`NotFound` if there is no such workspace."""
        if txn is None:
            with self.env.begin() as rtxn:
                return self.workspace_record(name, rtxn)
        try:
            raw = txn.get(name.encode(), db=self.dbs["workspaces"])
            if raw is None:
                raise NotFound(f"no workspace named {name!r} in {self.path}")
            return WorkspaceRecord.decode(raw)
        except (lmdb.Error, ValueError, KeyError, TypeError) as exc:
            raise Corrupt(f"the record of workspace {name!r} is damaged ({type(exc).__name__}: {exc}); "
                          "`chronicle fsck` names the damage, `chronicle fsck --repair` rebuilds it") from None

    def workspace_by_id(self, ws_id: int, txn: lmdb.Transaction) -> WorkspaceRecord:
        name = txn.get(schema.ws_key(ws_id), db=self.dbs["ws_ids"])
        if name is None:
            raise NotFound(f"no workspace with id {ws_id}")
        return self.workspace_record(bytes(name).decode(), txn)

    def workspaces(self) -> list[WorkspaceInfo]:
        out = []
        with self.env.begin() as txn:
            with txn.cursor(db=self.dbs["workspaces"]) as cur:
                for _key, value in cur:
                    rec = WorkspaceRecord.decode(value)
                    out.append(WorkspaceInfo(rec.name, rec.id, self.head_seq(txn, rec.id), rec.created, rec.parent,
                                             rec.fork_seq, self.mount_info(rec.name)))
        return out

    def fork_chain(self, record: WorkspaceRecord) -> list[tuple[int, int | None]]:
        """``[(ws id, fork seq), (parent id, its fork seq), ...]`` up to the first ancestor."""
        chain = [(record.id, record.fork_seq)]
        with self.env.begin() as txn:
            rec = record
            while rec.parent_id is not None:
                rec = self.workspace_by_id(rec.parent_id, txn)
                chain.append((rec.id, rec.fork_seq))
        return chain

    def create_workspace(self, name: str, uid: int | None = None, gid: int | None = None) -> WorkspaceRecord:
        """A new, empty workspace (root directory owned by ``uid``/``gid``)."""
        check_workspace_name(name)
        now = time.time_ns()
        with self.env.begin(write=True) as txn:
            if txn.get(name.encode(), db=self.dbs["workspaces"]) is not None:
                raise Exists(f"workspace {name!r} already exists")
            ws_id = self._next_ws_id(txn)
            root = self.allocate_ino(txn)
            record = WorkspaceRecord(ws_id, name, root, iso_time(now))
            attrs = Attrs(stat.S_IFDIR | 0o755, os.getuid() if uid is None else uid,
                          os.getgid() if gid is None else gid, 2, 4096, now, now, now)
            txn.put(schema.inode_key(ws_id, root, 0), attrs.encode(), db=self.dbs["inodes"])
            self._put_workspace(txn, record)
            txn.put(schema.ws_key(ws_id), schema.U64.pack(0), db=self.dbs["heads"])
        self.note_commit()
        return record

    def fork(self, source: str, seq: int | None, name: str) -> WorkspaceRecord:
        """A copy-on-write fork of ``source`` at ``seq`` (default: its head). O(1)."""
        check_workspace_name(name)
        with self.env.begin(write=True) as txn:
            src = self.workspace_record(source, txn)
            head = self.head_seq(txn, src.id)
            if seq is None:
                seq = head
            if seq < 0 or seq > head:
                raise NotFound(f"workspace {source!r} has no seq {seq} (head is {head})")
            if txn.get(name.encode(), db=self.dbs["workspaces"]) is not None:
                raise Exists(f"workspace {name!r} already exists")
            ws_id = self._next_ws_id(txn)
            record = WorkspaceRecord(ws_id, name, src.root, iso_time(time.time_ns()), parent=src.name,
                                     parent_id=src.id, fork_seq=seq)
            self._put_workspace(txn, record)
            txn.put(schema.ws_key(ws_id), schema.U64.pack(seq), db=self.dbs["heads"])
        self.note_commit()
        return record

    def _next_ws_id(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(schema.META_NEXT_WS, db=self.dbs["meta"])
        ws_id = schema.U32.unpack(raw)[0] if raw else 1
        txn.put(schema.META_NEXT_WS, schema.U32.pack(ws_id + 1), db=self.dbs["meta"])
        return ws_id

    def _put_workspace(self, txn: lmdb.Transaction, record: WorkspaceRecord) -> None:
        txn.put(record.name.encode(), record.encode(), db=self.dbs["workspaces"])
        txn.put(schema.ws_key(record.id), record.name.encode(), db=self.dbs["ws_ids"])

    def open_workspace(self, name: str, *, writable: bool = False, create: bool = False):
        """A :class:`~chronicle.store.namespace.workspace.Workspace`. ``writable`` takes the
        workspace's writer lock (raises :class:`StoreLocked` if another process
        holds it, e.g. a mount)."""
        try:
            record = self.workspace_record(name)
        except NotFound:
            if not create:
                raise
            record = self.create_workspace(name)
        if writable:
            self._lock_workspace(record)
        ws = Workspace(self, record, writable=writable)
        if writable:              # GC keeps a deleted file's content while it is open (gc.leases)
            self.lease.track(record.id, _open_files_of(ws))
        return ws

    def _lock_workspace(self, record: WorkspaceRecord) -> None:
        if record.id in self._locks:
            raise StoreLocked(f"workspace {record.name!r} is already open for writing in this process")
        fd = os.open(self.run_dir / f"ws-{record.id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     self.modes.file_mode)
        self.modes.fix_fd(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            where = self.mount_info(record.name)
            detail = f" (mounted at {where['mountpoint']} by pid {where['pid']})" if where else ""
            raise StoreLocked(f"workspace {record.name!r} is in use by another process{detail}") from None
        self._locks[record.id] = fd

    def release_workspace(self, ws: Workspace) -> None:
        """Give up the writer lock ``open_workspace(writable=True)`` took for ``ws``."""
        fd = self._locks.pop(ws.id, None)
        if fd is not None:
            os.close(fd)
        self.lease.untrack(ws.id)

    # Databases whose keys start with the workspace id (u32): a workspace's own records.
    _WS_DATABASES = ("inodes", "dirents", "dirent_hist", "events", "paths", "path_heads", "snapshots", "turns",
                     "policies", "receipts", "receipt_dirs", "receipt_entries", "turn_reads",
                     "gc_marks")

    def delete_workspace(self, name: str) -> None:
        """Delete workspace ``name`` and all its own records, in one transaction.

        Each of its inode records gives back its reference on its content;
        contents and chunks no longer used stay until GC frees them (fsck
        reports them as info). Raises :class:`NotFound`, :class:`StoreLocked`
        if it is mounted or open for writing, :class:`Busy` if another
        workspace is a fork of it (the fork reads through to its records).
        """
        record = self.workspace_record(name)
        self._lock_workspace(record)
        try:
            with self.env.begin(write=True) as txn:
                forks = []
                with txn.cursor(db=self.dbs["workspaces"]) as cur:
                    for _key, value in cur:
                        other = WorkspaceRecord.decode(value)
                        if other.parent_id == record.id:
                            forks.append(other.name)
                if forks:
                    raise Busy(f"workspace {name!r} cannot be deleted: {', '.join(sorted(forks))} "
                               f"{'is a fork' if len(forks) == 1 else 'are forks'} of it")
                prefix = schema.ws_key(record.id)
                released: dict[bytes, int] = {}
                with txn.cursor(db=self.dbs["inodes"]) as cur:
                    if cur.set_range(prefix):
                        for key, value in cur:
                            if key[:4] != prefix:
                                break
                            content = Attrs.decode(value).content
                            if content and content != EMPTY_CONTENT_ID:     # (not refcounted)
                                released[content] = released.get(content, 0) + 1
                contents = self.dbs["contents"]
                for content_id, count in released.items():
                    raw = txn.get(content_id, db=contents)
                    if raw is not None:
                        refcount = schema.content_header(raw, content_id)[1]
                        txn.put(content_id, schema.content_with_refcount(raw, max(0, refcount - count)),
                                db=contents)
                for db in self._WS_DATABASES:
                    with txn.cursor(db=self.dbs[db]) as cur:
                        if not cur.set_range(prefix):
                            continue
                        while cur.key()[:4] == prefix:
                            if not cur.delete():
                                break
                txn.delete(prefix, db=self.dbs["heads"])
                txn.delete(prefix, db=self.dbs["ws_ids"])
                txn.delete(name.encode(), db=self.dbs["workspaces"])
            self.note_commit()
            (self.run_dir / f"ws-{record.id}.lock").unlink(missing_ok=True)
        finally:
            fd = self._locks.pop(record.id, None)
            if fd is not None:
                os.close(fd)

    # -- mount registrations (written by the daemon, read by the CLI) --------------------

    def register_mount(self, name: str, mountpoint: str, pid: int) -> None:
        self.modes.write_file(self.run_dir / f"mount-{name}.json",
                              json.dumps({"workspace": name, "mountpoint": mountpoint, "pid": pid}).encode())

    def unregister_mount(self, name: str) -> None:
        (self.run_dir / f"mount-{name}.json").unlink(missing_ok=True)

    def mount_info(self, name: str) -> dict | None:
        """``{"workspace", "mountpoint", "pid"}`` if a live daemon has it mounted."""
        path = self.run_dir / f"mount-{name}.json"
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not process_alive(pid):
            return None
        return info

    def workspace_stats(self, ws: Workspace) -> dict:
        """A workspace's figures, as ``chronicle stats`` and ``.chronicle/stats`` show them."""
        mounted = self.mount_info(ws.name)
        return {"workspace": ws.name, "head_seq": ws.head_seq,
                "workspace_events": ws.head_seq,     # seqs are dense: the head seq counts the events
                "snapshots": len(points.snapshots(ws)), "parent": ws.record.parent, "fork_seq": ws.record.fork_seq,
                "mountpoint": mounted["mountpoint"] if mounted else None}

    # -- snapshots and turns ------------------------------------------------------------

    # Thin delegates for callers that hold a Store (ctl, the workspace, stats);
    # the code is chronicle.store.history.points.

    def get_turn(self, ws: Workspace, agent: str, turn: int) -> dict | None:
        """The turn label ``ws`` sees for ``turn`` of ``agent`` (a fork: also its
        ancestors' that ended by the fork seq), or None. The turn log
        (``chronicle.store.history.turns``) has the vocabulary and the writers."""
        return TurnLog(self).label(ws, agent, turn)

    def turns(self, ws: Workspace, agent: str | None = None) -> list[dict]:
        """Every turn label ``ws`` sees, of ``agent`` or of all (see :meth:`get_turn`)."""
        return TurnLog(self).labels(ws, agent)

    # -- points in history ---------------------------------------------------------------

    # -- content ------------------------------------------------------------------------

    def content_map(self, content_id: bytes) -> ContentMap:
        """A readable view of a content record (cached). Raises ``Corrupt`` if missing."""
        with self._content_lock:
            cm = self._content_cache.get(content_id)
            if cm is not None:
                self._content_cache.move_to_end(content_id)
                return cm
        if content_id == PRUNED_ID:
            raise Pruned("this version was pruned by gc: the retention policy no longer keeps its content")
        if content_id == EMPTY_CONTENT_ID:
            cm = ContentMap.empty(self.chunks)
        else:
            try:
                with self.env.begin() as txn:
                    raw = txn.get(content_id, db=self.dbs["contents"])
            except lmdb.Error as exc:
                raise Corrupt(f"the record of content {to_hex(content_id)} is on a damaged metadata page "
                              f"({type(exc).__name__}: {exc})") from None
            if raw is None:
                raise Corrupt(f"content {to_hex(content_id)} is missing from the store")
            cm = ContentMap(content_id, ContentRecord.decode(raw, content_id), self.chunks)
        self.remember_content(cm)
        return cm

    def remember_content(self, cm: ContentMap) -> None:
        with self._content_lock:
            self._content_cache[cm.id] = cm
            self._content_cache.move_to_end(cm.id)
            while len(self._content_cache) > 512:
                self._content_cache.popitem(last=False)

    # -- durability ---------------------------------------------------------------------

    def note_commit(self) -> None:
        self._dirty = True
        self._committed = True
        self._commits_since_sync += 1
        self._commits_since_backup += 1
        if self._commits_since_sync >= 4 * SYNC_COMMITS:
            self.sync()          # a safety net for writers that never call maintain()

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def synced(self) -> bool:
        """True when everything committed to the store so far, by any
        process, is durable: the store's last txnid is the one this
        process's last :meth:`sync` recorded. Cheap (no disk access): an
        fsync of a file with nothing new answers at once with it."""
        return self._synced_txnid is not None and self.env.info()["last_txnid"] == self._synced_txnid

    def needs_sync(self, interval: float = None, max_commits: int = None) -> bool:
        """True when a :meth:`sync` is due: this process committed and either
        ``interval`` seconds passed or ``max_commits`` commits piled up.

        Why commits count: until the next sync, pages freed by commits cannot
        be reused (``recovery``: the pin), so the metadata file grows by about
        20 pages per commit; syncing every few hundred commits bounds that.
        While a GC runs (``gc.leases.gc_running``), a process with unsynced
        commits syncs every :data:`GC_PIN_INTERVAL` seconds (its pin can only
        move with a sync), or the pages GC's commits free in between could
        not be reused.

        A process with nothing of its own to sync (an idle mount daemon, a
        reader) never syncs here: each process syncs its own commits. It
        only moves its pin on (:meth:`_renew_idle_pin`, no disk flush) so as
        not to hold back page reuse for the others, and only when someone
        committed since the pin was taken (a pin of the last txn holds no
        page back): every ``interval`` seconds, or every
        :data:`GC_PIN_INTERVAL` seconds while a GC runs. With no commit
        anywhere this costs no system call (``env.info`` reads the mapped
        meta pages), so an idle daemon's 0.1 s loop asks nothing of the disk.
        """
        interval = SYNC_INTERVAL if interval is None else interval
        max_commits = SYNC_COMMITS if max_commits is None else max_commits
        now = time.monotonic()
        if self._dirty:
            if now - self._last_sync >= interval or self._commits_since_sync >= max_commits:
                return True
            # a sync moves the pin: GC's freed pages come back
            return now - self._pin_time >= GC_PIN_INTERVAL and gc_running(self.run_dir)
        if self.env.info()["last_txnid"] > self._pin.id():
            age = now - self._pin_time
            if age >= interval or (age >= GC_PIN_INTERVAL and gc_running(self.run_dir)):
                self._renew_idle_pin()      # a GC frees pages: the pin must not keep them from it
        return False

    def read_txn(self) -> lmdb.Transaction:
        """A new LMDB read transaction (the caller ends it, ``with``). In a
        process with nothing to sync (a reader such as ``chronicle ui``, or an
        idle writer) whose recovery pin is older than ``SYNC_INTERVAL``,
        first moves the pin forward (:meth:`_renew_idle_pin`): a pin held from
        open on would keep every other process of the store from reusing any
        page freed since, and their metadata file would grow without bound."""
        if not self._dirty and time.monotonic() - self._pin_time >= SYNC_INTERVAL:
            self._renew_idle_pin()
        return self.env.begin()

    def _renew_idle_pin(self) -> None:
        """Replace the recovery pin by a read transaction of now, unless this
        process has commits not yet synced (``recovery``: they need the pin
        opened before their sync; the synced trees of other processes are
        kept by the pins of the processes that committed after them). Never
        waits: a sync under way moves the pin itself."""
        if not self._sync_lock.acquire(blocking=False):
            return
        try:
            if self._dirty or self._closed:
                return
            new_pin = self.env.begin()
            old, self._pin = self._pin, new_pin
            self._pin_time = time.monotonic()
            old.abort()
        finally:
            self._sync_lock.release()

    def maintain(self) -> None:
        """Sync if :meth:`needs_sync`; long-running writers call this
        periodically. Also refreshes this process's lease (``gc.leases``)."""
        try:
            self.lease.refresh()
        except OSError:
            pass                  # a full disk: the lease stays as it was (GC waits for it, then defers)
        if self.needs_sync():
            self.sync()

    def sync(self) -> None:
        """Make everything committed so far durable (see ``recovery``).

        Holds the LMDB writer lock only for a moment: to read the last
        committed txnid ``T`` and its meta page (no commit can come between
        the two). The disk flushes run without it, so commits go on while
        the disk works (the FUSE loop never waits for a flush): the packs
        (``ChunkStore.sync``: every chunk a commit up to ``T`` refers to was
        written before that commit) and ``data.mdb`` (``mdb_env_sync``) are
        flushed at the same time, in two threads, then ``synced.rec``
        records ``T`` with its meta page. Commits after ``T`` may reach the
        disk too; after a machine crash recovery rolls back to ``T`` (their
        pages and chunks were not promised), and the pin taken before ``T``
        keeps ``T``'s pages from being reused until the next sync. Syncs
        run one at a time (``_sync_lock``); a caller arriving while one
        runs waits for it and then syncs what came since. When ``T`` is the
        txnid this process's last sync recorded (nothing was committed
        since, by any process), ``data.mdb`` and ``synced.rec`` are left
        alone and only chunk data written since, if any, is flushed (an
        fsync of an unchanged file costs no disk flush). Raises
        :class:`NoSpace` on a full disk (the store stays dirty: the next
        sync tries again).
        """
        with self._sync_lock:
            dirty, commits = self._dirty, self._commits_since_sync
            self._dirty = False
            self._commits_since_sync = 0
            self._last_sync = time.monotonic()
            new_pin = self.env.begin()
            try:
                txn = self.env.begin(write=True)     # no commit between the txnid and its meta page
                try:
                    synced = self.env.info()["last_txnid"]
                    page = None if synced == self._synced_txnid else self._recorder.meta_page(synced)
                finally:
                    txn.abort()
                if synced == self._synced_txnid:
                    # No commit since our last sync (of any process: the txnid is the store's), so the
                    # metadata on disk and the record are already what this sync would make them; only
                    # chunk data of ours written since (not yet referred to) may want flushing.
                    if self.chunks.needs_sync():
                        self.chunks.sync()
                else:
                    if page is None:
                        raise RuntimeError(f"no meta page for synced txn {synced}")
                    if self.chunks.needs_sync():
                        self._flusher.both(self.chunks.sync, lambda: self.env.sync(True))
                    else:                    # no pack bytes of ours (a metadata-only change): no hand-off
                        self.chunks.sync()   # (other processes' open packs, if any)
                        self.env.sync(True)
                    if self._recorder.record(synced, page):
                        self.modes.fix_path(self.meta_dir / SYNCED_RECORD, False)
                    self._synced_txnid = synced
            except BaseException as exc:
                new_pin.abort()
                self._dirty = self._dirty or dirty
                self._commits_since_sync += commits
                if isinstance(exc, (OSError, lmdb.Error)) and self.no_space(exc):
                    raise NoSpace(f"no space left on the device that holds the store (syncing: {exc})") from exc
                raise
            old, self._pin = self._pin, new_pin
            self._pin_time = time.monotonic()
            old.abort()

    def backup_due(self, interval: float | None = None) -> bool:
        """True when this process committed since its last metadata backup
        and ``interval`` seconds (default ``backup.INTERVAL``) passed since
        (or since the store was opened)."""
        interval = backup.INTERVAL if interval is None else interval
        return self._commits_since_backup > 0 and time.monotonic() - self._last_backup >= interval

    def backup_metadata(self) -> backup.Generation | None:
        """Take a metadata backup generation now (``meta.backup.take``: a
        compacted, checked copy into ``meta-backup/``; at most
        ``backup.KEEP`` are kept). Returns it, or None if the newest already
        holds the current transaction. Raises ``OSError``/``lmdb.Error``
        from the disk, ``ValueError`` if the metadata is damaged."""
        commits = self._commits_since_backup
        self._commits_since_backup = 0
        self._last_backup = time.monotonic()
        try:
            return backup.take(self.env, self.dbs, self.path, self.modes)
        except BaseException:
            self._commits_since_backup += commits
            raise

    def before_commit(self) -> None:
        """Call inside a write transaction just before committing it: keeps
        the metadata file allocated past its last page
        (``recovery.MetaReserve``), so the commit does not meet a full disk
        half way. Raises :class:`NoSpace` when the disk has no room for it."""
        self._reserve.ensure(self.env.info()["last_pgno"])

    def no_space(self, exc: BaseException) -> bool:
        """True if ``exc`` (an ``lmdb.Error`` or ``OSError``) means the disk
        or quota that holds the store is full (``recovery.is_no_space``)."""
        return is_no_space(exc, self.path)

    # -- figures ------------------------------------------------------------------------

    def stats(self) -> dict:
        """Store figures (``chronicle stats``): running totals kept in the
        metadata, so this is O(1) in the size of the store.

        ``logical_bytes``: bytes of all distinct file contents ever recorded;
        ``unique_bytes``: bytes of the distinct chunks they are made of;
        ``stored_bytes``: those chunks after compression;
        ``pack_bytes``: pack files on disk (includes space GC can reclaim).
        """
        with self.env.begin() as txn:
            totals = schema.read_totals(txn, self.dbs["meta"])
            events = txn.stat(self.dbs["events"])["entries"]
            ws_count = txn.stat(self.dbs["workspaces"])["entries"]
        packs = self.chunks.reader.list_packs()
        pack_bytes = sum(packs.values())
        info = self.env.info()
        logical, unique, stored = totals["logical_bytes"], totals["unique_bytes"], totals["stored_bytes"]
        return {
            "store": str(self.path),
            "logical_bytes": logical,
            "unique_bytes": unique,
            "stored_bytes": stored,
            "pack_bytes": pack_bytes,
            "metadata_bytes": (info["last_pgno"] + 1) * self._page_size,
            "dedup_ratio": round(logical / unique, 3) if unique else 1.0,
            "compression_ratio": round(unique / stored, 3) if stored else 1.0,
            "workspaces": ws_count,
            "events": events,
            "contents": totals["contents"],
            "chunks": totals["chunks"],
            "packs": len(packs),
        }


def _make_backend(path: Path, config: dict, modes: StoreModes):
    """The chunk backend ``store.json`` names: ``file`` (a
    :class:`LocalBackend` on the store directory) or ``s3://BUCKET/PREFIX``
    (an :class:`~chronicle.store.chunks.backends.s3.S3Backend` with its
    spool, outbox and read cache in ``<store>/cache/s3``)."""
    backend = config.get("backend", "file")
    if backend == "file":
        return LocalBackend(path, file_mode=modes.file_mode, dir_mode=modes.dir_mode)
    if isinstance(backend, str) and backend.startswith("s3://"):
        from chronicle.store.chunks.backends import s3      # boto3 is loaded only for S3 stores

        options = config.get("s3") or {}
        location = s3.S3Location.parse(backend, options.get("endpoint"), options.get("region"))
        cache = path / "cache"
        modes.mkdir(cache)
        return s3.S3Backend(location, cache / "s3", cache_size=int(options.get("cache_size", s3.DEFAULT_CACHE_SIZE)),
                            file_mode=modes.file_mode, dir_mode=modes.dir_mode)
    raise StoreError(f"{path / STORE_FILE} names an unknown backend {backend!r}")


def _open_files_of(ws: Workspace):
    """The open inodes of ``ws`` (none once it is gone), for ``Lease.track``."""
    ref = weakref.ref(ws)

    def open_inodes() -> tuple[int, ...]:
        found = ref()
        return () if found is None else tuple(found.files)
    return open_inodes


class _PairFlusher:
    """Runs two flushes at the same time: ``both(first, second)`` runs
    ``first()`` in a helper thread and ``second()`` in the caller's (two
    fdatasyncs on one disk: the journal commits them together), and
    returns after both ended, raising the first exception either raised.
    The helper thread is started once and kept (a thread per sync cost a
    ``clone`` and an exit on every fsync). One ``both`` at a time (the
    store's sync lock); :meth:`close` stops the thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._job: Callable[[], object] | None = None
        self._done = True
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    def both(self, first: Callable[[], object], second: Callable[[], object]) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="chronicle-sync-packs", daemon=True)
                self._thread.start()
            self._job, self._done, self._error = first, False, None
            self._cond.notify_all()
        try:
            second()
        finally:
            with self._cond:
                while not self._done:
                    self._cond.wait()
                error, self._error = self._error, None
        if error is not None:
            raise error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stop:
                    self._cond.wait()
                if self._job is None:
                    return
                job, self._job = self._job, None
            error = None
            try:
                job()
            except BaseException as exc:      # handed to the caller of both()
                error = exc
            with self._cond:
                self._error, self._done = error, True
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join()
