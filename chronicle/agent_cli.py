"""``chronicle agent ...``: the agent runtime's commands (SPEC §5), thin over :class:`Runtime`.

Store: ``--store``, default ``$CHRONICLE_HOME/store`` as for ``chronicle
mount``. ``chat`` and ``serve`` create it if missing; the other commands need
an existing one.

Reads (``list``, ``turns``, ``show``, ``state``, ``stale``) open the store and work
whether the agent runs or not, in this process or another. Commands that
drive an agent (``chat``, ``rollback``, ``delete``, ``cancel``) go through
``chronicle agent serve`` when one serves the store (it runs the agents, and
one process at a time may run a given agent); without one they run a
:class:`Runtime` in this process, which starts the agent's worker and mounts
its workspace for as long as the command needs them.

Errors are :class:`ChronicleError`\\ s: the ``chronicle`` group
(``chronicle.cli``) prints each as one line and exits with its code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from chronicle import actions
from chronicle.errors import ChronicleError, UsageError
from chronicle.store.history.reads import ReadLog
from chronicle.store.store import check_workspace_name, default_store_path

from agent_runtime.client import ServeClient, error_from
from agent_runtime.runtime import Runtime

# -- options and helpers ----------------------------------------------------------------------


def _store_option(f):
    return click.option("--store", "-s", "store_opt", type=click.Path(path_type=Path), metavar="STORE",
                        help="Store directory (default: $CHRONICLE_HOME/store).")(f)


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def _agent_id(_ctx, _param, value: str | None) -> str | None:
    """A click callback: ``value`` if it can be an agent id (the name of its
    workspace), before anything looks it up. Raises :class:`UsageError`
    (``chronicle.store.store.check_workspace_name``: one line, exit 2)."""
    if value is not None:
        check_workspace_name(value)
    return value


def _store_path(store_opt: Path | None) -> Path:
    return Path(os.path.abspath(store_opt)) if store_opt is not None else default_store_path()


def _run(store_opt: Path | None, program, *, create: bool = False, **options: Any) -> Any:
    """``await program(rt)`` with a Runtime on the store; the runtime is always
    closed (its agents shut down gracefully, their workspaces unmounted)."""
    async def main():
        rt = Runtime(_store_path(store_opt), create_store=create, **options)
        try:
            return await program(rt)
        finally:
            await rt.close()
    return asyncio.run(main())


def _coordinator(store_opt: Path | None) -> ServeClient | None:
    """A client of the ``chronicle agent serve`` serving the store, if one runs."""
    return ServeClient.for_store(_store_path(store_opt))


def _isolation_option(f):
    return click.option("--no-isolation", "no_isolation", is_flag=True, envvar="CHRONICLE_NO_ISOLATION",
                        help="Run the agents' workers as this user in this mount namespace, as without "
                             "isolation (also $CHRONICLE_NO_ISOLATION=1). Default: each worker runs isolated "
                             "(needs root; see the README's Isolation section).")(f)


def _print_json(value: Any, indent: int | None = None) -> None:
    click.echo(json.dumps(value, indent=indent, ensure_ascii=False))


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _events(record: dict) -> int:
    begin, end = record.get("begin_seq"), record.get("end_seq")
    return max(0, end - begin + 1) if begin is not None and end is not None else 0


def parse_message(line: str) -> dict | None:
    """The message a line of ``chat`` input stands for: a JSON object as it is,
    any other line as ``{"text": line}``; None for a blank line (skipped)."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"text": text}


@click.group()
def agent() -> None:
    """Run agents, and read, roll back and fork their turns (SPEC §5)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="chronicle: %(levelname)s: %(message)s")


# -- chat -------------------------------------------------------------------------------------


class _Output:
    """Where a chat's replies go: tokens as they come (flushed), or JSON lines."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.open_line = False
        self.problems = 0

    def token(self, token: str) -> None:
        if self.as_json:
            click.echo(json.dumps({"token": token}, ensure_ascii=False))
        else:
            sys.stdout.write(token)
            self.open_line = not token.endswith("\n") if token else self.open_line
        sys.stdout.flush()

    def result(self, result: dict) -> None:
        if self.as_json:
            click.echo(json.dumps({"result": result}, ensure_ascii=False))
        elif self.open_line:
            sys.stdout.write("\n")
        self.open_line = False
        sys.stdout.flush()
        status = result.get("status")
        if status != "completed":
            self.problems += 1
            why = f": {result['error']}" if result.get("error") else ""
            click.echo(f"chronicle: turn {result.get('turn')} of agent {result.get('agent')!r} "
                       f"{'failed' if status == 'failed' else 'was ' + str(status)}{why}", err=True)


def _prompt(interactive: bool) -> None:
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()


def _stdin_queue(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Lines of stdin, then None at EOF. A daemon thread reads them, so a read
    that never returns (a terminal) does not keep the process alive; it reads
    the file descriptor itself, as a thread blocked inside ``sys.stdin.buffer``
    holds its lock and aborts the interpreter's shutdown."""
    queue: asyncio.Queue = asyncio.Queue()
    fd = sys.stdin.fileno()

    def put(item) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
            return True
        except RuntimeError:            # the loop is closed: the chat is over
            return False

    def read() -> None:
        pending = b""
        try:
            while chunk := os.read(fd, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    if not put(raw.decode("utf-8", "replace")):
                        return
        except OSError:
            pass
        if pending:
            put(pending.decode("utf-8", "replace"))
        put(None)

    threading.Thread(target=read, name="chat-stdin", daemon=True).start()
    return queue


async def _chat_here(rt: Runtime, agent_id: str, target: str, out: _Output) -> int | None:
    """The chat in this process; returns the signal number that ended it, if any."""
    await rt.start(agent_id, target, cwd=os.getcwd())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped_by: list[int] = []

    interactive = sys.stdin.isatty() and not out.as_json

    def on_signal(signum: int) -> None:
        if interactive:
            sys.stderr.write("\n")
        stopped_by.append(signum)
        stop.set()
        loop.create_task(rt.cancel(agent_id, wait=False))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    lines = _stdin_queue(loop)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            _prompt(interactive)
            get = asyncio.ensure_future(lines.get())
            await asyncio.wait({get, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            line = get.result()
            if line is None:
                break
            message = parse_message(line)
            if message is None:
                continue
            reply = await rt.send(agent_id, message)
            async for token in reply:
                out.token(token)
            out.result(await reply.result())
    finally:
        stopping.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return stopped_by[0] if stopped_by else None


def _chat_through(client: ServeClient, agent_id: str, target: str, out: _Output) -> int | None:
    """The chat through a running ``chronicle agent serve``."""
    client.start(agent_id, target, os.getcwd())

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    interactive = sys.stdin.isatty() and not out.as_json
    try:
        while True:
            _prompt(interactive)
            raw = sys.stdin.buffer.readline()
            if not raw:
                break
            message = parse_message(raw.decode("utf-8", "replace"))
            if message is None:
                continue
            for event in client.stream(agent_id, message):
                if "token" in event:
                    out.token(event["token"])
                elif "result" in event:
                    out.result(event["result"])
                else:
                    raise error_from(event, "the turn could not start")
    except KeyboardInterrupt:
        client.cancel(agent_id)
        return signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
        client.shutdown_agent(agent_id)
    return None


@agent.command()
@click.argument("target", metavar="MODULE:CLASS")
@click.option("--id", "agent_id", required=True, metavar="NAME", callback=_agent_id,
              help="The agent's id (created if missing).")
@_store_option
@_json_option
@_isolation_option
@click.pass_context
def chat(ctx: click.Context, target: str, agent_id: str, store_opt, as_json: bool, no_isolation: bool) -> None:
    """Chat with agent NAME running MODULE:CLASS: one message per line of stdin.

    MODULE is a dotted module importable from the current directory or a path
    to a .py file. A line holding a JSON object is the message; any other line
    is sent as {"text": LINE}; blank lines are skipped. Reply tokens are printed
    as they stream (with --json: {"token": ...} lines and a {"result": ...}
    line per message). At EOF the agent's on_shutdown runs and the command
    exits: 0, or 1 if a turn did not complete (its error goes to stderr).
    Ctrl-C cancels the running turn and ends the chat.
    """
    out = _Output(as_json)
    client = _coordinator(store_opt)
    if client is not None:
        stopped_by = _chat_through(client, agent_id, target, out)
    else:
        stopped_by = _run(store_opt, lambda rt: _chat_here(rt, agent_id, target, out), create=True,
                          isolation=not no_isolation)
    if stopped_by is not None:
        ctx.exit(128 + stopped_by)
    ctx.exit(1 if out.problems else 0)


# -- reads ------------------------------------------------------------------------------------


def _query(store_opt: Path | None, method: str, *args: Any) -> Any:
    """``Runtime.<method>(*args)``, a read of the store."""
    async def program(rt: Runtime) -> Any:
        return getattr(rt, method)(*args)
    return _run(store_opt, program)


@agent.command("list")
@_store_option
@_json_option
def list_agents(store_opt, as_json: bool) -> None:
    """List the store's agents (through the running `chronicle agent serve`, if
    any: its quota registry and running agents)."""
    client = _coordinator(store_opt)
    agents = client.call("GET", "/agents") if client is not None else _query(store_opt, "list_agents")
    if as_json:
        _print_json(agents)
        return
    if not agents:
        click.echo(f"No agents in {_store_path(store_opt)}", err=True)
        return
    rows = [["ID", "STATUS", "TURNS", "MESSAGES", "FORK OF", "MOUNTED", "CODE", "WAITING"]]
    for a in agents:
        parent = a.get("parent")
        waiting = [a["waiting"]] if a.get("waiting") else []
        waiting += [f"quota {key} backing off until {q['until']}" for key, q in (a.get("quota") or {}).items()
                    if q.get("backing_off")]
        rows.append([a["id"], a.get("status") or "-", str(a.get("last_turn", 0)), str(a.get("message_turns", 0)),
                     f"{parent['agent']}:{parent['turn']}" if parent else "-", "yes" if a.get("mounted") else "no",
                     a.get("target") or "-", "; ".join(waiting) or "-"])
    _table(rows, right={2, 3})


@agent.command()
@click.argument("name", callback=_agent_id)
@_store_option
@_json_option
def turns(name: str, store_opt, as_json: bool) -> None:
    """List agent NAME's turns, oldest first.

    STATUS is completed, failed, cancelled, interrupted (or running); PATCH
    counts the state's JSON Patch operations, FILES the file events of the
    turn; NOTE says "inherited from P" (a fork's turns before its fork turn),
    "undone" (a turn that did not complete, its files put back), how many
    durable steps and attempts it had.
    """
    records = _query(store_opt, "turns", name)
    if as_json:
        _print_json(records)
        return
    rows = [["TURN", "KIND", "STATUS", "TIME", "MS", "PATCH", "FILES", "MESSAGE ID", "NOTE"]]
    for t in records:
        ms = t.get("duration_ms")
        note = [f"inherited from {t['inherited']}"] if t.get("inherited") else []
        note += ["undone"] if t.get("undone") else []
        note += [f"{t['steps']} step(s)"] if t.get("steps") else []
        note += [f"{t['attempts']} attempts"] if (t.get("attempts") or 1) > 1 else []
        rows.append([str(t["turn"]), t.get("kind") or "-", t.get("status") or "-", t.get("time") or "-",
                     f"{ms:.0f}" if isinstance(ms, (int, float)) else "-", str(t.get("patch_ops", 0)),
                     str(t["events"]) if t.get("events") is not None else "-", t.get("message_id") or "-",
                     ", ".join(note) or "-"])
    _table(rows, right={0, 4, 5, 6})


def _event_text(ev: dict, label: dict) -> str:
    text = ev.get("path") or "."
    if ev.get("from") is not None:
        text += f" <- {ev['from']}"
    if ev.get("to") is not None:
        text += f" -> {ev['to']}"
    extra = [f"v{ev['version']}"] if ev.get("version") is not None else []
    if ev.get("size") is not None:
        extra.append(f"{ev['size']} B")
    if ev.get("turn") != label:
        turn = ev.get("turn")
        extra.append(f"turn {turn['agent']}:{turn['turn']}" if isinstance(turn, dict) else "no turn")
    return f"{ev.get('seq', '?'):>6}  {ev.get('event', ''):<9}  {text}" + (f" ({', '.join(extra)})" if extra else "")


@agent.command()
@click.argument("name", callback=_agent_id)
@click.argument("number", metavar="N", type=int)
@_store_option
@_json_option
def show(name: str, number: int, store_opt, as_json: bool) -> None:
    """Show turn N of agent NAME: its message, reply, state patch, file events
    and read-set (the file versions it read: path, version, seq, byte ranges,
    hash; none if the agent's class sets ``track_reads = False``)."""
    t = _query(store_opt, "show_turn", name, number)
    if as_json:
        _print_json(t, indent=2)
        return
    ms = t.get("duration_ms")
    click.echo(f"turn {t['turn']} of {name}: {t.get('kind')}, {t.get('status')}, {t.get('time')}"
               + (f", {ms:.0f} ms" if isinstance(ms, (int, float)) else ""))
    for key in ("inherited", "rollback_to", "forked_from", "migrated_from", "target", "attempts", "undone"):
        if t.get(key) is not None:
            click.echo(f"{key.replace('_', ' ')}: {_short(t[key], 200)}")
    if t.get("message") is not None:
        click.echo(f"message ({t.get('message_id')}): {json.dumps(t['message'], ensure_ascii=False)}")
    if t.get("reply"):
        click.echo("reply: " + t["reply"].replace("\n", "\n       "))
    if t.get("error"):
        click.echo(f"error: {t['error']}")
    if t.get("usage"):
        click.echo(f"usage: {json.dumps(t['usage'])}")
    click.echo(f"patch: {len(t['patch'])} operation(s)")
    for op in t["patch"]:
        value = f" {_short(json.dumps(op['value'], ensure_ascii=False))}" if "value" in op else ""
        source = f" from {op['from']}" if "from" in op else ""
        click.echo(f"  {op['op']:<8} {op['path']}{source}{value}")
    if t.get("steps"):
        click.echo(f"steps: {len(t['steps'])}")
        for step in t["steps"]:
            click.echo(f"  {step.get('seq', '?'):>6}  {step.get('name')}: "
                       f"{_short(json.dumps(step.get('result'), ensure_ascii=False))}")
    label = {"agent": t.get("inherited") or name, "turn": t["turn"], "message_id": t.get("message_id")}
    click.echo(f"files: {len(t['files'])} event(s)")
    for ev in t["files"]:
        click.echo("  " + _event_text(ev, label))
    click.echo(f"reads: {len(t['reads'])} file version(s)")
    if t["reads"]:
        rows = [["PATH", "VERSION", "SEQ", "BYTES", "SIZE", "RANGES", "HASH"]]
        for r in t["reads"]:
            ranges = ", ".join(f"{a}-{b}" for a, b in r["ranges"][:4]) + (" ..." if len(r["ranges"]) > 4 else "")
            rows.append([r["path"], _version_text(r), str(r["seq"]) if r.get("seq") is not None else "-",
                         str(r["bytes"]), str(r["size"]), ranges, (r.get("hash") or "-")[:16]])
        _table([["  " + row[0]] + row[1:] for row in rows], right={2, 3, 4})


def _version_text(read: dict) -> str:
    text = f"v{read['version']}" if read.get("version") is not None else "-"
    return text + " +own writes" if read.get("uncommitted") else text


@agent.command()
@click.argument("name", callback=_agent_id)
@_store_option
@_json_option
def stale(name: str, store_opt, as_json: bool) -> None:
    """List agent NAME's completed turns whose read files have changed since.

    A read file has changed when its content at the head differs from its
    content when the turn ended (a deleted file counts as changed). READ is
    the version the turn read, NOW the version at the head.
    """
    async def program(rt: Runtime) -> list[dict]:
        return ReadLog(rt.store).stale(name)
    turns = _run(store_opt, program)
    if as_json:
        _print_json(turns)
        return
    if not turns:
        click.echo(f"No stale turns of agent {name!r}", err=True)
        return
    rows = [["TURN", "PATH", "READ", "NOW"]]
    for t in turns:
        for c in t["changed"]:
            read, now = c["read"], c["now"]
            read_text = f"v{read['version']}" if read.get("version") is not None else (read.get("hash") or "?")[:12]
            now_text = "deleted" if now is None else (f"v{now['version']}" if now.get("version") is not None
                                                      else (now.get("hash") or "?")[:12])
            turn = f"{t['owner']}:{t['turn']}" if t["owner"] != name else str(t["turn"])
            rows.append([turn, c["path"], read_text, now_text])
    _table(rows, right={0})


@agent.command()
@click.argument("name", callback=_agent_id)
@click.option("--turn", "number", type=int, metavar="N", help="The state after turn N (default: the latest).")
@_store_option
@_json_option
def state(name: str, number: int | None, store_opt, as_json: bool) -> None:
    """Print agent NAME's state JSON after turn N (default: the latest)."""
    value = _query(store_opt, "state", name, number)
    _print_json(value, indent=None if as_json else 2)


# -- changes ----------------------------------------------------------------------------------


@agent.command()
@click.argument("name", callback=_agent_id)
@click.option("--to", "to", type=int, required=True, metavar="N", help="The turn to go back to.")
@_store_option
@_json_option
def rollback(name: str, to: int, store_opt, as_json: bool) -> None:
    """Bring agent NAME's files and state back to the end of turn N.

    Recorded as a new turn (the workspace gets a restore event); history is
    never rewritten.
    """
    record = asyncio.run(actions.rollback_agent(_store_path(store_opt), name, to))
    if as_json:
        _print_json(record)
    if record.get("status") != "completed":
        raise ChronicleError(f"the rollback of agent {name!r} to turn {to} failed: {record.get('error')}")
    if not as_json:
        click.echo(f"Rolled agent {name!r} back to turn {to}: new turn {record['turn']} "
                   f"({len(record.get('patch') or [])} state operation(s), {_events(record)} file event(s))")


@agent.command()
@click.argument("name", callback=_agent_id)
@click.argument("new", callback=_agent_id)
@click.option("--at", "at", type=int, metavar="N", help="The turn to fork at (default: the last ended one).")
@_store_option
@_json_option
def fork(name: str, new: str, at: int | None, store_opt, as_json: bool) -> None:
    """Fork agent NAME at the end of turn N as a new agent NEW.

    NEW's workspace is a copy-on-write fork of NAME's at that turn and its state
    is NAME's state after it; it runs the same code and starts on its first message.
    """
    record = asyncio.run(actions.fork_agent(_store_path(store_opt), name, new, at))
    if as_json:
        _print_json(record)
        return
    parent = record.get("parent") or {}
    click.echo(f"Forked agent {name!r} at turn {parent.get('turn')} as {new!r}")


@agent.command()
@click.argument("name", callback=_agent_id)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_store_option
def delete(name: str, yes: bool, store_opt) -> None:
    """Delete agent NAME: its workspace (all its file history) and its turn log."""
    _query(store_opt, "agent", name)          # AgentNotFound before asking
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete agent {name!r} without confirmation: stdin is not a terminal "
                             "(pass --yes)")
        click.confirm(f"Delete agent {name!r} with its workspace (all its file history) and its turn log?",
                      abort=True)
    client = _coordinator(store_opt)
    if client is not None:
        client.delete(name)
    else:
        _run(store_opt, lambda rt: rt.delete(name))
    click.echo(f"Deleted agent {name!r}")


@agent.command()
@click.argument("name", callback=_agent_id)
@_store_option
def cancel(name: str, store_opt) -> None:
    """Cancel agent NAME's running turn (through `chronicle agent serve`).

    The turn is recorded as cancelled and the state stays as before it. Only
    the coordinator that runs a turn can cancel it: a `chronicle agent chat`
    is cancelled with Ctrl-C.
    """
    client = _coordinator(store_opt)
    if client is None:
        _query(store_opt, "agent", name)      # AgentNotFound first
        raise ChronicleError(f"no `chronicle agent serve` is running for {_store_path(store_opt)}, so no turn of "
                             f"agent {name!r} can be cancelled from here (a `chronicle agent chat` is cancelled "
                             "with Ctrl-C)")
    if client.cancel(name):
        click.echo(f"Cancelled the running turn of agent {name!r}")
    else:
        click.echo(f"Agent {name!r} has no running turn")


# -- serve ------------------------------------------------------------------------------------


@agent.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL is printed).")
@click.option("--idle-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Scale an agent to zero after this long without messages (0: never).")
@click.option("--snapshot-every", default=100, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Keep a full state snapshot every N turns.")
@_store_option
@_isolation_option
def serve(host: str, port: int, idle_timeout: float, snapshot_every: int, store_opt, no_isolation: bool) -> None:
    """Run a coordinator for the store's agents with a local HTTP API.

    Agents are created with POST /agents and sent messages with POST
    /agents/ID/messages (the reply streams back as JSON lines); see the README
    and agent_runtime/serve.py for the whole API. On a loopback address only
    the user running it (and root) may use it. SIGINT or SIGTERM shuts every
    agent down gracefully and unmounts its workspace.
    """
    from agent_runtime import serve as server     # aiohttp is loaded only for this command

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not server.is_loopback(host):
        click.echo(f"chronicle: warning: listening on {host}, not a loopback address: the API has no "
                   "authentication, anyone who reaches it can run code as this user", err=True)

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    asyncio.run(server.serve(_store_path(store_opt), host, port, announce=announce,
                             idle_timeout=idle_timeout or None, snapshot_every=snapshot_every,
                             isolation=not no_isolation))


__all__ = ["agent", "parse_message"]
