"""An isolated worker's view of the file system, built inside its own mount namespace.

Run as a script, never imported by the runtime (standard library only, so
``python -I -S view.py`` starts in a few milliseconds)::

    unshare --mount --pid --ipc --fork --kill-child --propagation private --mount-proc \\
        python -I -S agent_runtime/view.py SPEC_JSON -- WORKER_ARGV...

It runs as root, as process 1 of the new PID namespace (the worker is
process 2; :mod:`agent_runtime.isolation` builds the command line).
``SPEC_JSON``: ``{"uid", "gid", "hide": [dir...], "tmp": [dir...],
"expose": [[path, writable]...], "cwd": dir, "attach": {"fd", "path"}}``
(``attach`` only when the agent has a workspace). In order:

1. open an ``O_PATH`` handle on every path to expose (while they are still
   reachable);
2. detach every Chronicle mount (``fuse.chronicle*`` in ``/proc/self/mountinfo``)
   from this namespace;
3. cover with an empty tmpfs every ``hide`` directory (the store, the agents'
   directory), every ``tmp`` directory (a private ``/tmp``, ``/var/tmp``,
   ``/dev/shm``, ``/run/lock``: mode 1777) and the outermost ancestor of an
   exposed path that the agent's uid could not search anyway (``/root`` for a
   Python installed under it);
4. re-bind each exposed path at its own path inside its cover, from its handle
   (``mount(2)`` of ``/proc/self/fd/N``, ``MS_BIND``), read-only unless
   writable; make the (empty) directory of the workspace's path;
5. ``chdir`` to ``cwd`` in the new view, then fork: the child execs
   ``setpriv --reuid UID --regid GID --clear-groups --no-new-privs
   --inh-caps=-all --bounding-set=-all -- WORKER_ARGV`` (setpriv(1)) and
   imports the agent's code while the runtime mounts the workspace;
6. wait on the ``attach`` socket for the workspace's mount: a detached copy
   the runtime made with open_tree(2) and sent with ``SCM_RIGHTS``; move it
   to its path (move_mount(2)), bind an empty root-owned file of mode 000 over
   its ``.chronicle/ctl`` (the runtime's channel for turn labels and
   restores, not the agent's), answer ``ok``. The runtime then starts the
   worker's first turn;
7. stay as the namespace's process 1 (root, holding nothing but its
   children): reap orphans, exit with the worker's status. ``unshare
   --kill-child`` kills it if the ``unshare`` dies (a parent-death signal,
   which the worker could not keep: a uid change clears it, prctl(2)), and
   when process 1 exits the kernel kills every process left in the namespace
   (pid_namespaces(7)).

Errors: a failed system call in steps 1–5 ends the process with status 126
and a line on stderr (the worker's log) naming the call, the path and the
errno; one in step 6 is the answer the runtime raises.

Mount flags are from <sys/mount.h> (mount(2), umount(2)).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import stat
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV = 0x1, 0x2, 0x4
MS_REMOUNT, MS_BIND, MS_REC = 0x20, 0x1000, 0x4000
MNT_DETACH = 0x2
AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH = -100, 0x4
SYS_MOVE_MOUNT = 429                # the same number on every architecture (added after 5.1's unification)

_libc = ctypes.CDLL(None, use_errno=True)


class ViewError(Exception):
    """A system call failed while the view was built."""


def _check(result: int, call: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ViewError(f"{call} {path}: {os.strerror(err)} (errno {err})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2)."""
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), "mount", target)


def detach(target: str) -> None:
    """umount2(target, MNT_DETACH)."""
    _check(_libc.umount2(target.encode(), MNT_DETACH), "umount", target)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (proc(5)).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def chronicle_mounts() -> list[str]:
    """Mount points of Chronicle file systems in this namespace, deepest first (proc(5) mountinfo)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right.split()[:1] and right.split()[0].startswith("fuse.chronicle"):
                found.append(_unescape(fields[4]))
    return sorted(found, key=len, reverse=True)


def _searchable(path: str, uid: int, gid: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def move_mount(tree: int, target: str) -> None:
    """move_mount(2) of the detached mount ``tree`` (from open_tree(2)) onto ``target``."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           "move_mount", target)


def mask(blocked: str, target: str) -> None:
    """Bind the unreadable file ``blocked`` read-only over ``target``."""
    mount(blocked, target, None, MS_BIND)
    mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build(spec: dict) -> str:
    """Steps 1–4 of the module docstring; returns the path of the unreadable
    file masks are made of. Raises :class:`ViewError`."""
    uid, gid = int(spec["uid"]), int(spec["gid"])
    exposed = sorted(((os.path.realpath(p), bool(w)) for p, w in spec["expose"]), key=lambda e: len(e[0]))
    handles = {}
    for path, _ in exposed:
        try:
            handles[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise ViewError(f"open {path}: {exc.strerror}") from None
    fuse = chronicle_mounts()
    for target in fuse:
        if target not in handles:
            detach(target)
    covers = [(os.path.realpath(p), 0o755) for p in spec["hide"]]
    covers += [(os.path.realpath(p), 0o1777) for p in spec["tmp"] if os.path.isdir(p)]
    for path, _ in exposed:
        for parent in _ancestors(path):
            if not _searchable(parent, uid, gid):
                covers.append((parent, 0o755))
                break
    done: list[str] = []
    for path, mode in sorted(covers, key=lambda c: len(c[0])):
        if any(_under(path, top) for top in done) or not os.path.isdir(path):
            continue
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o},size=50%")
        done.append(path)
    for path, writable in exposed:
        if not any(_under(path, top) for top in done):
            continue                        # in plain sight already
        source = f"/proc/self/fd/{handles[path]}"
        if os.path.isdir(source):
            os.makedirs(path, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            open(path, "a").close()
        mount(source, path, None, MS_BIND | MS_REC)
        if not writable:
            mount("none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    blocked = os.path.join(done[0], ".chronicle-masked")
    os.close(os.open(blocked, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0))
    os.chmod(blocked, 0)
    if spec.get("attach"):
        os.makedirs(spec["attach"]["path"], mode=0o755, exist_ok=True)
    for fd in handles.values():
        os.close(fd)
    return blocked


def attach(spec: dict, blocked: str) -> None:
    """Step 6: wait on the attach socket for the workspace's mount (a detached
    tree from open_tree(2), sent with SCM_RIGHTS), move it to its path, mask
    its ``ctl``, answer ``ok`` (or the error). EOF: the runtime gave up."""
    sock = socket.socket(fileno=int(spec["attach"]["fd"]))
    path = spec["attach"]["path"]
    try:
        _, fds, _, _ = socket.recv_fds(sock, 64, 1)
        if not fds:
            return
        try:
            move_mount(fds[0], path)
            mask(blocked, os.path.join(path, ".chronicle", "ctl"))
            answer = b"ok"
        except ViewError as exc:
            answer = str(exc).encode()
        finally:
            for fd in fds:
                os.close(fd)
        sock.sendall(answer)
    except OSError as exc:
        print(f"agent isolation: the workspace did not arrive: {exc}", file=sys.stderr)
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: view.py SPEC_JSON -- WORKER_ARGV...", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    try:
        blocked = build(spec)
        os.chdir(spec["cwd"])
    except (ViewError, OSError) as exc:
        print(f"agent isolation: cannot build the worker's view: {exc}", file=sys.stderr)
        return 126
    uid, gid = int(spec["uid"]), int(spec["gid"])
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
               "--inh-caps=-all", "--bounding-set=-all", "--"]
    worker = os.fork()
    if worker == 0:
        if spec.get("attach"):
            os.close(int(spec["attach"]["fd"]))
        try:
            os.execvp(setpriv[0], setpriv + argv[3:])
        except OSError as exc:
            print(f"agent isolation: cannot run setpriv: {exc}", file=sys.stderr)
        os._exit(126)
    if spec.get("attach"):
        attach(spec, blocked)
    return reap(worker)


def reap(worker: int) -> int:
    """Process 1's loop: reap every orphan until ``worker`` exits, then return
    its exit status (128 + N for signal N), ending the namespace with it."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))        # the worker's socket is the worker's alone
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == worker:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
