"""One agent inside the coordinator: its job queue, its turns and its lifecycle.

An :class:`AgentRunner` owns an agent while this runtime runs it: the agent's
lock file, its :class:`~agent_runtime.process.WorkspaceMount` and its
:class:`~agent_runtime.process.WorkerProcess`. Jobs (a message, a rollback,
a wake, a stop) wait in a queue and run one at a time, so turns never
overlap and a rollback lands between turns.

A **turn**, as the runner drives it (SPEC §5; the vocabulary is the turn
log's, ``chronicle.store.history.turns``)::

    ctl turn-begin {agent, turn N, message_id,     the daemon opens the label and writes turn N
                    record: {kind, message, ...}}   "running" in one transaction; every file event
                                                    from now on carries the label
    worker: run → tokens (streamed to the Reply at once) → done {status, patch, ...}
    ctl turn-end {record: outcome, snapshot?}       commits open files, ends the label and writes
                                                    turn N final (+ the state snapshot if due) in
                                                    one transaction, beside the file events

``turn-begin`` (with a record), a completed turn's ``turn-end`` and ``step``
go *quiet* (``chronicle.fs.ctl``): the ``write`` returning is the answer, no
reply is read — one FUSE request per command, not two.

A message turn is all-or-nothing (SPEC §5): when it ends failed, cancelled
or interrupted and the class has ``atomic_turns`` (the default), the runner
sends ``ctl restore at=<the head before turn-begin>`` *after* ``turn-end`` —
new, unlabelled events, so ``turn:AGENT:N`` still names the attempt's tree —
and the record says ``undone``. A turn an earlier runtime or daemon lost is
undone the same way at the next wake, if nothing was written after it.
Children of the worker that outlive the turn are left running; their later
writes carry no label. Durable steps (``ctx.step``) travel worker → runner
(``step``) → ``ctl step`` → ``stepped``. While the class's ``retry_policy``
allows, a turn whose worker died (or that raised a ``retry_on`` exception) is
run again inside the same label: the tree restored to the last step's seq,
a new worker if needed (``on_init`` called inside the turn), the completed
steps handed over.

The daemon writes because it is the workspace's writer (it holds the writer
lock while mounted); the runner reads the turn log and writes only the
agent record's ``status`` and ``state_version``. A runtime that dies
mid-turn leaves turn N ``running``: the next ``turn-end`` without a record (a
new runtime ends the label it finds open) or the next daemon's start (a daemon
that died too) records it ``interrupted``. A ``turn-end`` that fails (the
daemon is gone) leaves the turn to that, and the worker restarts from the
store so its state stays the log's.

States of a runner: **asleep** (no worker; the workspace unmounted) and
**awake** (mounted, worker started, ``on_init`` run). The first job wakes it;
after ``idle_timeout`` seconds without jobs it asks ``on_idle_timeout`` and,
on True, syncs the store, stops the worker and unmounts. A
worker that dies is noticed at once during a turn (EOF: the turn is
``interrupted``) and otherwise at the next job, which starts a new one from
the store (the latest snapshot plus patches). Before a message turn the
mount is checked without a request to it (its daemon has not exited); a
``turn-begin`` that finds the daemon gone (``StoreError``) wakes the agent
again — a new mount — and begins once more.

Lifecycle hooks (``on_init``, ``on_idle_timeout``, ``on_shutdown``) run as
turns too, labelled and with their state patch, but the turn log keeps them
only if they changed something (state or files) or failed (or, for a
migrating ``on_init``, always); otherwise their number is used by the next turn.

Timers and quotas (:mod:`agent_runtime.timers`): a turn that ends in
``ctx.sleep``/``pause`` leaves a timer (``host.set_timer``) and the agent
sleeps at once; a message or ``wake`` turn clears it. A turn of a class with
``quota_keys`` starts only once the host's backoff of those keys has passed.

The runner's **host** (:class:`~agent_runtime.host.RunnerHost`, implemented by
:class:`~agent_runtime.runtime.Runtime`) gives it the store and the turn log
to read, its settings, paths, mounts and workers, and hears when it ends; the
runner knows nothing else of the runtime.

Threads: everything here runs on the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import time
from typing import Any

import jsonpatch

from chronicle.errors import AgentError, AgentLoadError, Busy, ChronicleError, InvalidArgument, NotFound, StoreError
from chronicle.store.history.turns import FINAL_STATUSES, now_iso

from agent_runtime.host import RunnerHost
from agent_runtime.jobs import (CurrentTurn, Job, MessageJob, RollbackJob, SleepJob, StopJob, WakeJob,
                                take_agent_lock)
from agent_runtime.process import WorkerProcess, class_environment
from agent_runtime.reply import Reply
from agent_runtime.timers import compaction_point, timer_record

log = logging.getLogger("agent_runtime")

CTL_LINE = 1 << 20          # the longest ctl command line (SPEC §4; chronicle.fs.ctl.MAX_LINE)
TURN_DATA_PIECE = 1 << 18   # characters of JSON per turn-data piece (at most twice that once escaped)


class AgentRunner:
    """See the module docstring. ``lock_fd``: the agent's lock
    (:func:`take_agent_lock`), which the runner closes when it ends."""

    def __init__(self, host: RunnerHost, agent_id: str, lock_fd: int):
        self.host = host
        self.id = agent_id
        self.lock_fd = lock_fd
        self.log = host.turn_log
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self._pending: list[Job] = []               # the queue's jobs (queued())
        self.mount = host.workspace_mount(agent_id)
        self.worker: WorkerProcess | None = None
        self.spare: WorkerProcess | None = None      # a loaded worker handed over by create()
        self.awake = False
        self.busy = False
        self.current: CurrentTurn | None = None
        self.task = asyncio.create_task(self._serve(), name=f"agent {agent_id}")

    @property
    def idle(self) -> bool:
        return not self.busy and self.queue.empty()

    def submit(self, job: Job) -> Job:
        self.queue.put_nowait(job)
        self._pending.append(job)
        self._wake_up_idle(job)
        return job

    def queued(self) -> list[Job]:
        """The jobs waiting in the queue, oldest first."""
        return list(self._pending)

    def _take(self, job: Job) -> Job:
        self._pending.remove(job)
        return job

    def _wake_up_idle(self, job: Job | None) -> None:
        """A handler waiting in ``ctx.wait_for_wakeup`` hears of a queued job:
        ``{"reason": "message", "message_id"}`` for a message, else ``{"reason": "job"}``."""
        cur, worker = self.current, self.worker
        if cur is not None and cur.idle and worker is not None and worker.alive:
            cur.idle = False
            event = {"reason": "message", "message_id": job.reply.message_id} if isinstance(job, MessageJob) \
                else {"reason": "job"}
            asyncio.get_running_loop().create_task(worker.send({"op": "wakeup", "event": event}))

    async def _serve(self) -> None:
        job: Job | None = None
        try:
            while True:
                timeout = self.host.idle_timeout if self.awake and self.host.idle_timeout else None
                try:
                    job = self._take(await asyncio.wait_for(self.queue.get(), timeout))
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
                self._take(self.queue.get_nowait()).fail(gone)
                self.queue.task_done()
            self.host.runner_finished(self)
            os.close(self.lock_fd)

    # -- waking and sleeping -----------------------------------------------------------

    async def wake(self, quick: bool = False) -> None:
        """Mount, start a worker with the latest state, run ``on_init``: an
        awake agent. ``quick``: an awake agent's mount is checked without a
        request to it (``WorkspaceMount.serving``; before a turn, whose
        ``turn-begin`` asks the mount anyway)."""
        if self.awake and self.worker is not None and self.worker.alive and self.mount.serving(quick):
            return
        await self._drop_worker()
        info = self.log.get(self.id)
        worker, self.spare = self.spare, None
        if worker is None or not worker.alive:
            worker = await self.host.spawn_worker(self.id, info["target"], info["cwd"])
        try:
            kind = worker.info.get("entity_type")
            if info.get("entity_type") and kind != info["entity_type"]:
                raise AgentLoadError(f"agent {self.id!r} holds state of kind {info['entity_type']!r}, but "
                                     f"{info['target']} has State._entity_type {kind!r}")
            await self.mount.ensure(self.host.store, self.host.start_timeout)
            await self._close_label()
            if worker.info.get("atomic_turns", True):
                await self._undo_lost_turn()
            state = self.log.state_at(self.id)
            started = await worker.request({"op": "start", "workspace": str(self.mount.mountpoint),
                                            "state": state.state, "version": state.version,
                                            "env": class_environment(worker.info.get("env"))},
                                           "started", self.host.start_timeout)
        except BaseException:
            await worker.stop()
            raise
        self.worker = worker
        self.awake = True
        fields: dict[str, Any] = {"status": "running", "state_version": started["version"]}
        if worker.info.get("quota_keys") or info.get("quota_keys"):
            fields["quota_keys"] = worker.info.get("quota_keys") or []
        self.log.update(self.id, **fields)
        for key, until in self.host.quota_state().items():
            await worker.send({"op": "quota", "key": key, "until": until})
        migrated = started.get("migrated_from")
        await self.hook("init", force=migrated is not None,
                        extra={"migrated_from": migrated} if migrated is not None else None)
        if not self.awake:
            raise AgentError(f"the worker of agent {self.id!r} died during on_init (or its turn could not be "
                             f"recorded); see {self.host.worker_log(self.id)}")
        if self.mount.standby is not None:
            self.mount.standby.prepare()        # a daemon ready for the next wake (now, not during this one)

    async def _idle(self) -> None:
        if not self.awake:
            return
        if self.worker is None or not self.worker.alive:
            await self._sleep("sleeping")
            return
        done = await self.hook("idle")
        if done["status"] == "completed" and done.get("result"):
            log.info("agent %r: idle for %ss, scaling to zero", self.id, self.host.idle_timeout)
            await self._sleep("sleeping")

    async def stop(self) -> None:
        """Graceful stop: ``on_shutdown``, then sleep (sync, stop the worker, unmount)."""
        if self.awake and self.worker is not None and self.worker.alive:
            try:
                await self.hook("shutdown")
            except ChronicleError as exc:
                log.warning("agent %r: on_shutdown could not run: %s", self.id, exc)
        await self._sleep("stopped")

    async def scale_to_zero(self) -> None:
        """Sleep now (``Runtime.signal_idle``), without asking ``on_idle_timeout``."""
        if self.awake:
            await self._sleep("sleeping")

    async def _sleep(self, status: str) -> None:
        await self._drop_worker()
        if self.spare is not None:
            await self.spare.stop()
            self.spare = None
        await asyncio.to_thread(self.host.store.sync)     # make the turn log durable
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

    # -- turn commands on the workspace's ctl ---------------------------------------------

    async def _turn_command(self, command: dict, fields: dict, quiet: bool = False) -> dict | None:
        """``command`` with ``fields`` (a record, a snapshot); fields too long for
        one ctl line go ahead in ``turn-data`` pieces on the same handle.
        ``quiet``: no reply read if it succeeds (None; ``chronicle.fs.ctl``)."""
        full = {**command, **fields}
        if len(json.dumps(full, separators=(",", ":"))) < CTL_LINE - 1024:
            return await self.mount.control(full, quiet=quiet)
        text = json.dumps(fields, separators=(",", ":"))           # ASCII: escaping at most doubles it
        for start in range(0, len(text), TURN_DATA_PIECE):
            await self.mount.control({"cmd": "turn-data", "data": text[start:start + TURN_DATA_PIECE]})
        return await self.mount.control({**command, "turn_data": len(text)})

    async def _close_label(self) -> None:
        """End a turn label an earlier runtime left open on the daemon (its
        ``running`` record, if any, becomes ``interrupted``)."""
        try:
            await self.mount.control({"cmd": "turn-end"})
        except InvalidArgument:
            pass                                # no turn open: the usual case

    async def _undo_lost_turn(self) -> None:
        """Undo the files of a message turn that an earlier runtime or mount
        daemon lost (recorded ``interrupted`` when its label was closed, so
        never undone at its end) — only if nothing was written after it."""
        record = self.log.record(self.id, self.log.get(self.id)["last_turn"])
        if record is None or record.get("kind") != "message" or record.get("status") != "interrupted":
            return
        begin, end = record.get("begin_seq"), record.get("end_seq")
        if record.get("undone") or begin is None or end is None or end < begin:
            return
        head = (await self.mount.control({"cmd": "sync"}))["seq"]
        if head == end:
            await self._restore(begin - 1)

    async def _turn_begin(self, turn: int, message_id: str | None, record: dict | None = None) -> dict:
        """``turn-begin`` (with the ``running`` record, if given: then quiet,
        its ``seq`` read from the record); a label left open (a ``turn-end``
        that failed) is ended first. Returns ``{"seq"}``: the head before the turn."""
        command = {"cmd": "turn-begin", "agent": self.id, "turn": turn, "message_id": message_id}
        if self.worker is not None and self.worker.info.get("track_reads") is False:
            command["track_reads"] = False            # the class's track_reads: no read-set for its turns
        fields = {"record": record} if record is not None else {}
        try:
            reply = await self._turn_command(command, fields, quiet=record is not None)
        except InvalidArgument as exc:
            if "still open" not in str(exc):
                raise
            await self._close_label()
            reply = await self._turn_command(command, fields, quiet=record is not None)
        if reply is None:                       # quiet: the running record is there
            running = self.log.record(self.id, turn) or {}
            return {"seq": running["begin_seq"] - 1}
        return reply

    async def _turn_end(self, outcome: dict, snapshot: dict | None = None, keep: bool = False,
                        quiet: bool = False) -> dict | None:
        """``turn-end`` with the turn's outcome (and the state after it): the
        reply ``{"seq", "turn": label, "recorded"}`` (``quiet``: ``{}``, no
        reply read), or None if the daemon could not take it — then the turn
        is recorded ``interrupted`` when the label is next ended (module
        docstring) and the worker, whose state now runs ahead of the log, is
        stopped so the next turn reloads it."""
        fields: dict[str, Any] = {"record": outcome}
        if snapshot is not None:
            fields["snapshot"] = snapshot
        if keep:
            fields["keep"] = True
        try:
            reply = await self._turn_command({"cmd": "turn-end"}, fields, quiet=quiet)
            return {} if reply is None else reply
        except ChronicleError as exc:
            log.warning("agent %r: turn-end failed: %s", self.id, exc)
            await self._drop_worker()
            return None

    def _recorded(self, turn: int, outcome: dict, ended: dict | None) -> dict:
        """The turn's record as the store has it now, or (``turn-end`` failed)
        as it will be: ``interrupted``."""
        record = self.log.record(self.id, turn) if ended is not None else None
        if record is not None:
            return record
        error = "the turn's end could not be recorded (the mount daemon stopped)"
        return {**outcome, "turn": turn, "status": "interrupted", "error": outcome.get("error") or error,
                "patch": []}

    def _due(self, turn: int) -> bool:
        return turn % self.host.snapshot_every == 0

    def _snapshot(self, done: dict) -> dict | None:
        """The state snapshot the worker sent with ``done`` (when due), or None."""
        if "state" not in done or self.worker is None:
            return None
        return {"version": self.worker.info["version"], "entity_type": self.worker.info.get("entity_type"),
                "state": done["state"]}

    @staticmethod
    def _outcome(done: dict, started: float, reply_text: str, **fields: Any) -> dict:
        """The outcome ``turn-end`` records, from the worker's ``done``."""
        messages = done.get("messages")
        return {**fields, "status": done["status"], "patch": done.get("patch") or [], "error": done.get("error"),
                "usage": done.get("usage") or {}, "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "messages": messages if messages is not None else [reply_text] if reply_text else [],
                "reply": "\n".join(messages) if messages is not None else reply_text}

    # -- running on the worker ------------------------------------------------------------

    async def _run(self, cur: CurrentTurn, kind: str, turn: int, message_id: str | None, message: dict | None,
                   snapshot: bool, steps: list[dict] | None = None, init: bool = False) -> dict:
        """One ``run`` on the worker; returns its ``done`` (or a stand-in if the worker died).
        ``steps``: completed steps of earlier attempts; ``init``: ``on_init`` first (a new worker)."""
        cur.turn = turn
        if cur.cancel:
            return {"status": "cancelled", "patch": [], "messages": [], "usage": {}, "error": None}
        worker = self.worker
        assert worker is not None
        command: dict[str, Any] = {"op": "run", "kind": kind, "turn": turn, "message_id": message_id,
                                   "message": message, "snapshot": snapshot}
        if steps:
            command["steps"] = [{"name": s["name"], "result": s.get("result")} for s in steps]
        if init:
            command["init"] = True
        worker.channel.send_nowait(command)
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
                elif ev == "step":
                    await self._step(worker, event)
                elif ev == "quota":
                    if isinstance(event.get("key"), str) and isinstance(event.get("until"), (int, float)):
                        self.host.quota_hit(self.id, event["key"], float(event["until"]))
                elif ev == "idle":
                    cur.idle = True
                    if self._pending:           # queued before the worker said idle: that job wakes it
                        self._wake_up_idle(self._pending[0])
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

    async def _step(self, worker: WorkerProcess, event: dict) -> None:
        """Record a worker's completed step through ``ctl`` and answer ``stepped``."""
        name = event.get("name")
        try:
            reply = await self._turn_command({"cmd": "step", "name": name}, {"result": event.get("result")},
                                             quiet=True)
            answer = {"op": "stepped", "name": name, "seq": reply.get("seq") if reply is not None else None}
        except ChronicleError as exc:
            answer = {"op": "stepped", "name": name, "error": str(exc)}
        await worker.send(answer)

    async def _restore(self, seq: int) -> bool:
        """The whole tree back to ``seq`` (new events). Returns False (logged) if it failed."""
        try:
            try:
                await self.mount.control({"cmd": "restore", "at": seq})
            except Busy:                        # a dead worker's last writes not committed yet
                await self.mount.control({"cmd": "sync"})
                await self.mount.control({"cmd": "restore", "at": seq})
            return True
        except ChronicleError as exc:
            log.warning("agent %r: could not restore the workspace to seq %d: %s", self.id, seq, exc)
            return False

    async def _restart_worker(self) -> bool:
        """A new worker, started from the store, for a turn that runs again (no
        ``on_init`` turn: the re-run calls it). Returns False (logged) if it could not start."""
        await self._drop_worker()
        info, worker = self.log.get(self.id), None
        try:
            worker = await self.host.spawn_worker(self.id, info["target"], info["cwd"])
            state = self.log.state_at(self.id)
            await worker.request({"op": "start", "workspace": str(self.mount.mountpoint), "state": state.state,
                                  "version": state.version, "env": class_environment(worker.info.get("env"))},
                                 "started", self.host.start_timeout)
        except ChronicleError as exc:
            log.warning("agent %r: could not restart the worker to run the turn again: %s", self.id, exc)
            if worker is not None:
                await worker.stop()
            return False
        self.worker = worker
        self.awake = True
        return True

    async def cancel(self) -> CurrentTurn | None:
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

    async def _kill_after(self, cur: CurrentTurn, worker: WorkerProcess) -> None:
        await asyncio.sleep(self.host.cancel_grace)
        if self.current is cur and worker.alive:
            log.warning("agent %r: turn %s did not stop %.1fs after cancel; killing its worker",
                        self.id, cur.turn, self.host.cancel_grace)
            worker.signal_group(signal.SIGKILL)

    # -- turns ---------------------------------------------------------------------------

    async def hook(self, kind: str, force: bool = False, extra: dict | None = None) -> dict:
        """Run a lifecycle hook as a turn; the daemon keeps it in the log if it
        changed anything, failed or ``force``. Returns the worker's ``done``."""
        turn = self.log.get(self.id)["last_turn"] + 1
        started, begun = time.monotonic(), now_iso()
        await self._turn_begin(turn, None)
        # Not self.current: that is the message turn (if any) this hook runs for, which cancel() targets.
        done = await self._run(CurrentTurn(kind), kind, turn, None, None, snapshot=force or self._due(turn))
        outcome = self._outcome(done, started, "", kind=kind, time=begun, **(extra or {}))
        # The snapshot also after a failed on_init that migrated the state.
        ended = await self._turn_end(outcome, self._snapshot(done), keep=force)
        if ended is not None and ended.get("recorded") and outcome["status"] == "failed":
            log.warning("agent %r: %s failed: %s", self.id, kind, outcome["error"])
        return done

    async def message_turn(self, reply: Reply, kind: str = "message") -> dict:
        """One ``on_message`` turn (module docstring), or ``on_wake`` (``kind``
        "wake": a timer's); returns the Reply's result. Either cancels the
        agent's timer; a suspended turn (``ctx.sleep``/``pause``) stores the new
        one and the agent scales to zero."""
        cur = self.current = CurrentTurn("message", reply)
        suspend = None
        try:
            if self.log.get(self.id).get("timer") is not None:
                self.host.set_timer(self.id, None)
            await self.wake(quick=True)
            keys = (self.worker.info if self.worker is not None else {}).get("quota_keys") or []
            if keys and self.host.quota_until(keys) is not None:
                while (until := self.host.quota_until(keys)) is not None and not cur.cancel:
                    await asyncio.sleep(max(0.0, until - time.time()))      # (a quota backoff)
                await self.wake()
            turn = self.log.get(self.id)["last_turn"] + 1
            started = time.monotonic()
            record = {"kind": kind, "message": reply.message, "time": now_iso()}
            try:
                begun = await self._turn_begin(turn, reply.message_id, record)
            except StoreError:                  # the mount's daemon is gone: wake again (a new one), once
                log.warning("agent %r: its mount did not answer turn-begin; mounting it again", self.id)
                await self.wake()
                turn = self.log.get(self.id)["last_turn"] + 1
                begun = await self._turn_begin(turn, reply.message_id, record)
            reply.turn = turn
            assert self.worker is not None
            worker_info = self.worker.info
            try:
                done, attempts = await self._attempts(cur, turn, reply, begun["seq"], worker_info, kind)
            except BaseException as exc:
                done = {"status": "interrupted", "patch": [], "messages": None, "usage": {},
                        "error": f"the runtime failed during the turn: {exc}"}
                await self._turn_end(self._outcome(done, started, reply.text))
                raise
            extra: dict[str, Any] = {"attempts": attempts} if attempts > 1 else {}
            undo = done["status"] != "completed" and worker_info.get("atomic_turns", True)
            if undo:
                extra["undone"] = {"to_seq": begun["seq"]}
            if done["status"] == "completed" and isinstance(done.get("suspend"), dict):
                suspend = extra["suspend"] = timer_record(turn, done["suspend"])
            if done["status"] == "completed" and isinstance(done.get("compaction"), dict):
                extra["compaction"] = compaction_point(self.log, self.id, turn, done["compaction"])
            outcome = self._outcome(done, started, reply.text, **extra)
            ended = await self._turn_end(outcome, self._snapshot(done), quiet=not undo)
            record = self._recorded(turn, outcome, ended)
            if undo and ended is not None and ended["turn"]["end_seq"] >= ended["turn"]["begin_seq"]:
                # After the label's end: turn:AGENT:N keeps the attempt's tree; the undo carries no label.
                await self._restore(begun["seq"])
            if record["status"] == "failed":
                log.info("agent %r: turn %d failed: %s", self.id, turn, record["error"])
        finally:
            self.current = None
        result = {"agent": self.id, "turn": turn, "message_id": reply.message_id, "kind": kind,
                  "status": record["status"], "reply": record["reply"], "messages": record["messages"],
                  "error": record["error"], "usage": record["usage"]}
        if suspend is not None and record.get("status") == "completed":
            result["suspend"] = suspend
            self.host.set_timer(self.id, suspend)
        reply._finish(result)
        if suspend is not None and record.get("status") == "completed" and self.queue.empty():
            await self._sleep("sleeping")
        return result

    async def _attempts(self, cur: CurrentTurn, turn: int, reply: Reply, begin_seq: int,
                        worker_info: dict, kind: str = "message") -> tuple[dict, int]:
        """Run the message turn, again per the class's retry policy while it
        fails retryably (its worker died; an exception of ``retry_on``): each
        new attempt starts from the workspace at the last completed step's
        end (or the turn's start) and gets the completed steps. Returns the
        last ``done`` and the number of attempts."""
        policy = worker_info.get("retry") or {}
        max_attempts = policy.get("max_attempts", 1)
        attempt, steps, init = 1, None, False
        while True:
            done = await self._run(cur, kind, turn, reply.message_id, reply.message,
                                   snapshot=self._due(turn), steps=steps, init=init)
            retryable = done["status"] == "interrupted" or (done["status"] == "failed" and done.get("retry"))
            if not retryable or cur.cancel or attempt >= max_attempts:
                return done, attempt
            delay = min(policy.get("max_delay", 10.0), policy.get("initial_delay", 0.1)
                        * policy.get("backoff", 2.0) ** (attempt - 1)) \
                * (1 + policy.get("jitter", 0.0) * random.uniform(-1.0, 1.0))
            log.info("agent %r: turn %d attempt %d ended %s; running it again in %.2fs", self.id, turn,
                     attempt, done["status"], delay)
            await asyncio.sleep(max(0.0, delay))
            record = self.log.record(self.id, turn) or {}
            steps = record.get("steps") or []
            if not await self._restore(steps[-1]["seq"] if steps else begin_seq):
                return done, attempt
            init = self.worker is None or not self.worker.alive
            if init and not await self._restart_worker():
                return done, attempt
            attempt += 1

    async def rollback(self, to: int) -> dict:
        """Files and state back to the end of turn ``to``, as a new ``rollback``
        turn; returns its record. Raises :class:`NotFound` (no such turn, or
        one whose end was not recorded), :class:`Busy` (it has not ended)."""
        found = self.log.lineage_record(self.id, to)
        owner, target_record = found if found is not None else (self.id, None)
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
        await self.mount.ensure(self.host.store, self.host.start_timeout)
        if not self.awake:
            await self._close_label()
        turn = self.log.get(self.id)["last_turn"] + 1
        started = time.monotonic()
        await self._turn_begin(turn, None, {"kind": "rollback", "rollback_to": to, "time": now_iso()})
        done: dict = {"status": "completed", "patch": [], "messages": [], "usage": {}, "error": None}
        try:
            await self.mount.control({"cmd": "restore", "at": f"turn:{owner}:{to}"})
        except ChronicleError as exc:
            done.update(status="failed", error=str(exc))
        snapshot = None
        if done["status"] == "completed":
            state, version = target.state, target.version
            if self.awake and self.worker is not None and self.worker.alive:
                try:
                    loaded = await self.worker.request({"op": "load", "state": state, "version": version},
                                                       "state", self.host.start_timeout)
                    state, version = loaded["state"], loaded["version"]
                except ChronicleError as exc:
                    log.warning("agent %r: the worker could not load the rolled-back state (%s); "
                                "it restarts from the store", self.id, exc)
                    await self._drop_worker()
            done["patch"] = jsonpatch.make_patch(current.state, target.state).patch
            snapshot = {"version": version, "entity_type": target.entity_type, "state": state}
        outcome = self._outcome(done, started, "")
        record = self._recorded(turn, outcome, await self._turn_end(outcome, snapshot))
        if not self.awake:
            await self.mount.umount()
        return record


__all__ = ["AgentRunner", "CurrentTurn", "Job", "RunnerHost", "MessageJob", "RollbackJob", "SleepJob", "StopJob",
           "WakeJob", "take_agent_lock"]
