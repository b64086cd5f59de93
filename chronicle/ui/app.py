"""``chronicle ui``: the web timeline's HTTP server (aiohttp), its pages and its confirmed actions.

Pages are HTML rendered on the server (Jinja2 templates in ``templates/``,
Pygments for syntax highlighting and diffs, a little JavaScript in
``static/ui.js``); every route is listed in the package docstring
(:mod:`chronicle.ui`). Reads go to :mod:`chronicle.ui.data`; the four changes
(restore a file, take a snapshot, roll back an agent, fork an agent at a
turn) go to :mod:`chronicle.actions`, the code the CLI runs. A change is a
``GET`` that shows a confirmation page (it changes nothing) and the ``POST``
of its form.

Who may use it — the rules of ``chronicle agent serve``
(:mod:`agent_runtime.serve`, whose checks are reused): on a loopback address
only connections whose client socket belongs to the uid running the server
(or to root) are answered (the kernel's socket table); a ``Host`` that is not
a loopback name is refused (DNS rebinding); a request marked
``Sec-Fetch-Site: cross-site`` or ``same-site``, or carrying an ``Origin``
other than the server's own, is refused (403). A ``POST`` must also come from
the server's own origin (``Origin``, else ``Referer``) and carry the CSRF
token: the form field ``csrf`` equal to the per-server random token, which
is also set as a ``SameSite=Strict`` cookie and must match it (synchronizer
token plus double-submit cookie, OWASP CSRF Prevention Cheat Sheet).
Responses forbid framing and cross-origin scripts (``Content-Security-Policy:
default-src 'self'; frame-ancestors 'none'``).

Permissions: the pages show what the user running the server could read
(``chronicle.store.history.access``, :func:`invoking_user`), as the CLI does.

Errors: a :class:`ChronicleError` is an error page with one line and status
404 (``NotFound``), 403 (``PermissionDenied``), 409 (``Exists``, ``Busy``,
``StoreLocked``), 400 (``UsageError``, ``InvalidArgument``) or 500; a bug is
logged with its traceback and answered 500 with one line.

Threads: one asyncio event loop; store reads and the blocking actions run in
worker threads (``asyncio.to_thread``), the agent actions on the loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer, TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound

from chronicle import actions
from chronicle.errors import (Busy, ChronicleError, Exists, InvalidArgument, NotFound, PermissionDenied,
                              StoreLocked, UsageError)
from chronicle.store.history import points
from chronicle.store.history.access import Caller, invoking_user
from chronicle.store.history.views import HistoryViews
from chronicle.store.store import Store, check_workspace_name, default_store_path
from chronicle.ui import data

from agent_runtime.serve import ProtocolLog, host_name, is_loopback, listen, peer_uid

log = logging.getLogger("chronicle.ui")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8770
LOG_PAGE = 50                   # events per page of a workspace's log
HERE = Path(__file__).parent
_STYLE = "default"


def _status(exc: ChronicleError) -> int:
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (Exists, Busy, StoreLocked)):
        return 409
    if isinstance(exc, (UsageError, InvalidArgument)):
        return 400
    return 500


def _int(value: str | None, what: str, default: int | None = None) -> int:
    """A canonical non-negative number from a query or form field. Raises :class:`UsageError`."""
    if value is None or value == "":
        if default is None:
            raise UsageError(f"{what} is missing")
        return default
    number = points.parse_number(value)
    if number is None:
        raise UsageError(f"{what} must be a number (digits only), not {value!r}")
    return number


def _path(value: str | None) -> bytes:
    """A workspace path from a query field: relative, ``/``-separated, no ``.``/``..`` parts."""
    parts = [p for p in (value or "").split("/") if p]
    if any(p in (".", "..") for p in parts) or "\0" in (value or ""):
        raise UsageError(f"{value!r} is not a path inside the workspace")
    return os.fsencode("/".join(parts))


class UI:
    """The web timeline over one open store (module docstring)."""

    def __init__(self, store: Store, *, loopback: bool, port: int = 0, caller: Caller | None = None,
                 runtime_options: dict | None = None):
        self.store = store
        self.store_path = Path(store.path).absolute()
        self.loopback = loopback
        self.uid = os.geteuid()
        self.caller = caller or invoking_user()
        self.token = secrets.token_urlsafe(32)
        self.cookie = f"chronicle_ui_csrf_{port}"
        self.runtime_options = runtime_options or {}
        self.jinja = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                        autoescape=jinja2.select_autoescape(default=True),
                                        trim_blocks=True, lstrip_blocks=True)
        self.jinja.globals.update(url=self.url, store=str(self.store_path), csrf=self.token)
        self.jinja.filters.update(code=self.code_html, diff=self.diff_html, number=lambda n: f"{n:,}")
        self.formatter = HtmlFormatter(cssclass="hl", style=_STYLE)
        self.app = web.Application(middlewares=[self._guard], client_max_size=1 << 20)
        self.app.add_routes([
            web.get("/", self.index),
            web.get("/static/pygments.css", self.pygments_css),
            web.static("/static", HERE / "static", append_version=False),
            web.get("/agents/{agent}", self.agent),
            web.get("/agents/{agent}/turns/{n}", self.turn),
            web.get("/agents/{agent}/rollback", self.confirm_rollback),
            web.post("/agents/{agent}/rollback", self.rollback),
            web.get("/agents/{agent}/fork", self.confirm_fork),
            web.post("/agents/{agent}/fork", self.fork),
            web.get("/w/{ws}", self.workspace),
            web.get("/w/{ws}/file", self.file),
            web.get("/w/{ws}/tree", self.tree),
            web.get("/w/{ws}/restore", self.confirm_restore),
            web.post("/w/{ws}/restore", self.restore),
            web.get("/w/{ws}/snapshot", self.confirm_snapshot),
            web.post("/w/{ws}/snapshot", self.snapshot),
        ])

    # -- plumbing ------------------------------------------------------------------------

    @staticmethod
    def url(*parts: Any, **query: Any) -> str:
        """``/a/b?k=v``: each part quoted as one path segment; None query values left out."""
        path = "/" + "/".join(quote(str(p), safe="") for p in parts)
        pairs = {k: v for k, v in query.items() if v is not None and v != ""}
        return path + ("?" + urlencode(pairs) if pairs else "")

    def code_html(self, data_bytes: bytes, name: str) -> str:
        """Highlighted HTML of a file's content (Pygments; a lexer by file name, else plain text)."""
        text = data.as_text(data_bytes)
        if text is None:
            return Markup('<p class="note">binary content, not shown</p>')
        try:
            lexer = get_lexer_for_filename(name, text, stripnl=False)
        except ClassNotFound:
            lexer = TextLexer(stripnl=False)
        return Markup(highlight(text, lexer, self.formatter))

    def diff_html(self, text: str) -> str:
        """Highlighted HTML of a unified diff (Pygments' DiffLexer)."""
        return Markup(highlight(text, DiffLexer(stripnl=False), self.formatter))

    def page(self, template: str, status: int = 200, **context: Any) -> web.Response:
        html = self.jinja.get_template(template).render(**context)
        response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
        response.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")
        return response

    def _refuse(self, message: str, status: int) -> web.Response:
        return self.page("error.html", status, message=" ".join(message.split()), title="Refused")

    def _origin_ok(self, request: web.Request) -> bool:
        own = f"http://{request.headers.get('Host', '')}"
        origin = request.headers.get("Origin")
        if origin is not None:
            return origin == own
        referer = request.headers.get("Referer")
        return referer is not None and (referer == own or referer.startswith(own + "/"))

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
            return self._refuse("requests from other sites are refused", 403)
        if self.loopback:
            host = request.headers.get("Host")
            if host is None or host_name(host) is None:
                return self._refuse(f"malformed or missing Host header {host!r}", 400)
            if not is_loopback(host_name(host)):
                return self._refuse(f"the Host {host!r} is not a loopback name", 403)
            uid = peer_uid(request.transport)
            if uid not in (self.uid, 0):
                return self._refuse(f"only uid {self.uid} and root may use this web timeline, not uid {uid}", 403)
        if request.headers.get("Origin") is not None and not self._origin_ok(request):
            return self._refuse("requests from other origins are refused", 403)
        try:
            if request.method == "POST":
                await self._check_post(request)
            response = await handler(request)
        except ChronicleError as exc:
            return self.page("error.html", _status(exc), message=" ".join(str(exc).split()),
                             title=type(exc).__name__)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self.page("error.html", exc.status, message=f"{exc.reason}: {request.method} {request.path}",
                             title=str(exc.status))
        except Exception as exc:        # a bug: logged with its traceback, answered, the server goes on
            log.exception("%s %s failed", request.method, request.path)
            return self.page("error.html", 500, message=f"internal error: {type(exc).__name__}: {exc}",
                             title="Internal error")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def _check_post(self, request: web.Request) -> None:
        if not self._origin_ok(request):
            raise PermissionDenied("a change must come from this web timeline's own pages (no Origin or "
                                   "Referer of this server)")
        form = await request.post()
        sent, cookie = str(form.get("csrf", "")), request.cookies.get(self.cookie, "")
        if not (hmac.compare_digest(sent, self.token) and hmac.compare_digest(cookie, self.token)):
            raise PermissionDenied("the form's CSRF token is missing or stale: reload the page and try again")

    async def _thread(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def _views(self, workspace: str) -> HistoryViews:
        return HistoryViews(self.store.open_workspace(workspace), caller=self.caller)

    # -- pages ---------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        workspaces = await self._thread(data.workspace_tree, self.store)
        agents = await self._thread(data.agent_tree, self.store)
        return self.page("index.html", workspaces=workspaces, agents=agents, title="Chronicle")

    async def pygments_css(self, request: web.Request) -> web.Response:
        return web.Response(text=self.formatter.get_style_defs(".hl"), content_type="text/css")

    async def agent(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        page = _int(request.query.get("page"), "page", 0)
        turns = await self._thread(data.turn_page, self.store, name, page)
        return self.page("agent.html", name=name, t=turns, title=f"agent {name}")

    async def turn(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        number = _int(request.match_info["n"], "the turn number")
        detail = await self._thread(data.turn_detail, self.store, self.caller, name, number)
        return self.page("turn.html", name=name, number=number, d=detail, done=request.query.get("done"),
                         title=f"{name} turn {number}")

    async def workspace(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        views = await self._thread(self._views, name)
        head = views.ws.head_seq
        before = _int(request.query.get("before"), "before", head + 1)
        hi = min(before, head + 1) - 1
        lo = max(1, hi - LOG_PAGE + 1)
        events = await self._thread(data.log_events, views, lo, hi)
        choices = await self._thread(data.point_choices, views)
        return self.page("workspace.html", ws=name, record=self.store.workspace_record(name), head=head,
                         events=list(reversed(events)), lo=lo, hi=hi, choices=choices,
                         done=request.query.get("done"), title=f"workspace {name}")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        path = _path(request.query.get("path"))
        if not path:
            raise UsageError("give a file path (?path=...)")
        views = await self._thread(self._views, name)
        history = await self._thread(data.file_history, views, path)
        view = request.query.get("v")
        a, b = request.query.get("a"), request.query.get("b")
        shown = content = diff = None
        if view:
            shown = _int(view, "the version")
            content = await self._thread(data.version_content, views, path, shown)
        elif a or b or len(history["content"]) > 1:
            numbers = history["content"]
            a_no = _int(a, "version a", numbers[-2] if len(numbers) > 1 else (numbers[0] if numbers else 0))
            b_no = _int(b, "version b", numbers[-1] if numbers else 0)
            diff = await self._thread(data.version_diff, views, path, a_no, b_no)
            a, b = a_no, b_no
        return self.page("file.html", ws=name, path=os.fsdecode(path), h=history, shown=shown, content=content,
                         diff=diff, a=a, b=b, done=request.query.get("done"), title=os.fsdecode(path))

    async def tree(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        point = request.query.get("at", "").strip()
        path = _path(request.query.get("path"))
        views = await self._thread(self._views, name)
        listing = await self._thread(data.tree_listing, views, point or None, path)
        choices = await self._thread(data.point_choices, views)
        parents = []
        parts = listing["path"].split("/") if listing["path"] else []
        for i in range(len(parts)):
            parents.append(("/".join(parts[:i + 1]), parts[i]))
        return self.page("tree.html", ws=name, l=listing, choices=choices, parents=parents,
                         title=f"{name} at {point or 'head'}")

    # -- actions: a confirmation page (GET), then the change (POST) ----------------------

    async def confirm_rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        to = _int(request.query.get("to"), "the turn to roll back to")
        info, _owner, _record = await self._thread(data.agent_turn, self.store, name, to)
        return self.page("confirm.html", title="Roll back", action=self.url("agents", name, "rollback"),
                         fields={"to": to}, button=f"Roll back {name} to turn {to}",
                         text=f"Bring agent {name!r}'s files and state back to the end of turn {to}. This is "
                              f"recorded as a new turn after turn {info.get('last_turn')}: history is "
                              "never rewritten. The agent's worker is started for it if it is not running.",
                         back=self.url("agents", name, "turns", to))

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        form = await request.post()
        to = _int(form.get("to"), "the turn to roll back to")
        record = await actions.rollback_agent(self.store_path, name, to, **self.runtime_options)
        if record.get("status") != "completed":
            raise ChronicleError(f"the rollback of agent {name!r} to turn {to} failed: {record.get('error')}")
        raise web.HTTPSeeOther(self.url("agents", name, "turns", record["turn"],
                                        done=f"Rolled back to turn {to}: this is the new turn {record['turn']}"))

    async def confirm_fork(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        at = _int(request.query.get("at"), "the turn to fork at")
        await self._thread(data.agent_turn, self.store, name, at)         # NotFound before asking
        return self.page("confirm.html", title="Fork", action=self.url("agents", name, "fork"),
                         fields={"at": at}, ask="new", ask_label="New agent's name",
                         button=f"Fork {name} at turn {at}",
                         text=f"Create a new agent whose workspace is a copy-on-write fork of {name!r}'s at the end "
                              f"of turn {at} and whose state is the state after it; it runs the same code.",
                         back=self.url("agents", name, "turns", at))

    async def fork(self, request: web.Request) -> web.Response:
        name = request.match_info["agent"]
        form = await request.post()
        at = _int(form.get("at"), "the turn to fork at")
        new = str(form.get("new", "")).strip()
        check_workspace_name(new)
        await actions.fork_agent(self.store_path, name, new, at, **self.runtime_options)
        raise web.HTTPSeeOther(self.url("agents", new))

    async def confirm_restore(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        path = _path(request.query.get("path"))
        number = _int(request.query.get("version"), "the version")
        views = await self._thread(self._views, name)
        await self._thread(views.version, path, number)           # NotFound / PermissionDenied first
        shown = os.fsdecode(path)
        return self.page("confirm.html", title="Restore", action=self.url("w", name, "restore"),
                         fields={"path": shown, "version": number}, button=f"Restore {shown} to version {number}",
                         text=f"Bring {shown} in workspace {name!r} back to its version {number}. This is recorded "
                              "as a new version: history is never rewritten.",
                         back=self.url("w", name, "file", path=shown))

    async def restore(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        form = await request.post()
        path = _path(form.get("path"))
        number = _int(form.get("version"), "the version")
        done = await self._thread(self._change, actions.restore_version, self.store, name, path, number)
        what = "nothing to restore: it is that version already" if done.seq is None else f"restored at seq {done.seq}"
        raise web.HTTPSeeOther(self.url("w", name, "file", path=os.fsdecode(path), done=what))

    async def confirm_snapshot(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        snap = request.query.get("name", "").strip()
        points.check_snapshot_name(snap)
        head = (await self._thread(self._views, name)).ws.head_seq
        return self.page("confirm.html", title="Snapshot", action=self.url("w", name, "snapshot"),
                         fields={"name": snap}, button=f"Take snapshot {snap!r}",
                         text=f"Name the current state of workspace {name!r} (now seq {head}) {snap!r}.",
                         back=self.url("w", name))

    async def snapshot(self, request: web.Request) -> web.Response:
        name = request.match_info["ws"]
        form = await request.post()
        snap = str(form.get("name", "")).strip()
        seq = await self._thread(self._change, actions.take_snapshot, self.store, name, snap)
        raise web.HTTPSeeOther(self.url("w", name, done=f"snapshot {snap!r} at seq {seq}"))

    def _change(self, fn: Callable, *args: Any) -> Any:
        """A blocking action, then a sync of the store (as the CLI's close syncs)."""
        result = fn(*args)
        if self.store.dirty:
            self.store.sync()
        return result


async def serve(store: os.PathLike | str | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                announce: Callable[[str], None] = print, **runtime_options: Any) -> None:
    """Serve the web timeline of ``store`` (default ``$CHRONICLE_HOME/store``)
    until SIGINT or SIGTERM. ``announce`` gets one line with the URL once it
    listens; ``runtime_options`` go to the :class:`Runtime` of a rollback or
    fork. Raises :class:`StoreNotFound`, :class:`Busy` (the port is in use),
    :class:`UsageError` (a bad host)."""
    store_path = Path(store).absolute() if store is not None else default_store_path()
    try:
        sock = listen(host, port)
    except Busy:
        raise Busy(f"cannot listen on {host}:{port}: the port is in use (choose another with --port)") from None
    try:
        opened = Store.open(store_path)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    bound = sock.getsockname()[1]
    ui = UI(opened, loopback=is_loopback(host), port=bound, runtime_options=runtime_options)
    runner = web.AppRunner(ui.app, handle_signals=False, access_log=None,
                           logger=ProtocolLog(logging.getLogger("aiohttp.server"), {}))
    try:
        await runner.setup()
        site = web.SockSite(runner, sock, shutdown_timeout=5.0)
        await site.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/"
        announce(f"Serving the web timeline of {store_path} at {url} (pid {os.getpid()}; Ctrl-C to stop)")
        await stop.wait()
        await site.stop()
    finally:
        await runner.cleanup()
        sock.close()
        opened.close()


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "UI", "serve"]
