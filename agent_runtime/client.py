"""A client of ``chronicle agent serve`` (:mod:`agent_runtime.serve`), and how to find one.

A running coordinator registers itself in ``<store>/run/agent-serve.json``
(``{"pid", "url", "host", "port", "store", "started"}``) and removes the file
when it stops; :func:`find_server` reads it and ignores a file whose process
is gone. :class:`ServeClient` speaks the HTTP API with the standard library
only (``urllib``), so the CLI does not load an HTTP framework to use it.

Errors: a request the coordinator refuses raises the :class:`ChronicleError`
subclass it names (``{"error", "kind"}`` in the answer), so a client sees the
same errors as a caller of :class:`~agent_runtime.runtime.Runtime`; a
coordinator that cannot be reached raises :class:`AgentError`.

Threads: plain blocking code; a client may be used from any one thread.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chronicle import errors, procs
from chronicle.errors import AgentError, ChronicleError

REGISTRATION = "agent-serve.json"


def registration_path(store_path: os.PathLike | str) -> Path:
    """Where the coordinator serving ``store_path`` registers itself."""
    return Path(store_path) / "run" / REGISTRATION


def find_server(store_path: os.PathLike | str) -> dict | None:
    """The registration of the live coordinator serving ``store_path``, or None."""
    try:
        info = json.loads(registration_path(store_path).read_text())
        pid = int(info["pid"])
        info["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if procs.alive(pid) else None


def error_from(body: Any, fallback: str) -> ChronicleError:
    """The :class:`ChronicleError` an error answer ``{"error", "kind"}`` names."""
    kind = body.get("kind") if isinstance(body, dict) else None
    message = body.get("error") if isinstance(body, dict) else None
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ChronicleError)):
        cls = ChronicleError
    return cls(message or fallback)


class ServeClient:
    """The HTTP API of one coordinator at ``url`` (``http://127.0.0.1:8765``)."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    @classmethod
    def for_store(cls, store_path: os.PathLike | str) -> ServeClient | None:
        """A client of the coordinator serving ``store_path``, or None if none
        runs (also when the registered process no longer answers at its URL:
        a coordinator killed with -9 leaves its file, and its pid may be reused)."""
        info = find_server(store_path)
        if info is None:
            return None
        client = cls(info["url"])
        try:
            answer = client.call("GET", "/", timeout=10.0)
        except AgentError:
            return None
        return client if isinstance(answer, dict) and answer.get("pid") == info["pid"] else None

    # -- requests ------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: Any = None, query: dict | None = None,
              timeout: float | None = None):
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read() or b"null")
            except ValueError:
                answer = None
            raise error_from(answer, f"the coordinator answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AgentError(f"cannot reach the agent coordinator at {self.url}: {reason}") from None

    def call(self, method: str, path: str, body: Any = None, query: dict | None = None,
             timeout: float | None = None) -> Any:
        """One request; the decoded JSON answer. Raises the error it names."""
        with self._open(method, path, body, query, timeout) as response:
            return json.loads(response.read() or b"null")

    def stream(self, agent: str, message: dict, message_id: str | None = None) -> Iterator[dict]:
        """Send ``message`` and yield the answer's lines as they arrive:
        ``{"token": ...}`` per reply token, then ``{"result": {...}}`` (or
        ``{"error", "kind"}`` if the turn could not start)."""
        path = f"/agents/{urllib.parse.quote(agent, safe='')}/messages"
        with self._open("POST", path, message, {"message_id": message_id}) as response:
            try:
                for line in response:
                    if line.strip():
                        yield json.loads(line)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise AgentError(f"lost the reply stream from the agent coordinator at {self.url}: "
                                 f"{type(exc).__name__}: {exc}") from None

    # -- the operations the CLI forwards --------------------------------------------------

    def agent_path(self, agent: str, tail: str = "") -> str:
        return f"/agents/{urllib.parse.quote(agent, safe='')}{tail}"

    def start(self, agent: str, target: str | None, cwd: str | None) -> dict:
        return self.call("POST", "/agents", {"id": agent, "target": target, "cwd": cwd})

    def cancel(self, agent: str) -> bool:
        return bool(self.call("POST", self.agent_path(agent, "/cancel"))["cancelled"])

    def rollback(self, agent: str, to: int) -> dict:
        return self.call("POST", self.agent_path(agent, "/rollback"), {"to": to})

    def fork(self, agent: str, new_agent: str, at: int | None) -> dict:
        return self.call("POST", self.agent_path(agent, "/fork"), {"id": new_agent, "at": at})

    def shutdown_agent(self, agent: str) -> None:
        self.call("POST", self.agent_path(agent, "/shutdown"))

    def delete(self, agent: str) -> None:
        self.call("DELETE", self.agent_path(agent))


__all__ = ["REGISTRATION", "ServeClient", "error_from", "find_server", "registration_path"]
