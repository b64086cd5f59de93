"""Starting and stopping mount daemons (``chronicle mount`` / ``umount``).

``mount`` without ``foreground`` starts ``python -m chronicle mount
--foreground ...`` as a detached daemon (its own session, output appended to
``<store>/run/mount-<workspace>.log``) and returns once the mountpoint is a
mount and the daemon is alive — or raises with the daemon's last error.
``umount`` unmounts with ``fusermount3 -u`` and waits for the daemon to
finish committing and syncing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from chronicle.errors import Busy, ChronicleError, InvalidArgument, NotFound, StoreError

DEFAULT_WORKSPACE = "default"
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 120.0


def _store_path(store: Path | None) -> Path:
    from chronicle.store.store import default_store_path

    return Path(store).absolute() if store else default_store_path()


def mount(store: Path | None, workspace: str, mountpoint: Path, *, foreground: bool = False) -> None:
    """Mount ``workspace`` of ``store`` (default store when None; both created
    if missing) at ``mountpoint``. Without ``foreground``, returns once the
    mount is ready while a daemon keeps serving; with it, serves until
    unmounted. Raises a ``ChronicleError`` with a one-line message."""
    from chronicle.fs.daemon import clear_stale, serve, setup_logging
    from chronicle.store.store import Store, check_workspace_name

    check_workspace_name(workspace)
    store_path = _store_path(store)
    mountpoint = Path(mountpoint).absolute()
    clear_stale(mountpoint)
    if os.path.ismount(mountpoint):
        raise Busy(f"{mountpoint} is already a mount point")
    if mountpoint.exists() and not mountpoint.is_dir():
        raise InvalidArgument(f"{mountpoint} is not a directory")
    mountpoint.mkdir(parents=True, exist_ok=True)
    with Store.open(store_path, create=True) as st:
        info = st.mount_info(workspace)
        if info is not None:
            raise Busy(f"workspace {workspace!r} is already mounted at {info['mountpoint']} (pid {info['pid']})")
    if foreground:
        setup_logging()
        raise SystemExit(serve(store_path, workspace, mountpoint))
    log_path = store_path / "run" / f"mount-{workspace}.log"
    with open(log_path, "ab") as log_file:
        start = log_file.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "chronicle", "mount", "--foreground", "--store", str(store_path),
             "--workspace", workspace, str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(f"the mount daemon exited: {_last_error(log_path, start)}")
        if os.path.ismount(mountpoint):
            return
        time.sleep(0.02)
    proc.terminate()
    raise StoreError(f"the mount did not come up within {MOUNT_TIMEOUT:.0f}s: {_last_error(log_path, start)}")


def _last_error(log_path: Path, start: int) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "error" in line.lower():
            return line.split(": ", 1)[-1] if " ERROR " in line else line
    return lines[-1] if lines else "no output (see the log)"


def mount_identity(mountpoint: Path) -> dict:
    """``{"store", "workspace", "pid", ...}`` of a live mount, read from its
    ``.chronicle/stats``. Raises :class:`NotFound` if it is not a Chronicle mount."""
    try:
        with open(Path(mountpoint) / ".chronicle" / "stats", "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        raise NotFound(f"{mountpoint} is not a Chronicle mount") from None


def umount(mountpoint: Path) -> None:
    """Flush, unmount ``mountpoint`` and wait for its daemon to exit."""
    from chronicle.fs.daemon import clear_stale
    from chronicle.store.store import process_alive

    mountpoint = Path(mountpoint).absolute()
    if clear_stale(mountpoint):
        return
    if not os.path.ismount(mountpoint):
        raise NotFound(f"{mountpoint} is not mounted")
    identity = mount_identity(mountpoint)
    pid = int(identity.get("pid", 0))
    proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "fusermount3 failed"
        if "busy" in message.lower():
            raise Busy(f"{mountpoint} is busy (a process has a file or directory open in it)")
        raise ChronicleError(message)
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while pid and time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.02)
    if pid:
        raise StoreError(f"the daemon (pid {pid}) did not exit within {UMOUNT_TIMEOUT:.0f}s")
