"""Processes and FUSE mounts, written once: alive, stale, unmount, spawn-and-wait.

Every front end — the CLI (``chronicle.mounting``, ``chronicle.locate``), the
mount daemon (``chronicle.fs.daemon``), the agent runtime
(``agent_runtime.process``, ``agent_runtime.client``), the store's liveness
checks of registered daemons, the tests and the benchmarks — asks these
questions the same way through this module. It is a leaf: it imports nothing
of Chronicle but :mod:`chronicle.errors`, so the store may import it too.

Vocabulary:

- **alive** — a process that runs. A **zombie** (exited, not yet reaped by its
  parent: state ``Z``/``X`` in ``/proc/PID/stat``, proc(5)) is *gone*: it
  holds no files, serves no mount and will never run again. A live process
  of another user is *alive* (``kill(pid, 0)`` answers ``EPERM``, kill(2)).
- **mounted** — ``/proc/self/mounts`` lists a mount at the path (no access
  to the file system itself, so neither a hung nor a dead daemon can block
  or fool the answer).
- **stale** — a FUSE mount whose daemon is gone: the kernel answers
  ``ENOTCONN`` ("Transport endpoint is not connected"). We ask with
  ``statfs``: the kernel answers ``stat`` of a FUSE root from its attribute
  cache even on a dead connection, but always sends ``STATFS`` to the
  daemon (fuse(4); libfuse's ``fuse_lowlevel.h``). ``ECONNABORTED`` (a
  connection aborted through ``/sys/fs/fuse/connections/N/abort``) is
  stale too.
- **serving** — mounted, and ``statfs`` and ``os.path.ismount`` answered.
- **unmount** — ``fusermount3 -u`` (fusermount3(1)); **lazy** unmount,
  ``fusermount3 -u -z``, detaches the mount at once and lets the kernel
  finish it once nothing uses it (umount(2) ``MNT_DETACH``). A stale mount
  can only be removed lazily.

Errors: :func:`wait_for_mount` raises :class:`~chronicle.errors.StoreError`
with the daemon's log tail; everything else answers with values and never
raises for a missing process or mount.

Threads: plain blocking code, safe from any thread. :func:`serving` with a
timeout probes in a helper thread so a hung daemon cannot hang the caller.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from chronicle.errors import StoreError

FUSERMOUNT = "fusermount3"
_STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


# --- processes ----------------------------------------------------------------

def alive(pid: int) -> bool:
    """True if process ``pid`` runs: a zombie counts as gone, another user's
    live process as alive (see the module docstring). ``pid <= 0`` is never
    alive (``kill(0, ...)`` would name our own process group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                               # exists, belongs to someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses.
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True                        # no /proc to ask: kill(2) said it exists
    return state not in (b"Z", b"X")


def wait_gone(pid: int, timeout: float, poll: float = 0.02) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to stop being :func:`alive`;
    True once it is gone, False if it still runs."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


# --- mounts -------------------------------------------------------------------

def _unescape_mounts_field(text: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo (getmntent(3)).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _canonical(path: os.PathLike | str) -> str:
    # realpath() of the parent only: resolving the mountpoint itself would
    # touch the mount, which blocks on a hung daemon and fails on a stale one.
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mount_entries(mountpoint: os.PathLike | str) -> list[str]:
    """File system types mounted at ``mountpoint`` (``["fuse.chronicle"]``;
    more than one when mounts are stacked), per ``/proc/self/mounts``."""
    want = _canonical(mountpoint)
    found = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape_mounts_field(fields[1]) == want:
                found.append(fields[2])
    return found


def mounted_under(directory: os.PathLike | str) -> list[str]:
    """Mount points at or below ``directory``, per ``/proc/self/mounts``."""
    base = Path(_canonical(directory))
    found = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and Path(_unescape_mounts_field(fields[1])).is_relative_to(base):
                found.append(_unescape_mounts_field(fields[1]))
    return found


def is_stale(mountpoint: os.PathLike | str) -> bool:
    """True if ``mountpoint`` is a mount whose FUSE daemon is gone (``statfs``
    fails with ``ENOTCONN``/``ECONNABORTED``; see the module docstring)."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in _STALE_ERRNOS and bool(mount_entries(mountpoint))
    return False


def fusermount(mountpoint: os.PathLike | str, *, lazy: bool = False, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``fusermount3 -u`` (``-u -z`` if ``lazy``) on ``mountpoint``.

    Returns ``(exit status, stderr text)``; ``-1`` if fusermount3 is missing
    or did not finish within ``timeout`` s. Never raises for a failure."""
    cmd = [FUSERMOUNT, "-u"] + (["-z"] if lazy else []) + [os.fspath(mountpoint)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"{' '.join(cmd)} timed out after {timeout:.0f}s"
    except FileNotFoundError:
        return -1, f"{FUSERMOUNT} not found (apt-get install fuse3)"
    return proc.returncode, proc.stderr.strip()


def unmount(mountpoint: os.PathLike | str, *, timeout: float = 30.0) -> tuple[int, str]:
    """Unmount ``mountpoint``: ``fusermount3 -u``, and if that fails (busy,
    stale) ``fusermount3 -u -z``. No-op ``(0, "")`` if nothing is mounted
    there. Returns the status and message of the last fusermount3 run."""
    if not mount_entries(mountpoint):
        return 0, ""
    rc, message = fusermount(mountpoint, timeout=timeout)
    if rc != 0 and mount_entries(mountpoint):
        rc, message = fusermount(mountpoint, lazy=True, timeout=timeout)
    return rc, message


def clear_stale(mountpoint: os.PathLike | str) -> bool:
    """Lazily unmount stale mounts at ``mountpoint`` (stacked stale mounts
    come off one per call, so up to 8 times). A mount whose daemon still
    answers is left alone. Returns True if something was unmounted."""
    cleared = False
    for _ in range(8):
        if not is_stale(mountpoint):
            break
        fusermount(mountpoint, lazy=True)
        cleared = True
    return cleared


def serving(mountpoint: os.PathLike | str, timeout: float | None = None) -> bool:
    """True if ``mountpoint`` is mounted and its daemon answers: ``statfs``
    succeeds and ``os.path.ismount`` holds. ``ismount`` alone can be fooled by
    a stale mount whose root attributes the kernel still caches.

    With ``timeout`` (s), the probe runs in a helper thread and a daemon that
    does not answer in time counts as not serving."""
    if not mount_entries(mountpoint):
        return False

    def probe() -> bool:
        try:
            os.statvfs(mountpoint)
        except OSError:
            return False
        return os.path.ismount(mountpoint)

    if timeout is None:
        return probe()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(probe()), daemon=True,
                              name=f"probe {mountpoint}")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


# --- mount daemons ------------------------------------------------------------

def log_tail(path: os.PathLike | str, start: int = 0, lines: int = 12) -> str:
    """The last ``lines`` non-blank lines of a log from byte offset ``start``
    (``""`` if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def last_error(path: os.PathLike | str, start: int = 0) -> str:
    """One line for a user: the daemon log's last line naming an error (its
    message part, after the logger name), else its last line."""
    text = log_tail(path, start, lines=200)
    if not text:
        return "no output (see the log)"
    lines = [ln.strip() for ln in text.splitlines()]
    for line in reversed(lines):
        if "error" in line.lower():
            return line.split(": ", 1)[-1] if " ERROR " in line else line
    return lines[-1]


def mount_command(store: os.PathLike | str, workspace: str, mountpoint: os.PathLike | str,
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The argv of a foreground mount daemon: ``python -m chronicle mount
    --foreground --store STORE --workspace WS [EXTRA...] MOUNTPOINT``."""
    return [sys.executable, "-m", "chronicle", "mount", "--foreground", "--store", os.fspath(store),
            "--workspace", workspace, *extra_args, os.fspath(mountpoint)]


def spawn(argv: Sequence[str], log_path: os.PathLike | str, *, env: dict[str, str] | None = None,
          cwd: os.PathLike | str | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` detached: its own session (a ^C for the caller does not
    reach it), stdin from ``/dev/null``, stdout and stderr appended to
    ``log_path``. Returns the process and the log's size before it started
    (where its output begins)."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        start = out.tell()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True, close_fds=True)
    return proc, start


def wait_for_mount(mountpoint: os.PathLike | str, pid: int, *, timeout: float,
                   log_path: os.PathLike | str | None = None, log_start: int = 0,
                   describe: Callable[[], str] | None = None, poll: float = 0.02) -> None:
    """Wait until ``mountpoint`` is :func:`serving` while process ``pid`` is
    still :func:`alive` (checked again after the mount answered).

    Raises :class:`StoreError` if the process exits first or ``timeout`` s
    pass; the message ends with ``describe()`` (default: the last lines of
    ``log_path`` from ``log_start``). The process is left as it is: the
    caller owns it and decides whether to kill it."""
    mountpoint = Path(mountpoint)

    def detail() -> str:
        if describe is not None:
            return describe()
        return (log_tail(log_path, log_start, lines=3) if log_path is not None else "") or "no output"

    deadline = time.monotonic() + timeout
    while True:
        if not alive(pid):
            raise StoreError(f"the mount daemon (pid {pid}) exited before {mountpoint} was mounted: {detail()}")
        remaining = deadline - time.monotonic()
        if serving(mountpoint, timeout=max(remaining, 0.5)) and alive(pid):
            return
        if time.monotonic() >= deadline:
            raise StoreError(f"{mountpoint} was not mounted within {timeout:.0f}s: {detail()}")
        time.sleep(poll)


__all__ = ["FUSERMOUNT", "alive", "clear_stale", "fusermount", "is_stale", "last_error", "log_tail",
           "mount_command", "mount_entries", "mounted_under", "serving", "spawn", "unmount", "wait_for_mount", "wait_gone"]
