"""``chronicle agent serve``: one long-running coordinator for many agents, over local HTTP.

One :class:`~agent_runtime.runtime.Runtime` serves the agents of one store;
this module puts an HTTP API (aiohttp) in front of it, by default on
``http://127.0.0.1:8765``. Agents start on their first message, scale to zero
after ``--idle-timeout`` seconds and wake again, as the runtime does it.
While it runs, the coordinator is registered in ``<store>/run/agent-serve.json``
(:mod:`agent_runtime.client`), so ``chronicle agent chat/rollback/delete/cancel``
on the same store go through it instead of failing with "run by another
runtime process".

The API. Bodies and answers are JSON; ``{id}`` is an agent id; every error is
``{"error": "one line", "kind": "AgentNotFound"}`` with status 400 (bad
input: ``UsageError``, ``AgentLoadError``), 404 (``AgentNotFound``,
``NotFound``: no such agent or turn), 409 (``AgentExists``, ``Busy``), 503
(the coordinator is shutting down), 504 (a wait that timed out), 403 (not a
local client of its user, below) or 500; an unknown route or method is 404 or
405 with kind ``HTTPError``.

=======================================  ==========================================================
``GET  /``                               ``{"store", "pid", "agents": [ids running here]}``
``GET  /agents``                         every agent record of the store, with ``waiting``
                                         ("sleeping until T (reason)", "paused (reason)" or
                                         null) and ``quota`` (its keys in the registry)
``POST /agents``                         ``{"id", "target"?, "cwd"?}``: create the agent from
                                         ``target`` (``MODULE:CLASS``, imported from ``cwd``,
                                         default the directory serve was started in) or start
                                         an existing one (a ``target`` replaces its code). 201
                                         (created) or 200, the agent record
``GET  /agents/{id}``                    the agent record, with ``idle`` and ``turn_count``
``DELETE /agents/{id}``                  delete the agent, its workspace and its turn log
``POST /agents/{id}/messages``           body: the message (a JSON object); query
                                         ``message_id`` (optional). Streams
                                         ``application/x-ndjson``, one line per reply token as it
                                         is produced, ``{"token": "..."}``, then one last line
                                         ``{"result": {"agent", "turn", "message_id", "status",
                                         "reply", "messages", "error", "usage"}}``, or
                                         ``{"error", "kind"}`` if the turn could not start.
                                         ``X-Message-Id`` names the message
``POST /agents/{id}/send``               the same message, without waiting: 202
                                         ``{"agent", "message_id"}``
``GET  /agents/{id}/replies/{mid}``      a sent message's progress: ``{"message_id", "turn",
                                         "done", "text", "result"}`` (the last 1,000 messages)
``POST /agents/{id}/cancel``             cancel the running turn: ``{"cancelled": bool}``
``POST /agents/{id}/wait``               query ``timeout`` (s): wait until the agent has no
                                         running or queued turn: ``{"idle": true}`` (504 on time)
``GET  /agents/{id}/turns``              the turn list (as ``chronicle agent turns --json``)
``GET  /agents/{id}/turns/{n}``          one turn: ``{"turn", "message", "patch", "files",
                                         "reply", "status", ...}``
``GET  /agents/{id}/state``              query ``turn`` (default: the latest): the state JSON
``GET  /agents/{id}/history``            the conversation (messages and replies)
``POST /agents/{id}/rollback``           ``{"to": N}``: files and state back to turn N, as a new
                                         turn; the new turn record
``POST /agents/{id}/fork``               ``{"id": NEW, "at": N?}``: 201, the new agent's record
``POST /agents/{id}/shutdown``           stop the agent gracefully (``on_shutdown``, unmount);
                                         it starts again on its next message
``POST /agents/{id}/disconnect``         detach the clients streaming its replies: their
                                         streams end with ``{"disconnected": true,
                                         "message_id"}``; the turns go on (``/replies/{mid}``):
                                         ``{"disconnected": N}``
``POST /agents/{id}/idle``               scale the agent to zero now (``signal_idle``): the record
``GET  /agents/{id}/last-response``      ``{"reply": the last completed turn's reply or null}``
``GET  /agents/{id}/compactions``        the turns with a compaction point (``ctx.compact``)
``GET  /quotas``                         the quota registry: ``{key: {"until", "remaining_s",
                                         "backing_off", "hits", "last_agent"}}``
``POST /shutdown``                       stop the coordinator, as SIGTERM does: 202
=======================================  ==========================================================

Only its user: listening on a loopback address (the default), the server
answers only connections whose client socket belongs to the uid that runs it
(or to root), as the kernel's socket table (``/proc/net/tcp``) tells, since
the agents it starts run that user's code with that user's rights. It
refuses (403) any request carrying an ``Origin`` header, a ``Sec-Fetch-Site``
of ``cross-site`` or ``same-site``, or a ``Host`` that is not a loopback name,
so a web page open in a browser cannot drive it either (cross-site requests,
DNS rebinding); a request without a ``Host`` or with a malformed one is
refused with 400. A request aiohttp cannot parse at all (HTTP/1.1 without
``Host``, a broken request line) gets aiohttp's own plain-text 400; such bad
input is logged as one DEBUG line, never with a traceback. Listening on another address
(``--host``) drops the uid check (it cannot be made for remote clients) and
has no authentication at all.

Timers: on start the coordinator schedules every timer stored in the store
(``Runtime.start_timers``), so a sleeping agent wakes on time across restarts
(a timer due while no coordinator ran fires at once); the replies of the wake
turns are kept for ``/replies`` like sent messages.

Stopping: SIGINT, SIGTERM or ``POST /shutdown`` stop accepting requests, let
queued turns finish, run every agent's ``on_shutdown``, stop the workers and
unmount every workspace (``Runtime.close``), then exit. A second signal
cancels the running turns so the stop does not wait for them.

Threads: everything runs on one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from chronicle.errors import (Busy, ChronicleError, Exists, InvalidArgument, NotFound, StoreError,
                              UsageError)
from chronicle.store.history.turns import now_iso
from chronicle.store.store import check_workspace_name, default_store_path

from agent_runtime.client import ServeClient, registration_path
from agent_runtime.reply import Reply
from agent_runtime.runtime import Runtime

log = logging.getLogger("agent_runtime.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
REPLIES_KEPT = 1000
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}
_PORT = re.compile(r"[0-9]{1,5}")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _status(exc: ChronicleError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (Exists, Busy)):
        return 409
    if isinstance(exc, (UsageError, InvalidArgument)):
        return 400
    return 500


def _error(message: str, kind: str, status: int) -> web.Response:
    return _json({"error": " ".join(message.split()), "kind": kind}, status)


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def is_loopback(host: str) -> bool:
    """True if ``host`` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The host of a ``Host`` header (RFC 9110 §7.2: ``uri-host [":" port]``;
    an IPv6 address in brackets), or None if the header is malformed."""
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep:
            return None
    else:
        name, sep, port = header.partition(":")
        rest = sep + port
    if rest:
        port = rest[1:]
        if rest[0] != ":" or port and not (_PORT.fullmatch(port) and int(port) <= 65535):
            return None
    return name or None


class ProtocolLog(logging.LoggerAdapter):
    """aiohttp's server logger (``AppRunner(logger=...)``): a request aiohttp
    cannot parse is the client's bad input, logged as one DEBUG line without a
    traceback (aiohttp logs it with one, for every such request); every other
    exception as aiohttp logs it."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.logger.debug("refused a malformed HTTP request: %s", " ".join(str(exc_info.message).split()))
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


def _proc_address(host: str, port: int) -> str:
    """``host:port`` as ``/proc/net/tcp{,6}`` writes it: the address as native-endian 32-bit hex words."""
    if ":" in host:
        words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, host))
    else:
        words = struct.unpack("=I", socket.inet_aton(host))
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def peer_uid(transport) -> int | None:
    """The uid owning the client end of a loopback TCP connection, from the
    kernel's socket table (``/proc/net/tcp``: the line whose local address is
    the peer's and remote address ours); None if it cannot be told."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    peer = transport.get_extra_info("peername") if transport is not None else None
    if sock is None or not peer:
        return None
    local = sock.getsockname()
    try:
        want = (_proc_address(peer[0], peer[1]), _proc_address(local[0], local[1]))
        with open("/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                if (fields[1], fields[2]) == want:
                    return int(fields[7])
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return None


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be an integer, not {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be an integer, not {value!r}") from None


class Server:
    """The HTTP application over one runtime (module docstring)."""

    def __init__(self, rt: Runtime, *, cwd: str, loopback: bool, on_shutdown: Callable[[], None]):
        self.rt = rt
        self.cwd = cwd
        self.loopback = loopback
        self.closing = False
        self.uid = os.geteuid()
        self._request_shutdown = on_shutdown
        self.replies: OrderedDict[tuple[str, str], Reply] = OrderedDict()
        self.app = web.Application(middlewares=[self._guard], client_max_size=64 << 20)
        a = "/agents/{id}"
        self.app.add_routes([
            web.get("/", self.index),
            web.get("/agents", self.list_agents),
            web.post("/agents", self.start),
            web.get(a, self.agent),
            web.delete(a, self.delete),
            web.post(a + "/messages", self.message),
            web.post(a + "/send", self.send),
            web.get(a + "/replies/{mid}", self.reply_status),
            web.post(a + "/cancel", self.cancel),
            web.post(a + "/wait", self.wait),
            web.get(a + "/turns", self.turns),
            web.get(a + "/turns/{n}", self.show_turn),
            web.get(a + "/state", self.state),
            web.get(a + "/history", self.history),
            web.post(a + "/rollback", self.rollback),
            web.post(a + "/fork", self.fork),
            web.post(a + "/shutdown", self.shutdown_agent),
            web.post(a + "/disconnect", self.disconnect),
            web.post(a + "/idle", self.signal_idle),
            web.get(a + "/last-response", self.last_response),
            web.get(a + "/compactions", self.compactions),
            web.get("/quotas", self.quotas),
            web.post("/shutdown", self.shutdown),
        ])

    # -- plumbing ----------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if (request.headers.get("Origin") is not None
                or request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site")):
            return _error("requests from web pages are refused (this API is for local programs)", "Forbidden", 403)
        if self.loopback:
            host = request.headers.get("Host")
            if host is None:
                return _error("the request has no Host header", "BadRequest", 400)
            name = host_name(host)
            if name is None:
                return _error(f"malformed Host header {host!r}", "BadRequest", 400)
            if not is_loopback(name):
                return _error(f"the Host {host!r} is not a loopback name", "Forbidden", 403)
            uid = peer_uid(request.transport)
            if uid not in (self.uid, 0):
                who = "root" if self.uid == 0 else f"uid {self.uid} and root"
                return _error(f"only {who} may use this coordinator (it runs agents as uid {self.uid}), "
                              f"not uid {uid}", "Forbidden", 403)
        if self.closing:
            return _error("the coordinator is shutting down", "ShuttingDown", 503)
        try:
            return await handler(request)
        except ChronicleError as exc:
            return _error(str(exc), type(exc).__name__, _status(exc))
        except TimeoutError:
            return _error("timed out", "Timeout", 504)
        except web.HTTPException as exc:     # no such route or method: JSON like every other error
            if exc.status < 400:
                raise
            return _error(f"{exc.reason}: {request.method} {request.path}", "HTTPError", exc.status)
        except Exception as exc:            # a bug: logged with its traceback, answered, the server goes on
            log.exception("%s %s failed", request.method, request.path)
            return _error(f"internal error: {type(exc).__name__}: {exc}", "InternalError", 500)

    @staticmethod
    async def _body(request: web.Request, required: bool = True) -> Any:
        raw = await request.read()
        if not raw.strip():
            if required:
                raise UsageError("the request needs a JSON body")
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"the body is not JSON: {exc}") from None

    async def _object(self, request: web.Request, required: bool = True) -> dict:
        body = await self._body(request, required)
        if not isinstance(body, dict):
            raise UsageError(f"the body must be a JSON object, not {type(body).__name__}")
        return body

    def _remember(self, reply: Reply) -> None:
        self.replies[(reply.agent, reply.message_id)] = reply
        while len(self.replies) > REPLIES_KEPT:
            self.replies.popitem(last=False)

    # -- agents ------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return _json({"store": str(self.rt.store_path), "pid": os.getpid(),
                      "agents": sorted(a["id"] for a in self.rt.list_agents() if a["running_here"])})

    async def list_agents(self, request: web.Request) -> web.Response:
        return _json(self.rt.list_agents())

    async def start(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        agent, target, cwd = body.get("id"), body.get("target"), body.get("cwd") or self.cwd
        if not isinstance(agent, str) or not agent:
            raise UsageError('the body needs "id": the agent id')
        if target is not None and not isinstance(target, str):
            raise UsageError('"target" is MODULE:CLASS, a string')
        check_workspace_name(agent)               # (an agent id names its workspace) before it is looked up
        existed = self.rt.turn_log.exists(agent)
        record = await self.rt.start(agent, target, cwd=cwd)
        return _json(record, 200 if existed else 201)

    async def agent(self, request: web.Request) -> web.Response:
        agent = request.match_info["id"]
        record = self.rt.agent(agent)
        record.update(idle=self.rt.is_idle(agent), turn_count=self.rt.turn_count(agent))
        return _json(record)

    async def delete(self, request: web.Request) -> web.Response:
        agent = request.match_info["id"]
        await self.rt.delete(agent)
        return _json({"deleted": agent})

    # -- messages ----------------------------------------------------------------------

    async def _send(self, request: web.Request) -> Reply:
        message = await self._object(request)
        reply = await self.rt.send(request.match_info["id"], message, message_id=request.query.get("message_id"))
        self._remember(reply)
        return reply

    async def message(self, request: web.Request) -> web.StreamResponse:
        reply = await self._send(request)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                                               "X-Message-Id": reply.message_id})
        await response.prepare(request)
        try:
            try:
                async for token in reply:
                    await response.write(_line({"token": token}))
                if reply.detached and not reply.done:
                    final = {"disconnected": True, "message_id": reply.message_id}
                else:
                    final = {"result": await reply.result()}
            except ChronicleError as exc:
                final = {"error": " ".join(str(exc).split()), "kind": type(exc).__name__}
            await response.write(_line(final))
            await response.write_eof()
        except ConnectionError:
            log.info("the client of message %s went away; the turn goes on", reply.message_id)
        return response

    async def send(self, request: web.Request) -> web.Response:
        reply = await self._send(request)
        return _json({"agent": reply.agent, "message_id": reply.message_id}, 202)

    async def reply_status(self, request: web.Request) -> web.Response:
        agent, mid = request.match_info["id"], request.match_info["mid"]
        reply = self.replies.get((agent, mid))
        if reply is None:
            self.rt.agent(agent)
            raise NotFound(f"no message {mid!r} sent to agent {agent!r} through this coordinator "
                           "(or it is older than the last 1,000)")
        out = {"message_id": mid, "turn": reply.turn, "done": reply.done, "text": reply.text, "result": None}
        if reply.done:
            try:
                out["result"] = await reply.result()
            except ChronicleError as exc:
                out["error"], out["kind"] = str(exc), type(exc).__name__
        return _json(out)

    async def cancel(self, request: web.Request) -> web.Response:
        return _json({"cancelled": await self.rt.cancel(request.match_info["id"])})

    async def wait(self, request: web.Request) -> web.Response:
        timeout = request.query.get("timeout")
        try:
            seconds = float(timeout) if timeout else None
        except ValueError:
            raise UsageError(f"timeout must be a number of seconds, not {timeout!r}") from None
        await self.rt.wait_for_idle(request.match_info["id"], seconds)
        return _json({"idle": True})

    # -- history -----------------------------------------------------------------------

    async def turns(self, request: web.Request) -> web.Response:
        return _json(self.rt.turns(request.match_info["id"]))

    async def show_turn(self, request: web.Request) -> web.Response:
        return _json(self.rt.show_turn(request.match_info["id"], _int(request.match_info["n"], "a turn number")))

    async def state(self, request: web.Request) -> web.Response:
        turn = request.query.get("turn")
        return _json(self.rt.state(request.match_info["id"], _int(turn, "turn") if turn is not None else None))

    async def history(self, request: web.Request) -> web.Response:
        return _json(self.rt.history(request.match_info["id"]))

    async def rollback(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        if "to" not in body:
            raise UsageError('the body needs "to": the turn to roll back to')
        return _json(await self.rt.rollback(request.match_info["id"], _int(body["to"], '"to"')))

    async def fork(self, request: web.Request) -> web.Response:
        body = await self._object(request)
        new, at = body.get("id"), body.get("at")
        if not isinstance(new, str) or not new:
            raise UsageError('the body needs "id": the new agent id')
        record = await self.rt.fork(request.match_info["id"], new, _int(at, '"at"') if at is not None else None)
        return _json(record, 201)

    async def shutdown_agent(self, request: web.Request) -> web.Response:
        agent = request.match_info["id"]
        await self.rt.shutdown_agent(agent)
        return _json(self.rt.agent(agent))

    async def disconnect(self, request: web.Request) -> web.Response:
        return _json({"disconnected": self.rt.disconnect(request.match_info["id"])})

    async def signal_idle(self, request: web.Request) -> web.Response:
        agent = request.match_info["id"]
        await self.rt.signal_idle(agent)
        return _json(self.rt.agent(agent))

    async def last_response(self, request: web.Request) -> web.Response:
        return _json({"reply": self.rt.last_response(request.match_info["id"])})

    async def compactions(self, request: web.Request) -> web.Response:
        return _json(self.rt.compaction_indices(request.match_info["id"]))

    async def quotas(self, request: web.Request) -> web.Response:
        return _json(self.rt.quota_registry())

    async def shutdown(self, request: web.Request) -> web.Response:
        self._request_shutdown()
        return _json({"stopping": True}, 202)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port). Raises
    :class:`Busy` if the port is in use, :class:`UsageError` for a bad host."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # a restart need not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Busy(f"cannot listen on {host}:{port}: the port is in use (another `chronicle agent serve`? "
                       "choose one with --port)") from None
        raise StoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


async def serve(store: os.PathLike | str | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                announce: Callable[[str], None] = print, **runtime_options: Any) -> None:
    """Run the coordinator until SIGINT/SIGTERM or ``POST /shutdown``.

    ``store``: the store directory (default ``$CHRONICLE_HOME/store``, created
    if missing). ``announce`` gets one line once the server listens (with its
    URL); ``runtime_options`` go to :class:`Runtime`. Raises :class:`Busy` if
    the port is in use or another coordinator serves the store (both checked
    before the store is opened).
    """
    store_path = Path(store).absolute() if store is not None else default_store_path()
    other = ServeClient.for_store(store_path)
    if other is not None:
        raise Busy(f"a coordinator already serves {store_path} at {other.url}")
    sock = listen(host, port)
    try:
        rt = Runtime(store_path, **runtime_options)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            log.warning("second signal: cancelling the running turns")
            for record in rt.list_agents():
                if record["running_here"]:
                    loop.create_task(rt.cancel(record["id"], wait=False))

    server = Server(rt, cwd=os.getcwd(), loopback=is_loopback(host), on_shutdown=stop.set)
    rt.reply_listener = server._remember
    runner = web.AppRunner(server.app, handle_signals=False, access_log=None,
                           logger=ProtocolLog(logging.getLogger("aiohttp.server"), {}))
    registered = False
    try:
        await runner.setup()
        site = web.SockSite(runner, sock, shutdown_timeout=30.0)
        await site.start()
        bound = sock.getsockname()[1]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
        reg = registration_path(rt.store_path)
        reg.parent.mkdir(parents=True, exist_ok=True)
        tmp = reg.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": url, "host": host, "port": bound,
                                   "store": str(rt.store_path), "started": now_iso()}))
        os.replace(tmp, reg)
        registered = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        timers = rt.start_timers()
        if timers:
            log.info("scheduled the timers of %d sleeping agents", timers)
        announce(f"Serving the agents of {rt.store_path} at {url} (pid {os.getpid()}; Ctrl-C to stop)")
        await stop.wait()
        log.info("stopping: shutting every agent down")
        server.closing = True
        await site.stop()
    finally:
        try:
            await rt.close()
        finally:
            await runner.cleanup()
            sock.close()
            if registered:
                _unregister(rt.store_path)


def _unregister(store_path: Path) -> None:
    reg = registration_path(store_path)
    try:
        if json.loads(reg.read_text()).get("pid") == os.getpid():
            reg.unlink()
    except (OSError, ValueError):
        pass


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ProtocolLog", "Server", "host_name", "is_loopback", "listen", "peer_uid",
           "serve"]
