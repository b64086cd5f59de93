"""The agent SDK and runtime (SPEC §5).

Write an agent with :class:`BaseAgent`, :class:`AgentContext` and
:class:`DeltaState`; run agents with :class:`Runtime` (one worker process and
one versioned workspace per agent, turns recorded in the Chronicle store).
"""

from chronicle.errors import StateError

from agent_runtime.agent import AgentContext, BaseAgent, Message, RetryPolicy, TurnSuspended
from agent_runtime.delta_state import DeltaState
from agent_runtime.reply import Reply
from agent_runtime.runtime import Runtime

__all__ = ["AgentContext", "BaseAgent", "DeltaState", "Message", "Reply", "RetryPolicy", "Runtime", "StateError",
           "TurnSuspended"]
