"""Agent isolation: what an agent's worker may see and do (SPEC §5, last bullet).

An isolated worker (the default; ``Runtime(isolation=False)``, ``chronicle
agent chat/serve --no-isolation`` or ``CHRONICLE_NO_ISOLATION=1`` run it as
before, as the runtime's user) starts as::

    unshare --mount --pid --ipc --fork --kill-child --propagation private --mount-proc \\
      python -I -S agent_runtime/view.py SPEC -- python -m agent_runtime.worker ...

- **its own namespaces** (unshare(1)): a mount namespace whose mounts are
  private (nothing it mounts or unmounts reaches the host, nothing new on
  the host reaches it), a PID namespace with its own ``/proc`` (process 1 is
  the view builder, left as a root reaper; the worker is process 2: it sees
  only its own processes, cannot signal or ptrace anyone else's, and
  ``/proc/<pid>/root`` of another worker does not exist; when the worker
  exits or the ``unshare`` is killed, every process it started is killed),
  and an IPC namespace;
- **its own view** (:mod:`agent_runtime.view`): the store's directory and the
  agents' directory are covered by empty tmpfs, every Chronicle mount is
  detached, and its own workspace is moved in at its own path once mounted
  (the worker starts while it mounts: :meth:`WorkerProcess.attach
  <agent_runtime.process.WorkerProcess.attach>`, :func:`clone_mount`) — the
  only Chronicle mount it can see, its ``.chronicle/ctl`` (the runtime's channel
  for turn labels and restores) masked by an unreadable file; ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock`` are private tmpfs (``HOME=/tmp``; ``PATH`` starts with the
  runtime's Python's directory); the agent's code directory
  and the Python it runs on are bound read-only at their paths when an
  ancestor hides them;
- **an unprivileged uid** (setpriv(1)): uid and gid :data:`AGENT_UID`
  (``Runtime(agent_uid=...)``), no supplementary groups, no capabilities,
  ``PR_SET_NO_NEW_PRIVS`` (no setuid binary gives it more). One uid for every
  agent, not one per agent: a fork's files and a rolled-back tree carry the
  owner they were written with, so a fork must be able to write its parent's
  files; agents are kept apart by their namespaces instead (none can name
  another's files or processes). Files the runtime's user may read and this
  uid may not (``/etc/shadow``) stay unreadable.

The workspace's root is owned by that uid (created so; an agent created
without isolation has its tree handed over once, through the mount, on its
first isolated start: those ownership changes are events outside any turn).

Requirements, checked before the first isolated worker starts (a clear
:class:`~chronicle.errors.AgentError` otherwise): running as root, Linux
namespaces, util-linux's ``unshare`` and ``setpriv``.

Threads: :func:`check`, :func:`adopt` and :func:`clone_mount` block or make
system calls (run them in a worker thread); the rest is pure.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import AgentError

AGENT_UID = 64999           # uid and gid of isolated workers: Debian's on-demand range ends here (60000-64999)
NO_ISOLATION_ENV = "CHRONICLE_NO_ISOLATION"
VIEW_SCRIPT = str(Path(__file__).resolve().parent / "view.py")
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
UNSHARE = ["unshare", "--mount", "--pid", "--ipc", "--fork", "--kill-child", "--propagation", "private",
           "--mount-proc"]

SYS_OPEN_TREE, OPEN_TREE_CLONE, AT_FDCWD = 428, 0x1, -100    # <linux/mount.h>; one number on every arch

_checked: dict[int, str | None] = {}
_libc = ctypes.CDLL(None, use_errno=True)


def isolation_default() -> bool:
    """True unless ``$CHRONICLE_NO_ISOLATION`` is set to a non-empty value other than ``0``."""
    return os.environ.get(NO_ISOLATION_ENV, "") in ("", "0")


def check(uid: int = AGENT_UID) -> None:
    """Raise :class:`AgentError` unless isolated workers can start here (root,
    ``unshare``, ``setpriv``, namespaces: one probe run, remembered)."""
    if uid not in _checked:
        _checked[uid] = _probe(uid)
    if _checked[uid] is not None:
        raise AgentError(f"agent isolation is not available: {_checked[uid]}; run the runtime as root, or "
                         "run the agents as this user with --no-isolation (Runtime(isolation=False), "
                         f"{NO_ISOLATION_ENV}=1)")


def _probe(uid: int) -> str | None:
    if os.geteuid() != 0:
        return "it needs root (to give each worker its own namespaces and an unprivileged uid)"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    argv = [*UNSHARE, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "true"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv[:2])} failed: {exc}"
    if proc.returncode != 0:
        return f"the kernel refused new namespaces: {proc.stderr.strip() or f'status {proc.returncode}'}"
    return None


@dataclass(frozen=True)
class View:
    """What one isolated worker sees. ``hide``: directories covered by an empty
    tmpfs; ``workspace``: its workspace's mountpoint (None while the agent is
    created: no workspace yet); ``cwd``: its code directory; ``uid``/``gid``."""

    hide: tuple[str, ...]
    workspace: str | None
    cwd: str
    uid: int = AGENT_UID
    gid: int = AGENT_UID

    def spec(self, attach_fd: int | None = None) -> dict:
        """The JSON spec :mod:`agent_runtime.view` builds the view from;
        ``attach_fd``: the socket on which the workspace's mount will come."""
        expose: list[tuple[str, bool]] = [(self.cwd, False)]
        expose += [(p, False) for p in _python_paths()]
        spec = {"uid": self.uid, "gid": self.gid, "hide": list(self.hide), "tmp": list(TMP_DIRS),
                "expose": expose, "cwd": self.cwd}
        if self.workspace is not None and attach_fd is not None:
            spec["attach"] = {"fd": attach_fd, "path": os.path.realpath(self.workspace)}
        return spec

    def argv(self, worker: Sequence[str], attach_fd: int | None = None) -> list[str]:
        """The command line that runs ``worker`` isolated (module docstring)."""
        return [*UNSHARE, sys.executable, "-I", "-S", VIEW_SCRIPT, json.dumps(self.spec(attach_fd)), "--",
                *worker]

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` for the worker: ``HOME`` and ``TMPDIR`` in its private ``/tmp``;
        ``PATH`` starting with the directory of this Python (``python`` and
        ``pip`` are the runtime's: a ``python`` found under a hidden ``/root``
        would not run)."""
        path = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH", os.defpath)) if p)
        return dict(env, HOME="/tmp", TMPDIR="/tmp", PATH=path)


def _python_paths() -> list[str]:
    """Directories the worker's Python needs: its installation, the venv, ``PYTHONPATH``."""
    paths = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
             str(Path(__file__).resolve().parent.parent)}
    paths |= {p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    out: list[str] = []
    for path in sorted(os.path.realpath(p) for p in paths if os.path.isdir(p)):
        if not any(path == top or path.startswith(top + "/") for top in out):
            out.append(path)                # (a directory inside one already listed comes with it)
    return out


def clone_mount(mountpoint: os.PathLike | str) -> int:
    """A detached copy of the mount at ``mountpoint`` (open_tree(2) with
    ``OPEN_TREE_CLONE``): an fd that :mod:`agent_runtime.view` moves into a
    worker's namespace. Raises :class:`AgentError`."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(mountpoint), OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise AgentError(f"cannot hand {mountpoint} to the agent's worker: open_tree: {os.strerror(err)}")
    return fd


def adopt(mountpoint: os.PathLike | str, uid: int = AGENT_UID, gid: int = AGENT_UID) -> int:
    """Give the workspace mounted at ``mountpoint`` to ``uid``/``gid`` if its
    root belongs to someone else (an agent created without isolation): every
    file, through the mount. Returns how many entries changed owner."""
    root = Path(mountpoint)
    st = os.stat(root)
    if (st.st_uid, st.st_gid) == (uid, gid):
        return 0
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and ".chronicle" in dirnames:
            dirnames.remove(".chronicle")
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)
            changed += 1
    os.chown(root, uid, gid)
    return changed + 1


__all__ = ["AGENT_UID", "NO_ISOLATION_ENV", "View", "adopt", "check", "clone_mount", "isolation_default"]
