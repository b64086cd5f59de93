"""The mount daemon: one process serving one workspace at one mountpoint.

Lifecycle (S3QL's and borg's rules):

- the store and workspace are opened (taking the workspace's writer lock)
  before mounting, so a bad store or a workspace mounted elsewhere fails
  before anything appears at the mountpoint;
- the FUSE loop (``pyfuse3.main`` on trio) runs beside background tasks:
  :meth:`Store.sync` whenever it is due (every few seconds or few hundred
  commits while dirty, like ext4's 5 s commit interval; see
  ``Store.needs_sync``), the metadata backup when due
  (``Store.backup_due``, ``chronicle.store.meta.backup``), GC (below) and the signal handler;
- **GC** (``chronicle.store.gc.collect``) runs in a worker thread, never on
  the trio loop, in bounded batches (``gc.prune.BATCH_SECONDS`` per LMDB
  write transaction): every :data:`GC_INTERVAL` seconds (default an hour,
  ``CHRONICLE_GC_INTERVAL``; 0 turns it off) with the workspace's policy,
  and before a full disk is answered ENOSPC (``errno_map.set_reclaim``:
  then packs with any dead chunk are rewritten, and the request is tried
  again). Every second the task also refreshes this process's GC lease
  (``gc.leases``) and closes descriptors of packs another GC deleted; when
  that GC asked it to seal the pack it writes (``Lease.take_rotation``), it
  closes that pack at once in a worker (``PackWriter.close_sealed``) and
  rewrites its lease, so the GC need not wait for the next sync;
- SIGTERM/SIGINT/SIGHUP end the loop cleanly; an unmount (``fusermount3 -u``)
  ends it too. Only after a clean return are open files committed, the
  metadata backed up (if anything was committed), the store synced and the
  mount removed. On a crash path the mount is left in place
  (an empty mountpoint would make tools think the files are gone); the next
  ``chronicle mount`` clears the stale mountpoint (``chronicle.procs``).

Logging goes to stderr: ``"%(asctime)s %(levelname)s %(name)s: %(message)s"``.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from chronicle import procs
from chronicle.errors import Busy, NoSpace
from chronicle.fs.errno_map import set_reclaim
from chronicle.fs.groupsync import GroupSync
from chronicle.fs.operations import ChronicleOperations
from chronicle.store.gc.collect import collect
from chronicle.store.gc.sweep import SETTLE_WAIT, THRESHOLD
from chronicle.store.history.turns import TurnLog
from chronicle.store.store import SYNC_INTERVAL, Store

log = logging.getLogger("chronicle.daemon")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
GC_INTERVAL = float(os.environ.get("CHRONICLE_GC_INTERVAL", "3600"))   # seconds between background GC runs
RECLAIM_PAUSE = 5.0         # seconds without another ENOSPC reclaim after one that freed nothing


class _InterruptedReplies(logging.Filter):
    """pyfuse3 logs every failed ``fuse_reply_*`` as an ERROR. One failure is
    not an error: ENOENT, which the kernel answers when the request being
    replied to is no longer waiting — it was interrupted, or it was an
    asynchronous RELEASE whose file the kernel already let go (``close(2)``
    returns before RELEASE is answered, so an unmount can overtake it; see
    ``fuse_dev_do_write`` in the kernel's ``fs/fuse/dev.c``). Those are logged
    at DEBUG; every other reply failure stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "fuse_reply_* failed with" in str(record.msg) and \
                record.args and str(record.args[-1]) == os.strerror(errno.ENOENT):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def setup_logging() -> None:
    """Log to stderr in :data:`LOG_FORMAT` at ``$CHRONICLE_LOG_LEVEL`` (default INFO)."""
    level = os.environ.get("CHRONICLE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("pyfuse3").addFilter(_InterruptedReplies())


def clear_stale(mountpoint: Path) -> bool:
    """Lazily unmount a stale mount left at ``mountpoint`` by a daemon that
    died (:func:`chronicle.procs.clear_stale`); True if there was one."""
    if not procs.clear_stale(mountpoint):
        return False
    log.info("cleared the stale mount at %s", mountpoint)
    return True


def fs_name(store: Path, workspace: str) -> str:
    """The mount's source, as ``/proc/self/mounts``, ``findmnt`` and ``df``
    show it: ``STORE#WORKSPACE``, the SOURCE ``mount.fuse.chronicle`` takes
    (``chronicle.mount_helper``), so that ``mount -a`` finds an fstab line
    already mounted. Written for libfuse's option parser (``fuse_opt.c``: a
    backslash escapes the next character, ``\\ooo`` is a byte in octal) in
    ASCII, as pyfuse3 passes options: ``,`` and ``\\`` escaped, bytes
    outside printable ASCII in octal."""
    out = []
    for byte in os.fsencode(f"{os.fspath(store)}#{workspace}"):
        char = chr(byte)
        if char in ",\\":
            out.append("\\" + char)
        elif 0x20 < byte < 0x7f:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def mount_options(workspace: str, extra: tuple[str, ...] = (), store: Path | None = None) -> set[str]:
    """pyfuse3's defaults (``default_permissions``) plus ``fsname``
    (:func:`fs_name` of ``store``; ``chronicle:WORKSPACE`` without one),
    ``subtype`` and ``noatime`` (mount.fuse3(8)); ``allow_other`` as root;
    and ``extra``, the user's (``chronicle.mounting.fuse_options``: ``ro``,
    ``allow_other``, ...)."""
    options = set(pyfuse3.default_options)          # default_permissions: the kernel checks modes
    name = fs_name(store, workspace) if store is not None else f"chronicle:{workspace}"
    options |= {f"fsname={name}", "subtype=chronicle", "noatime", *extra}
    if os.getuid() == 0:
        options.add("allow_other")                  # other users reach it like any directory
    return options


async def _periodic_sync(store: Store, group: GroupSync) -> None:
    """Sync when due (``Store.needs_sync``: this process's commits, by time or
    count, sooner while a GC runs; with none, the call only moves the pin on),
    through the adapter's :class:`~chronicle.fs.groupsync.GroupSync`, which
    fsync and ctl ``sync`` share: one ``Store.sync`` at a time, in a worker
    thread, and an fsync arriving meanwhile shares the next one."""
    while True:
        await trio.sleep(0.1)
        if store.needs_sync():
            try:
                await group.sync()
            except Exception:
                log.exception("periodic sync failed; will retry")
                await trio.sleep(SYNC_INTERVAL)


async def _periodic_backup(store: Store, limiter: trio.CapacityLimiter) -> None:
    """Take a metadata backup (``Store.backup_metadata``) when one is due
    (``Store.backup_due``), in a worker thread: the copy reads one LMDB
    snapshot and blocks no commit. A failure is logged and retried at the next interval."""
    while True:
        await trio.sleep(1.0)
        if store.backup_due():
            try:
                await trio.to_thread.run_sync(store.backup_metadata, limiter=limiter)
            except Exception as exc:
                log.warning("metadata backup failed (%s: %s); will retry", type(exc).__name__, exc)


def _backup_at_unmount(store: Store) -> None:
    """The clean unmount's metadata backup, if this daemon committed since the last."""
    if not store.backup_due(0):
        return
    try:
        store.backup_metadata()
    except Exception as exc:
        log.warning("metadata backup at unmount failed (%s: %s)", type(exc).__name__, exc)


class _Collector:
    """The daemon's GC: one run at a time, in a worker thread (module docstring)."""

    def __init__(self, store: Store, workspace: str):
        self.store = store
        self.workspace = workspace
        self._lock = trio.Lock()
        self.runs = 0
        self._fruitless_until = 0.0

    async def run(self, why: str, threshold: float = THRESHOLD, wait: float = SETTLE_WAIT) -> dict | None:
        """One GC run (None if another process's GC holds the store, or it
        failed). ``threshold``, ``wait``: ``gc.sweep.compact``'s."""
        async with self._lock:
            kwargs = {"wait": wait, "threshold": threshold}
            try:
                result = await trio.to_thread.run_sync(partial(collect, self.store, [self.workspace], **kwargs))
            except Busy:
                log.info("gc (%s): another gc is running on this store", why)
                return None
            except NoSpace as exc:
                log.warning("gc (%s) stopped: %s; the next run finishes the job", why, exc)
                return None
            except Exception:
                log.exception("gc (%s) failed; the next run finishes the job", why)
                return None
            finally:
                self.runs += 1
        log.info("gc (%s): pruned %d versions, freed %d bytes, %d bytes of disk space back%s", why,
                 result["pruned_versions"], result["freed_bytes"], result["reclaimed_bytes"],
                 f" (deferred: {result['deferred']})" if result.get("deferred") else "")
        return result

    async def reclaim(self) -> bool:
        """Before ENOSPC: free what the policy allows; True if space came back
        (or another reclaim finished while this one waited). After a reclaim
        that freed nothing, the next :data:`RECLAIM_PAUSE` seconds answer False at once."""
        before = self.runs
        if time.monotonic() < self._fruitless_until:
            return False
        async with self._lock:
            if self.runs != before:
                return True
        log.info("the disk is full: freeing what the retention policy allows before answering ENOSPC")
        result = await self.run("disk full", threshold=1.0, wait=1.0)   # a request is waiting
        freed = bool(result and (result["reclaimed_bytes"] > 0 or result["packs_deleted"] > 0))
        if freed:
            try:                          # chunks a failed write lost, from the pack writer's copies
                recovered = await trio.to_thread.run_sync(self.store.chunks.recover_lost)
                if recovered:
                    log.info("wrote %d chunks again that the full disk had lost", recovered)
            except NoSpace:
                freed = False
        if not freed:
            self._fruitless_until = time.monotonic() + RECLAIM_PAUSE
        return freed

    async def background(self) -> None:
        last = time.monotonic()
        while True:
            await trio.sleep(1.0)
            try:
                self.store.lease.refresh()
            except OSError as exc:            # a full disk: the lease stays as it was (gc waits, then defers)
                log.debug("could not refresh the gc lease: %s", exc)
            if self.store.lease.take_rotation():          # another process's gc waits for the pack sealed
                try:
                    await trio.to_thread.run_sync(self.store.chunks.writer.close_sealed)
                    self.store.lease.refresh(force=True)
                except Exception as exc:      # noqa: BLE001 - the next sync closes it as before
                    log.debug("could not close the sealed pack early: %s", exc)
            self.store.chunks.release_deleted()
            if GC_INTERVAL > 0 and time.monotonic() - last >= GC_INTERVAL:
                await self.run("policy")
                last = time.monotonic()


async def _signals(ops: ChronicleOperations) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _main(ops: ChronicleOperations) -> None:
    collector = _Collector(ops.store, ops.ws.name)
    set_reclaim(collector.reclaim)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_periodic_sync, ops.store, ops.group_sync)
        nursery.start_soon(_periodic_backup, ops.store, trio.CapacityLimiter(1))
        nursery.start_soon(collector.background)
        nursery.start_soon(_signals, ops)
        nursery.start_soon(_tune_readahead, ops.mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(store_path: Path, workspace: str, mountpoint: Path, options: tuple[str, ...] = ()) -> int:
    """Mount and serve until unmounted or signalled, with the user's mount
    ``options`` beside the daemon's (:func:`mount_options`; ``ro``: the
    kernel refuses every change with EROFS). Returns the exit status.

    Raises ``ChronicleError`` (before mounting) for a bad store or a
    workspace in use.
    """
    faulthandler.enable()
    mountpoint = Path(mountpoint).absolute()
    store = Store.open(store_path, create=True)
    try:
        ws = store.open_workspace(workspace, writable=True, create=True)
    except BaseException:
        store.close()
        raise
    closed = TurnLog(store).close_interrupted(ws)
    if closed:
        log.info("ended %d turn label(s) left open by a daemon that stopped mid-turn", closed)
    ops = ChronicleOperations(ws, store, mountpoint=str(mountpoint))
    clear_stale(mountpoint)
    try:
        pyfuse3.init(ops, str(mountpoint), mount_options(workspace, tuple(options), store.path))
    except RuntimeError as exc:
        store.close()
        raise OSError(f"cannot mount at {mountpoint}: {exc}") from None
    store.register_mount(workspace, str(mountpoint), os.getpid())
    log.info("mounted workspace %r of %s at %s (pid %d)", workspace, store.path, mountpoint, os.getpid())
    clean = False
    try:
        _run_loop(ops)
        clean = True
    except BaseException:
        log.exception("the FUSE loop failed; leaving the mount in place")
        raise
    finally:
        pyfuse3.close(unmount=clean)
        if clean:
            _commit_open_files(ops)
            _backup_at_unmount(store)
            log.info("unmounted %s", mountpoint)
        store.unregister_mount(workspace)
        store.close()
    return 0


READ_AHEAD_KB = 1024


def _readahead_file(mountpoint: str) -> str | None:
    """The sysfs ``read_ahead_kb`` file of our mount, found in
    ``/proc/self/mountinfo`` (a ``stat`` of the mountpoint would go through
    the mount itself)."""
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint and " - fuse" in line:
                device = fields[2]
    return f"/sys/class/bdi/{device}/read_ahead_kb" if device else None


async def _tune_readahead(mountpoint: str) -> None:
    """Raise the kernel's readahead for this mount from FUSE's 128 KiB to
    :data:`READ_AHEAD_KB`, so sequential reads come as 1 MiB requests (each
    request has a fixed cost in the FUSE loop). The kernel sets it when it
    gets our INIT reply, so this runs once the loop serves. Needs root;
    skipped otherwise."""
    for _ in range(20):
        await trio.sleep(0.1)
        try:
            path = _readahead_file(mountpoint)
            if path is None:
                return
            with open(path, "w") as f:
                f.write(f"{READ_AHEAD_KB}\n")
            with open(path) as f:
                if int(f.read()) == READ_AHEAD_KB:
                    return
        except (OSError, ValueError) as exc:
            log.debug("could not raise read_ahead_kb: %s", exc)
            return


def _run_loop(ops: ChronicleOperations) -> None:
    """Run the trio loop; with ``CHRONICLE_PROFILE=FILE`` under cProfile
    (stats written to FILE at unmount, for ``pstats``)."""
    profile_to = os.environ.get("CHRONICLE_PROFILE")
    if not profile_to:
        trio.run(_main, ops)
        return
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(trio.run, _main, ops)
    finally:
        profiler.dump_stats(profile_to)


def _commit_open_files(ops: ChronicleOperations) -> None:
    for ino in list(ops.ws.files):
        try:
            ops.ws.files.commit(ino)
        except Exception:
            log.exception("could not commit inode %d at unmount", ino)
