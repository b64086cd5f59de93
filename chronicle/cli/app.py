"""The ``chronicle`` group and what its commands share (see :mod:`chronicle.cli`).

:class:`ChronicleGroup` turns errors into one line and an exit code; the
``choose_target``/``in_mount`` helpers pick the store, workspace and path;
``store_options``/``workspace_options``/``json_option`` are the shared click
options; the rest prints (``print_table``, ``event_line``, ``human_size``) or
draws progress on a terminal (``progress_bar``, via rich).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import click
import lmdb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chronicle import mounting
from chronicle.errors import ChronicleError, UsageError
from chronicle.locate import Target, locate, select
from chronicle.store.model import KIND_FILE, Actor
from chronicle.store.namespace.workspace import Workspace
from chronicle.store.store import Store

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
            _report(ctx, f"chronicle: error: {one_line(err)}", err.exit_code)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise                   # click quiets a closed stdout (`chronicle cat f | head`)
            _report(ctx, f"chronicle: error: {one_line(exc)}", 1)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.InvalidError) as exc:
            _report(ctx, f"chronicle: error: the store's metadata is damaged ({type(exc).__name__}: "
                    f"{one_line(exc)}); `chronicle fsck` names what, `chronicle fsck --repair` drops it", 1)
        except Exception as exc:        # noqa: BLE001 - the last line of defence
            _report(ctx, f"chronicle: internal error: {type(exc).__name__}: {one_line(exc)}", 1)


def _report(ctx: click.Context, line: str, code: int) -> None:
    if ctx.meta.get(_DEBUG):
        traceback.print_exc()
    click.echo(line, err=True)
    ctx.exit(code)


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# -- choosing the store, the workspace and the path ------------------------------------------


def choose_target(store_opt: Path | None, ws_opt: str | None, path: str | None = None) -> Target:
    return select(store_opt, ws_opt, path, default_workspace=mounting.DEFAULT_WORKSPACE)


def in_mount(store_opt: Path | None, ws_opt: str | None, where: str | None) -> Target:
    """The target of a command whose optional PATH only says which mount to use."""
    if where is not None and locate(where) is None:
        raise UsageError(f"{where!r} is not inside a Chronicle mount")
    return choose_target(store_opt, ws_opt, where)


def show_path(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "."


def line_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\n"     # paths are os.fsdecode'd: give back their bytes


@contextmanager
def open_store(target: Target):
    store = Store.open(target.store)
    try:
        yield store
    finally:
        store.close()


def caller_actor() -> Actor:
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


def stdout_bytes():
    return sys.stdout.buffer


@contextmanager
def progress_bar(description: str):
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


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def event_line(ev: dict, seq_width: int) -> str:
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
    details = [f"{k} {ev[k]}" for k in ("restored", "at", "paths", "mode", "uid", "gid", "name", "through", "events")
               if k in ev]
    if ev.get("exchange"):
        details.append("exchange")
    if details:
        text += " (" + ", ".join(details) + ")"
    return (f"{str(ev.get('seq', '?')).rjust(seq_width)}  {ev.get('time', '')}  {ev.get('event', ''):<11}  "
            f"{version:>5}  {size:>10}  {digest:<12}  {label:<12}  {text}")


def print_table(rows: list[list[str]], right: set[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


def tree_size(ws: Workspace) -> tuple[int, int]:
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


# -- the group ------------------------------------------------------------------------------------


@click.group(cls=ChronicleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chronicle", prog_name="chronicle")
@click.option("--debug", is_flag=True, envvar="CHRONICLE_DEBUG", help="Show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Chronicle: a versioned workspace filesystem for AI agents."""
    ctx.meta[_DEBUG] = debug
