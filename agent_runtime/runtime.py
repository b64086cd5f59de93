"""The agent runtime's coordinator: :class:`Runtime` (SPEC §5).

A runtime serves the agents of one store. Each agent has a workspace of the
same name in that store (chunks shared by all), mounted while the agent runs
at ``<agents_dir>/<id>/workspace`` (default ``agents_dir``: ``<store>/agents``),
and a worker process (``python -m agent_runtime.worker``, log in
``<agents_dir>/<id>/worker.log``). Its turn log lives in the store's LMDB
environment beside the file events (``chronicle.store.history.turns``),
written by the workspace's mount daemon from what the agent's runner sends on
its ``ctl`` channel; the runtime reads it. The runtime is each runner's host
(:class:`~agent_runtime.runner.RunnerHost`). After its first mount it keeps
one standby mount daemon ready for the next (``process.DaemonStandby``),
ended by :meth:`close` (or by EOF when this process ends).

Use::

    async with Runtime(store_path, idle_timeout=300) as rt:
        await rt.create("bot", "my_agent:MyAgent")
        async for token in rt.stream("bot", {"text": "hi"}):
            print(token, end="")
        print(rt.turns("bot"), rt.state("bot"))

Operations that drive agents are coroutines (``create``, ``start``,
``send``/``stream``/``ask``, ``cancel``, ``wait_for_idle``, ``rollback``,
``fork``, ``shutdown_agent``, ``delete``, ``close``); reads are plain methods
that touch only the store and work whether the agent runs or not, here or in
another runtime (``list_agents``, ``agent``, ``turns``, ``turn_count``,
``show_turn``, ``state``, ``history``, ``last_turn_usage``,
``total_usage``, ``last_response``, ``compaction_indices``). Timers, quotas,
``disconnect`` and ``signal_idle``/``wait_for_wakeup``:
:mod:`agent_runtime.surface`. An agent that exists in the store starts on its first
message (and wakes again after scaling to zero); one runtime process at a
time runs a given agent (its ``lock`` file).

Errors (``chronicle.errors``): :class:`AgentNotFound`, :class:`AgentExists`,
:class:`AgentLoadError` (bad ``MODULE:CLASS``), :class:`AgentBusy` (run by
another runtime), :class:`UsageError` (a message that is not a JSON object, a
bad id), :class:`NotFound` (no such turn), :class:`AgentError` (a worker
that dies while starting).

Threads: a Runtime belongs to one asyncio event loop (create it inside it);
its plain read methods may be called from that loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from chronicle.errors import (AgentBusy, AgentExists, AgentLoadError, AgentNotFound, Busy, ChronicleError,
                              NotFound, UsageError)
from chronicle.store.history.reads import ReadLog
from chronicle.store.history.turns import FINAL_STATUSES, TurnLog, now_iso
from chronicle.store.store import Store, check_workspace_name, default_store_path

from agent_runtime.isolation import AGENT_UID, View, adopt, check, isolation_default
from agent_runtime.loader import normalise_target
from agent_runtime.process import DaemonStandby, WorkerProcess, WorkspaceMount, env_names
from agent_runtime.reply import Reply
from agent_runtime.runner import AgentRunner, Job, MessageJob, RollbackJob, StopJob, WakeJob, take_agent_lock
from agent_runtime.surface import RuntimeSurface
from agent_runtime.timers import QuotaRegistry, TimerScheduler, describe_wait

log = logging.getLogger("agent_runtime")


class Runtime(RuntimeSurface):
    """A coordinator for the agents of one store (module docstring).

    ``store``: the store directory (default ``$CHRONICLE_HOME/store``; created
    if missing). ``agents_dir``: where workspaces are mounted and workers log.
    ``snapshot_every``: keep a full state snapshot every N turns (restoring an
    agent reads one snapshot and fewer than N patches). ``idle_timeout``:
    seconds without messages before ``on_idle_timeout`` (None: never scale to
    zero). ``cancel_grace``: seconds a cancelled turn gets to stop before its
    worker is killed. ``start_timeout``: seconds for a worker or mount to start.
    ``sync_interval``: seconds after which a sync of the store is due (see
    ``Store.needs_sync``; also after a few hundred commits). ``create_store``:
    False raises :class:`StoreNotFound` for a missing store (read commands).
    ``isolation``: run each worker isolated, as uid/gid ``agent_uid``
    (:mod:`agent_runtime.isolation`; default True unless
    ``$CHRONICLE_NO_ISOLATION`` is set); its requirements are checked when the
    first worker starts (:class:`AgentError` if unmet). False: workers run as
    this process's user, in its mount namespace. ``worker_env``: names of
    this process's environment variables every worker gets besides the
    allowlist (``agent_runtime.process.WORKER_ENV``; also
    ``$CHRONICLE_AGENT_ENV``, comma-separated). A worker inherits nothing
    else; an agent class names what it needs in ``BaseAgent.worker_env``.
    """

    def __init__(self, store: os.PathLike | str | None = None, *, agents_dir: os.PathLike | str | None = None,
                 snapshot_every: int = 100, idle_timeout: float | None = None, cancel_grace: float = 5.0,
                 start_timeout: float = 60.0, sync_interval: float = 5.0, create_store: bool = True,
                 isolation: bool | None = None, agent_uid: int = AGENT_UID, worker_env: Iterable[str] = ()):
        if not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise UsageError(f"snapshot_every must be a positive integer, not {snapshot_every!r}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise UsageError(f"idle_timeout must be positive seconds or None, not {idle_timeout!r}")
        self.store_path = Path(store).absolute() if store is not None else default_store_path()
        self.store = Store.open(self.store_path, create=create_store)
        self.turn_log = TurnLog(self.store)
        self.agents_dir = Path(agents_dir).absolute() if agents_dir is not None else self.store_path / "agents"
        self.snapshot_every = snapshot_every
        self.idle_timeout = idle_timeout
        self.cancel_grace = cancel_grace
        self.start_timeout = start_timeout
        self.sync_interval = sync_interval
        self.isolation = isolation_default() if isolation is None else bool(isolation)
        self.agent_uid = agent_uid
        self.worker_env = env_names(worker_env, "worker_env")
        self._runners: dict[str, AgentRunner] = {}
        self._sync_task: asyncio.Task | None = None
        self._closed = False
        self._timers = TimerScheduler(self._fire)
        self._standby = DaemonStandby(self.store_path / "run" / "mount-standby.log")   # (started by mounts)
        self.quotas = QuotaRegistry()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- paths -------------------------------------------------------------------------

    def agent_dir(self, agent_id: str) -> Path:
        return self.agents_dir / agent_id

    def mountpoint(self, agent_id: str) -> Path:
        """Where the agent's workspace is mounted while it runs (its ``AGENT_WORKSPACE``)."""
        return self.agent_dir(agent_id) / "workspace"

    def worker_log(self, agent_id: str) -> Path:
        """The agent's worker log (appended to by each of its workers)."""
        return self.agent_dir(agent_id) / "worker.log"

    def workspace_mount(self, agent_id: str) -> WorkspaceMount:
        """A handle on the agent's workspace mount at :meth:`mountpoint` (``RunnerHost``)."""
        return WorkspaceMount(self.store_path, agent_id, self.mountpoint(agent_id), self._standby)

    async def spawn_worker(self, agent_id: str, target: str, cwd: str) -> WorkerProcess:
        """A worker for the agent that has loaded ``target`` from ``cwd``
        (``RunnerHost``). Raises :class:`AgentLoadError`, :class:`AgentError`.

        The worker starts (and imports its code) while the workspace mounts
        (both take a few hundred ms: a wake waits for the slower). Isolated,
        its view takes the mount once it is up; while the agent is being
        created it has none, and the worker sees no workspace."""
        runner = self._runners.get(agent_id)
        mount = runner.mount if runner is not None and self._has_workspace(agent_id) else None
        view = None
        if self.isolation:
            await asyncio.to_thread(check, self.agent_uid)
            hide = tuple(dict.fromkeys((str(self.store_path), str(self.agents_dir))))
            view = View(hide, str(mount.mountpoint) if mount else None, cwd, self.agent_uid, self.agent_uid)
        mounting = asyncio.ensure_future(mount.ensure(self.store, self.start_timeout)) if mount else None
        try:
            worker = await WorkerProcess.spawn(agent_id, target, cwd, str(self.mountpoint(agent_id)),
                                               self.worker_log(agent_id), self.start_timeout, view,
                                               env_extra=self.worker_env)
        except BaseException:
            if mounting is not None:
                await asyncio.gather(mounting, return_exceptions=True)
            raise
        if mounting is None:
            return worker
        try:
            await mounting
            if view is not None:
                changed = await asyncio.to_thread(adopt, mount.mountpoint, self.agent_uid, self.agent_uid)
                if changed:
                    log.info("agent %r: gave its %d files to uid %d (isolation)", agent_id, changed,
                             self.agent_uid)
                await worker.attach(mount.mountpoint, self.start_timeout)
        except BaseException:
            await worker.stop()
            raise
        return worker

    def _has_workspace(self, agent_id: str) -> bool:
        try:
            self.store.workspace_record(agent_id)
        except NotFound:
            return False
        return True

    # -- creating and starting ---------------------------------------------------------

    async def create(self, agent_id: str, target: str, *, cwd: os.PathLike | str | None = None) -> dict:
        """Create agent ``agent_id`` running ``target`` (``MODULE:CLASS``, imported
        from ``cwd``, default the current directory) and start it. Its state
        starts from the class's defaults (turn 0), its workspace empty.
        Returns the agent record.

        Raises :class:`AgentExists` (an agent or workspace of that name),
        :class:`AgentLoadError`, :class:`UsageError` (a bad id).
        """
        self._check_open()
        check_workspace_name(agent_id)
        cwd = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
        target = normalise_target(target, cwd)
        self._check_new_name(agent_id)
        runner = self._runner(agent_id)
        try:
            worker = await self.spawn_worker(agent_id, target, cwd)
        except BaseException:
            await self._release(runner)
            raise
        runner.spare = worker
        try:
            defaults = worker.info.get("defaults")
            if defaults is None:
                raise AgentLoadError(f"bad agent class {target!r}: every field of its State needs a default "
                                     "(the state of a new agent is built from them)")
            self._check_new_name(agent_id)
            owner = (self.agent_uid, self.agent_uid) if self.isolation else (None, None)
            self.store.create_workspace(agent_id, *owner)
            record = self._agent_record(agent_id, target, cwd, worker.info, parent=None)
            snapshot = {"version": worker.info["version"], "entity_type": worker.info["entity_type"],
                        "state": defaults}
            self._create_agent(record, snapshot, {"kind": "create", "target": target})
            if self.isolation:          # it saw no workspace: the agent wakes in a worker that does
                runner.spare = None
                await worker.stop()
        except BaseException:
            await self._release(runner)
            raise
        await self._call(runner, WakeJob())
        return self.agent(agent_id)

    async def start(self, agent_id: str, target: str | None = None, *,
                    cwd: os.PathLike | str | None = None) -> dict:
        """Start (wake) an existing agent, or create it if ``target`` is given and
        it does not exist. A ``target`` for an existing agent replaces its code
        (its state is migrated if the class's ``_version`` is newer).
        Returns the agent record."""
        self._check_open()
        if not self.turn_log.exists(agent_id):
            if target is None:
                raise AgentNotFound(f"no agent named {agent_id!r} in {self.store_path} (give MODULE:CLASS to "
                                    "create it)")
            return await self.create(agent_id, target, cwd=cwd)
        previous = None
        if target is not None:
            cwd = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
            target = normalise_target(target, cwd)
            info = self.turn_log.get(agent_id)
            if (info["target"], info["cwd"]) != (target, cwd):
                if agent_id in self._runners and self._runners[agent_id].awake:
                    raise AgentBusy(f"agent {agent_id!r} is running {info['target']}; shut it down before "
                                    "changing its code")
                self._runner(agent_id)          # AgentBusy (another runtime runs it) before the record changes
                previous = {"target": info["target"], "cwd": info["cwd"]}
                self.turn_log.update(agent_id, target=target, cwd=cwd)
        try:
            await self._call(self._runner(agent_id), WakeJob())
        except BaseException:
            if previous is not None:            # the new code did not start: the agent keeps its old code
                self.turn_log.update(agent_id, **previous)
            raise
        return self.agent(agent_id)

    def _check_new_name(self, agent_id: str) -> None:
        if self.turn_log.exists(agent_id):
            raise AgentExists(f"agent {agent_id!r} already exists in {self.store_path}")
        try:
            self.store.workspace_record(agent_id)
        except NotFound:
            return
        raise AgentExists(f"the store already has a workspace named {agent_id!r}; choose another agent id")

    def _agent_record(self, agent_id: str, target: str, cwd: str, info: dict, parent: dict | None,
                      version: int | None = None) -> dict:
        return {"id": agent_id, "target": target, "cwd": cwd, "created": now_iso(),
                "entity_type": info.get("entity_type"),
                "state_version": version if version is not None else info.get("version"),
                "parent": parent, "last_turn": 0, "message_turns": 0, "history_from": 0,
                "total_usage": {}, "last_turn_usage": {}, "status": "created"}

    def _create_agent(self, record: dict, snapshot: dict, origin: dict) -> None:
        """Write the new agent's record, turn 0 and first snapshot. Its workspace
        is not mounted yet, so this process is its writer for that transaction
        (``chronicle.store.history.turns``: who writes)."""
        ws = self.store.open_workspace(record["id"], writable=True)
        try:
            self.turn_log.create_agent(ws, record, snapshot, origin)
        finally:
            self.store.release_workspace(ws)

    # -- messages ----------------------------------------------------------------------

    async def send(self, agent_id: str, message: dict, *, message_id: str | None = None) -> Reply:
        """Queue ``message`` (a JSON object) for the agent and return its
        :class:`~agent_runtime.reply.Reply` at once (tokens stream into it;
        ``await reply.result()`` for the outcome). Starts the agent if needed.

        Raises :class:`AgentNotFound`, :class:`UsageError` (not a JSON object),
        :class:`AgentBusy`.
        """
        self._check_open()
        if not isinstance(message, dict):
            raise UsageError(f"a message is a dict (a JSON object), not {type(message).__name__}")
        try:
            message = json.loads(json.dumps(message, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"the message is not JSON: {exc}") from None
        if message_id is not None and (not isinstance(message_id, str) or not message_id):
            raise UsageError("a message id is a non-empty str")
        self.turn_log.get(agent_id)
        runner = self._runner(agent_id)
        reply = Reply(agent_id, message_id or uuid.uuid4().hex, message)
        runner.submit(MessageJob(reply))
        return reply

    async def stream(self, agent_id: str, message: dict, *, message_id: str | None = None) -> AsyncIterator[str]:
        """Send ``message`` and yield the reply's tokens as they are produced.

        An async generator: ``async for token in rt.stream(agent, msg)``. The
        turn's outcome is then in :meth:`turns`/:meth:`show_turn`; a turn that
        could not start raises its error here.
        """
        reply = await self.send(agent_id, message, message_id=message_id)
        async for token in reply:
            yield token

    async def ask(self, agent_id: str, message: dict, *, message_id: str | None = None,
                  timeout: float | None = None) -> dict:
        """Send ``message`` and return the turn's outcome (see :class:`Reply`)."""
        reply = await self.send(agent_id, message, message_id=message_id)
        return await reply.result(timeout)

    async def cancel(self, agent_id: str, *, wait: bool = True) -> bool:
        """Cancel the agent's running turn: the handler gets ``CancelledError``
        (its worker is killed if it does not stop within ``cancel_grace``); the
        turn is recorded ``cancelled`` and the state stays as before it.
        Returns False if no message turn was running. ``wait``: return once
        the turn is recorded."""
        self.turn_log.get(agent_id)
        runner = self._runners.get(agent_id)
        cur = await runner.cancel() if runner is not None else None
        if cur is None:
            return False
        if wait and cur.reply is not None:
            try:
                await cur.reply.result(self.cancel_grace + self.start_timeout)
            except ChronicleError:
                pass
        return True

    async def wait_for_idle(self, agent_id: str | None = None, timeout: float | None = None) -> None:
        """Wait until the agent (default: every agent of this runtime) has no
        running turn and no queued message. Raises ``TimeoutError``."""
        if agent_id is not None:
            self.turn_log.get(agent_id)
            runners = [self._runners[agent_id]] if agent_id in self._runners else []
        else:
            runners = list(self._runners.values())
        if runners:
            await asyncio.wait_for(asyncio.gather(*(r.queue.join() for r in runners)), timeout)

    def is_idle(self, agent_id: str) -> bool:
        """True if the agent has no running turn and no queued message here."""
        self.turn_log.get(agent_id)
        runner = self._runners.get(agent_id)
        return runner is None or runner.idle

    # -- history operations ------------------------------------------------------------

    async def rollback(self, agent_id: str, to: int) -> dict:
        """Bring the agent's files and state back to the end of turn ``to``,
        recorded as a new ``rollback`` turn (the workspace gets one restore
        event); runs after the queued messages. Returns the new turn record.

        Raises :class:`AgentNotFound`, :class:`NotFound` (no such turn).
        """
        self._check_open()
        if not isinstance(to, int) or isinstance(to, bool):
            raise UsageError(f"a turn number is an int, not {to!r}")
        self.turn_log.get(agent_id)
        return await self._call(self._runner(agent_id), RollbackJob(to))

    async def fork(self, agent_id: str, new_agent_id: str, at: int | None = None) -> dict:
        """A new agent ``new_agent_id`` with the same code, whose workspace is a
        copy-on-write fork of ``agent_id``'s at the end of turn ``at`` (default:
        its last ended turn; an inherited turn too) and whose state is the
        state after that turn. The new agent's own turns number on from
        ``at`` (its record: ``parent`` ``{"agent", "turn"}``, ``first_turn``);
        the turns before are its parent's (:meth:`turns` marks them
        ``inherited``). It starts on its first message. Returns its record.

        Raises :class:`AgentNotFound`, :class:`AgentExists`, :class:`NotFound`
        (no such turn), :class:`Busy` (the turn has not ended).
        """
        self._check_open()
        check_workspace_name(new_agent_id)
        info = self.turn_log.get(agent_id)
        self._check_new_name(new_agent_id)
        if at is None:
            at = info["last_turn"]
            while at > 0 and (self.turn_log.record(agent_id, at) or {}).get("status") not in FINAL_STATUSES:
                at -= 1
        found = self.turn_log.lineage_record(agent_id, at) if isinstance(at, int) and not isinstance(at, bool) \
            else None
        record = found[1] if found is not None else None
        if record is None:
            raise NotFound(f"agent {agent_id!r} has no turn {at} (its turns are 0 to {info['last_turn']})")
        if record.get("status") not in FINAL_STATUSES:
            raise Busy(f"turn {at} of agent {agent_id!r} has not ended")
        end_seq = record.get("end_seq")
        if end_seq is None:
            raise NotFound(f"turn {at} of agent {agent_id!r} has no recorded end in its workspace")
        state = self.turn_log.state_at(agent_id, at)
        self.store.fork(agent_id, end_seq, new_agent_id)
        try:
            parent = {"agent": agent_id, "turn": at}
            new = self._agent_record(new_agent_id, info["target"], info["cwd"],
                                     {"entity_type": state.entity_type or info.get("entity_type")}, parent,
                                     version=state.version)
            # Numbering continues along the lineage: the fork's own first turn is `at`, its next at + 1.
            new.update(first_turn=at, last_turn=at)
            self._create_agent(new, {"version": state.version, "entity_type": new["entity_type"],
                                     "state": state.state}, {"kind": "fork", "forked_from": parent})
        except BaseException:
            self.store.delete_workspace(new_agent_id)
            raise
        return self.agent(new_agent_id)

    def clear_history(self, agent_id: str) -> None:
        """Hide the messages so far from :meth:`history` (and a fork's inherited
        ones). The turn log, the state and the files are unchanged."""
        info = self.turn_log.get(agent_id)
        self.turn_log.update(agent_id, history_from=info["last_turn"], history_cleared=now_iso())

    # -- stopping ----------------------------------------------------------------------

    async def shutdown_agent(self, agent_id: str) -> None:
        """Stop the agent gracefully after its queued messages: ``on_shutdown``,
        sync, stop the worker, unmount. It starts again on its next message."""
        self.turn_log.get(agent_id)
        runner = self._runners.get(agent_id)
        if runner is None:
            return
        await self._call(runner, StopJob())
        # The runner ends right after the stop, unless messages arrived meanwhile (then it serves on).
        await asyncio.wait({runner.task}, timeout=1.0)

    async def delete(self, agent_id: str) -> None:
        """Delete the agent: shut it down, then remove its workspace (all its file
        history) and its turn log from the store, and its directory.

        Raises :class:`AgentNotFound`, :class:`Busy` (an agent or workspace was
        forked from it), :class:`AgentBusy` (run by another runtime).
        """
        self._check_open()
        self.turn_log.get(agent_id)
        forks = sorted(w.name for w in self.store.workspaces() if w.parent == agent_id)
        if forks:
            one = len(forks) == 1
            raise Busy(f"agent {agent_id!r} cannot be deleted: {', '.join(forks)} {'was' if one else 'were'} "
                       f"forked from it; delete {'it' if one else 'them'} first")
        await self.shutdown_agent(agent_id)
        lock = take_agent_lock(self.agent_dir(agent_id) / "lock", agent_id)
        try:
            mount = self.workspace_mount(agent_id)
            await mount.ensure_unmounted(self.store)
            self.store.delete_workspace(agent_id)
            self.turn_log.delete_agent(agent_id)
            (self.store_path / "run" / f"mount-{agent_id}.log").unlink(missing_ok=True)
            if not os.path.ismount(self.mountpoint(agent_id)):
                shutil.rmtree(self.agent_dir(agent_id), ignore_errors=True)
        finally:
            os.close(lock)

    async def close(self) -> None:
        """Shut every running agent down gracefully, then close the store.
        Stored timers stay in the store (a later runtime's :meth:`start_timers`)."""
        if self._closed:
            return
        self._closed = True
        self._timers.close()
        runners = list(self._runners.values())
        jobs = [r.submit(StopJob()) for r in runners]
        for runner, job in zip(runners, jobs, strict=True):
            try:
                await job.future
            except Exception as exc:
                log.warning("agent %r did not shut down cleanly: %s", runner.id, exc)
        for runner in runners:
            try:
                await runner.task
            except Exception:
                pass
        if self._sync_task is not None:
            self._sync_task.cancel()
        await self._standby.close()
        self.store.close()

    # -- reads -------------------------------------------------------------------------

    def agent(self, agent_id: str) -> dict:
        """The agent record (``chronicle.store.history.turns``) with ``workspace`` (its
        mountpoint), ``mounted`` and ``running_here``."""
        info = self.turn_log.get(agent_id)
        runner = self._runners.get(agent_id)
        info["workspace"] = str(self.mountpoint(agent_id))
        info["mounted"] = self.store.mount_info(agent_id) is not None
        info["running_here"] = bool(runner and runner.awake)
        info["worker_pid"] = runner.worker.pid if runner and runner.worker else None
        info["waiting"] = describe_wait(info.get("timer"))
        info["quota"] = self.quotas.describe(info.get("quota_keys") or [])
        return info

    def list_agents(self) -> list[dict]:
        """Every agent of the store (see :meth:`agent`), by id."""
        return [self.agent(record["id"]) for record in self.turn_log.agents()]

    def turns(self, agent_id: str) -> list[dict]:
        """Every turn along the agent's lineage, oldest first: ``{"turn",
        "kind", "message_id", "status", "time", "end_time", "duration_ms",
        "events", "patch_ops", "reply_chars", "usage", "error", "steps",
        "attempts", "undone", "inherited"}`` (``events``: file events in the
        workspace; ``steps``: how many durable steps it completed;
        ``inherited``: None for the agent's own turns, else the ancestor
        whose turn a fork inherited — the turns before its fork turn)."""
        out = []
        for owner, rec in self.turn_log.lineage(agent_id):
            begin, end = rec.get("begin_seq"), rec.get("end_seq")
            out.append({"turn": rec["turn"], "kind": rec.get("kind"), "message_id": rec.get("message_id"),
                        "status": rec.get("status"), "time": rec.get("time"), "end_time": rec.get("end_time"),
                        "duration_ms": rec.get("duration_ms"),
                        "events": max(0, end - begin + 1) if begin is not None and end is not None else None,
                        "patch_ops": len(rec.get("patch") or []), "reply_chars": len(rec.get("reply") or ""),
                        "usage": rec.get("usage") or {}, "error": rec.get("error"),
                        "steps": len(rec.get("steps") or []), "attempts": rec.get("attempts", 1),
                        "undone": bool(rec.get("undone")), "inherited": owner if owner != agent_id else None})
        return out

    def turn_count(self, agent_id: str) -> int:
        """How many messages the agent has been given turns for (any status)."""
        return self.turn_log.get(agent_id).get("message_turns", 0)

    def show_turn(self, agent_id: str, turn: int) -> dict:
        """One turn in full: ``{"turn", "message", "patch", "files", "reads",
        "reply", "status", ...}``, ``files`` being the workspace's file events
        of the turn (``.chronicle/log`` records, with their paths), ``reads``
        its read-set (``chronicle.store.history.reads``). Raises
        :class:`NotFound`."""
        self.turn_log.get(agent_id)
        found = self.turn_log.lineage_record(agent_id, turn) if isinstance(turn, int) else None
        if found is None:
            raise NotFound(f"agent {agent_id!r} has no turn {turn}")
        owner, record = found
        out = {"turn": record["turn"], "message": record.get("message"), "patch": record.get("patch") or [],
               "files": self.turn_log.turn_events(owner, record),
               "reads": ReadLog(self.store).turn_reads(owner, owner, record["turn"]),
               "reply": record.get("reply") or "",
               "status": record.get("status"), "inherited": owner if owner != agent_id else None}
        out.update((k, v) for k, v in record.items() if k not in out)
        return out

    def state(self, agent_id: str, turn: int | None = None) -> dict:
        """The state JSON after turn ``turn`` (default: the latest). Raises
        :class:`NotFound` for a turn the agent does not have."""
        return self.turn_log.state_at(agent_id, turn).state

    def history(self, agent_id: str) -> list[dict]:
        """The conversation, oldest first: ``{"agent", "turn", "message_id",
        "message", "reply", "status", "time", "kind", "compaction",
        "compacted"}`` per message or wake turn since the last
        :meth:`clear_history`; a fork starts with its parent's up to the fork.
        ``compaction``: the compaction point the turn recorded (``ctx.compact``:
        ``{"summary", "keep_last", "summarises", "state_turn"}``) or None;
        ``compacted``: a later point of this agent summarises the turn."""
        return self._history(agent_id, None, 0)

    def _history(self, agent_id: str, upto: int | None, depth: int) -> list[dict]:
        info = self.turn_log.get(agent_id)
        out: list[dict] = []
        start = info.get("history_from", 0)
        parent = info.get("parent")
        if parent and start == 0 and depth < 64:
            try:
                out = self._history(parent["agent"], parent["turn"], depth + 1)
            except AgentNotFound:
                pass
        summarised: set[int] = set()
        for rec in self.turn_log.records(agent_id, start + 1, upto):
            point = rec.get("compaction")
            if point:
                summarised.update(point.get("summarises") or [])
            if rec.get("kind") in ("message", "wake") or point:
                out.append({"agent": agent_id, "turn": rec["turn"], "message_id": rec.get("message_id"),
                            "message": rec.get("message"), "reply": rec.get("reply") or "",
                            "status": rec.get("status"), "time": rec.get("time"), "kind": rec.get("kind"),
                            "compaction": point})
        for entry in out:
            entry["compacted"] = entry["agent"] == agent_id and entry["turn"] in summarised
        return out

    def last_turn_usage(self, agent_id: str) -> dict:
        """Usage recorded by the last finished message turn (``ctx.record_usage``)."""
        return dict(self.turn_log.get(agent_id).get("last_turn_usage") or {})

    def total_usage(self, agent_id: str) -> dict:
        """Usage summed over all the agent's turns."""
        return dict(self.turn_log.get(agent_id).get("total_usage") or {})

    def worker_pid(self, agent_id: str) -> int | None:
        """The PID of the agent's worker in this runtime, or None."""
        runner = self._runners.get(agent_id)
        return runner.worker.pid if runner is not None and runner.worker is not None else None

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this runtime is closed")
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    def _runner(self, agent_id: str) -> AgentRunner:
        runner = self._runners.get(agent_id)
        if runner is None:
            lock = take_agent_lock(self.agent_dir(agent_id) / "lock", agent_id)
            runner = self._runners[agent_id] = AgentRunner(self, agent_id, lock)
        return runner

    def runner_finished(self, runner: AgentRunner) -> None:
        """Forget an ended runner (``RunnerHost``)."""
        if self._runners.get(runner.id) is runner:
            del self._runners[runner.id]

    async def _release(self, runner: AgentRunner) -> None:
        """Stop a runner and wait until it has ended (its lock released)."""
        try:
            await self._call(runner, StopJob())
        except ChronicleError as exc:
            log.debug("stopping agent %r: %s", runner.id, exc)
        await asyncio.wait({runner.task}, timeout=10.0)

    @staticmethod
    async def _call(runner: AgentRunner, job: Job) -> Any:
        runner.submit(job)
        return await job.future

    async def _sync_loop(self) -> None:
        """Sync the store when due (``Store.needs_sync``): the agent records we
        wrote get durable (the daemons sync the turns they write), and our LMDB
        pin does not hold back page reuse for the daemons."""
        while True:
            await asyncio.sleep(min(1.0, self.sync_interval))
            if self.store.needs_sync(interval=self.sync_interval):
                try:
                    await asyncio.to_thread(self.store.sync)
                except Exception:
                    log.exception("store sync failed; will retry")


__all__ = ["Runtime"]
