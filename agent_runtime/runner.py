"""One agent inside the coordinator: its job queue, its turns and its lifecycle.

An :class:`AgentRunner` owns an agent while this runtime runs it: the agent's
lock file, its :class:`~agent_runtime.process.WorkspaceMount` and its
:class:`~agent_runtime.process.WorkerProcess`. Jobs (a message, a rollback,
a wake, a stop) wait in a queue and run one at a time, so turns never
overlap and a rollback lands between turns.

A **turn**, as the runner drives it (SPEC §5)::

    ctl turn-begin {agent, turn N, message_id}    every file event from now on carries the label
    store: turn N "running"                       (a runtime that dies here leaves it; the next
                                                   start records it "interrupted")
    worker: run → tokens (streamed to the Reply at once) → done {status, patch, ...}
    ctl turn-end                                  commits open files; gives begin_seq/end_seq
    store: turn N final, + state snapshot if due  one LMDB transaction, beside the file events

States of a runner: **asleep** (no worker; the workspace unmounted) and
**awake** (mounted, worker started, ``on_init`` run). The first job wakes it;
after ``idle_timeout`` seconds without jobs it asks ``on_idle_timeout`` and,
on True, seals the turn log (store sync), stops the worker and unmounts. A
worker that dies is noticed at once during a turn (EOF: the turn is
``interrupted``) and otherwise at the next job, which starts a new one from
the store (the latest snapshot plus patches).

Lifecycle hooks (``on_init``, ``on_idle_timeout``, ``on_shutdown``) run as
turns too, labelled and with their state patch, but they are kept in the turn
log only if they changed something (state or files) or failed; otherwise
their number is used by the next turn.

Threads: everything here runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonpatch

from chronicle.errors import AgentBusy, AgentError, AgentLoadError, Busy, ChronicleError, InvalidArgument, NotFound
from chronicle.store.history.turns import FINAL_STATUSES, now_iso

from agent_runtime.process import WorkerProcess, WorkspaceMount
from agent_runtime.reply import Reply

if TYPE_CHECKING:
    from agent_runtime.runtime import Runtime

log = logging.getLogger("agent_runtime")


@dataclass
class _Current:
    """The turn (or hook) being run."""

    kind: str
    reply: Reply | None = None
    turn: int | None = None
    cancel: bool = False
    run_sent: bool = False
    killer: asyncio.Task | None = None


class Job:
    """Something the runner does between turns; ``future`` gets its outcome."""

    def __init__(self) -> None:
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def run(self, runner: AgentRunner) -> Any:
        raise NotImplementedError

    def finish(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class MessageJob(Job):
    def __init__(self, reply: Reply):
        super().__init__()
        self.reply = reply

    async def run(self, runner: AgentRunner) -> None:
        result = await runner.message_turn(self.reply)
        self.finish(result)

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.reply._fail(exc)


class WakeJob(Job):
    async def run(self, runner: AgentRunner) -> None:
        await runner.wake()
        self.finish(None)


class RollbackJob(Job):
    def __init__(self, to: int):
        super().__init__()
        self.to = to

    async def run(self, runner: AgentRunner) -> None:
        self.finish(await runner.rollback(self.to))


class StopJob(Job):
    async def run(self, runner: AgentRunner) -> None:
        await runner.stop()
        self.finish(None)


def take_agent_lock(path: os.PathLike, agent: str) -> int:
    """An exclusive lock on the agent (its ``lock`` file). Raises :class:`AgentBusy`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentBusy(f"agent {agent!r} is run by another runtime process") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class AgentRunner:
    """See the module docstring. Made by :class:`~agent_runtime.runtime.Runtime`."""

    def __init__(self, runtime: Runtime, agent_id: str, lock_fd: int):
        self.rt = runtime
        self.id = agent_id
        self.lock_fd = lock_fd
        self.log = runtime.log
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.mount = WorkspaceMount(runtime.store_path, agent_id, runtime.mountpoint(agent_id))
        self.worker: WorkerProcess | None = None
        self.spare: WorkerProcess | None = None      # a loaded worker handed over by create()
        self.awake = False
        self.busy = False
        self.current: _Current | None = None
        self.task = asyncio.create_task(self._serve(), name=f"agent {agent_id}")

    @property
    def idle(self) -> bool:
        return not self.busy and self.queue.empty()

    def submit(self, job: Job) -> Job:
        self.queue.put_nowait(job)
        return job

    async def _serve(self) -> None:
        job: Job | None = None
        try:
            while True:
                timeout = self.rt.idle_timeout if self.awake and self.rt.idle_timeout else None
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    try:
                        await self._idle()
                    except Exception:
                        log.exception("agent %r: the idle check failed", self.id)
                    continue
                self.busy = True
                try:
                    await job.run(self)
                except Exception as exc:
                    if not isinstance(exc, ChronicleError):
                        log.exception("agent %r: %s failed", self.id, type(job).__name__)
                    job.fail(exc)
                finally:
                    self.busy = False
                    self.queue.task_done()
                if isinstance(job, StopJob) and self.queue.empty():
                    return
        except asyncio.CancelledError:
            await asyncio.shield(self._abort())
            raise
        finally:
            gone = ChronicleError(f"agent {self.id!r} was shut down")
            if job is not None:
                job.fail(gone)                  # (a no-op for a job that finished)
            while not self.queue.empty():
                self.queue.get_nowait().fail(gone)
                self.queue.task_done()
            self.rt._runner_finished(self)

    # -- waking and sleeping -----------------------------------------------------------

    async def wake(self) -> None:
        """Mount, start a worker with the latest state, run ``on_init``: an awake agent."""
        if self.awake and self.worker is not None and self.worker.alive and self.mount.serving():
            return
        await self._drop_worker()
        info = self.log.get(self.id)
        worker, self.spare = self.spare, None
        if worker is None or not worker.alive:
            worker = await WorkerProcess.spawn(self.id, info["target"], info["cwd"], str(self.mount.mountpoint),
                                               self.rt.worker_log(self.id), self.rt.start_timeout)
        try:
            kind = worker.info.get("entity_type")
            if info.get("entity_type") and kind != info["entity_type"]:
                raise AgentLoadError(f"agent {self.id!r} holds state of kind {info['entity_type']!r}, but "
                                     f"{info['target']} has State._entity_type {kind!r}")
            await self.mount.ensure(self.rt.store, self.rt.start_timeout)
            await self._close_label()
            self._finish_running()
            state = self.log.state_at(self.id)
            started = await worker.request({"op": "start", "workspace": str(self.mount.mountpoint),
                                            "state": state.state, "version": state.version},
                                           "started", self.rt.start_timeout)
        except BaseException:
            await worker.stop()
            raise
        self.worker = worker
        self.awake = True
        self.log.update(self.id, status="running", state_version=started["version"])
        migrated = started.get("migrated_from")
        await self.hook("init", force=migrated is not None,
                        extra={"migrated_from": migrated} if migrated is not None else None)
        if not self.awake:
            raise AgentError(f"the worker of agent {self.id!r} died during on_init; see "
                             f"{self.rt.worker_log(self.id)}")

    async def _idle(self) -> None:
        if not self.awake:
            return
        if self.worker is None or not self.worker.alive:
            await self._sleep("sleeping")
            return
        done = await self.hook("idle")
        if done["status"] == "completed" and done.get("result"):
            log.info("agent %r: idle for %ss, scaling to zero", self.id, self.rt.idle_timeout)
            await self._sleep("sleeping")

    async def stop(self) -> None:
        """Graceful stop: ``on_shutdown``, then sleep (sync, stop the worker, unmount)."""
        if self.awake and self.worker is not None and self.worker.alive:
            try:
                await self.hook("shutdown")
            except ChronicleError as exc:
                log.warning("agent %r: on_shutdown could not run: %s", self.id, exc)
        await self._sleep("stopped")

    async def _sleep(self, status: str) -> None:
        await self._drop_worker()
        if self.spare is not None:
            await self.spare.stop()
            self.spare = None
        await asyncio.to_thread(self.rt.store.sync)       # seal the turn log
        await self.mount.umount()
        if self.log.exists(self.id):                      # (not when create() gave up)
            self.log.update(self.id, status=status)

    async def _drop_worker(self) -> None:
        worker, self.worker = self.worker, None
        self.awake = False
        if worker is not None:
            await worker.stop()

    async def _abort(self) -> None:
        """The runtime is torn down without a graceful stop: end the processes."""
        for worker in (self.worker, self.spare):
            if worker is not None:
                await worker.kill()
                worker.close()
        self.worker = self.spare = None
        self.awake = False
        try:
            await self.mount.umount(timeout=30.0)
        except ChronicleError as exc:
            log.warning("agent %r: could not unmount: %s", self.id, exc)

    # -- labels ----------------------------------------------------------------------------

    async def _close_label(self) -> None:
        """End a turn label an earlier runtime left open on the daemon."""
        try:
            await self.mount.control({"cmd": "turn-end"})
        except InvalidArgument:
            pass                                # no turn open: the usual case

    async def _turn_begin(self, turn: int, message_id: str | None) -> dict:
        """``turn-begin``; a label left open (a ``turn-end`` that failed) is ended first."""
        command = {"cmd": "turn-begin", "agent": self.id, "turn": turn, "message_id": message_id}
        try:
            return await self.mount.control(command)
        except InvalidArgument as exc:
            if "still open" not in str(exc):
                raise
        await self._close_label()
        return await self.mount.control(command)

    async def _turn_end(self) -> dict | None:
        try:
            return (await self.mount.control({"cmd": "turn-end"})).get("turn")
        except ChronicleError as exc:
            log.warning("agent %r: turn-end failed: %s", self.id, exc)
            return None

    def _finish_running(self) -> None:
        """A turn left ``running`` by a runtime that died is ``interrupted``."""
        info = self.log.get(self.id)
        record = self.log.turn(self.id, info["last_turn"])
        if record is None or record.get("status") != "running":
            return
        label = self.rt.store.get_turn(self.rt.store.open_workspace(self.id), self.id, record["turn"]) or {}
        record.update(status="interrupted", end_seq=label.get("end_seq"), end_time=now_iso(),
                      error="the runtime stopped during this turn", patch=[])
        self.log.put_turn(self.id, record)

    def _due(self, turn: int) -> bool:
        return turn % self.rt.snapshot_every == 0

    def _snapshot(self, state: dict, version: int) -> dict:
        return {"version": version, "entity_type": self.worker.info.get("entity_type") if self.worker else None,
                "state": state}

    # -- running on the worker ------------------------------------------------------------

    async def _run(self, cur: _Current, kind: str, turn: int, message_id: str | None, message: dict | None,
                   snapshot: bool) -> dict:
        """One ``run`` on the worker; returns its ``done`` (or a stand-in if the worker died)."""
        cur.turn = turn
        if cur.cancel:
            return {"status": "cancelled", "patch": [], "messages": [], "usage": {}, "error": None}
        worker = self.worker
        assert worker is not None
        worker.channel.send_nowait({"op": "run", "kind": kind, "turn": turn, "message_id": message_id,
                                    "message": message, "snapshot": snapshot})
        cur.run_sent = True
        try:
            await worker.channel.writer.drain()
        except (ConnectionError, OSError):
            pass                                # the EOF below tells the rest
        try:
            while True:
                event = await worker.next_event()
                ev = event.get("ev")
                if ev == "token":
                    if cur.reply is not None:
                        cur.reply._token(event.get("token", ""))
                elif ev == "message":
                    if cur.reply is not None and event.get("message", 0) > 0:
                        cur.reply._token("\n")
                elif ev == "done":
                    return event
                elif ev in ("eof", "error"):
                    await worker.wait_exit(5.0)
                    if ev == "error":
                        status, error = "failed", event.get("error")
                    else:
                        status = "cancelled" if cur.cancel else "interrupted"
                        error = None if cur.cancel else \
                            f"the worker process ended (status {worker.proc.returncode}) during the turn"
                    await self._drop_worker()
                    return {"status": status, "patch": [], "messages": None, "usage": {}, "error": error}
        finally:
            if cur.killer is not None:
                cur.killer.cancel()

    async def cancel(self) -> _Current | None:
        """Cancel the running message turn (or the one about to run). Returns it, or None."""
        cur = self.current
        if cur is None or cur.kind != "message":
            return None
        if not cur.cancel:
            cur.cancel = True
            if cur.run_sent and self.worker is not None:
                await self.worker.send({"op": "cancel", "turn": cur.turn})
                cur.killer = asyncio.create_task(self._kill_after(cur, self.worker))
        return cur

    async def _kill_after(self, cur: _Current, worker: WorkerProcess) -> None:
        await asyncio.sleep(self.rt.cancel_grace)
        if self.current is cur and worker.alive:
            log.warning("agent %r: turn %s did not stop %.1fs after cancel; killing its worker",
                        self.id, cur.turn, self.rt.cancel_grace)
            worker.signal_group(signal.SIGKILL)

    # -- turns ---------------------------------------------------------------------------

    def _record(self, turn: int, kind: str, begin: dict, message_id: str | None = None,
                message: dict | None = None, **extra: Any) -> dict:
        return {"turn": turn, "kind": kind, "status": "running", "message_id": message_id, "message": message,
                "reply": "", "messages": [], "patch": [], "error": None, "usage": {},
                "begin_seq": begin.get("seq", 0) + 1, "end_seq": None, "time": now_iso(), "end_time": None,
                "duration_ms": None, "snapshot": False, **extra}

    def _finish(self, record: dict, done: dict, label: dict | None, started: float, reply_text: str) -> None:
        messages = done.get("messages")
        record.update(status=done["status"], patch=done.get("patch") or [], error=done.get("error"),
                      usage=done.get("usage") or {}, end_time=now_iso(),
                      duration_ms=round((time.monotonic() - started) * 1000, 3),
                      messages=messages if messages is not None else [reply_text] if reply_text else [],
                      reply="\n".join(messages) if messages is not None else reply_text)
        if label is not None:
            record["begin_seq"] = label.get("begin_seq", record["begin_seq"])
            record["end_seq"] = label.get("end_seq")
        if record["status"] != "completed":
            record["patch"] = []

    async def hook(self, kind: str, force: bool = False, extra: dict | None = None) -> dict:
        """Run a lifecycle hook as a turn; kept in the log if it changed anything, failed or ``force``."""
        turn = self.log.get(self.id)["last_turn"] + 1
        started = time.monotonic()
        begin = await self._turn_begin(turn, None)
        record = self._record(turn, kind, begin, **(extra or {}))
        # Not self.current: that is the message turn (if any) this hook runs for, which cancel() targets.
        done = await self._run(_Current(kind), kind, turn, None, None, snapshot=force or self._due(turn))
        label = await self._turn_end()
        self._finish(record, done, label, started, "")
        files_changed = label is not None and (label.get("end_seq") or 0) >= record["begin_seq"]
        if force or record["patch"] or files_changed or record["status"] != "completed":
            snapshot = None
            if "state" in done and self.worker is not None:     # also after a failed on_init that migrated
                snapshot = self._snapshot(done["state"], self.worker.info["version"])
                record["snapshot"] = True
            self.log.put_turn(self.id, record, new=True, snapshot=snapshot)
            if record["status"] == "failed":
                log.warning("agent %r: %s failed: %s", self.id, kind, record["error"])
        return done

    async def message_turn(self, reply: Reply) -> dict:
        """One ``on_message`` turn (module docstring); returns the Reply's result."""
        cur = self.current = _Current("message", reply)
        try:
            await self.wake()
            turn = self.log.get(self.id)["last_turn"] + 1
            started = time.monotonic()
            begin = await self._turn_begin(turn, reply.message_id)
            record = self._record(turn, "message", begin, reply.message_id, reply.message)
            self.log.begin_turn(self.id, record)
            reply.turn = turn
            try:
                done = await self._run(cur, "message", turn, reply.message_id, reply.message,
                                       snapshot=self._due(turn))
            except BaseException as exc:
                done = {"status": "interrupted", "patch": [], "messages": None, "usage": {},
                        "error": f"the runtime failed during the turn: {exc}"}
                label = await self._turn_end()
                self._finish(record, done, label, started, reply.text)
                self.log.put_turn(self.id, record)
                raise
            label = await self._turn_end()
            self._finish(record, done, label, started, reply.text)
            snapshot = None
            if "state" in done and self.worker is not None:
                snapshot = self._snapshot(done["state"], self.worker.info["version"])
                record["snapshot"] = True
            self.log.put_turn(self.id, record, snapshot=snapshot)
            if record["status"] == "failed":
                log.info("agent %r: turn %d failed: %s", self.id, turn, record["error"])
        finally:
            self.current = None
        result = {"agent": self.id, "turn": turn, "message_id": reply.message_id, "kind": "message",
                  "status": record["status"], "reply": record["reply"], "messages": record["messages"],
                  "error": record["error"], "usage": record["usage"]}
        reply._finish(result)
        return result

    async def rollback(self, to: int) -> dict:
        """Files and state back to the end of turn ``to``, as a new ``rollback`` turn."""
        target_record = self.log.turn(self.id, to)
        if target_record is None:
            last = self.log.get(self.id)["last_turn"]
            raise NotFound(f"agent {self.id!r} has no turn {to} (its turns are 0 to {last})")
        if target_record.get("status") not in FINAL_STATUSES:
            raise Busy(f"turn {to} of agent {self.id!r} has not ended")
        if target_record.get("end_seq") is None:
            raise NotFound(f"turn {to} of agent {self.id!r} has no recorded end in its workspace "
                           "(its mount daemon died during it); roll back to another turn")
        target = self.log.state_at(self.id, to)
        current = self.log.state_at(self.id)
        await self.mount.ensure(self.rt.store, self.rt.start_timeout)
        if not self.awake:
            await self._close_label()
            self._finish_running()
        turn = self.log.get(self.id)["last_turn"] + 1
        started = time.monotonic()
        begin = await self._turn_begin(turn, None)
        record = self._record(turn, "rollback", begin, rollback_to=to)
        self.log.begin_turn(self.id, record)
        done: dict = {"status": "completed", "patch": [], "messages": [], "usage": {}, "error": None}
        try:
            await self.mount.control({"cmd": "restore", "at": f"turn:{self.id}:{to}"})
        except ChronicleError as exc:
            done.update(status="failed", error=str(exc))
        label = await self._turn_end()
        snapshot = None
        if done["status"] == "completed":
            state, version = target.state, target.version
            if self.awake and self.worker is not None and self.worker.alive:
                try:
                    loaded = await self.worker.request({"op": "load", "state": state, "version": version},
                                                       "state", self.rt.start_timeout)
                    state, version = loaded["state"], loaded["version"]
                except ChronicleError as exc:
                    log.warning("agent %r: the worker could not load the rolled-back state (%s); "
                                "it restarts from the store", self.id, exc)
                    await self._drop_worker()
            done["patch"] = jsonpatch.make_patch(current.state, target.state).patch
            snapshot = {"version": version, "entity_type": target.entity_type, "state": state}
        self._finish(record, done, label, started, "")
        record["snapshot"] = snapshot is not None
        self.log.put_turn(self.id, record, snapshot=snapshot)
        if not self.awake:
            await self.mount.umount()
        return record


__all__ = ["AgentRunner", "Job", "MessageJob", "RollbackJob", "StopJob", "WakeJob", "take_agent_lock"]
