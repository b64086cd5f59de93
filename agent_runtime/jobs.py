"""The runner's jobs: what waits in an agent's queue and runs between turns.

A :class:`Job` is one thing an :class:`~agent_runtime.runner.AgentRunner`
does, one at a time: a message (or a timer's wake) turn, a wake-up of the
agent, a rollback, a sleep (scale to zero now), a graceful stop. Its
``future`` gets the outcome.

Threads: jobs belong to the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from agent_runtime.reply import Reply

if TYPE_CHECKING:                       # (the runner imports this module)
    from agent_runtime.runner import AgentRunner


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
    """A message turn, or (``kind`` "wake") a timer's wake turn whose message is the wake event."""

    def __init__(self, reply: Reply, kind: str = "message"):
        super().__init__()
        self.reply = reply
        self.kind = kind

    async def run(self, runner: AgentRunner) -> None:
        result = await runner.message_turn(self.reply, self.kind)
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


class SleepJob(Job):
    """Scale the agent to zero now (``Runtime.signal_idle``), without asking ``on_idle_timeout``."""

    async def run(self, runner: AgentRunner) -> None:
        if runner.awake:
            await runner._sleep("sleeping")
        self.finish(None)


class StopJob(Job):
    async def run(self, runner: AgentRunner) -> None:
        await runner.stop()
        self.finish(None)

__all__ = ["Job", "MessageJob", "RollbackJob", "SleepJob", "StopJob", "WakeJob"]
