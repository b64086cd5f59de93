"""What an agent's runner needs from the runtime that hosts it: :class:`RunnerHost`.

:class:`~agent_runtime.runner.AgentRunner` drives one agent's turns; the
runtime (:class:`~agent_runtime.runtime.Runtime`) implements this protocol
for it — the store and turn log, the settings, the agent's paths, mounts and
workers, timers and quotas — and the runner knows nothing else of it.

Threads: everything here belongs to the coordinator's event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from chronicle.store.history.turns import TurnLog
from chronicle.store.store import Store

from agent_runtime.process import WorkerProcess, WorkspaceMount

if TYPE_CHECKING:
    from agent_runtime.runner import AgentRunner


class RunnerHost(Protocol):
    """What an :class:`AgentRunner` needs from the runtime that hosts it.

    ``store``: the open store (the runner syncs it and reads its mount
    registrations; its turns go through the mount's ``ctl``); ``turn_log``:
    the store's turn log, for agent records, turn records and states; the
    settings below, in seconds (``idle_timeout`` None: never scale to zero)
    and turns (``snapshot_every``).
    """

    store: Store
    turn_log: TurnLog
    idle_timeout: float | None
    start_timeout: float
    cancel_grace: float
    snapshot_every: int

    def workspace_mount(self, agent_id: str) -> WorkspaceMount:
        """A handle on the agent's workspace mount (not mounted yet)."""
        ...

    def worker_log(self, agent_id: str) -> Path:
        """The agent's worker log file."""
        ...

    async def spawn_worker(self, agent_id: str, target: str, cwd: str) -> WorkerProcess:
        """A new worker that has loaded ``target`` from ``cwd``. Raises
        :class:`AgentLoadError`, :class:`AgentError`."""
        ...

    def runner_finished(self, runner: AgentRunner) -> None:
        """``runner`` has ended (its queue failed; its lock is released next)."""
        ...

    def set_timer(self, agent_id: str, timer: dict | None) -> None:
        """Store (None: clear) the agent's timer (``ctx.sleep``/``pause``) and schedule its wake."""
        ...

    def quota_hit(self, agent_id: str, key: str, until: float) -> None:
        """An agent's ``ctx.record_quota_hit``: ``key`` backs off until ``until`` (epoch s)."""
        ...

    def quota_until(self, keys: list[str]) -> float | None:
        """When the latest backoff of ``keys`` ends (epoch s), or None if none backs off."""
        ...

    def quota_state(self) -> dict[str, float]:
        """Every key backing off now: key -> end (epoch s)."""
        ...


__all__ = ["RunnerHost"]
