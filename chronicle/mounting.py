"""Starting and stopping mount daemons (``chronicle mount`` / ``umount``).

``mount`` without ``foreground`` starts ``python -m chronicle mount
--foreground ...`` as a detached daemon (its own session, output appended to
``<store>/run/mount-<workspace>.log``) and returns once the mountpoint is a
mount and the daemon is alive — or raises with the daemon's last error.
``umount`` unmounts with ``fusermount3 -u`` and waits for the daemon to
finish committing and syncing. Processes and mounts are asked about through
:mod:`chronicle.procs` (alive, stale, fusermount, spawn-and-wait).

``python -m chronicle.mounting --store STORE --workspace NAME MOUNTPOINT``
(:func:`main`) is ``chronicle mount --foreground`` without importing the
command line (click, rich, the agent commands): the same daemon, mounted
sooner. The agent runtime starts its workspaces' daemons this way
(``agent_runtime.process.WorkspaceMount``; :data:`DAEMON_MODULE`).

**Mount options** (``chronicle mount -o``, ``mount -t fuse.chronicle -o``):
the FUSE and kernel options a user may add to the daemon's own
(:data:`FUSE_OPTIONS`; ``chronicle.fs.daemon.mount_options`` adds them),
checked by :func:`fuse_options` before anything is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from chronicle import procs
from chronicle.errors import Busy, ChronicleError, InvalidArgument, NotFound, StoreError

DEFAULT_WORKSPACE = "default"
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 120.0
DAEMON_MODULE = "chronicle.mounting"      # python -m DAEMON_MODULE: a foreground daemon (main)

# What a user may add to the daemon's FUSE options (fuse(8), mount(8) "FILESYSTEM-INDEPENDENT MOUNT OPTIONS"):
# kernel mount flags libfuse passes to mount(2), and libfuse's own allow_other/allow_root. The daemon
# always sets default_permissions, fsname, subtype and noatime; rw is the default.
FUSE_OPTIONS = frozenset({"ro", "rw", "allow_other", "allow_root", "nosuid", "suid", "nodev", "dev", "noexec",
                          "exec", "noatime"})


def fuse_options(options) -> tuple[str, ...]:
    """Check mount options given by a user (an iterable of strings, each one
    option or a comma-separated list, as ``-o`` takes them) and return them
    one per item, in order, without repeats and without ``rw`` (the default).
    Raises :class:`InvalidArgument` naming an option outside
    :data:`FUSE_OPTIONS`, or ``ro`` together with ``rw``."""
    found: list[str] = []
    for item in options:
        for option in str(item).split(","):
            option = option.strip()
            if not option:
                continue
            if option not in FUSE_OPTIONS:
                raise InvalidArgument(f"unknown mount option {option!r}: Chronicle takes "
                                      f"{', '.join(sorted(FUSE_OPTIONS))}")
            if option not in found:
                found.append(option)
    if "ro" in found and "rw" in found:
        raise InvalidArgument("mount options 'ro' and 'rw' contradict each other")
    return tuple(o for o in found if o != "rw")


def _store_path(store: Path | None) -> Path:
    from chronicle.store.store import default_store_path

    return Path(store).absolute() if store else default_store_path()


def mount(store: Path | None, workspace: str, mountpoint: Path, *, foreground: bool = False,
          options: tuple[str, ...] = (), create_store: bool = True, env: dict[str, str] | None = None) -> None:
    """Mount ``workspace`` of ``store`` (default store when None; both created
    if missing, the store only if ``create_store``) at ``mountpoint``, with
    the user's mount ``options`` (:func:`fuse_options`). Without
    ``foreground``, returns once the mount is ready while a daemon keeps
    serving (started with environment ``env``, default ours); with it, serves
    until unmounted. Raises a ``ChronicleError`` with a one-line message
    (:class:`~chronicle.errors.StoreNotFound` for a missing store when not
    ``create_store``)."""
    from chronicle.fs.daemon import serve, setup_logging
    from chronicle.store.store import Store, check_workspace_name

    check_workspace_name(workspace)
    options = fuse_options(options)
    store_path = _store_path(store)
    mountpoint = Path(mountpoint).absolute()
    procs.clear_stale(mountpoint)
    if os.path.ismount(mountpoint):
        raise Busy(f"{mountpoint} is already a mount point")
    if mountpoint.exists() and not mountpoint.is_dir():
        raise InvalidArgument(f"{mountpoint} is not a directory")
    mountpoint.mkdir(parents=True, exist_ok=True)
    with Store.open(store_path, create=create_store) as st:
        info = st.mount_info(workspace)
        if info is not None:
            raise Busy(f"workspace {workspace!r} is already mounted at {info['mountpoint']} (pid {info['pid']})")
    if foreground:
        setup_logging()
        raise SystemExit(serve(store_path, workspace, mountpoint, options))
    log_path = store_path / "run" / f"mount-{workspace}.log"
    extra = ["-o", ",".join(options)] if options else []
    proc, start = procs.spawn(procs.mount_command(store_path, workspace, mountpoint, extra), log_path, env=env)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m chronicle.mounting --store STORE --workspace NAME
    MOUNTPOINT``: serve in the foreground, as ``chronicle mount --foreground``.
    ``--standby`` (no other argument): import the daemon's code, then read
    what to serve from stdin, one JSON line ``{"store", "workspace",
    "mountpoint", "log"}`` (``log``: the file its output is appended to from
    then on); EOF first: exit 0 — a daemon started ahead of need, so that a
    mount costs no start-up (``agent_runtime.process.DaemonStandby``).
    An error before mounting is one line ``chronicle: error: ...`` on stderr
    and the error's exit code (1 for an ``OSError``), as the CLI's."""
    parser = argparse.ArgumentParser(prog=f"python -m {DAEMON_MODULE}",
                                     description="Serve a workspace at MOUNTPOINT (chronicle mount --foreground).")
    parser.add_argument("--store", type=Path)
    parser.add_argument("--workspace", default=DEFAULT_WORKSPACE)
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="mount options, comma-separated (chronicle mount -o)")
    parser.add_argument("--standby", action="store_true",
                        help="read {store, workspace, mountpoint, log} as one JSON line from stdin")
    parser.add_argument("mountpoint", type=Path, nargs="?")
    args = parser.parse_args(argv)
    try:
        if args.standby:
            if args.store is not None or args.mountpoint is not None:
                parser.error("--standby reads the store, workspace and mountpoint from stdin")
            store, workspace, mountpoint = _standby()
            if store is None:
                return 0
        else:
            if args.store is None or args.mountpoint is None:
                parser.error("give --store STORE and MOUNTPOINT (or --standby)")
            store, workspace, mountpoint = args.store, args.workspace, args.mountpoint
        mount(store.absolute(), workspace, mountpoint.absolute(), foreground=True, options=tuple(args.options))
    except ChronicleError as err:
        print(f"chronicle: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except OSError as exc:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "") if exc.strerror else str(exc)
        print(f"chronicle: error: {' '.join(text.split())}", file=sys.stderr)
        return 1
    return 0


def _standby() -> tuple[Path | None, str, Path | None]:
    """``main --standby``: the daemon's imports, then its job from stdin (the
    store, workspace and mountpoint; ``(None, "", None)`` at EOF), with
    stdout and stderr appended to the job's log from then on."""
    import chronicle.fs.daemon  # noqa: F401  (the start-up cost, paid before the job comes)

    line = sys.stdin.readline()
    if not line.strip():
        return None, "", None
    try:
        job = json.loads(line)
        store, workspace, mountpoint, log = (job["store"], job["workspace"], job["mountpoint"], job["log"])
        if not all(isinstance(v, str) and v for v in (store, workspace, mountpoint, log)):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument('a standby daemon reads {"store", "workspace", "mountpoint", "log"} '
                              "(strings) as one JSON line") from None
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    return Path(store), workspace, Path(mountpoint)


if __name__ == "__main__":
    sys.exit(main())
