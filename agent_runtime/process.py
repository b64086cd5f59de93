"""The coordinator's handles on an agent's two processes: its worker and its mount daemon.

- :class:`WorkerProcess` — ``python -m agent_runtime.worker`` in its own
  session (so stopping it can end every process the agent started), isolated
  in its own namespaces as an unprivileged uid when given a
  :class:`~agent_runtime.isolation.View`, speaking
  :mod:`agent_runtime.protocol` over a socket pair; a reader task turns the
  lines into a queue of events, ending with ``{"ev": "eof"}``.
- :class:`WorkspaceMount` — the agent's workspace mounted by ``python -m
  chronicle.mounting`` (the daemon of ``chronicle mount --foreground``
  without the command line's imports: it mounts sooner; in its own session,
  log appended to ``<store>/run/mount-<workspace>.log`` as ``chronicle
  mount`` does), and its ``.chronicle/ctl`` channel (``chronicle.control``).
  A mount left by an earlier runtime whose daemon still serves is adopted.
- :class:`DaemonStandby` — one mount daemon started ahead (its imports done
  while nothing waits), handed to the next mount: a wake does not wait for a
  daemon's start-up.

A worker's environment is an allowlist of the coordinator's
(:data:`WORKER_ENV`, :func:`worker_environment`), never all of it.

The runtime reaches a workspace only through these: the mount, its ``ctl``
file, and the store's public API.

Processes and mounts are asked about through :mod:`chronicle.procs` (alive,
stale, fusermount, wait-for-mount), as the CLI and the tests ask.

Threads: both belong to the coordinator's event loop; blocking calls (ctl
requests, waiting for a mount, fusermount3) run in worker threads via
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronicle import errors, mounting, procs
from chronicle.control import ControlChannel
from chronicle.errors import AgentBusy, AgentError, Busy, ChronicleError, StoreError
from chronicle.procs import log_tail

from agent_runtime.isolation import View, clone_mount
from agent_runtime.protocol import Channel

if TYPE_CHECKING:
    from chronicle.store.store import Store

log = logging.getLogger("agent_runtime")

_REPO = str(Path(__file__).resolve().parent.parent)      # where agent_runtime and chronicle import from

#: The runtime's environment variables a worker inherits; no other name does,
#: so the runtime's credentials (``AWS_*``, ``*_TOKEN``, proxies with
#: passwords...) stay out of agents. More names: ``Runtime(worker_env=...)``,
#: ``$CHRONICLE_AGENT_ENV`` (comma-separated) and ``BaseAgent.worker_env``.
#: Isolated, ``HOME``, ``TMPDIR`` and ``PATH`` are then set for the view
#: (``agent_runtime.isolation.View.env``).
WORKER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
              "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8")
WORKER_ENV_PREFIXES = ("LC_",)           # the locale's LC_ALL, LC_CTYPE, ...
AGENT_ENV = "CHRONICLE_AGENT_ENV"        # more names for every worker of this process's runtimes


def env_names(names: object, what: str) -> tuple[str, ...]:
    """``names`` (an iterable of environment variable names, or one
    comma-separated string) as a tuple. Raises :class:`UsageError` naming
    ``what`` for a name that cannot be one (empty, with ``=`` or NUL)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, Iterable):
        raise errors.UsageError(f"{what} is a list of environment variable names, not {names!r}")
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not name or "=" in name or "\x00" in name:
            raise errors.UsageError(f"{what}: {name!r} is not an environment variable name")
    return out


def worker_environment(extra: Iterable[str] = (), environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a worker starts with: the names of :data:`WORKER_ENV`
    (and ``LC_*``), ``extra`` and ``$CHRONICLE_AGENT_ENV`` that ``environ``
    has, with ``PYTHONPATH`` led by the runtime's own import path."""
    wanted = set(WORKER_ENV) | set(extra) | set(env_names(environ.get(AGENT_ENV, ""), AGENT_ENV))
    env = {k: v for k, v in environ.items() if k in wanted or k.startswith(WORKER_ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
    return env


def class_environment(names: object, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The values of the names an agent class asks for (``BaseAgent.worker_env``,
    as its worker reported them) that ``environ`` has."""
    if not isinstance(names, list):
        return {}
    return {n: environ[n] for n in names if isinstance(n, str) and n in environ}


def _error(kind: Any, message: str) -> ChronicleError:
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ChronicleError)):
        cls = AgentError
    return cls(message)


class WorkerProcess:
    """A running worker. Use :meth:`spawn`."""

    def __init__(self, proc: asyncio.subprocess.Process, channel: Channel, log_path: Path, log_start: int):
        self.proc = proc
        self.channel = channel
        self.log_path = log_path
        self.log_start = log_start
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.info: dict = {}
        self._attach: socket.socket | None = None       # isolated: where its workspace's mount goes
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, agent_id: str, target: str, cwd: str, workspace: str, log_path: Path,
                    timeout: float, view: View | None = None, env_extra: Iterable[str] = ()) -> WorkerProcess:
        """Start a worker and wait for it to import the agent class. With a
        ``view``, the worker runs isolated in it (:mod:`agent_runtime.isolation`;
        its ``pid`` is then that of the ``unshare`` holding its namespaces).
        Its environment: :func:`worker_environment` (``env_extra``: names
        more), ``AGENT_WORKSPACE``, ``AGENT_ID``.

        Raises :class:`AgentLoadError` (bad MODULE:CLASS) or :class:`AgentError`
        (the worker died or did not answer within ``timeout`` s), with its log's tail.
        """
        if not os.path.isdir(cwd):
            raise errors.AgentLoadError(f"the agent's directory {cwd} does not exist (its module is "
                                        "imported from there)")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(worker_environment(env_extra), AGENT_WORKSPACE=workspace, AGENT_ID=agent_id,
                   PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "agent_runtime.worker", "--fd", str(child.fileno()),
                "--agent", agent_id, "--target", target]
        fds = [child.fileno()]
        attach = attach_child = None
        if view is not None:
            if view.workspace is not None:
                attach, attach_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                fds.append(attach_child.fileno())
            argv, env = view.argv(argv, attach_child.fileno() if attach_child else None), view.env(env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as out:
                start = out.tell()
                proc = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=fds, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            parent.close()
            if attach is not None:
                attach.close()
            raise
        finally:
            child.close()
            if attach_child is not None:
                attach_child.close()
        worker = cls(proc, await Channel.open(parent), log_path, start)
        worker._attach = attach
        try:
            first = await worker.next_event(timeout)
        except TimeoutError:
            await worker.kill()
            raise AgentError(f"the worker of agent {agent_id!r} did not load {target!r} within "
                             f"{timeout:.0f}s") from None
        if first.get("ev") == "loaded":
            worker.info = first
            return worker
        await worker.wait_exit(5.0)
        if first.get("ev") == "error":
            raise _error(first.get("kind"), first.get("error") or "the worker failed")
        raise AgentError(f"the worker of agent {agent_id!r} exited while loading {target!r}: "
                         f"{worker.tail() or 'no output'}")

    async def attach(self, mountpoint: Path, timeout: float) -> None:
        """Hand the workspace mounted at ``mountpoint`` to an isolated worker's
        view (:func:`~agent_runtime.isolation.clone_mount`, sent to its
        namespace's process 1). Raises :class:`AgentError`."""
        sock, self._attach = self._attach, None
        if sock is None:
            raise AgentError("this worker was not started to receive a workspace")
        sock.settimeout(timeout)

        def send() -> bytes:
            tree = clone_mount(mountpoint)
            try:
                socket.send_fds(sock, [b"attach"], [tree])
            finally:
                os.close(tree)
            return sock.recv(4096)

        try:
            answer = await asyncio.to_thread(send)
        except OSError as exc:
            raise AgentError(f"the worker's view did not take its workspace: {exc}: {self.tail()}") from None
        finally:
            sock.close()
        if answer != b"ok":
            raise AgentError(f"the worker's view did not take its workspace: "
                             f"{answer.decode(errors='replace') or self.tail() or 'no answer'}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self) -> str:
        return log_tail(self.log_path, self.log_start)

    async def _read(self) -> None:
        try:
            while True:
                event = await self.channel.receive()
                if event is None:
                    break
                self.events.put_nowait(event)
        except AgentError as exc:
            self.events.put_nowait({"ev": "error", "kind": "AgentError", "error": str(exc)})
        finally:
            self.events.put_nowait({"ev": "eof"})

    async def next_event(self, timeout: float | None = None) -> dict:
        """The next event (``{"ev": "eof"}`` once the worker is gone, repeatedly)."""
        event = await asyncio.wait_for(self.events.get(), timeout)
        if event.get("ev") == "eof":
            self.events.put_nowait(event)
        return event

    async def send(self, obj: dict) -> bool:
        """Send a command; False if the worker is gone."""
        try:
            await self.channel.send(obj)
            return True
        except (ConnectionError, OSError, RuntimeError):
            return False

    async def request(self, obj: dict, answer: str, timeout: float) -> dict:
        """Send a command and return its ``answer`` event. Raises the worker's
        error, or :class:`AgentError` if it dies or does not answer in time."""
        await self.send(obj)
        try:
            event = await self.next_event(timeout)
        except TimeoutError:
            raise AgentError(f"the worker did not answer {obj.get('op')!r} within {timeout:.0f}s") from None
        if event.get("ev") == answer:
            return event
        if event.get("ev") == "error":
            raise _error(event.get("kind"), event.get("error") or "the worker failed")
        await self.wait_exit(2.0)
        raise AgentError(f"the worker exited (status {self.proc.returncode}) instead of answering "
                         f"{obj.get('op')!r}: {self.tail() or 'no output'}")

    def signal_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's session (the worker and what it started)."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        await self.wait_exit(10.0)

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit (no hook); kill it if it does not; then end its
        session's leftover processes so the workspace can be unmounted."""
        if self.alive:
            await self.send({"op": "exit"})
            if not await self.wait_exit(timeout):
                log.warning("worker %d did not exit within %.0fs; killing it", self.pid, timeout)
        self.signal_group(signal.SIGKILL)
        await self.wait_exit(10.0)
        self.close()

    def close(self) -> None:
        if self._attach is not None:
            self._attach.close()
            self._attach = None
        self.channel.close()
        self._reader.cancel()


def daemon_env() -> dict[str, str]:
    """The environment of a mount daemon: this process's, importing from where we do."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p))


class DaemonStandby:
    """A mount daemon started ahead of need (``python -m chronicle.mounting
    --standby``): its imports — most of a daemon's start — are done while
    nothing waits, and :meth:`take` hands it to the next mount, which writes
    it its job (the workspace to serve) and so mounts in a fraction of the
    time. One is kept ready: the runner asks for the next one
    (:meth:`prepare`) once a wake is complete, so that its start-up (0.2 s of
    CPU) does not slow the wake. :meth:`close` kills it; it exits by itself
    at EOF on its stdin, when this process ends however it ends. Its output
    before a job goes to ``log_path``."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task | None = None
        self._waiting = False                   # _starting is in its delay (cancel it, no process yet)
        self._closed = False

    def prepare(self, delay: float = 0.0) -> None:
        """Start a standby daemon in ``delay`` s (not to compete for the CPU
        with a wake in progress), unless one is there or starting."""
        if self._closed or self._starting is not None or (self._proc is not None and self._proc.returncode is None):
            return
        self._starting = asyncio.get_running_loop().create_task(self._start(delay))

    async def _start(self, delay: float) -> None:
        self._waiting = True
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._starting = None
            raise
        finally:
            self._waiting = False
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as out:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", mounting.DAEMON_MODULE, "--standby", stdin=subprocess.PIPE,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=daemon_env())
        except OSError as exc:
            log.warning("could not start a standby mount daemon: %s", exc)
        finally:
            self._starting = None

    async def take(self) -> asyncio.subprocess.Process | None:
        """The standby daemon (started, waiting for its job), or None if there
        is none (:meth:`prepare` starts the next)."""
        if self._starting is not None:
            if self._waiting:
                self._starting.cancel()                 # still waiting out its delay: no daemon yet
            await asyncio.gather(self._starting, return_exceptions=True)
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return None
        return proc

    async def close(self) -> None:
        """End the standby daemon: killed (it has no job, so it holds nothing:
        no store, no mount), not to wait for its imports to finish."""
        self._closed = True
        if self._starting is not None:
            if self._waiting:
                self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
        except ProcessLookupError:
            pass                                # (it has just exited)
        await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


class WorkspaceMount:
    """One agent workspace's mount and control channel (``standby``: where
    its daemon comes from, when it has one ready)."""

    def __init__(self, store_path: Path, workspace: str, mountpoint: Path, standby: DaemonStandby | None = None):
        self.store_path = store_path
        self.workspace = workspace
        self.mountpoint = mountpoint
        self.standby = standby
        self.log_path = store_path / "run" / f"mount-{workspace}.log"
        self.proc: asyncio.subprocess.Process | None = None     # a daemon we started
        self.pid: int | None = None                             # ours or an adopted one
        self._ctl: ControlChannel | None = None
        self._ctl_lock = asyncio.Lock()

    def serving(self, quick: bool = False) -> bool:
        """True while the daemon lives and the mount answers. ``quick``: for
        a daemon this process started, only that it has not exited (no
        request to the mount: a stale mount needs its daemon gone, and a
        daemon whose mount was removed exits); the next ``ctl`` request tells
        the rest (:meth:`control` raises :class:`StoreError`)."""
        if self.pid is None:
            return False
        if quick and self.proc is not None and self._ctl is not None:
            return self.proc.returncode is None
        if self.proc is not None and self.proc.returncode is not None:
            return False
        if self.proc is None and not procs.alive(self.pid):
            return False
        return os.path.ismount(self.mountpoint) and not procs.is_stale(self.mountpoint)

    async def ensure(self, store: Store, timeout: float) -> None:
        """Mount the workspace unless it is served already (adopting a live
        mount of it at our mountpoint). Raises :class:`AgentBusy` if another
        process has it mounted elsewhere, :class:`StoreError` if the daemon fails."""
        if self.serving():
            return
        self.close_ctl()
        await asyncio.to_thread(procs.clear_stale, self.mountpoint)
        info = store.mount_info(self.workspace)
        if info is not None:
            if os.path.realpath(info["mountpoint"]) == os.path.realpath(self.mountpoint) \
                    and os.path.ismount(self.mountpoint):
                self.proc, self.pid = None, int(info["pid"])
                log.info("adopted the mount of %r at %s (daemon pid %d)", self.workspace, self.mountpoint, self.pid)
                return
            raise AgentBusy(f"the workspace of agent {self.workspace!r} is mounted at {info['mountpoint']} "
                            f"by pid {info['pid']}; unmount it first (chronicle umount {info['mountpoint']})")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        proc = await self.standby.take() if self.standby is not None else None
        with open(self.log_path, "ab") as out:
            start = out.tell()
            if proc is not None and proc.stdin is not None:
                job = {"store": str(self.store_path), "workspace": self.workspace,
                       "mountpoint": str(self.mountpoint), "log": str(self.log_path)}
                proc.stdin.write(json.dumps(job).encode() + b"\n")
                proc.stdin.close()
            else:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", mounting.DAEMON_MODULE, "--store", str(self.store_path),
                    "--workspace", self.workspace, str(self.mountpoint),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env=daemon_env())
        self.proc, self.pid = proc, proc.pid
        try:
            await asyncio.to_thread(procs.wait_for_mount, self.mountpoint, proc.pid, timeout=timeout,
                                    log_path=self.log_path, log_start=start)
        except StoreError:
            tail = log_tail(self.log_path, start, 3)
            if procs.alive(proc.pid):
                await self._kill_daemon()
                raise StoreError(f"the workspace of {self.workspace!r} was not mounted within {timeout:.0f}s: "
                                 f"{tail}") from None
            await proc.wait()
            self.proc = self.pid = None
            raise StoreError(f"the mount daemon of {self.workspace!r} exited (status {proc.returncode}): "
                             f"{tail or 'no output'}") from None

    async def ensure_unmounted(self, store: Store) -> None:
        """Unmount a mount of this workspace left at our mountpoint (by a runtime
        that died). Raises :class:`AgentBusy` if it is mounted elsewhere."""
        info = store.mount_info(self.workspace)
        if info is None:
            await asyncio.to_thread(procs.clear_stale, self.mountpoint)
            return
        if os.path.realpath(info["mountpoint"]) != os.path.realpath(self.mountpoint):
            raise AgentBusy(f"the workspace of agent {self.workspace!r} is mounted at {info['mountpoint']} "
                            f"by pid {info['pid']}; unmount it first (chronicle umount {info['mountpoint']})")
        if self.pid is None:
            self.proc, self.pid = None, int(info["pid"])
        await self.umount()

    # -- ctl ---------------------------------------------------------------------------

    async def control(self, command: dict, quiet: bool = False) -> dict | None:
        """One ``ctl`` command (``chronicle.control``); raises its error.
        ``quiet`` (a turn command): no reply is read when it succeeds —
        returns None then (``ControlChannel.request_quiet``; a line too long
        for that is sent as usual and its reply returned)."""
        async with self._ctl_lock:
            if self._ctl is None:
                self._ctl = await asyncio.to_thread(ControlChannel, self.mountpoint)
            ctl = self._ctl
            try:
                if quiet and await asyncio.to_thread(ctl.request_quiet, command):
                    return None
                return await asyncio.to_thread(ctl.request, command)
            except StoreError:
                self.close_ctl()          # the channel itself failed: reopen next time
                raise

    def close_ctl(self) -> None:
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            try:
                ctl.close()
            except OSError:
                # close(2) on a mount whose daemon died fails (ENOTCONN) yet frees the fd;
                # ControlChannel.close keeps the number then, so do not let it close it again.
                ctl._fd = -1

    # -- unmounting --------------------------------------------------------------------

    async def umount(self, timeout: float = 120.0) -> None:
        """Flush, unmount and wait for the daemon to exit. Raises :class:`Busy`
        if the mount stays busy."""
        self.close_ctl()
        if self.pid is None:
            await asyncio.to_thread(procs.clear_stale, self.mountpoint)
            return
        message = ""
        for attempt in range(25):
            if not os.path.ismount(self.mountpoint):
                break
            rc, message = await asyncio.to_thread(procs.fusermount, self.mountpoint)
            if rc == 0:
                break
            if "busy" not in message.lower():
                break
            await asyncio.sleep(0.1 if attempt < 10 else 0.4)     # a process just leaving the mount
        else:
            raise Busy(f"{self.mountpoint} is busy (a process has a file or directory open in it): {message}")
        if os.path.ismount(self.mountpoint) and not procs.is_stale(self.mountpoint):
            raise StoreError(f"cannot unmount {self.mountpoint}: {message}")
        if not await self._wait_daemon(timeout):
            log.warning("the mount daemon %d of %r did not exit within %.0fs; killing it",
                        self.pid, self.workspace, timeout)
            await self._kill_daemon()
        await asyncio.to_thread(procs.clear_stale, self.mountpoint)
        self.proc = self.pid = None

    async def _wait_daemon(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
                return True
            except TimeoutError:
                return False
        deadline = time.monotonic() + timeout
        while self.pid is not None and procs.alive(self.pid):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _kill_daemon(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self._wait_daemon(10.0)
        self.proc = self.pid = None


__all__ = ["AGENT_ENV", "DaemonStandby", "WORKER_ENV", "WorkerProcess", "WorkspaceMount", "class_environment",
           "env_names", "log_tail", "worker_environment"]
