"""Starting and stopping mount daemons (``chronicle mount`` / ``umount``).

``mount`` without ``foreground`` starts ``python -m chronicle mount
--foreground ...`` as a detached daemon (its own session, output appended to
``<store>/run/mount-<workspace>.log``) and returns once the mountpoint is a
mount and the daemon is alive — or raises with the daemon's last error.
``umount`` unmounts with ``fusermount3 -u`` and waits for the daemon to
finish committing and syncing. Processes and mounts are asked about through
:mod:`chronicle.procs` (alive, stale, fusermount, spawn-and-wait).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chronicle import procs
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
    from chronicle.fs.daemon import serve, setup_logging
    from chronicle.store.store import Store, check_workspace_name

    check_workspace_name(workspace)
    store_path = _store_path(store)
    mountpoint = Path(mountpoint).absolute()
    procs.clear_stale(mountpoint)
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
    proc, start = procs.spawn(procs.mount_command(store_path, workspace, mountpoint), log_path)
    try:
        procs.wait_for_mount(mountpoint, proc.pid, timeout=MOUNT_TIMEOUT,
                             describe=lambda: procs.last_error(log_path, start))
    except StoreError:
        if proc.poll() is None:
            proc.terminate()
        raise


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
    mountpoint = Path(mountpoint).absolute()
    if procs.clear_stale(mountpoint):
        return
    if not os.path.ismount(mountpoint):
        raise NotFound(f"{mountpoint} is not mounted")
    identity = mount_identity(mountpoint)
    pid = int(identity.get("pid", 0))
    rc, stderr = procs.fusermount(mountpoint)
    if rc != 0:
        message = stderr.splitlines()[-1] if stderr else "fusermount3 failed"
        if "busy" in message.lower():
            raise Busy(f"{mountpoint} is busy (a process has a file or directory open in it)")
        raise ChronicleError(message)
    if pid and not procs.wait_gone(pid, UMOUNT_TIMEOUT):
        raise StoreError(f"the daemon (pid {pid}) did not exit within {UMOUNT_TIMEOUT:.0f}s")
