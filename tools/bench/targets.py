"""Benchmark targets: the filesystems a workload runs on.

A *target* owns one private directory (``base``) given by the bench and offers
a directory ``root`` on its filesystem where workloads make their own fresh
subdirectories. Four kinds:

- ``ext4``        -- a plain directory on the local disk;
- ``passthrough`` -- pyfuse3's ``examples/passthroughfs.py`` over a plain
  directory (``tools/passthrough.py``), the Python-FUSE baseline;
- ``chronicle``   -- Chronicle's mount, driven through its CLI
  (``python -m chronicle mount/umount``), with a private store in ``base``;
- ``chronicle-s3`` -- the same with the store's packs in a private SeaweedFS
  bucket (``tools.seaweed``), its read cache emptied at each remount.

Lifecycle: ``open()`` mounts (raises ``TargetUnavailable`` with the reason if
it cannot), ``remount(between)`` unmounts, calls ``between()`` and mounts again
(so a read starts from a cold mount), ``close()`` unmounts, stops every process
the target started -- by PID -- and removes ``base``. ``close()`` is idempotent
and safe after a failed ``open()``; callers put it in a ``finally``.

Nothing here is thread-safe; the bench drives one target at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chronicle import procs
from tools.passthrough import PassthroughMount, start_passthroughfs

REPO = Path(__file__).resolve().parents[2]

# `chronicle mount` returns once the mount is ready; `umount` flushes first,
# which after a 1 GiB run may take a while.
MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 600.0


class TargetUnavailable(Exception):
    """The target cannot be mounted here; the message says why."""


def _warn(msg: str) -> None:
    print(f"fsbench: warning: {msg}", file=sys.stderr, flush=True)


def _fusermount_unmount(mountpoint: Path) -> None:
    """Unmount a FUSE mount; lazily if it is busy. No-op if not mounted."""
    procs.unmount(mountpoint)


def _remove_tree(path: Path, mountpoints: list[Path]) -> None:
    """Remove ``path`` unless one of ``mountpoints`` inside it is still mounted."""
    still = [m for m in mountpoints if procs.mount_entries(m)]
    if still:
        _warn(f"leaving {path} in place: {', '.join(map(str, still))} is still mounted")
        return
    shutil.rmtree(path, ignore_errors=True)


class Target:
    """Base class; see the module docstring for the lifecycle."""

    name = "?"
    is_fuse = False

    def __init__(self, base: Path):
        self.base = base
        self.root: Path | None = None

    def open(self) -> None:
        raise NotImplementedError

    def remount(self, between: Callable[[], object]) -> None:
        between()

    def close(self) -> None:
        raise NotImplementedError


class MountedTarget(Target):
    """A target served by a FUSE daemon the bench starts at ``mountpoint``:
    subclasses give ``_mount()`` (raises :class:`TargetUnavailable`) and
    ``_unmount()`` (unmounts and stops the daemon by PID); remount and close
    are the same for all of them."""

    is_fuse = True
    mountpoint: Path

    def _mount(self) -> None:
        raise NotImplementedError

    def _unmount(self) -> None:
        raise NotImplementedError

    def remount(self, between: Callable[[], object]) -> None:
        self._unmount()
        if procs.mount_entries(self.mountpoint):
            raise RuntimeError(f"could not unmount {self.mountpoint}")
        between()
        try:
            self._mount()
        except TargetUnavailable as exc:
            raise RuntimeError(f"remount failed: {exc}") from None

    def close(self) -> None:
        try:
            self._unmount()
        finally:
            _fusermount_unmount(self.mountpoint)
            _remove_tree(self.base, [self.mountpoint])


class Ext4Target(Target):
    """A plain directory on the local disk (``base`` must be on ext4)."""

    name = "ext4"

    def open(self) -> None:
        self.root = self.base / "root"
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class PassthroughTarget(Target):
    """pyfuse3 ``examples/passthroughfs.py`` mounted over ``base/backing``."""

    name = "passthrough"
    is_fuse = True

    def __init__(self, base: Path):
        super().__init__(base)
        self.backing = base / "backing"
        self.mountpoint = base / "mnt"
        self._mount: PassthroughMount | None = None

    def _start(self) -> None:
        self._mount = start_passthroughfs(self.backing, self.mountpoint)

    def _stop(self) -> None:
        mount, self._mount = self._mount, None
        if mount is None:
            return
        try:
            mount.stop()  # fusermount3 -u (-z if busy), then wait/terminate/kill its PID
        finally:
            # start_passthroughfs leaves its daemon log in /tmp; it is ours to remove.
            Path(mount.log).unlink(missing_ok=True)

    def open(self) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except RuntimeError as exc:  # fetch or mount failed
            raise TargetUnavailable(str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc))
        self.root = self.mountpoint

    def remount(self, between: Callable[[], object]) -> None:
        self._stop()
        between()
        self._start()

    def close(self) -> None:
        try:
            self._stop()
        finally:
            _fusermount_unmount(self.mountpoint)
            _remove_tree(self.base, [self.mountpoint])


class ChronicleTarget(MountedTarget):
    """Chronicle's mount of workspace ``bench`` from a private store in ``base``.

    The CLI's ``mount`` forks a daemon we do not get the PID of. We stop it
    with ``chronicle umount``; if that fails we unmount with fusermount3 and
    then signal, by PID, the processes whose command line names this target's
    own (unique) mountpoint -- never by name pattern across the machine.
    """

    name = "chronicle"
    is_fuse = True
    workspace = "bench"

    def __init__(self, base: Path):
        super().__init__(base)
        self.store = base / "store"
        self.mountpoint = base / "mnt"
        self.log = base / "chronicle-cli.log"
        self._mounted_once = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        # Should anything ignore --store, it lands in our work dir, not in ~.
        env["CHRONICLE_HOME"] = str(self.base / "home")
        return env

    def _cli(self, *args: str, timeout: float) -> tuple[int, str]:
        """Run ``python -m chronicle ARGS``; return (exit code, last log line).

        Output goes to a file, not a pipe: a daemon that inherits a pipe would
        keep ``subprocess.run`` waiting until it exits.
        """
        with open(self.log, "ab") as out:
            out.write(f"$ chronicle {' '.join(args)}\n".encode())
            out.flush()
            try:
                rc = subprocess.run([sys.executable, "-m", "chronicle", *args], cwd=self.base,
                                    env=self._env(), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return -1, f"timed out after {timeout:.0f}s"
        lines = [line for line in self.log.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("$ chronicle ")]
        return rc, (lines[-1].strip() if lines else "")

    def _mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        rc, last = self._cli("mount", "--store", str(self.store), "--workspace", self.workspace,
                             str(self.mountpoint), timeout=MOUNT_TIMEOUT)
        if rc != 0:
            raise TargetUnavailable(f"`chronicle mount` exited with {rc}: {last or '(no output)'}")
        if not os.path.ismount(self.mountpoint):
            raise TargetUnavailable("`chronicle mount` returned 0 but the mountpoint is not mounted")
        self._mounted_once = True

    def _unmount(self) -> None:
        """Unmount through the CLI; fall back to fusermount3 and PID signals."""
        if os.path.ismount(self.mountpoint):
            rc, last = self._cli("umount", str(self.mountpoint), timeout=UMOUNT_TIMEOUT)
            if rc != 0 or os.path.ismount(self.mountpoint):
                _warn(f"`chronicle umount` failed ({rc}: {last}); unmounting with fusermount3")
                _fusermount_unmount(self.mountpoint)
        if self._mounted_once:
            self._stop_leftover_daemons()

    def _daemon_pids(self) -> list[int]:
        """PIDs of processes whose argv contains this target's mountpoint."""
        wanted = {str(self.mountpoint), str(self.mountpoint.resolve())}
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = {os.fsdecode(a).rstrip("/") for a in argv}
            if wanted & args:
                pids.append(int(entry))
        return pids

    def _stop_leftover_daemons(self) -> None:
        pids = self._daemon_pids()
        deadline = time.monotonic() + 5.0  # a daemon that just lost its mount exits by itself
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in pids if procs.alive(p)]
        if not pids:
            return
        _warn(f"chronicle daemon(s) {pids} still running after unmount; sending SIGTERM")
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                pids = [p for p in pids if procs.alive(p)]
                if not pids:
                    return
                time.sleep(0.1)

    def open(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self._mount()
        except BaseException:
            self.close()
            raise
        self.root = self.mountpoint



class ChronicleS3Target(ChronicleTarget):
    """Chronicle's mount of a store whose packs are in a SeaweedFS bucket
    (``tools.seaweed``: a private ``weed server -s3`` on 127.0.0.1, started
    and stopped by PID with the target). A remount also empties the store's
    local read cache, so a read after it fetches every pack from the bucket
    (the cold case: another machine, or an evicted cache)."""

    name = "chronicle-s3"

    def __init__(self, base: Path):
        super().__init__(base)
        self.server = None

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.server is not None:
            env.update(self.server.env)
        return env

    def open(self) -> None:
        from tools.seaweed import SeaweedServer
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.server = SeaweedServer(self.base / "seaweed").start()
            rc, last = self._cli("init", str(self.store), "--backend", f"s3://{self.server.bucket}/bench",
                                 "--endpoint", self.server.endpoint, timeout=MOUNT_TIMEOUT)
            if rc != 0:
                raise TargetUnavailable(f"`chronicle init --backend s3://...` exited with {rc}: {last}")
        except BaseException:
            self.close()
            raise
        super().open()

    def remount(self, between: Callable[[], object]) -> None:
        def wipe_then(between=between):
            shutil.rmtree(self.store / "cache" / "s3" / "blocks", ignore_errors=True)
            between()
        super().remount(wipe_then)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None


TARGETS: dict[str, type[Target]] = {
    "ext4": Ext4Target,
    "passthrough": PassthroughTarget,
    "chronicle": ChronicleTarget,
    "chronicle-s3": ChronicleS3Target,
}
