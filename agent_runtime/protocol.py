"""The coordinator ⇄ worker protocol: JSON lines over a Unix socket pair.

The coordinator (:mod:`agent_runtime.runtime`) makes a ``socketpair`` and
starts ``python -m agent_runtime.worker --fd N --agent ID --target T`` with
one end as fd N. Each side writes one JSON object per line (UTF-8, no
newline inside; a line may be large: a full state). The worker's stdout and
stderr are a log file, never the protocol.

Worker → coordinator (``ev``):

=================================================================  =================================================
``{"ev": "loaded", "pid", "entity_type", "version", "defaults",    the class imported; ``defaults`` is the default
``"atomic_turns", "retry", "quota_keys", "env", "track_reads"}``   state JSON (null if a field has no default);
                                                                   ``retry``: its ``RetryPolicy`` timings;
                                                                   ``env``: its ``worker_env`` names
``{"ev": "error", "kind", "error"}``                               fatal (bad MODULE:CLASS, bad stored state, a
                                                                   patch that does not apply); the worker exits
``{"ev": "started", "version", "migrated_from", "state"}``         the state is loaded; ``state`` (the migrated
                                                                   JSON) only if ``migrated_from`` is not null
``{"ev": "message", "turn", "message"}``                           a reply message starts (``message``: its index)
``{"ev": "token", "turn", "message", "token", "final"}``           one reply token, sent as soon as it is produced
``{"ev": "done", "turn", "status", "patch", "messages",            the end of a ``run``: ``status`` is
``"usage", "error", "result", "state", "retry",                    completed / failed / cancelled; ``patch`` the
``"suspend"?, "compaction"?}``                                     turn's JSON Patch ([] unless completed);
                                                                   ``state`` the full state JSON after the run when
                                                                   it asked for a snapshot; ``result`` the value
                                                                   ``on_idle_timeout`` returned (as a bool);
                                                                   ``retry``: the exception is one to retry;
                                                                   ``suspend``: ``{"kind": sleep|pause, "due",
                                                                   "reason"}``; ``compaction``: ``{"summary",
                                                                   "keep_last"}`` (``state`` then sent too)
``{"ev": "step", "turn", "name", "result"}``                       a ``ctx.step`` completed; the worker waits for
                                                                   ``stepped`` before the step returns
``{"ev": "state", "version", "state"}``                            answer to ``load``
``{"ev": "quota", "turn", "key", "until"}``                        ``ctx.record_quota_hit``: ``key`` backs off
                                                                   until ``until`` (epoch s); no answer
``{"ev": "idle", "turn"}``                                         ``ctx.signal_idle``: send ``wakeup`` when a
                                                                   message is queued for the agent
=================================================================  =================================================

Coordinator → worker (``op``):

=================================================================  =================================================
``{"op": "start", "workspace", "state", "version", "env"?}``       load the state (migrating an older version),
                                                                   enter the workspace, set ``env`` (the values
                                                                   of ``worker_env``); answered by ``started``
``{"op": "run", "kind", "turn", "message_id", "message",           one turn: ``kind`` is message / wake / init / idle /
``"snapshot", "steps"?, "init"?}``                                 shutdown; tokens, then ``done``; ``steps``:
                                                                   the completed steps of earlier attempts;
                                                                   ``init``: call ``on_init`` first
``{"op": "stepped", "name", "seq"?, "error"?}``                    the step is recorded (at ``seq``) or not (``error``)
``{"op": "cancel", "turn"}``                                       cancel that turn's task (its ``done`` says
                                                                   cancelled); ignored if it is not running
``{"op": "load", "state", "version"}``                             replace the state (rollback); answered by ``state``
``{"op": "quota", "key", "until"}``                                a key of the runtime backs off until ``until``
``{"op": "wakeup", "event"}``                                      answers ``idle``: ``ctx.wait_for_wakeup`` returns
``{"op": "exit"}``                                                 exit now (no hook); EOF does the same
=================================================================  =================================================

One ``run`` at a time: the coordinator sends the next ``run`` only after the
``done`` of the previous one. A worker that dies (EOF) during a ``run`` has
interrupted that turn.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from chronicle.errors import AgentError

LINE_LIMIT = 1 << 30        # one line may hold a whole state


class Channel:
    """One end of the socket pair as JSON lines (asyncio)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    def send_nowait(self, obj: dict[str, Any]) -> None:
        """Queue one line without waiting for the buffer to drain."""
        self.writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    async def send(self, obj: dict[str, Any]) -> None:
        """Send one line. Raises ``ConnectionError`` if the peer is gone."""
        self.send_nowait(obj)
        await self.writer.drain()

    async def receive(self) -> dict[str, Any] | None:
        """The next object, or None at EOF. Raises :class:`AgentError` on a bad line."""
        try:
            line = await self.reader.readline()
        except (ConnectionError, OSError):
            return None
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise AgentError(f"protocol error: {exc}") from None
        if not line:
            return None
        if not line.endswith(b"\n"):
            return None             # the peer died in the middle of a line
        try:
            obj = json.loads(line)
        except ValueError:
            raise AgentError(f"protocol error: not JSON: {line[:200]!r}") from None
        if not isinstance(obj, dict):
            raise AgentError(f"protocol error: not an object: {line[:200]!r}")
        return obj

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


__all__ = ["Channel", "LINE_LIMIT"]
