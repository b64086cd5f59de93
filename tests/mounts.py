"""Real FUSE mounts for tests: start a daemon in a subprocess, wait, clean up.

Vocabulary:

- **target** -- what a test mounts, chosen by ``$CHRONICLE_TEST_TARGET``:
  ``chronicle`` (default: ``python -m chronicle mount --foreground``),
  ``passthrough`` (pyfuse3's pass-through example mirroring a directory, the
  stand-in used to validate this harness) or ``plain`` (no mount at all: a
  plain directory, to self-check the tests themselves).
- **store** -- what a mount serves: a Chronicle store directory (created by the
  daemon on first mount), the passthrough's source directory (under
  ``$CHRONICLE_TEST_PASSTHROUGH_BASE`` if set, see ``MountFactory.new_store``),
  or for ``plain`` the directory itself.
- **daemon log** -- the daemon's stdout+stderr, one file per daemon process.
  Chronicle logs ``"%(asctime)s %(levelname)s %(name)s: %(message)s"``; a
  record at WARNING or above (or an uncaught traceback) is a *problem* that
  fails the test it happened in, unless the test expects it (STYLE.md, Tests).

Every daemon started here is stopped by PID and every mount is unmounted:
``fusermount3 -u``, then ``fusermount3 -u -z`` as a fallback, then terminate
and kill; a stale mountpoint (daemon gone, ``ENOTCONN``) is cleaned with
``fusermount3 -u -z``. The questions (alive, mounted, stale, serving) and the
fusermount3 calls are :mod:`chronicle.procs`'s, the same the CLI, the daemon
and the agent runtime ask; ``alive``, ``mount_entries``, ``is_stale`` and
``unmount_stale`` are re-exported here for the tests.

This module knows nothing of pytest; ``conftest.py`` turns ``MountError`` and
problems into test failures. It is synchronous and not thread-safe (one test
process drives its mounts).
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chronicle import procs
from chronicle.errors import StoreError
from chronicle.procs import alive, is_stale, mount_entries

REPO_ROOT = Path(__file__).resolve().parent.parent

TARGETS = ("chronicle", "passthrough", "plain")
TARGET_ENV = "CHRONICLE_TEST_TARGET"
TIMEOUT_ENV = "CHRONICLE_TEST_MOUNT_TIMEOUT"
PASSTHROUGH_BASE_ENV = "CHRONICLE_TEST_PASSTHROUGH_BASE"
DEFAULT_TIMEOUT = 30.0
DEFAULT_WORKSPACE = "test"

# A log record starts with a timestamp; Chronicle's format puts the level after
# it. The passthrough's format has no level, so only tracebacks count there.
_RECORD_START = re.compile(
    r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[,.]\d{3} "
    r"(?:(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) )?")
_BAD_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
_CRASH_MARKERS = ("Traceback (most recent call last):", "Fatal Python error")

_counter = itertools.count(1)
_live: "set[Mount]" = set()   # mounts not cleaned up yet; atexit is the last safety net


class MountError(RuntimeError):
    """A mount could not be started, stopped or cleaned up; the message carries the log."""


def target_from_env() -> str:
    """The target named by ``$CHRONICLE_TEST_TARGET`` (default ``chronicle``).

    Raises ``MountError`` for an unknown name.
    """
    target = os.environ.get(TARGET_ENV, "").strip() or "chronicle"
    if target not in TARGETS:
        raise MountError(f"{TARGET_ENV}={target!r}: expected one of {', '.join(TARGETS)}")
    return target


def default_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE mount cannot be made here, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module / pass --device /dev/fuse)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


# --- mounts (chronicle.procs) ---------------------------------------------------

def _fusermount(mountpoint: os.PathLike | str, lazy: bool, timeout: float = 30.0) -> tuple[int, str]:
    return procs.fusermount(mountpoint, lazy=lazy, timeout=timeout)


unmount_stale = procs.clear_stale


# --- daemon logs -------------------------------------------------------------

@dataclass
class LogRecord:
    level: str | None        # None: no level in the format, or text outside any record
    text: str                # first line and continuation lines (tracebacks)

    @property
    def is_problem(self) -> bool:
        if self.level in _BAD_LEVELS:
            return True
        # An uncaught exception or a fatal error printed to stderr, not a
        # DEBUG record that chose to show a traceback.
        return self.level != "DEBUG" and any(marker in self.text for marker in _CRASH_MARKERS)


def parse_log(text: str) -> list[LogRecord]:
    """Split daemon log text into records; lines without a timestamp continue the previous one."""
    records: list[LogRecord] = []
    for line in text.splitlines():
        match = _RECORD_START.match(line)
        if match or not records:
            records.append(LogRecord(match.group("level") if match else None, line))
        else:
            records[-1].text += "\n" + line
    return records


def log_problems(text: str, allowed: list[re.Pattern] = (), allow_all: bool = False) -> list[str]:
    """The problem records in ``text`` that no pattern in ``allowed`` matches (``re.search``)."""
    if allow_all:
        return []
    return [r.text for r in parse_log(text)
            if r.is_problem and not any(p.search(r.text) for p in allowed)]


# --- a mount -----------------------------------------------------------------

@dataclass(eq=False)
class Mount:
    """One daemon process serving ``store`` at ``path`` (for ``plain``: just a directory).

    ``problems`` collects what went wrong outside the log (daemon died, did not
    unmount cleanly, exited non-zero); the log guard reports them.
    """

    target: str
    store: Path
    workspace: str
    path: Path
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    killed: bool = False         # killed on purpose (kill()): its death is no problem
    stopped: bool = False        # stopped or cleaned up by the harness
    death_reported: bool = False
    started_at: float = field(default_factory=time.monotonic)
    problems: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        """True while the daemon process runs (always True for ``plain``)."""
        return self.proc is None or self.proc.poll() is None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size if self.log_path else 0
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The daemon log from byte offset ``since``."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) or "(daemon log is empty)"

    def mkdtemp(self, prefix: str = "t-") -> Path:
        """A fresh, empty directory inside the mount."""
        while True:
            path = self.path / f"{prefix}{next(_counter)}-{os.getpid()}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue

    def is_stale(self) -> bool:
        return self.proc is not None and is_stale(self.path)

    def is_dead(self, grace: float = 5.0) -> bool:
        """True if the daemon exited or lost its FUSE connection.

        A daemon whose mount went stale but which is still on its way out
        (printing a traceback) gets ``grace`` seconds to exit, so its log is
        complete; then it is killed.
        """
        if self.proc is None:
            return False
        if self.alive() and self.is_stale():
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return not self.alive()

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` (default: kill -9) to the daemon by PID and reap it.

        The mountpoint is left as the kernel leaves it: after kill -9 a stale
        mount (``ENOTCONN``) until ``unmount_stale`` or a restart cleans it.
        Returns the exit status (negative signal number).
        """
        if self.proc is None:
            raise MountError(f"target {self.target!r} has no daemon to kill")
        self.killed = True
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise MountError(f"daemon {self.proc.pid} did not exit {timeout}s after signal {sig}") from exc

    def stop(self, timeout: float = 30.0) -> int | None:
        """Unmount cleanly (``fusermount3 -u``) and wait for the daemon to exit.

        Returns the daemon's exit status. Raises ``MountError`` (with the log)
        if the mount is busy or the daemon does not exit by itself; in that
        case the mount stays for ``cleanup`` to force.
        """
        if self.proc is None:
            self.stopped = True
            return None
        if self.proc.poll() is None:
            rc, err = 1, ""
            for _ in range(10):  # a just-exited child may still hold the mount for a moment
                rc, err = _fusermount(self.path, lazy=False)
                if rc == 0:
                    break
                time.sleep(0.2)
            if rc != 0:
                raise MountError(f"fusermount3 -u {self.path} failed: {err}")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                raise MountError(f"daemon {self.proc.pid} still running {timeout}s after unmount\n"
                                 f"{self.log_tail()}") from exc
        self.stopped = True
        return self.proc.returncode

    def cleanup(self) -> list[str]:
        """Force everything down; never raises. Returns (and records) the problems seen.

        Order: ``fusermount3 -u``; if that fails ``fusermount3 -u -z``; then
        terminate, then kill the daemon by PID; lazily unmount a stale mount;
        remove the mountpoint directory.
        """
        if self.proc is None:
            return self.problems
        proc = self.proc
        if proc.poll() is None:
            try:
                rc = self.stop()
                if rc != 0:
                    self.problems.append(f"daemon exited with status {rc} after a clean unmount")
            except MountError as exc:
                self.problems.append(f"unclean unmount: {exc}")
                if mount_entries(self.path) and not self.is_stale():
                    _fusermount(self.path, lazy=True)
                for send, wait in ((None, 5.0), (proc.terminate, 10.0), (proc.kill, 10.0)):
                    if send is not None and proc.poll() is None:
                        send()
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        elif not (self.killed or self.stopped or self.death_reported):
            self.death_reported = True
            self.problems.append(f"daemon (pid {proc.pid}) died with status {proc.returncode} "
                                 "while the mount was in use")
        self.stopped = True
        _live.discard(self)
        unmount_stale(self.path)
        if not mount_entries(self.path):
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # a later mount on the same mountpoint still uses it, or it holds leftovers
        return self.problems

    def __repr__(self) -> str:
        return f"<Mount {self.target} {self.path} pid={self.pid}>"


def stop_workers(pids: list[int], store: Path) -> list[str]:
    """After a runtime test: kill the process group of every agent worker in
    ``pids`` still alive (by PID, nothing else), then :func:`clean_store_mounts`;
    returns the problems (a worker left running, a mount left mounted)."""
    problems = []
    for pid in pids:
        if alive(pid):
            problems.append(f"worker {pid} was still running")
            os.killpg(pid, signal.SIGKILL)
    return problems + clean_store_mounts(store)


def clean_store_mounts(store: Path) -> list[str]:
    """After a test: unmount what the mount daemons of ``store`` left mounted
    (their registrations in ``run/`` and the agent workspaces under
    ``agents/``) and stop those daemons by PID. Returns the problems found
    (each was cleaned up)."""
    problems = []
    run = store / "run"
    for reg in sorted(run.glob("mount-*.json")) if run.exists() else []:
        try:
            info = json.loads(reg.read_text())
        except ValueError:
            continue
        mp, pid = Path(info["mountpoint"]), int(info["pid"])
        if mount_entries(mp):
            problems.append(f"{mp} was still mounted")
            if _fusermount(mp, lazy=False)[0] != 0:
                _fusermount(mp, lazy=True)
        for _ in range(200):
            if not alive(pid):
                break
            time.sleep(0.05)
        else:
            problems.append(f"mount daemon {pid} was still running")
            os.kill(pid, signal.SIGKILL)
    agents = store / "agents"
    for mp in agents.glob("*/workspace") if agents.exists() else []:
        if mount_entries(mp):
            problems.append(f"{mp} was still mounted")
            _fusermount(mp, lazy=True)
    return problems


def _start_chronicle(store: Path, workspace: str, mountpoint: Path, log_path: Path,
                     extra_args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    # A new session (procs.spawn): a ^C meant for pytest must not kill the
    # daemon before the fixture unmounts it in order.
    proc, _ = procs.spawn(procs.mount_command(store, workspace, mountpoint, extra_args), log_path,
                          env=env, cwd=REPO_ROOT)
    return proc


def _passthrough_tool():
    # tools/ is not an installed package; load the module by its path.
    name = "_chronicle_tools_passthrough"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / "passthrough.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _start_passthrough(store: Path, mountpoint: Path, log_path: Path, timeout: float) -> subprocess.Popen:
    store.mkdir(parents=True, exist_ok=True)
    try:
        pt = _passthrough_tool().start_passthroughfs(store, mountpoint, timeout=timeout)
    except RuntimeError as exc:
        raise MountError(str(exc)) from exc
    # Keep the log with the test's files rather than in /tmp.
    shutil.move(str(pt.log), log_path)
    return pt.proc


def start_mount(target: str, store: Path, mountpoint: Path, log_path: Path, *,
                workspace: str = DEFAULT_WORKSPACE, timeout: float | None = None,
                clean_stale: bool = True, extra_args: list[str] | tuple = ()) -> Mount:
    """Start a daemon for ``target`` and return once it serves ``mountpoint``.

    Ready means: ``os.path.ismount(mountpoint)`` (and a STATFS answered) and
    the process is still alive. ``clean_stale`` first removes a stale mount left by a killed daemon
    (Chronicle must also manage that by itself: pass False to test it; the
    passthrough cannot, so it is always cleaned for it). Raises ``MountError``
    with the daemon's log if the daemon exits or does not mount within
    ``timeout`` seconds; nothing is left running then.
    """
    timeout = default_timeout() if timeout is None else timeout
    store, mountpoint, log_path = Path(store), Path(mountpoint), Path(log_path)
    if target == "plain":
        mountpoint.mkdir(parents=True, exist_ok=True)
        return Mount(target, store, workspace, mountpoint)
    if target not in TARGETS:
        raise MountError(f"unknown target {target!r}")
    reason = fuse_unavailable_reason()
    if reason:
        raise MountError(f"this test needs FUSE and cannot get it: {reason}")
    if clean_stale or target == "passthrough":
        unmount_stale(mountpoint)
    if not is_stale(mountpoint):
        mountpoint.mkdir(parents=True, exist_ok=True)
    if mount_entries(mountpoint) and not is_stale(mountpoint):
        raise MountError(f"{mountpoint} is already mounted by a live daemon")
    log_path.parent.mkdir(parents=True, exist_ok=True)

    if target == "passthrough":
        proc = _start_passthrough(store, mountpoint, log_path, timeout)
    else:
        proc = _start_chronicle(store, workspace, mountpoint, log_path, list(extra_args))
    mount = Mount(target, store, workspace, mountpoint, log_path, proc)
    _live.add(mount)

    try:
        procs.wait_for_mount(mountpoint, proc.pid, timeout=timeout, describe=lambda: "")
    except StoreError:
        if proc.poll() is not None:
            mount.stopped = True
            mount.cleanup()
            raise MountError(f"{target} daemon exited with status {proc.returncode} before "
                             f"{mountpoint} was ready; its log:\n{mount.log_tail()}") from None
        mount.cleanup()
        raise MountError(f"{target} daemon did not mount {mountpoint} within {timeout}s; "
                         f"its log:\n{mount.log_tail()}") from None
    return mount


@atexit.register
def _cleanup_leftovers() -> None:
    # Fixtures clean up in `finally`; this only catches a run that died around them.
    for mount in list(_live):
        mount.cleanup()


# --- many mounts for one test ------------------------------------------------

class DaemonLogGuard:
    """Collects the daemon-log problems of the mounts one test used.

    ``watch(mount)`` starts watching a mount's log from its current end (for
    a shared mount: only the lines this test causes); ``expect(pattern)``
    allows records matching a regex; ``problems()`` lists what is left.
    """

    def __init__(self, allowed: list[str] = (), allow_all: bool = False):
        self.allowed = [re.compile(p) for p in allowed]
        self.allow_all = allow_all
        self._watched: list[tuple[Mount, int, bool]] = []
        self._extra: list[str] = []

    def expect(self, *patterns: str) -> None:
        """Allow daemon log records (and harness problems) matching any of ``patterns``."""
        self.allowed.extend(re.compile(p) for p in patterns)

    def watch(self, mount: Mount, since: int | None = None, shared: bool = False) -> None:
        """Check ``mount``'s log from ``since`` (default: its current end).

        ``shared``: the mount outlives the test, so its death during the test
        is a problem of this test.
        """
        self._watched.append((mount, mount.log_size() if since is None else since, shared))

    def add_problems(self, problems: list[str]) -> None:
        self._extra.extend(problems)

    def records(self, mount: Mount | None = None) -> list[LogRecord]:
        """Log records written since watching started (all watched mounts, or one)."""
        out = []
        for m, since, _ in self._watched:
            if mount is None or m is mount:
                out.extend(parse_log(m.log_text(since)))
        return out

    def problems(self) -> list[str]:
        found = []
        seen = set()
        for m, since, shared in self._watched:
            if shared and not (m.killed or m.death_reported) and m.is_dead():
                m.death_reported = True
                found.append(f"shared daemon {m!r} died during this test "
                             f"(status {m.proc.returncode})")
            for text in log_problems(m.log_text(since), self.allowed, self.allow_all):
                found.append(f"{m!r} logged:\n{text}")
            for p in m.problems:
                if id(p) not in seen:
                    seen.add(id(p))
                    found.append(p)
        for p in self._extra:
            if p not in found:
                found.append(p)
        return [p for p in found if not any(a.search(p) for a in self.allowed)]


class MountFactory:
    """Starts mounts for one test (or one scope) and cleans all of them up in ``close``.

        m = factory()                      # fresh store, mountpoint, workspace "test"
        m.kill()                           # kill -9 by PID; the mountpoint goes stale
        m2 = factory.restart(m)            # same store/workspace/mountpoint; stale mount cleaned first
        m3 = factory.restart(m2, clean_stale=False)   # the daemon must clean it (Chronicle)
        m4 = factory(store=m.store, workspace="other")
    """

    def __init__(self, workdir: Path, target: str, guard: DaemonLogGuard | None = None):
        self.workdir = Path(workdir)
        self.target = target
        self.guard = guard
        self.mounts: list[Mount] = []
        self._n = itertools.count(1)
        self._outside: list[Path] = []   # stores made outside workdir, removed by close()

    def new_store(self) -> Path:
        """A path for a fresh store (Chronicle creates it on first mount)."""
        base = os.environ.get(PASSTHROUGH_BASE_ENV)
        if self.target == "passthrough" and base:
            # The passthrough example uses the backing st_ino as the FUSE inode
            # number; when the backing file system reuses a number (ext4 does
            # at once) while the kernel still knows the old inode, two files
            # become one. tmpfs never reuses numbers: point this at /dev/shm.
            path = Path(tempfile.mkdtemp(prefix="chronicle-passthrough-", dir=base))
            self._outside.append(path)
            return path
        return self.workdir / f"store-{next(self._n)}"

    def __call__(self, store: os.PathLike | None = None, workspace: str = DEFAULT_WORKSPACE,
                 mountpoint: os.PathLike | None = None, *, clean_stale: bool = True,
                 timeout: float | None = None, extra_args: list[str] | tuple = ()) -> Mount:
        n = next(self._n)
        if store is None:
            store = self.new_store() if self.target != "plain" else self.workdir / f"plain-{n}"
        if mountpoint is None:
            mountpoint = store if self.target == "plain" else self.workdir / f"mnt-{n}"
        log_path = self.workdir / "logs" / f"daemon-{n}.log"
        mount = start_mount(self.target, Path(store), Path(mountpoint), log_path,
                            workspace=workspace, timeout=timeout, clean_stale=clean_stale,
                            extra_args=extra_args)
        self.mounts.append(mount)
        if self.guard is not None:
            self.guard.watch(mount, since=0)
        return mount

    def restart(self, mount: Mount, *, clean_stale: bool = True, timeout: float | None = None,
                extra_args: list[str] | tuple = ()) -> Mount:
        """Start a new daemon on ``mount``'s store, workspace and mountpoint.

        The old daemon must be gone (``stop()`` or ``kill()`` it first).
        """
        if mount.proc is not None and mount.alive():
            raise MountError(f"{mount!r} is still running; stop() or kill() it first")
        return self(mount.store, mount.workspace, mount.path, clean_stale=clean_stale,
                    timeout=timeout, extra_args=extra_args)

    unmount_stale = staticmethod(unmount_stale)

    def close(self) -> list[str]:
        """Clean up every mount, newest first; returns the problems (also given to the guard)."""
        problems: list[str] = []
        for mount in reversed(self.mounts):
            problems.extend(mount.cleanup())
        self.mounts.clear()
        for path in self._outside:
            shutil.rmtree(path, ignore_errors=True)
        self._outside.clear()
        if self.guard is not None:
            self.guard.add_problems(problems)
        return problems


class SharedMount:
    """A mount kept across tests (module or session scope).

    ``get()`` returns the running mount, restarting the daemon on the same
    store if it died (the test during which it died has already been failed
    by its guard; a death between tests fails the next test).
    """

    def __init__(self, workdir: Path, target: str):
        self.factory = MountFactory(workdir, target)
        self.current: Mount | None = None

    def get(self) -> tuple[Mount, list[str]]:
        """The running mount, and problems found on the way (a death between tests)."""
        problems = []
        if self.current is None:
            self.current = self.factory()
        elif self.current.is_dead():
            dead = self.current
            if not (dead.killed or dead.death_reported):
                dead.death_reported = True
                problems.append(f"shared daemon {dead!r} died (status {dead.proc.returncode}) "
                                f"and was restarted; its log:\n{dead.log_tail()}")
            self.current = self.factory.restart(dead)
        return self.current, problems

    def close(self) -> list[str]:
        return self.factory.close()
