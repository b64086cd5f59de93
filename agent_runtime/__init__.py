"""The agent SDK and runtime (SPEC §5).

Write an agent with :class:`BaseAgent`, :class:`AgentContext` and
:class:`DeltaState`; run agents with :class:`Runtime` (one worker process and
one versioned workspace per agent, turns recorded in the Chronicle store).

:class:`Runtime` (the coordinator, with the store, LMDB and the process
handling) is imported on first use (PEP 562 ``__getattr__``), so a worker
process — whose agent module does ``from agent_runtime import BaseAgent`` —
imports only the SDK: it starts sooner (a wake waits for it).
"""

from typing import TYPE_CHECKING, Any

from chronicle.errors import StateError

from agent_runtime.agent import AgentContext, BaseAgent, Message, RetryPolicy, TurnSuspended
from agent_runtime.delta_state import DeltaState
from agent_runtime.reply import Reply

if TYPE_CHECKING:
    from agent_runtime.runtime import Runtime

__all__ = ["AgentContext", "BaseAgent", "DeltaState", "Message", "Reply", "RetryPolicy", "Runtime", "StateError",
           "TurnSuspended"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from agent_runtime.runtime import Runtime
        return Runtime
    raise AttributeError(f"module 'agent_runtime' has no attribute {name!r}")
