"""Reading history: ``log``, ``show`` (alias ``cat``), ``diff``, ``blame``, ``grep``;
and ``hash`` (the content hash Chronicle gives a file's bytes, like ``b3sum``).

All answer from ``store/history/views.py`` and ``points.py`` (as the
``.chronicle/`` tree does), opening the store without a writer lock.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import sys

import click

from chronicle.cli.app import (choose_target, cli, event_line, json_option, line_bytes, open_store, show_path,
                               stdout_bytes, workspace_options)
from chronicle.errors import InvalidArgument, NotFound, UsageError
from chronicle.store.history import points, search
from chronicle.store.history.access import invoking_user
from chronicle.store.history.blame import blame as blame_of
from chronicle.store.history.points import TurnLabel
from chronicle.store.chunks.tree import hash_data, hash_file
from chronicle.store.history.views import HistoryViews, split_version
from chronicle.store.store import Store
from chronicle.ui.data import as_text         # the web timeline's test of text vs binary, shared

READ_PIECE = 1 << 20            # bytes per read when streaming a version to stdout
DIFF_LIMIT = 32 << 20           # larger versions are compared, not diffed line by line


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


def _entry_time(version) -> str:
    try:
        return json.loads(b"{" + version.entry.fragment).get("time", "")
    except ValueError:
        return ""


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
    target = choose_target(store_opt, ws_opt, path)
    out = stdout_bytes()
    with open_store(target) as store:
        ws = store.open_workspace(target.workspace)
        views = HistoryViews(ws, caller=invoking_user())
        if changed_in is not None:
            doc = search.turn_changes(views, changed_in.agent, changed_in.number)
            out.write((json.dumps(doc) + "\n").encode() if as_json
                      else b"".join(line_bytes(p) for p in doc["paths"]))
            return
        lo, hi = points.seq_range(ws, since, until, turn)
        width = len(str(ws.head_seq))
        if not target.path:
            for raw in views.log(lo, hi):
                out.write(raw + b"\n" if as_json else line_bytes(event_line(json.loads(raw), width)))
            return
        if as_json and (since, until, turn) == (None, None, None):
            out.write(views.query(target.path))
            return
        doc = views.path_history(target.path, lo, hi)
    if as_json:
        out.write(json.dumps(doc).encode() + b"\n")
    else:
        for entry in doc["versions"]:
            out.write(line_bytes(event_line(entry, width)))


@cli.command()
@click.argument("spec", metavar="PATH[@VERSION]")
@workspace_options
def show(spec: str, store_opt, ws_opt) -> None:
    """Write a version of a file to stdout (default: the latest)."""
    path, number = split_version(spec)
    target = choose_target(store_opt, ws_opt, path)
    out = stdout_bytes()
    with open_store(target) as store:
        views = HistoryViews(store.open_workspace(target.workspace), caller=invoking_user())
        _number, version = _pick(views, views.file_versions(target.path), target.path, number)
        cm = store.content_map(version.entry.content)
        for offset in range(0, cm.size, READ_PIECE):
            out.write(cm.read(offset, READ_PIECE))
        out.flush()


cli.add_command(show, "cat")


def _pick(views: HistoryViews, versions: dict, path: bytes, number: int | None):
    """``views.pick_version``, but a version gc pruned raises
    :class:`~chronicle.errors.Pruned` (exit 1: "version N ... was pruned by
    gc") rather than "no version N"."""
    if number is not None and number not in versions:
        try:
            views.version(path, number)
        except NotFound:
            pass                  # not a pruned mark: pick_version names the versions there are
    return views.pick_version(versions, path, number)


@cli.command()
@click.argument("path")
@click.argument("a", type=int, required=False)
@click.argument("b", type=int, required=False)
@workspace_options
def diff(path: str, a: int | None, b: int | None, store_opt, ws_opt) -> None:
    """Unified diff of PATH between versions A and B.

    Default: the previous version against the latest; with A only: A against the latest.
    """
    target = choose_target(store_opt, ws_opt, path)
    shown = show_path(target.path or b"")
    with open_store(target) as store:
        views = HistoryViews(store.open_workspace(target.workspace), caller=invoking_user())
        versions = views.file_versions(target.path)
        numbers = sorted(versions)
        b_no, b_ver = _pick(views, versions, target.path, b)
        if a is None and b is None:
            a_no, a_ver = (numbers[-2], versions[numbers[-2]]) if len(numbers) > 1 else (None, None)
        else:
            a_no, a_ver = _pick(views, versions, target.path, a)
        if a_ver is not None and a_ver.entry.content == b_ver.entry.content:
            return
        a_size = store.content_map(a_ver.entry.content).size if a_ver else 0
        b_size = store.content_map(b_ver.entry.content).size
        if max(a_size, b_size) > DIFF_LIMIT:
            click.echo(f"Versions {a_no} and {b_no} of {shown} differ (too large for a line diff)")
            return
        old = _read_all(store, a_ver) if a_ver else b""
        new = _read_all(store, b_ver)
    old_text, new_text = as_text(old), as_text(new)
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
    target = choose_target(store_opt, ws_opt, path)
    with open_store(target) as store:
        result = blame_of(HistoryViews(store.open_workspace(target.workspace), caller=invoking_user()),
                          target.path, number)
    out = stdout_bytes()
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
        out.write(line_bytes(f"{str(r['version']).rjust(vwidth)} {str(r['seq']).rjust(width)} {r['time']} {label} "
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
    targets = [choose_target(store_opt, ws_opt, p) for p in paths] or [choose_target(store_opt, ws_opt)]
    if len({(t.store, t.workspace) for t in targets}) > 1:
        raise UsageError("all PATHs must be in one workspace")
    history = history or (since, until, turn) != (None, None, None)
    out = stdout_bytes()
    found = False
    with open_store(targets[0]) as store:
        ws = store.open_workspace(targets[0].workspace)
        lo, hi = points.seq_range(ws, since, until, turn)
        views = HistoryViews(ws, caller=invoking_user())
        for m in search.grep(views, pattern, [t.path or b"" for t in targets], history=history, lo=lo, hi=hi):
            found = True
            text = m.text.decode("utf-8", "surrogateescape")
            shown = show_path(m.path) + ("" if m.version is None else f"@{m.version}")
            out.write((json.dumps({"path": show_path(m.path), "version": m.version, "line": m.line, "text": text})
                       + "\n").encode() if as_json else line_bytes(f"{shown}:{m.line}:{text}"))
    if not found:
        ctx.exit(1)


@cli.command("hash")
@click.argument("files", metavar="FILE...", nargs=-1, required=True)
@click.option("--dense", is_flag=True, help="Count no holes (the file digest of receipts).")
def hash_cmd(files: tuple[str, ...], dense: bool) -> None:
    """Print the hash each FILE would have in Chronicle (``-``: standard input).

    One line per file, ``HASH  FILE`` as ``b3sum`` prints: Chronicle's content
    hash is a tree hash over the BLAKE3 ids of the file's chunks, not the
    BLAKE3 of the whole file (README "Differences from SPEC.md"). A sparse
    file's holes of 64 KiB or more count as holes, as Chronicle stores them
    (``--dense``: they do not). Needs no store.
    """
    for name in files:
        if name == "-":
            digest = hash_data(sys.stdin.buffer.read())
        else:
            st = os.stat(name)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{name!r} is not a regular file")
            digest = hash_file(name, dense=dense)
        click.echo(f"{digest.hex()}  {name}")
