"""Stores, mounts and serving: ``init``, ``mount``, ``umount``, ``install-mount-helper``, ``workspaces``, ``ui``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from chronicle import mounting
from chronicle.cli.app import (cli, human_size, in_mount, json_option, one_line, open_store, print_table,
                               store_options, tree_size)
from chronicle.errors import StoreError, UsageError
from chronicle.store.store import Store


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?", re.IGNORECASE)


def parse_size(_ctx, _param, value: str | None) -> int | None:
    """A byte count from ``512M``, ``2G``, ``1.5GiB``, ``1000000`` (K, M, G, T are powers of 1024)."""
    if value is None:
        return None
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise click.BadParameter(f"not a size: {value!r} (e.g. 512M, 2G)")
    unit = m.group(2).upper()
    return int(float(m.group(1)) * (1024 ** ("KMGT".index(unit) + 1) if unit else 1))


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--backend", default="file", show_default=True, metavar="file|s3://BUCKET/PREFIX",
              help="Where chunk data lives: the store directory, or an S3-compatible bucket.")
@click.option("--endpoint", metavar="URL", help="S3 endpoint (http(s)://HOST:PORT) of a non-AWS server.")
@click.option("--region", metavar="REGION", help="S3 region (default: us-east-1).")
@click.option("--cache-size", metavar="SIZE", callback=parse_size,
              help="Local read cache of an S3 store (e.g. 512M, 4G; default 2G).")
@click.option("--shared-group", metavar="GROUP",
              help="Share the store with GROUP's members (directories 2770, files 0660); default: private "
                   "to you (0700/0600).")
def init(store: Path, backend: str, endpoint: str | None, region: str | None, cache_size: int | None,
         shared_group: str | None) -> None:
    """Create an empty store at STORE.

    With --backend s3://BUCKET/PREFIX the packs live in the bucket (which must
    exist; the prefix must hold no packs yet) and a bounded local cache keeps
    what was read. Credentials are what the AWS tools read (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials); they are not
    stored. `chronicle doctor --backend ...` checks an endpoint first."""
    if backend != "file" and not backend.startswith("s3://"):
        raise UsageError(f"unknown backend {backend!r}: use 'file' or s3://BUCKET/PREFIX")
    if backend == "file" and (endpoint or region or cache_size is not None):
        raise UsageError("--endpoint, --region and --cache-size are for --backend s3://BUCKET/PREFIX")
    path = Path(os.path.abspath(store))
    try:
        Store.init(path, backend, shared_group=shared_group, endpoint=endpoint, region=region,
                   cache_size=cache_size).close()
    except OSError as exc:
        raise StoreError(f"cannot create a store at {path}: {one_line(exc)}") from None
    where = f" (packs in {backend}{' at ' + endpoint if endpoint else ''})" if backend != "file" else ""
    click.echo(f"Initialized an empty Chronicle store at {path}{where}")


@cli.command()
@click.option("--store", "-s", "store_opt", type=click.Path(path_type=Path), metavar="STORE",
              help="Store directory (default $CHRONICLE_HOME/store, created if missing).")
@click.option("--workspace", "-w", default=mounting.DEFAULT_WORKSPACE, show_default=True, metavar="NAME",
              help="Workspace to mount (created on first mount).")
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted.")
@click.option("--options", "-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="Mount options: ro (the kernel refuses every change), allow_other, allow_root, "
                   "nosuid, nodev, noexec (and their opposites), writeback_cache (the kernel caches "
                   "writes: faster sqlite and small writes, slower create/unlink).")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def mount(store_opt: Path | None, workspace: str, foreground: bool, options: tuple[str, ...],
          mountpoint: Path) -> None:
    """Mount a workspace at MOUNTPOINT."""
    store = Path(os.path.abspath(store_opt)) if store_opt is not None else None
    where = Path(os.path.abspath(mountpoint))
    mounting.mount(store, workspace, where, foreground=foreground, options=options)
    if not foreground:
        click.echo(f"Mounted workspace {workspace!r} at {where}")


@cli.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount(mountpoint: Path) -> None:
    """Flush and unmount MOUNTPOINT; waits for its daemon to exit."""
    mounting.umount(Path(os.path.abspath(mountpoint)))


@cli.command("install-mount-helper")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("/sbin"), show_default=True,
              help="Where mount(8) looks for helpers (/sbin, /sbin/fs.d, /sbin/fs).")
@click.option("--force", is_flag=True, help="Replace a mount.fuse.chronicle this command did not write.")
@click.option("--remove", is_flag=True, help="Remove the helper this command wrote.")
def install_mount_helper(directory: Path, force: bool, remove: bool) -> None:
    """Install mount.fuse.chronicle, so that `mount -t fuse.chronicle STORE#WORKSPACE MOUNTPOINT` and
    /etc/fstab lines of type fuse.chronicle work (as root; see the README's "mount(8) and /etc/fstab")."""
    from chronicle import mount_helper

    try:
        if remove:
            path = mount_helper.uninstall(directory)
            click.echo(f"Removed {path}" if path else f"No {mount_helper.PROG} of ours in {directory}")
            return
        path = mount_helper.install(directory, force=force)
    except PermissionError:
        raise StoreError(f"cannot write to {directory}: run it as root (sudo)") from None
    click.echo(f"Installed {path} (runs {sys.executable})")


@cli.command()
@click.argument("where", metavar="[PATH]", required=False)
@click.option("--size/--no-size", default=True, show_default=True,
              help="Count files and bytes at each head (walks every tree).")
@store_options
@json_option
def workspaces(where, size: bool, store_opt, as_json) -> None:
    """List the store's workspaces (PATH: a path inside a mount)."""
    target = in_mount(store_opt, None, where)
    rows = []
    with open_store(target) as store:
        for info in store.workspaces():
            row = {"name": info.name, "head_seq": info.head_seq, "created": info.created, "parent": info.parent,
                   "fork_seq": info.fork_seq, "mountpoint": info.mounted["mountpoint"] if info.mounted else None}
            if size:
                row["files"], row["size"] = tree_size(store.open_workspace(info.name))
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
        figures = [str(r["files"]), human_size(r["size"])] if size else []
        fork_of = f"{r['parent']}@{r['fork_seq']}" if r["parent"] else "-"
        table.append([r["name"], str(r["head_seq"])] + figures + [fork_of, r["mountpoint"] or "-"])
    print_table(table, right={1, 2, 3} if size else {1})


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

    asyncio.run(web_ui.serve(in_mount(store_opt, None, None).store, host, port, announce=announce))
