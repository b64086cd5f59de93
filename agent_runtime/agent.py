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

Files: a turn that does not complete leaves the workspace as the previous
turn ended it (``atomic_turns``, default True; the attempt's files stay in
the history, at ``turn:AGENT:N``). Processes the handler started that are
still running when its turn ends are not killed: what they write later
carries no turn label (it belongs to no turn).

Durable steps: ``await ctx.step("fetch", fn, *args)`` records ``fn``'s JSON
result; a turn the runtime runs again (``retry_policy``) resumes after the
last completed step, with the files as they were at its end.

Replies: ``await ctx.send_message(text)`` starts a reply message and returns
a :class:`Message`; ``await msg.stream_token(token)`` delivers each token to
the caller at once; ``final=True`` ends the message. A turn may send several
messages; the turn's reply text is their texts joined by newlines (the
caller's token stream carries the same newline between messages).

The worker's current directory is the agent's workspace, so relative paths
and child processes (``subprocess``, shells, git) work in it; its absolute
path is ``ctx.workspace`` and ``$AGENT_WORKSPACE``.

Timers (the README's "Timers"): ``await ctx.sleep(seconds, reason)`` /
``await ctx.sleep_until(when, reason)`` / ``await ctx.pause(reason)`` end the
turn at once (code after them does not run; the turn is ``completed``, with
its state patch), the agent scales to zero and the runtime stores a durable
timer in the agent record; when it is due the runtime runs a ``wake`` turn,
``on_wake(ctx, event)`` (default: ``on_message(ctx, {"wake": event})``). A
message that arrives first wakes the agent at once and cancels the timer.
``pause`` sets no time: only a message wakes the agent.

Compaction: ``ctx.compact(summary, keep_last=N)`` records a compaction point
at the end of this turn (with a state snapshot): the message turns before it
but the last ``N`` are summarised by ``summary``.

Quotas: ``ctx.record_quota_hit(retry_after, key=K)`` tells the runtime that
key ``K`` (a model API, say) is rate-limited for ``retry_after`` seconds;
``await ctx.wait_for_quota(K)`` waits until that passes, in every agent of
the runtime, and the runtime starts no turn of an agent whose class lists
``K`` in ``quota_keys`` before then.

Idle: ``ctx.signal_idle()`` says the handler is waiting; ``await
ctx.wait_for_wakeup(timeout)`` returns the next wake-up (a message queued for
the agent: ``{"reason": "message", "message_id"}``) or None after ``timeout``
seconds.

Threads: a context belongs to the worker's event loop; call its methods from
the handler's task (``asyncio.to_thread`` code must not call them).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from chronicle.errors import UsageError

from agent_runtime.delta_state import DeltaState


class TokenSink(Protocol):
    """Where a context's reply tokens (and step records) go: the worker's IPC
    channel, or a test's list."""

    async def message(self, message: int) -> None: ...

    async def token(self, message: int, token: str, final: bool) -> None: ...

    async def step(self, name: str, result: Any) -> int | None:
        """Record a completed step; returns the workspace seq at its end (None without a runtime)."""
        ...

    def notify(self, event: dict) -> None:
        """Tell the runtime at once (no answer): ``{"ev": "quota", "key", "until"}``, ``{"ev": "idle"}``."""
        ...


class TurnSuspended(BaseException):
    """Raised by ``ctx.sleep``/``sleep_until``/``pause`` to end the handler; the
    worker records the turn completed. A BaseException, so that an agent's
    ``except Exception`` does not swallow it."""


@dataclass(frozen=True)
class RetryPolicy:
    """When to run something again: a turn (``BaseAgent.retry_policy``) or a
    step (``ctx.step(..., retry=RetryPolicy(...))``).

    ``max_attempts``: runs in all (1: no retry). The delay before attempt k+1
    is ``min(max_delay, initial_delay * backoff**(k-1))`` seconds, scaled by a
    random factor in ``[1 - jitter, 1 + jitter]``. ``retry_on``: the exception
    types that retry (any subclass); a turn whose worker process died
    (``interrupted``) always retries while attempts are left.
    """

    max_attempts: int = 1
    initial_delay: float = 0.1
    max_delay: float = 10.0
    backoff: float = 2.0
    jitter: float = 0.25
    retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise UsageError(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        for name in ("initial_delay", "max_delay", "backoff", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise UsageError(f"{name} must be a non-negative number, not {value!r}")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise UsageError("retry_on is a tuple of exception types")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after attempt ``attempt`` (1-based) failed."""
        base = min(self.max_delay, self.initial_delay * self.backoff ** max(0, attempt - 1))
        return max(0.0, base * (1 + self.jitter * random.uniform(-1.0, 1.0)))

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` is one of the types that retry."""
        return isinstance(exc, self.retry_on) if self.retry_on else False

    def to_json(self) -> dict:
        """The timing fields (what the coordinator needs; ``retry_on`` stays in the worker)."""
        return {"max_attempts": self.max_attempts, "initial_delay": self.initial_delay,
                "max_delay": self.max_delay, "backoff": self.backoff, "jitter": self.jitter}


class _CollectingSink:
    """Keeps tokens in memory: a context used directly, without a runtime."""

    def __init__(self) -> None:
        self.tokens: list[tuple[int, str, bool]] = []

    async def message(self, message: int) -> None:
        pass

    async def token(self, message: int, token: str, final: bool) -> None:
        self.tokens.append((message, token, final))

    async def step(self, name: str, result: Any) -> int | None:
        return None

    def notify(self, event: dict) -> None:
        pass


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
        self._recorded_steps: dict[str, Any] = {}     # name -> result, from an earlier attempt of this turn
        self._steps_run: set[str] = set()
        self._suspend: dict | None = None              # set by sleep/pause, sent with the turn's done
        self._compaction: dict | None = None
        self._quota: dict[str, float] = {}             # key -> backoff end (epoch s), kept across turns
        self._wakeup: asyncio.Future | None = None

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

    # -- durable steps -----------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, retry: RetryPolicy | None = None,
                   **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (a plain or ``async`` function) as the
        durable step ``name`` of this turn and return its result.

        The result (JSON: ``None``, bool, number, str, list, dict with str keys)
        is recorded in the turn log with the workspace seq at the step's end,
        before this returns. When the runtime runs the turn again (its worker
        died, or it raised an exception its ``retry_policy`` retries), the
        workspace is back at the last completed step's end and a completed
        step returns its recorded result without calling ``fn``. The
        keyword ``retry`` (not passed to ``fn``) retries ``fn`` itself in
        this process on the exception types it names. State changes made
        inside ``fn`` are not replayed: derive state from the result.

        Raises :class:`~chronicle.errors.UsageError` for a name used twice in
        the turn, a name that is not a non-empty str, a result that is not
        JSON, a call outside a turn; whatever ``fn`` raises (after its retries).
        """
        if not isinstance(name, str) or not name:
            raise UsageError(f"a step name is a non-empty str, not {name!r}")
        if not callable(fn):
            raise UsageError(f"step {name!r}: fn must be callable, not {type(fn).__name__}")
        self._check_open()
        if name in self._steps_run:
            raise UsageError(f"step {name!r} already ran in turn {self.turn}; step names are unique within a turn")
        self._steps_run.add(name)
        if name in self._recorded_steps:
            return self._recorded_steps[name]
        policy = retry or RetryPolicy()
        attempt = 1
        while True:
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                break
            except Exception as exc:
                if attempt >= policy.max_attempts or not policy.retries(exc):
                    raise
                self.log.info("step %r: attempt %d failed (%s); retrying", name, attempt, exc)
                await asyncio.sleep(policy.delay(attempt))
                attempt += 1
        try:
            text = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"step {name!r} returned {type(result).__name__}, which is not JSON: {exc}") from None
        result = json.loads(text)               # what a re-run gets back: the same value
        self._check_open()
        await self._sink.step(name, result)
        return result

    # -- timers ------------------------------------------------------------------------

    async def sleep(self, seconds: float, reason: str = "") -> None:
        """End the turn now and wake the agent in ``seconds`` (a non-negative
        number) with a ``wake`` turn (module docstring). Never returns: raises
        :class:`TurnSuspended`, which the worker turns into a completed turn.
        Raises :class:`UsageError` for a bad number or reason, outside a turn."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise UsageError(f"sleep seconds must be a non-negative number, not {seconds!r}")
        await self._suspend_turn("sleep", time.time() + seconds, reason)

    async def sleep_until(self, when: datetime, reason: str = "") -> None:
        """As :meth:`sleep`, until ``when`` (a ``datetime``; naive: local time;
        a time past wakes the agent at once)."""
        if not isinstance(when, datetime):
            raise UsageError(f"sleep_until takes a datetime, not {type(when).__name__}")
        await self._suspend_turn("sleep", when.timestamp(), reason)

    async def pause(self, reason: str = "") -> None:
        """End the turn now; the agent scales to zero and only a message wakes it."""
        await self._suspend_turn("pause", None, reason)

    async def _suspend_turn(self, kind: str, due: float | None, reason: str) -> None:
        if not isinstance(reason, str):
            raise UsageError(f"a reason is a str, not {type(reason).__name__}")
        self._check_open()
        self._suspend = {"kind": kind, "due": due, "reason": reason}
        raise TurnSuspended(kind)

    # -- compaction ----------------------------------------------------------------------

    def compact(self, summary: str, keep_last: int = 0) -> None:
        """Record a compaction point at the end of this turn: ``summary`` (a
        str) stands for the message turns before it but the last ``keep_last``
        (an int >= 0). The turn keeps a state snapshot.
        ``Runtime.compaction_indices`` lists these turns. Raises :class:`UsageError`."""
        if not isinstance(summary, str):
            raise UsageError(f"a summary is a str, not {type(summary).__name__}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise UsageError(f"keep_last must be an integer >= 0, not {keep_last!r}")
        self._check_open()
        self._compaction = {"summary": summary, "keep_last": keep_last}

    # -- quotas --------------------------------------------------------------------------

    def record_quota_hit(self, retry_after: float, key: str = "default") -> None:
        """Key ``key`` is rate-limited for ``retry_after`` seconds (a
        non-negative number): every agent of the runtime waits (module
        docstring). Raises :class:`UsageError`."""
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) \
                or not math.isfinite(retry_after) or retry_after < 0:
            raise UsageError(f"retry_after must be a non-negative number of seconds, not {retry_after!r}")
        if not isinstance(key, str) or not key:
            raise UsageError(f"a quota key is a non-empty str, not {key!r}")
        until = time.time() + retry_after
        self._quota[key] = max(until, self._quota.get(key, 0.0))
        self._sink.notify({"ev": "quota", "key": key, "until": until})

    def quota_until(self, key: str = "default") -> float | None:
        """When the backoff of ``key`` ends (epoch seconds), or None if it is not backing off."""
        until = self._quota.get(key)
        return until if until is not None and until > time.time() else None

    async def wait_for_quota(self, key: str = "default") -> float:
        """Wait until the backoff of ``key`` (recorded by any agent of the
        runtime) has passed; returns the seconds waited."""
        started = time.monotonic()
        while (until := self.quota_until(key)) is not None:
            await asyncio.sleep(until - time.time())
        return time.monotonic() - started

    # -- idle ------------------------------------------------------------------------------

    def signal_idle(self) -> None:
        """Tell the runtime this turn is idle, waiting for a wake-up (:meth:`wait_for_wakeup`)."""
        self._check_open()
        if self._wakeup is None or self._wakeup.done():
            self._wakeup = asyncio.get_running_loop().create_future()
        self._sink.notify({"ev": "idle"})

    async def wait_for_wakeup(self, timeout: float | None = None) -> dict | None:
        """After :meth:`signal_idle`: the next wake-up (a message queued for the
        agent, ``{"reason": "message", "message_id"}``), or None after
        ``timeout`` seconds (None: no limit)."""
        if self._wakeup is None:
            self.signal_idle()
        assert self._wakeup is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._wakeup), timeout)
        except TimeoutError:
            return None
        finally:
            if self._wakeup is not None and self._wakeup.done():
                self._wakeup = None

    def _woken(self, event: dict) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(event)

    # -- the runtime's side --------------------------------------------------------------

    def _begin(self, turn: int | None, message_id: str | None, steps: list[dict] | None = None) -> None:
        self.turn = turn
        self.message_id = message_id
        self._messages = []
        self._usage = {}
        self._open = True
        self._recorded_steps = {s["name"]: s.get("result") for s in steps or [] if isinstance(s, dict)}
        self._steps_run = set()
        self._suspend = None
        self._compaction = None
        self._wakeup = None

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

    #: A turn that does not complete (raises, is cancelled, its worker dies)
    #: leaves the workspace's files as at the end of the previous turn, like
    #: its state; False keeps what it wrote.
    atomic_turns: bool = True

    #: How the runtime runs a message turn again: after its worker died, or
    #: after an exception of ``retry_on``; completed ``ctx.step``s are reused.
    retry_policy: RetryPolicy = RetryPolicy()

    #: Quota keys the agent uses (``ctx.record_quota_hit``): while one backs
    #: off, the runtime starts none of its turns.
    quota_keys: tuple[str, ...] = ()

    #: Names of the runtime's environment variables the agent needs (an API
    #: key: ``("OPENAI_API_KEY",)``). A worker gets only the runtime's
    #: allowlist (``agent_runtime.process.WORKER_ENV``); these are set in its
    #: ``os.environ`` before ``on_init`` — after the module was imported, so
    #: read them in a hook, not at import time.
    worker_env: tuple[str, ...] = ()

    #: Record each turn's read-set: the file versions it (and its child
    #: processes) read through the workspace, kept at the turn's end
    #: (``chronicle agent show``/``agent stale``). False: none is kept, and
    #: files keep the kernel's page cache across the agent's turns.
    track_reads: bool = True

    async def on_init(self, ctx: AgentContext) -> None:
        """Called once after the runtime starts (or wakes) the agent's worker."""

    async def on_message(self, ctx: AgentContext, message: dict) -> None:
        """Handle one message (a JSON object). Override this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement on_message")

    async def on_wake(self, ctx: AgentContext, event: dict) -> None:
        """A timer (``ctx.sleep``) is due: ``event`` is ``{"reason", "kind": "sleep",
        "due", "set_in_turn", "late_s"}`` (``due``: ISO time). Default:
        ``on_message(ctx, {"wake": event})``."""
        outcome = self.on_message(ctx, {"wake": event})
        if inspect.isawaitable(outcome):
            await outcome

    async def on_idle_timeout(self, ctx: AgentContext) -> bool:
        """Called after the configured idle time; True lets the runtime scale the agent to zero."""
        return True

    async def on_shutdown(self, ctx: AgentContext) -> None:
        """Called on a graceful stop."""


__all__ = ["AgentContext", "BaseAgent", "Message", "RetryPolicy", "TokenSink", "TurnSuspended"]
