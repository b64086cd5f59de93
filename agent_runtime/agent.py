"""What an agent's code sees: :class:`BaseAgent`, :class:`AgentContext`, :class:`Message`.

An agent is a :class:`BaseAgent` subclass with a nested ``State`` (a
:class:`~agent_runtime.delta_state.DeltaState` subclass) and async hooks::

    class MyAgent(BaseAgent):
        class State(DeltaState):
            count: int = 0

        async def on_message(self, ctx: AgentContext, message: dict) -> None:
            ctx.state.count += 1
            msg = await ctx.send_message("")
            await msg.stream_token(f"{ctx.state.count} messages so far", final=True)

The runtime builds one instance per worker process (``cls()``, no
arguments), calls ``on_init`` once after it starts, then ``on_message`` once
per message, one at a time; ``on_idle_timeout`` before scaling to zero (return
True to allow it) and ``on_shutdown`` on a graceful stop. Each call is a
*turn*: the state changes it records are committed when it returns, and
dropped (the state goes back to what it was before the call) when it raises
or is cancelled.

Replies: ``await ctx.send_message(text)`` starts a reply message and returns
a :class:`Message`; ``await msg.stream_token(token)`` delivers each token to
the caller at once; ``final=True`` ends the message. A turn may send several
messages; the turn's reply text is their texts joined by newlines (the
caller's token stream carries the same newline between messages).

The worker's current directory is the agent's workspace, so relative paths
and child processes (``subprocess``, shells, git) work in it; its absolute
path is ``ctx.workspace`` and ``$AGENT_WORKSPACE``.

Threads: a context belongs to the worker's event loop; call its methods from
the handler's task (``asyncio.to_thread`` code must not call them).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from chronicle.errors import UsageError

from agent_runtime.delta_state import DeltaState


class TokenSink(Protocol):
    """Where a context's reply tokens go (the worker's IPC channel, or a test's list)."""

    async def message(self, message: int) -> None: ...

    async def token(self, message: int, token: str, final: bool) -> None: ...


class _CollectingSink:
    """Keeps tokens in memory: a context used directly, without a runtime."""

    def __init__(self) -> None:
        self.tokens: list[tuple[int, str, bool]] = []

    async def message(self, message: int) -> None:
        pass

    async def token(self, message: int, token: str, final: bool) -> None:
        self.tokens.append((message, token, final))


class Message:
    """One reply message of a turn, streamed token by token."""

    def __init__(self, ctx: AgentContext, index: int) -> None:
        self._ctx = ctx
        self.index = index
        self.text = ""
        self.final = False

    async def stream_token(self, token: str, final: bool = False) -> None:
        """Append ``token`` and deliver it to the caller now; ``final`` ends the message.

        Raises :class:`~chronicle.errors.UsageError` for a token that is not a
        ``str`` or a message that already ended, or after the turn ended.
        """
        if not isinstance(token, str):
            raise UsageError(f"a token is a str, not {type(token).__name__}")
        if self.final:
            raise UsageError("this message has ended (a token was sent with final=True)")
        self._ctx._check_open()
        self.text += token
        self.final = bool(final)
        await self._ctx._sink.token(self.index, token, self.final)

    def __repr__(self) -> str:
        return f"<Message {self.index} {'final' if self.final else 'open'} {self.text[:40]!r}>"


class AgentContext:
    """The runtime as one agent sees it during a turn (and in the hooks).

    ``agent_id``: the agent's name; ``workspace``: absolute path of its mounted
    workspace; ``state``: its :class:`DeltaState`; ``turn``/``message_id``: the
    current turn's number and message id (None outside a turn); ``log``: a
    logger whose records go to the worker's log file.

    A runtime builds contexts itself; ``AgentContext(agent_id, workspace,
    state)`` without a ``sink`` makes one that keeps tokens in memory, to call
    an agent's hooks directly (tests, benchmarks).
    """

    def __init__(self, agent_id: str, workspace: str | os.PathLike, state: DeltaState,
                 sink: TokenSink | None = None) -> None:
        self.agent_id = agent_id
        self.workspace = os.fspath(workspace)
        self.state = state
        self.turn: int | None = None
        self.message_id: str | None = None
        self.log = logging.getLogger(f"agent.{agent_id}")
        self._sink: Any = sink if sink is not None else _CollectingSink()
        self._messages: list[Message] = []
        self._usage: dict[str, int | float] = {}
        self._open = False

    # -- replies ---------------------------------------------------------------------

    async def send_message(self, text: str = "") -> Message:
        """Start a reply message; a non-empty ``text`` is delivered as its first token."""
        if not isinstance(text, str):
            raise UsageError(f"a message's text is a str, not {type(text).__name__}")
        self._check_open()
        message = Message(self, len(self._messages))
        self._messages.append(message)
        await self._sink.message(message.index)
        if text:
            await message.stream_token(text)
        return message

    @property
    def messages(self) -> list[Message]:
        """The messages sent in this turn so far."""
        return list(self._messages)

    @property
    def reply_text(self) -> str:
        """The turn's reply: its messages' texts joined by newlines."""
        return "\n".join(m.text for m in self._messages)

    # -- usage -------------------------------------------------------------------------

    def record_usage(self, input_tokens: int = 0, output_tokens: int = 0, **counters: int | float) -> None:
        """Add model usage to this turn (summed into the agent's totals by the runtime).

        Raises :class:`~chronicle.errors.UsageError` for a value that is not a
        non-negative number.
        """
        for name, value in {"input_tokens": input_tokens, "output_tokens": output_tokens, **counters}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise UsageError(f"usage {name!r} must be a non-negative number, not {value!r}")
            if value:
                self._usage[name] = self._usage.get(name, 0) + value

    @property
    def usage(self) -> dict[str, int | float]:
        """This turn's usage so far."""
        return dict(self._usage)

    # -- the runtime's side --------------------------------------------------------------

    def _begin(self, turn: int | None, message_id: str | None) -> None:
        self.turn = turn
        self.message_id = message_id
        self._messages = []
        self._usage = {}
        self._open = True

    def _end(self) -> None:
        self._open = False
        self.turn = None
        self.message_id = None

    def _check_open(self) -> None:
        if not self._open:
            raise UsageError("the turn has ended; a reply can only be sent while the handler runs")


class BaseAgent:
    """Base class of an agent (see the module docstring).

    ``State`` defaults to an empty state; override it with a nested
    :class:`DeltaState` subclass. Every hook may be ``async def`` (preferred:
    a cancel interrupts it at its next ``await``) or a plain method.
    """

    class State(DeltaState):
        _entity_type = "agent"

    async def on_init(self, ctx: AgentContext) -> None:
        """Called once after the runtime starts (or wakes) the agent's worker."""

    async def on_message(self, ctx: AgentContext, message: dict) -> None:
        """Handle one message (a JSON object). Override this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement on_message")

    async def on_idle_timeout(self, ctx: AgentContext) -> bool:
        """Called after the configured idle time; True lets the runtime scale the agent to zero."""
        return True

    async def on_shutdown(self, ctx: AgentContext) -> None:
        """Called on a graceful stop."""


__all__ = ["AgentContext", "BaseAgent", "Message", "TokenSink"]
