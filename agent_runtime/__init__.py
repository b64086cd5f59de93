"""The agent SDK: an agent's typed, recorded state (and, as they land, the agent runtime).

See SPEC.md §5. Only names that exist are exported.
"""

from chronicle.errors import StateError

from agent_runtime.delta_state import DeltaState

__all__ = ["DeltaState", "StateError"]
