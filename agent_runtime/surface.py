"""The runtime's timers, quotas and the rest of the seed runtime's surface (SPEC §5, issue 8).

:class:`RuntimeSurface` is a base of :class:`~agent_runtime.runtime.Runtime`:
the methods here use the runtime's store, turn log and runners.

- ``start_timers()``: schedule every ``sleep`` timer stored in the store
  (``chronicle agent serve`` does on start); ``set_timer`` is the runners'
  (``RunnerHost``) way to store one. When a timer is due the agent gets a
  ``wake`` turn (``on_wake``); see :mod:`agent_runtime.timers`.
- ``quota_hit``/``quota_until``/``quota_state`` (``RunnerHost``) and
  ``quota_registry()``: the per-key quota backoff of this runtime.
- ``last_response``, ``compaction_indices``, ``disconnect``,
  ``signal_idle``/``wait_for_wakeup``.

Threads: the runtime's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from chronicle.errors import ChronicleError
from chronicle.store.history.turns import TurnLog

from agent_runtime.jobs import Job, MessageJob, SleepJob
from agent_runtime.reply import Reply
from agent_runtime.timers import QuotaRegistry, TimerScheduler, wake_event

if TYPE_CHECKING:                       # (runtime.py imports this module)
    from agent_runtime.runner import AgentRunner

log = logging.getLogger("agent_runtime")


class RuntimeSurface:
    """The methods above (module docstring); :class:`Runtime` provides the attributes."""

    #: Called with the Reply of every wake turn a timer starts (serve keeps them for ``/replies``).
    reply_listener: Callable[[Reply], None] | None = None

    turn_log: TurnLog
    quotas: QuotaRegistry
    _timers: TimerScheduler
    _runners: dict[str, AgentRunner]
    _closed: bool

    def _check_open(self) -> None: ...

    def _runner(self, agent_id: str) -> AgentRunner: ...

    async def _call(self, runner: AgentRunner, job: Job): ...

    def turns(self, agent_id: str) -> list[dict]: ...

    # -- timers, quotas and the seed's surface (agent_runtime.timers) -------------------

    def start_timers(self) -> int:
        """Schedule every ``sleep`` timer stored in the store (``chronicle agent
        serve`` does on start; a timer already due fires at once). Returns how many."""
        self._check_open()
        count = 0
        for record in self.turn_log.agents():
            timer = record.get("timer")
            if isinstance(timer, dict) and timer.get("kind") == "sleep":
                self._timers.schedule(record["id"], timer)
                count += 1
        return count

    def set_timer(self, agent_id: str, timer: dict | None) -> None:
        """Store (None: clear) the agent's timer in its record and schedule it (``RunnerHost``)."""
        self.turn_log.update(agent_id, timer=timer)
        if timer is None:
            self._timers.cancel(agent_id)
        elif not self._closed:
            self._timers.schedule(agent_id, timer)

    def _fire(self, agent_id: str, timer: dict) -> None:
        """A timer is due: queue the agent's ``wake`` turn (unless the timer changed meanwhile)."""
        try:
            if self._closed or self.turn_log.get(agent_id).get("timer") != timer:
                return
            runner = self._runner(agent_id)
        except ChronicleError as exc:
            log.warning("agent %r: its timer is due but it cannot be woken here: %s", agent_id, exc)
            return
        reply = Reply(agent_id, uuid.uuid4().hex, wake_event(timer))
        if self.reply_listener is not None:
            self.reply_listener(reply)
        runner.submit(MessageJob(reply, kind="wake"))

    def quota_hit(self, agent_id: str, key: str, until: float) -> None:
        """Record ``ctx.record_quota_hit`` and tell every running worker (``RunnerHost``)."""
        end = self.quotas.hit(key, until, agent_id)
        log.info("agent %r: quota key %r backs off for %.2fs", agent_id, key, end - time.time())
        for runner in self._runners.values():
            if runner.worker is not None and runner.worker.alive and runner.id != agent_id:
                asyncio.get_running_loop().create_task(runner.worker.send({"op": "quota", "key": key,
                                                                           "until": end}))

    def quota_until(self, keys: list[str]) -> float | None:
        """When the latest backoff among ``keys`` ends (epoch s), or None (``RunnerHost``)."""
        return self.quotas.until(keys)

    def quota_state(self) -> dict[str, float]:
        """Key -> backoff end (epoch s) of the keys backing off now (``RunnerHost``)."""
        return self.quotas.active()

    def quota_registry(self) -> dict[str, dict]:
        """Every quota key hit in this runtime: ``{key: {"until", "remaining_s",
        "backing_off", "hits", "last_agent"}}``."""
        return self.quotas.describe()

    def last_response(self, agent_id: str) -> str | None:
        """The reply of the agent's last completed message or wake turn, or None."""
        info = self.turn_log.get(agent_id)
        for turn in range(info["last_turn"], info.get("first_turn", 0), -1):
            rec = self.turn_log.record(agent_id, turn)
            if rec is not None and rec.get("kind") in ("message", "wake") and rec.get("status") == "completed":
                return rec.get("reply") or ""
        return None

    def compaction_indices(self, agent_id: str) -> list[int]:
        """The turns that recorded a compaction point (``ctx.compact``), oldest first."""
        self.turn_log.get(agent_id)
        return [rec["turn"] for rec in self.turn_log.records(agent_id) if rec.get("compaction")]

    def disconnect(self, agent_id: str) -> int:
        """Detach the clients streaming the agent's replies (running and queued
        turns): their token streams end now; the turns go on, their results
        stay in their :class:`Reply` (and the turn log). Returns how many were detached."""
        self.turn_log.get(agent_id)
        runner = self._runners.get(agent_id)
        if runner is None:
            return 0
        replies = [job.reply for job in runner.queued() if isinstance(job, MessageJob)]
        if runner.current is not None and runner.current.reply is not None:
            replies.insert(0, runner.current.reply)
        return sum(reply._detach() for reply in replies)

    async def signal_idle(self, agent_id: str) -> None:
        """Scale the agent to zero now, after its queued jobs, without asking
        ``on_idle_timeout`` (its timer, if any, stays)."""
        self._check_open()
        self.turn_log.get(agent_id)
        runner = self._runners.get(agent_id)
        if runner is not None:
            await self._call(runner, SleepJob())

    async def wait_for_wakeup(self, agent_id: str, timeout: float | None = None) -> dict | None:
        """Wait until the agent's next message or wake turn is recorded (by any
        runtime process; polled every 50 ms): its turn list entry
        (:meth:`turns`), or None after ``timeout`` seconds."""
        last = self.turn_log.get(agent_id)["last_turn"]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for rec in self.turn_log.records(agent_id, last + 1):
                if rec.get("kind") in ("message", "wake"):
                    return next(t for t in self.turns(agent_id) if t["turn"] == rec["turn"])
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)



__all__ = ["RuntimeSurface"]
