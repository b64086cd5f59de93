"""The ``chronicle`` command line (SPEC §2): parse, call the store, print.

Store selection: ``--store`` / ``--workspace`` if given; otherwise the mount
that a PATH argument (or the current directory) lies in (``chronicle.locate``);
otherwise ``$CHRONICLE_HOME/store`` and workspace ``default``. PATH arguments
are relative to the workspace root, or to the current directory inside a mount.

Read commands open the store without taking a workspace's writer lock, so they
work while a daemon has it mounted. Commands that change a mounted workspace
(``restore``, ``snapshot``) go through the mount's ``ctl`` file, so the daemon
(its only writer) applies them and the mount shows them at once.

Errors: a :class:`ChronicleError` is one line ``chronicle: error: ...`` and its
``exit_code``; bad arguments are click usage errors (exit 2); anything else is
one line ``chronicle: internal error: ...`` and exit 1 (a traceback only with
``--debug`` or ``CHRONICLE_DEBUG=1``).
"""

from __future__ import annotations

import asyncio
import difflib
import errno
import json
import logging
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import click
import lmdb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chronicle import actions, control, mounting
from chronicle.agent_cli import agent
from chronicle.errors import ChronicleError, InvalidArgument, NotFound, StoreError, UsageError
from chronicle.locate import Target, locate, select
from chronicle.store.fsck.checks import fsck as check_store
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc.policy import parse_duration
from chronicle.store.history import points, search
from chronicle.store.history.blame import blame as blame_of
from chronicle.store.history.access import invoking_user
from chronicle.store.history.points import TurnLabel
from chronicle.store.history.receipts import Receipts
from chronicle.store.history.views import HistoryViews, split_version
from chronicle.store.model import KIND_FILE, Actor
from chronicle.store.namespace.restore import restore_tree
from chronicle.store.namespace.workspace import Workspace
from chronicle.store.store import Store

READ_PIECE = 1 << 20            # bytes per read when streaming a version to stdout
DIFF_LIMIT = 32 << 20           # larger versions are compared, not diffed line by line
_DEBUG = "chronicle.debug"


# -- error handling ------------------------------------------------------------------------


class ChronicleGroup(click.Group):
    """Turns errors into one line and an exit code (module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ChronicleError as err:
            _report(ctx, f"chronicle: error: {_one_line(err)}", err.exit_code)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise                   # click quiets a closed stdout (`chronicle cat f | head`)
            _report(ctx, f"chronicle: error: {_one_line(exc)}", 1)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.InvalidError) as exc:
            _report(ctx, f"chronicle: error: the store's metadata is damaged ({type(exc).__name__}: "
                    f"{_one_line(exc)}); `chronicle fsck` names what, `chronicle fsck --repair` drops it", 1)
        except Exception as exc:        # noqa: BLE001 - the last line of defence
            _report(ctx, f"chronicle: internal error: {type(exc).__name__}: {_one_line(exc)}", 1)


def _report(ctx: click.Context, line: str, code: int) -> None:
    if ctx.meta.get(_DEBUG):
        traceback.print_exc()
    click.echo(line, err=True)
    ctx.exit(code)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# -- choosing the store, the workspace and the path ------------------------------------------


def _target(store_opt: Path | None, ws_opt: str | None, path: str | None = None) -> Target:
    return select(store_opt, ws_opt, path, default_workspace=mounting.DEFAULT_WORKSPACE)


def _in_mount(store_opt: Path | None, ws_opt: str | None, where: str | None) -> Target:
    """The target of a command whose optional PATH only says which mount to use."""
    if where is not None and locate(where) is None:
        raise UsageError(f"{where!r} is not inside a Chronicle mount")
    return _target(store_opt, ws_opt, where)


def _show_path(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "."


def _line(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\n"     # paths are os.fsdecode'd: give back their bytes


@contextmanager
def _open_store(target: Target):
    store = Store.open(target.store)
    try:
        yield store
    finally:
        store.close()


def _actor() -> Actor:
    return Actor(os.getuid(), os.getgid(), os.getpid())


def store_options(f):
    return click.option("--store", "-s", "store_opt", type=click.Path(path_type=Path), metavar="STORE",
                        help="Store directory (default: the mount you are in, else $CHRONICLE_HOME/store).")(f)


def workspace_options(f):
    f = click.option("--workspace", "-w", "ws_opt", metavar="NAME",
                     help="Workspace (default: the mount you are in, else 'default').")(f)
    return store_options(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def _out():
    return sys.stdout.buffer


@contextmanager
def _progress(description: str):
    """A ``progress(phase, done, total)`` callback that draws a bar on a terminal
    (stderr) and does nothing otherwise; ``total`` 0 or None shows a spinner."""
    if not sys.stderr.isatty():
        yield lambda *_args: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(phase: str, done: int, total: int | None) -> None:
            bar.update(task, description=f"{description}: {phase}", completed=done, total=total or None)

        yield update


# -- formatting ---------------------------------------------------------------------------------


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _event_line(ev: dict, seq_width: int) -> str:
    """One aligned text line of a log record or a path-history entry."""
    turn = ev.get("turn")
    label = f"{turn.get('agent')}:{turn.get('turn')}" if isinstance(turn, dict) else "-"
    version = f"v{ev['version']}" if ev.get("version") is not None else "-"
    size = str(ev["size"]) if ev.get("size") is not None else "-"
    digest = ev["hash"][:12] if ev.get("hash") else ("pruned" if ev.get("pruned") else "-")
    path = ev.get("path")
    text = "?" if path is None else (path or ".")
    if ev.get("from") is not None:
        text += f" <- {ev['from']}"
    if ev.get("to") is not None:
        text += f" -> {ev['to']}"
    if ev.get("target") is not None:
        text += f" -> {ev['target']}"
    details = [f"{k} {ev[k]}" for k in ("restored", "at", "paths", "mode", "uid", "gid", "name") if k in ev]
    if ev.get("exchange"):
        details.append("exchange")
    if details:
        text += " (" + ", ".join(details) + ")"
    return (f"{str(ev.get('seq', '?')).rjust(seq_width)}  {ev.get('time', '')}  {ev.get('event', ''):<11}  "
            f"{version:>5}  {size:>10}  {digest:<12}  {label:<12}  {text}")


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


# -- history helpers ------------------------------------------------------------------------------


def _parse_turn(_ctx, _param, value: str | None) -> TurnLabel | None:
    if value is None:
        return None
    try:
        return points.parse_turn_label(value)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc)) from None


def _read_all(store: Store, version) -> bytes:
    cm = store.content_map(version.entry.content)
    return cm.read(0, cm.size)


def _as_text(data: bytes) -> str | None:
    """``data`` as text, or None if it looks binary (a NUL near the start, or not UTF-8)."""
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _entry_time(version) -> str:
    try:
        return json.loads(b"{" + version.entry.fragment).get("time", "")
    except ValueError:
        return ""


# -- the commands ---------------------------------------------------------------------------------


@click.group(cls=ChronicleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chronicle", prog_name="chronicle")
@click.option("--debug", is_flag=True, envvar="CHRONICLE_DEBUG", help="Show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Chronicle: a versioned workspace filesystem for AI agents."""
    ctx.meta[_DEBUG] = debug


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--backend", default="file", show_default=True, metavar="file|s3://BUCKET/PREFIX",
              help="Where chunk data lives.")
@click.option("--shared-group", metavar="GROUP",
              help="Share the store with GROUP's members (directories 2770, files 0660); default: private "
                   "to you (0700/0600).")
def init(store: Path, backend: str, shared_group: str | None) -> None:
    """Create an empty store at STORE."""
    if backend.startswith("s3://"):
        raise ChronicleError("the S3 backend is not available yet; use --backend file")
    if backend != "file":
        raise UsageError(f"unknown backend {backend!r}: use 'file' or s3://BUCKET/PREFIX")
    path = Path(os.path.abspath(store))
    try:
        Store.init(path, shared_group=shared_group).close()
    except OSError as exc:
        raise StoreError(f"cannot create a store at {path}: {_one_line(exc)}") from None
    click.echo(f"Initialized an empty Chronicle store at {path}")


@cli.command()
@click.option("--store", "-s", "store_opt", type=click.Path(path_type=Path), metavar="STORE",
              help="Store directory (default $CHRONICLE_HOME/store, created if missing).")
@click.option("--workspace", "-w", default=mounting.DEFAULT_WORKSPACE, show_default=True, metavar="NAME",
              help="Workspace to mount (created on first mount).")
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted.")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def mount(store_opt: Path | None, workspace: str, foreground: bool, mountpoint: Path) -> None:
    """Mount a workspace at MOUNTPOINT."""
    store = Path(os.path.abspath(store_opt)) if store_opt is not None else None
    where = Path(os.path.abspath(mountpoint))
    mounting.mount(store, workspace, where, foreground=foreground)
    if not foreground:
        click.echo(f"Mounted workspace {workspace!r} at {where}")


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount(mountpoint: Path) -> None:
    """Flush and unmount MOUNTPOINT; waits for its daemon to exit."""
    mounting.umount(Path(os.path.abspath(mountpoint)))


@cli.command()
@click.argument("path", required=False)
@click.option("--since", metavar="T", help="From seq T, time T, or after snapshot/turn T.")
@click.option("--until", metavar="T", help="Up to seq, time, snapshot or turn T (inclusive).")
@click.option("--turn", metavar="AGENT:N", callback=_parse_turn, help="Only the events of that turn.")
@click.option("--changed-in", "changed_in", metavar="AGENT:N", callback=_parse_turn,
              help="The paths that turn changed (with --json: .chronicle/turns/AGENT/N).")
@workspace_options
@json_option
def log(path, since, until, turn, changed_in, store_opt, ws_opt, as_json) -> None:
    """History of PATH, or of the whole workspace (oldest first, newest last).

    T is a seq number, an ISO-8601 time, a snapshot name or turn:AGENT:N.
    """
    if changed_in is not None and (path, since, until, turn) != (None, None, None, None):
        raise click.UsageError("--changed-in takes no PATH, --since, --until or --turn")
    target = _target(store_opt, ws_opt, path)
    out = _out()
    with _open_store(target) as store:
        ws = store.open_workspace(target.workspace)
        views = HistoryViews(ws, caller=invoking_user())
        if changed_in is not None:
            doc = search.turn_changes(views, changed_in.agent, changed_in.number)
            out.write((json.dumps(doc) + "\n").encode() if as_json
                      else b"".join(_line(p) for p in doc["paths"]))
            return
        lo, hi = points.seq_range(ws, since, until, turn)
        width = len(str(ws.head_seq))
        if not target.path:
            for raw in views.log(lo, hi):
                out.write(raw + b"\n" if as_json else _line(_event_line(json.loads(raw), width)))
            return
        if as_json and (since, until, turn) == (None, None, None):
            out.write(views.query(target.path))
            return
        doc = views.path_history(target.path, lo, hi)
    if as_json:
        out.write(json.dumps(doc).encode() + b"\n")
    else:
        for entry in doc["versions"]:
            out.write(_line(_event_line(entry, width)))


@cli.command()
@click.argument("spec", metavar="PATH[@VERSION]")
@workspace_options
def show(spec: str, store_opt, ws_opt) -> None:
    """Write a version of a file to stdout (default: the latest)."""
    path, number = split_version(spec)
    target = _target(store_opt, ws_opt, path)
    out = _out()
    with _open_store(target) as store:
        views = HistoryViews(store.open_workspace(target.workspace), caller=invoking_user())
        _number, version = views.pick_version(views.file_versions(target.path), target.path, number)
        cm = store.content_map(version.entry.content)
        for offset in range(0, cm.size, READ_PIECE):
            out.write(cm.read(offset, READ_PIECE))
        out.flush()


cli.add_command(show, "cat")


@cli.command()
@click.argument("path")
@click.argument("a", type=int, required=False)
@click.argument("b", type=int, required=False)
@workspace_options
def diff(path: str, a: int | None, b: int | None, store_opt, ws_opt) -> None:
    """Unified diff of PATH between versions A and B.

    Default: the previous version against the latest; with A only: A against the latest.
    """
    target = _target(store_opt, ws_opt, path)
    shown = _show_path(target.path or b"")
    with _open_store(target) as store:
        views = HistoryViews(store.open_workspace(target.workspace), caller=invoking_user())
        versions = views.file_versions(target.path)
        numbers = sorted(versions)
        b_no, b_ver = views.pick_version(versions, target.path, b)
        if a is None and b is None:
            a_no, a_ver = (numbers[-2], versions[numbers[-2]]) if len(numbers) > 1 else (None, None)
        else:
            a_no, a_ver = views.pick_version(versions, target.path, a)
        if a_ver is not None and a_ver.entry.content == b_ver.entry.content:
            return
        a_size = store.content_map(a_ver.entry.content).size if a_ver else 0
        b_size = store.content_map(b_ver.entry.content).size
        if max(a_size, b_size) > DIFF_LIMIT:
            click.echo(f"Versions {a_no} and {b_no} of {shown} differ (too large for a line diff)")
            return
        old = _read_all(store, a_ver) if a_ver else b""
        new = _read_all(store, b_ver)
    old_text, new_text = _as_text(old), _as_text(new)
    if old_text is None or new_text is None:
        click.echo(f"Binary versions {a_no} and {b_no} of {shown} differ")
        return
    lines = difflib.unified_diff(old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                 fromfile=f"a/{shown}@{a_no}" if a_ver else "/dev/null",
                                 tofile=f"b/{shown}@{b_no}", fromfiledate=_entry_time(a_ver) if a_ver else "",
                                 tofiledate=_entry_time(b_ver))
    for line in lines:
        click.echo(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n", nl=False)


@cli.command()
@click.argument("spec", metavar="PATH[@VERSION]")
@workspace_options
@json_option
def blame(spec: str, store_opt, ws_opt, as_json) -> None:
    """Which version, seq, time and turn last changed each line of a file.

    Text: VERSION SEQ TIME TURN LINE) TEXT; a binary file (a NUL in its first
    8000 bytes) by 4096-byte range. --json: JSON Lines as .chronicle/blame/PATH.
    """
    path, number = split_version(spec)
    target = _target(store_opt, ws_opt, path)
    with _open_store(target) as store:
        result = blame_of(HistoryViews(store.open_workspace(target.workspace), caller=invoking_user()),
                          target.path, number)
    out = _out()
    if as_json:
        out.write(result.json_lines())
        return
    width = max((len(str(r["seq"])) for r in result.records), default=1)
    vwidth = max((len(str(r["version"])) for r in result.records), default=1)
    for r in result.records:
        turn = r["turn"]
        label = f"{turn.get('agent')}:{turn.get('turn')}" if isinstance(turn, dict) else "-"
        where = f"{r['line']})" if "line" in r else f"{r['offset']}+{r['length']})"
        text = f" {r['text']}" if "text" in r else ""
        out.write(_line(f"{str(r['version']).rjust(vwidth)} {str(r['seq']).rjust(width)} {r['time']} {label} "
                        f"{where}{text}"))


@cli.command()
@click.argument("pattern")
@click.argument("paths", metavar="[PATH]...", nargs=-1)
@click.option("--history", is_flag=True, help="Search every kept version, not only the head.")
@click.option("--since", metavar="T", help="Versions from T (implies --history).")
@click.option("--until", metavar="T", help="Versions up to T (implies --history).")
@click.option("--turn", metavar="AGENT:N", callback=_parse_turn, help="Versions that turn wrote (implies --history).")
@workspace_options
@json_option
@click.pass_context
def grep(ctx, pattern, paths, history, since, until, turn, store_opt, ws_opt, as_json) -> None:
    """Lines matching PATTERN (a Python regular expression) in the files.

    Prints PATH:LINE:TEXT (PATH@VERSION:LINE:TEXT with --history); binary
    files are skipped. Exit 1 if nothing matched.
    """
    targets = [_target(store_opt, ws_opt, p) for p in paths] or [_target(store_opt, ws_opt)]
    if len({(t.store, t.workspace) for t in targets}) > 1:
        raise UsageError("all PATHs must be in one workspace")
    history = history or (since, until, turn) != (None, None, None)
    out = _out()
    found = False
    with _open_store(targets[0]) as store:
        ws = store.open_workspace(targets[0].workspace)
        lo, hi = points.seq_range(ws, since, until, turn)
        views = HistoryViews(ws, caller=invoking_user())
        for m in search.grep(views, pattern, [t.path or b"" for t in targets], history=history, lo=lo, hi=hi):
            found = True
            text = m.text.decode("utf-8", "surrogateescape")
            shown = _show_path(m.path) + ("" if m.version is None else f"@{m.version}")
            out.write((json.dumps({"path": _show_path(m.path), "version": m.version, "line": m.line, "text": text})
                       + "\n").encode() if as_json else _line(f"{shown}:{m.line}:{text}"))
    if not found:
        ctx.exit(1)


@cli.command()
@click.option("--at", "point", metavar="POINT", help="Seq, time, snapshot or turn:AGENT:N (default: the head).")
@click.option("--verify", is_flag=True,
              help="Check the stored receipt at POINT (default: the latest) against the stored tree.")
@workspace_options
@json_option
@click.pass_context
def receipt(ctx, point, verify, store_opt, ws_opt, as_json) -> None:
    """Merkle root of the whole tree at a point (README "Receipts").

    Prints ROOT, the seq and what it covers; made from the latest receipt
    before it, in time proportional to what changed, and stored. --verify
    recomputes a stored receipt from scratch: exit 0 if it matches, 1 if not.
    tools/receipt.py DIR recomputes ROOT from a checkout.
    """
    target = _target(store_opt, ws_opt)
    with _open_store(target) as store:
        mounted = store.mount_info(target.workspace)
        if mounted is not None:          # the daemon commits open files first
            command = {"cmd": "receipt", "verify": verify, **({} if point is None else {"at": point})}
            reply = control.send(mounted["mountpoint"], command)
            result = ({"ok": reply.get("verified"), **{k: reply.get(k) for k in ("seq", "root", "recomputed",
                                                                                   "receipt")}}
                      if verify else reply.get("receipt"))
        else:
            ws = store.open_workspace(target.workspace)
            seq = None if point is None else points.resolve_point(ws, point)
            receipts = Receipts(ws)
            result = receipts.verify(seq) if verify else receipts.make(seq)
    if as_json:
        click.echo(json.dumps(result))
    elif verify:
        click.echo(f"{result['root']} seq {result['seq']}: "
                   + ("matches the stored tree" if result["ok"] else
                      f"does NOT match the stored tree (it hashes to {result['recomputed']})"))
    else:
        click.echo(f"{result['root']} seq {result['seq']} ({result['files']} files, {result['dirs']} directories, "
                   f"{result['others']} others, {result['bytes']} bytes)")
    if verify and not result["ok"]:
        ctx.exit(1)


@cli.command()
@click.argument("path", required=False)
@click.option("--version", "number", type=int, metavar="N", help="Bring PATH back to its version N.")
@click.option("--at", "point", metavar="POINT",
              help="Bring the whole workspace back to a seq, time, snapshot or turn:AGENT:N.")
@workspace_options
def restore(path, number, point, store_opt, ws_opt) -> None:
    """Bring back a file version or the whole workspace at a point.

    Recorded as a new event: history is never rewritten.
    """
    by_file = path is not None and number is not None and point is None
    by_point = point is not None and path is None and number is None
    if not (by_file or by_point):
        raise click.UsageError("use either `restore PATH --version N` or `restore --at POINT`")
    target = _target(store_opt, ws_opt, path)
    if path is not None and not target.path:
        raise UsageError("give a file path, not the workspace root (use --at to restore the whole workspace)")
    with _open_store(target) as store:
        mounted = store.mount_info(target.workspace)
        if path is not None:
            seq, paths, at = actions.restore_version(store, target.workspace, target.path, number).seq, None, None
        elif mounted is not None:
            with _progress("Restoring"):
                reply = control.send(mounted["mountpoint"], {"cmd": "restore", "at": point})
            changed = reply.get("paths") != 0
            seq, paths, at = reply.get("seq") if changed else None, reply.get("paths"), reply.get("at", point)
        else:
            ws = store.open_workspace(target.workspace, writable=True)
            at = points.resolve_point(ws, point)
            with _progress(f"Restoring workspace {target.workspace!r} to seq {at}"):
                changes = restore_tree(ws, at, _actor())
            seq, paths = changes.seq, changes.paths
    what = (f"{_show_path(target.path)} to version {number}" if path is not None
            else f"workspace {target.workspace!r} to seq {at}")
    if seq is None:
        click.echo(f"Nothing to restore: {what} changes nothing")
    else:
        click.echo(f"Restored {what} (seq {seq}" + (f", {paths} path(s) changed)" if path is None else ")"))


@cli.command()
@click.argument("name")
@workspace_options
def snapshot(name: str, store_opt, ws_opt) -> None:
    """Name the workspace's current seq NAME."""
    target = _target(store_opt, ws_opt)
    with _open_store(target) as store:
        seq = actions.take_snapshot(store, target.workspace, name)
    click.echo(f"Snapshot {name!r} of workspace {target.workspace!r}" + (f" at seq {seq}" if seq is not None else ""))


@cli.command()
@click.argument("where", metavar="[PATH]", required=False)
@workspace_options
@json_option
def snapshots(where, store_opt, ws_opt, as_json) -> None:
    """List the workspace's snapshots (PATH: a path inside a mount)."""
    target = _in_mount(store_opt, ws_opt, where)
    with _open_store(target) as store:
        items = points.snapshots(store.open_workspace(target.workspace))
    if as_json:
        click.echo(json.dumps(items))
    elif items:
        _table([["NAME", "SEQ", "TIME"]] + [[s["name"], str(s["seq"]), s["time"]] for s in items], right={1})


@cli.command()
@click.argument("new_workspace")
@click.option("--at", "point", metavar="POINT", help="Seq, snapshot, time or turn:AGENT:N (default: the head).")
@workspace_options
def fork(new_workspace: str, point, store_opt, ws_opt) -> None:
    """Copy-on-write fork of the workspace as NEW_WORKSPACE."""
    target = _target(store_opt, ws_opt)
    with _open_store(target) as store:
        source = store.open_workspace(target.workspace)
        seq = points.resolve_point(source, point) if point is not None else None
        record = store.fork(target.workspace, seq, new_workspace)
    click.echo(f"Forked workspace {target.workspace!r} at seq {record.fork_seq} as {new_workspace!r}")


def _tree_size(ws: Workspace) -> tuple[int, int]:
    """``(regular files, bytes)`` at the head; a hard-linked file counts once."""
    seen: set[int] = set()
    total = 0
    view = ws.view()
    with ws.read_txn() as txn:
        for _path, ino, kind in view.walk(txn):
            if kind == KIND_FILE and ino not in seen:
                seen.add(ino)
                attrs = view.attrs(txn, ino)
                total += attrs.size if attrs else 0
    return len(seen), total


@cli.command()
@click.argument("where", metavar="[PATH]", required=False)
@click.option("--size/--no-size", default=True, show_default=True,
              help="Count files and bytes at each head (walks every tree).")
@store_options
@json_option
def workspaces(where, size: bool, store_opt, as_json) -> None:
    """List the store's workspaces (PATH: a path inside a mount)."""
    target = _in_mount(store_opt, None, where)
    rows = []
    with _open_store(target) as store:
        for info in store.workspaces():
            row = {"name": info.name, "head_seq": info.head_seq, "created": info.created, "parent": info.parent,
                   "fork_seq": info.fork_seq, "mountpoint": info.mounted["mountpoint"] if info.mounted else None}
            if size:
                row["files"], row["size"] = _tree_size(store.open_workspace(info.name))
            rows.append(row)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo(f"No workspaces in {target.store}", err=True)
        return
    header = ["NAME", "HEAD"] + (["FILES", "SIZE"] if size else []) + ["FORK OF", "MOUNTED AT"]
    table = [header]
    for r in rows:
        figures = [str(r["files"]), _human(r["size"])] if size else []
        fork_of = f"{r['parent']}@{r['fork_seq']}" if r["parent"] else "-"
        table.append([r["name"], str(r["head_seq"])] + figures + [fork_of, r["mountpoint"] or "-"])
    _table(table, right={1, 2, 3} if size else {1})


def _duration(_ctx, _param, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc)) from None


def _count(name: str):
    return click.option(f"--keep-{name}", f"keep_{name}", type=click.IntRange(0, 1 << 31), metavar="N")


@cli.group()
def policy() -> None:
    """A workspace's retention policy (what gc keeps; README "Retention")."""


@policy.command("show")
@workspace_options
@json_option
def policy_show(store_opt, ws_opt, as_json) -> None:
    """Print the workspace's policy (the default if none was set)."""
    target = _target(store_opt, ws_opt)
    with _open_store(target) as store:
        record = store.workspace_record(target.workspace)
        current = dryrun.get_policy(store, record.id)
        own = dryrun.has_own_policy(store, record.id)
    doc = {"workspace": target.workspace, "default": not own, **current.as_dict()}
    if as_json:
        click.echo(json.dumps(doc))
        return
    _print_policy(doc)


def _print_policy(doc: dict) -> None:
    rows = [["workspace:", doc["workspace"] + (" (default policy)" if doc["default"] else "")]]
    for key in ("keep_last", "keep_within_text", "keep_hourly", "keep_daily", "keep_weekly", "keep_turns"):
        value = doc[key]
        rows.append([key.replace("_text", "").replace("_", "-") + ":", "-" if value is None else str(value)])
    rows.append(["ignore:", " ".join(doc["ignore"]) or "-"])
    _table(rows)


@policy.command("set")
@_count("last")
@click.option("--keep-within", callback=_duration, metavar="DURATION", help="e.g. 30m, 12h, 7d, 2w.")
@_count("hourly")
@_count("daily")
@_count("weekly")
@_count("turns")
@click.option("--ignore", "ignore", multiple=True, metavar="PATTERN", help="Add a gitignore pattern.")
@click.option("--no-ignore", "no_ignore", multiple=True, metavar="PATTERN", help="Remove a pattern.")
@workspace_options
def policy_set(keep_last, keep_within, keep_hourly, keep_daily, keep_weekly, keep_turns, ignore, no_ignore,
               store_opt, ws_opt) -> None:
    """Change the workspace's policy (options not given stay as they are)."""
    target = _target(store_opt, ws_opt)
    with _open_store(target) as store:
        record = store.workspace_record(target.workspace)
        new = dryrun.get_policy(store, record.id).changed(
            keep_last=keep_last, keep_within=keep_within, keep_hourly=keep_hourly, keep_daily=keep_daily,
            keep_weekly=keep_weekly, keep_turns=keep_turns, ignore_add=ignore, ignore_remove=no_ignore)
        dryrun.set_policy(store, record.id, new)
    _print_policy({"workspace": target.workspace, "default": False, **new.as_dict()})


@cli.command()
@click.option("--dry-run", is_flag=True, help="Print what the policy would drop and free; change nothing.")
@click.option("--all", "all_workspaces", is_flag=True, help="Every workspace of the store.")
@workspace_options
@json_option
def gc(dry_run: bool, all_workspaces: bool, store_opt, ws_opt, as_json) -> None:
    """Prune versions the policy no longer keeps, free their chunks, compact packs.

    Prunes the workspace (or --all); frees and compacts the whole store.
    """
    if all_workspaces and ws_opt is not None:
        raise UsageError("give --workspace or --all, not both")
    target = _target(store_opt, ws_opt)
    names = None if all_workspaces else [target.workspace]
    if not dry_run:
        with _open_store(target) as store, _progress("Collecting") as progress:
            result = collect.collect(store, names, progress=progress)
        if as_json:
            click.echo(json.dumps(result))
            return
        _print_gc(result)
        return
    with _open_store(target) as store:
        report = dryrun.dry_run(store, names)
    if as_json:
        click.echo(json.dumps(report))
        return
    out = _out()
    for ws in report["workspaces"]:
        out.write(_line(f"workspace {ws['workspace']}: {ws['versions']} versions, would drop "
                        f"{ws['dropped_versions']} ({_human(ws['dropped_bytes'])} logical), keep {ws['kept_versions']}"))
        for p in ws["paths"]:
            seqs = ", ".join(str(s) for s in p["dropped"])
            out.write(_line(f"  {p['path']}: drop {len(p['dropped'])} of {p['versions']} (seqs {seqs})"))
    out.write(_line(f"would free {report['freed_chunks']} chunks, {_human(report['freed_bytes'])} stored "
                    f"({_human(report['freed_raw_bytes'])} before compression); dry run, nothing changed"))


def _print_gc(result: dict) -> None:
    click.echo(f"pruned {result['pruned_versions']} versions of {', '.join(result['workspaces']) or 'no workspace'} "
               f"({result['pruned_records']} inode records)")
    click.echo(f"freed {result['freed_contents']} contents ({_human(result['freed_logical_bytes'])} logical), "
               f"{result['freed_chunks']} chunks, {_human(result['freed_bytes'])} stored "
               f"({_human(result['freed_raw_bytes'])} before compression)")
    click.echo(f"compacted: {result['packs_deleted']} packs deleted, {result['packs_written']} written; "
               f"{_human(max(0, result['reclaimed_bytes']))} of disk space back")
    if result.get("deferred"):
        click.echo(f"deferred: dead chunks kept for the next gc ({result['deferred']})")


@cli.command()
@click.option("--repair", is_flag=True, help="Repair what can be repaired.")
@click.option("--verify-contents", is_flag=True, help="Also re-hash whole file contents.")
@store_options
@json_option
@click.pass_context
def fsck(ctx: click.Context, repair: bool, verify_contents: bool, store_opt, as_json) -> None:
    """Verify every chunk hash, every reference and refcount.

    Exit status 0 when clean (no error or warning left unrepaired), 1 otherwise.
    """
    target = _target(store_opt, None)
    with _open_store(target) as store, _progress("Checking") as progress:
        modes_changed = store.tighten_modes() if repair else 0
        report = check_store(store, repair=repair, verify_contents=verify_contents, progress=progress)
    reports = [report]
    if repair and report.metadata_rebuilt:
        # the metadata file was replaced: check (and repair) the new one, e.g. refcounts of derived records
        with _open_store(target) as store, _progress("Checking the rebuilt metadata") as progress:
            reports.append(check_store(store, repair=True, verify_contents=verify_contents, progress=progress))
    if as_json:
        doc = report.as_dict()
        if len(reports) > 1:
            doc["after_rebuild"] = reports[1].as_dict()
        click.echo(json.dumps(doc, indent=2))
    for n, rep in enumerate(reports if not as_json else ()):
        if n:
            click.echo("the metadata was rebuilt; checking it again:")
        for p in rep.problems:
            click.echo(f"{p.severity}: {p.kind}: {p.message}" + (" (repaired)" if p.repaired else ""))
        if modes_changed and not n:
            click.echo(f"store-modes: {modes_changed} directories and files put to the store's modes (repaired)")
        if n == len(reports) - 1:
            newest = f", newest {rep.metadata_backup_newest}" if rep.metadata_backup_newest else ""
            click.echo(f"metadata: {rep.metadata_in_use}; {rep.metadata_backups} backup(s) in meta-backup/{newest}")
        figures = rep.as_dict()
        click.echo(f"{target.store}: {'clean' if rep.clean else 'NOT clean'} ({figures['errors']} error(s), "
                   f"{figures['warnings']} warning(s) unrepaired, {figures['repaired']} repaired; "
                   f"{rep.chunks} chunks, {rep.contents} contents, {rep.seconds:.1f} s)")
    ctx.exit(0 if reports[-1].clean else 1)


def _retention_figures(store: Store, ws: Workspace) -> dict:
    """The workspace's head bytes, kept history, what its policy would free (dry run)."""
    report = dryrun.dry_run(store, [ws.name])
    mine = report["workspaces"][0]
    return {"head_logical_bytes": _tree_size(ws)[1], "history_logical_bytes": mine["kept_bytes"],
            "policy_would_drop_versions": mine["dropped_versions"],
            "policy_would_drop_logical_bytes": mine["dropped_bytes"],
            "policy_would_free_bytes": report["freed_bytes"], "last_gc": collect.last_result(store)}


@cli.command()
@click.argument("where", metavar="[PATH]", required=False)
@workspace_options
@json_option
def stats(where, store_opt, ws_opt, as_json) -> None:
    """Store figures (bytes, dedup and compression, counts) and the workspace's."""
    target = _in_mount(store_opt, ws_opt, where)
    with _open_store(target) as store:
        figures = store.stats()
        try:
            ws = store.open_workspace(target.workspace)
        except NotFound:
            if target.workspace_chosen:
                raise
            ws = None
        if ws is not None:
            figures.update(store.workspace_stats(ws))
            figures.update(_retention_figures(store, ws))
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    rows = []
    for key, value in figures.items():
        if key.endswith("_bytes"):
            value = f"{_human(value)} ({value})"
        elif key == "last_gc" and isinstance(value, dict):
            value = (f"{value['time']}: pruned {value['pruned_versions']} versions, freed "
                     f"{_human(value.get('freed_bytes'))}, {_human(max(0, value.get('reclaimed_bytes') or 0))} "
                     "of disk space back")
        elif value is None:
            value = "-"
        rows.append([key.replace("_", " ") + ":", str(value)])
    _table(rows)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8770, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL is printed).")
@store_options
def ui(host: str, port: int, store_opt) -> None:
    """Serve the web timeline of the store: agents, turns, diffs, file history, past trees.

    On a loopback address only you (and root) may use it; it refuses requests
    from other sites. SIGINT or SIGTERM stops it. See the README's "Web timeline".
    """
    from chronicle.ui import app as web_ui       # aiohttp, jinja2 and pygments are loaded only for this command

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not web_ui.is_loopback(host):
        click.echo(f"chronicle: warning: listening on {host}, not a loopback address: the web timeline has no "
                   "authentication, anyone who reaches it can read the store's history and roll agents back",
                   err=True)

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    asyncio.run(web_ui.serve(_in_mount(store_opt, None, None).store, host, port, announce=announce))


cli.add_command(agent)


def main() -> None:
    cli(prog_name="chronicle")
