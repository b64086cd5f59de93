"""The runner's jobs: what waits in an agent's queue and runs between turns.

:class:`CurrentTurn` is the turn (or hook) a runner is running;
:func:`take_agent_lock` the lock one runtime process holds on an agent.
A :class:`Job` is one thing an :class:`~agent_runtime.runner.AgentRunner`
does, one at a time: a message (or a timer's wake) turn, a wake-up of the
agent, a rollback, a sleep (scale to zero now), a graceful stop. Its
``future`` gets the outcome.

Threads: jobs belong to the coordinator's event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chronicle.errors import AgentBusy

from agent_runtime.reply import Reply

if TYPE_CHECKING:                       # (the runner imports this module)
    from agent_runtime.runner import AgentRunner


@dataclass
class CurrentTurn:
    """The turn (or hook) being run; :meth:`AgentRunner.cancel` returns it."""

    kind: str
    reply: Reply | None = None
    turn: int | None = None
    cancel: bool = False
    run_sent: bool = False
    killer: asyncio.Task | None = None
    idle: bool = False          # the handler called ctx.signal_idle (a queued message wakes it up)


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
        await runner.scale_to_zero()
        self.finish(None)


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


__all__ = ["CurrentTurn", "take_agent_lock", "Job", "MessageJob", "RollbackJob", "SleepJob", "StopJob", "WakeJob"]
