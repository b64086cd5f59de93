"""A sent message's reply, as the caller sees it: tokens as they stream, then a result.

``reply = await runtime.send(agent, message)`` returns at once with a
:class:`Reply`; ``async for token in reply`` yields each token as the agent
produces it (one consumer: tokens are handed out once), and ``await
reply.result()`` gives the turn's outcome::

    {"agent", "turn", "message_id", "kind": "message", "status", "reply",
     "messages", "error", "usage"}

``status`` is ``completed``, ``failed`` (the handler raised: ``error`` holds
the exception line), ``cancelled`` or ``interrupted`` (the worker died). A
reply whose message could not even start a turn (the agent's class cannot be
loaded, its workspace cannot be mounted) raises that error from
``result()`` and from the iteration.

``Runtime.disconnect`` detaches a reply (:attr:`detached`): its token
stream ends at once, the turn goes on, and ``text``/``result()`` still give
what it produced.

Threads: a Reply belongs to the runtime's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

_END = object()


class Reply:
    """See the module docstring."""

    def __init__(self, agent: str, message_id: str, message: dict):
        self.agent = agent
        self.message_id = message_id
        self.message = message
        self.turn: int | None = None
        self.text = ""
        self.detached = False
        self._tokens: asyncio.Queue[Any] = asyncio.Queue()
        self._result: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        # An error nobody asks for (send() and forget) is not "never retrieved" noise.
        self._result.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def done(self) -> bool:
        return self._result.done()

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The turn's outcome (module docstring), once the turn is recorded."""
        return await asyncio.wait_for(asyncio.shield(self._result), timeout)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            token = await self._tokens.get()
            if token is _END:
                self._tokens.put_nowait(_END)     # a second loop ends at once too
                if self._result.done() and not self._result.cancelled() and self._result.exception():
                    raise self._result.exception()
                return
            yield token

    # -- the runtime's side ---------------------------------------------------------------

    def _token(self, token: str) -> None:
        self.text += token
        if not self.detached:
            self._tokens.put_nowait(token)

    def _detach(self) -> bool:
        """End the token stream now (the turn goes on). True if it was still attached and running."""
        if self.detached or self.done:
            return False
        self.detached = True
        self._tokens.put_nowait(_END)
        return True

    def _finish(self, result: dict[str, Any]) -> None:
        if not self._result.done():
            self._result.set_result(result)
            if not self.detached:
                self._tokens.put_nowait(_END)

    def _fail(self, exc: BaseException) -> None:
        if not self._result.done():
            self._result.set_exception(exc)
            if not self.detached:
                self._tokens.put_nowait(_END)

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"<Reply {self.agent} turn={self.turn} {self.message_id} {state}>"


__all__ = ["Reply"]
