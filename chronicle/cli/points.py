"""Points in a workspace's history: ``receipt``, ``restore``, ``snapshot``, ``snapshots``, ``fork``.

A mounted workspace is changed (and a receipt taken) through its ``ctl`` file,
so the daemon, its only writer, applies it; otherwise the store directly.
"""

from __future__ import annotations

import json

import click

from chronicle import actions, control
from chronicle.cli.app import (caller_actor, choose_target, cli, in_mount, json_option, open_store, print_table,
                               progress_bar, show_path, workspace_options)
from chronicle.errors import UsageError
from chronicle.store.history import points
from chronicle.store.history.receipts import Receipts
from chronicle.store.namespace.restore import restore_tree


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
    target = choose_target(store_opt, ws_opt)
    with open_store(target) as store:
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
    target = choose_target(store_opt, ws_opt, path)
    if path is not None and not target.path:
        raise UsageError("give a file path, not the workspace root (use --at to restore the whole workspace)")
    with open_store(target) as store:
        mounted = store.mount_info(target.workspace)
        if path is not None:
            seq, paths, at = actions.restore_version(store, target.workspace, target.path, number).seq, None, None
        elif mounted is not None:
            with progress_bar("Restoring"):
                reply = control.send(mounted["mountpoint"], {"cmd": "restore", "at": point})
            changed = reply.get("paths") != 0
            seq, paths, at = reply.get("seq") if changed else None, reply.get("paths"), reply.get("at", point)
        else:
            ws = store.open_workspace(target.workspace, writable=True)
            at = points.resolve_point(ws, point)
            with progress_bar(f"Restoring workspace {target.workspace!r} to seq {at}"):
                changes = restore_tree(ws, at, caller_actor())
            seq, paths = changes.seq, changes.paths
    what = (f"{show_path(target.path)} to version {number}" if path is not None
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
    target = choose_target(store_opt, ws_opt)
    with open_store(target) as store:
        seq = actions.take_snapshot(store, target.workspace, name)
    click.echo(f"Snapshot {name!r} of workspace {target.workspace!r}" + (f" at seq {seq}" if seq is not None else ""))


@cli.command()
@click.argument("where", metavar="[PATH]", required=False)
@workspace_options
@json_option
def snapshots(where, store_opt, ws_opt, as_json) -> None:
    """List the workspace's snapshots (PATH: a path inside a mount)."""
    target = in_mount(store_opt, ws_opt, where)
    with open_store(target) as store:
        items = points.snapshots(store.open_workspace(target.workspace))
    if as_json:
        click.echo(json.dumps(items))
    elif items:
        print_table([["NAME", "SEQ", "TIME"]] + [[s["name"], str(s["seq"]), s["time"]] for s in items], right={1})


@cli.command()
@click.argument("new_workspace")
@click.option("--at", "point", metavar="POINT", help="Seq, snapshot, time or turn:AGENT:N (default: the head).")
@workspace_options
def fork(new_workspace: str, point, store_opt, ws_opt) -> None:
    """Copy-on-write fork of the workspace as NEW_WORKSPACE."""
    target = choose_target(store_opt, ws_opt)
    with open_store(target) as store:
        source = store.open_workspace(target.workspace)
        seq = points.resolve_point(source, point) if point is not None else None
        record = store.fork(target.workspace, seq, new_workspace)
    click.echo(f"Forked workspace {target.workspace!r} at seq {record.fork_seq} as {new_workspace!r}")
