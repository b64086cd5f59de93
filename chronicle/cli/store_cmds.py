"""The store's upkeep: ``policy show|set``, ``gc``, ``fsck``, ``stats``."""

from __future__ import annotations

import json
import time

import click

from chronicle.cli.app import (choose_target, cli, human_size, in_mount, json_option, line_bytes, open_store,
                               print_table, progress_bar, stdout_bytes, store_options,
                               workspace_options)
from chronicle.errors import InvalidArgument, NotFound, UsageError
from chronicle.store.fsck.checks import fsck as check_store
from chronicle.store.gc import collect, dryrun
from chronicle.store.gc import stats as gc_stats
from chronicle.store.gc.policy import parse_duration


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
    target = choose_target(store_opt, ws_opt)
    with open_store(target) as store:
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
    print_table(rows)


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
    target = choose_target(store_opt, ws_opt)
    with open_store(target) as store:
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
    target = choose_target(store_opt, ws_opt)
    names = None if all_workspaces else [target.workspace]
    if not dry_run:
        with open_store(target) as store, progress_bar("Collecting") as progress:
            result = collect.collect(store, names, progress=progress)
        if as_json:
            click.echo(json.dumps(result))
            return
        _print_gc(result)
        return
    with open_store(target) as store:
        report = dryrun.dry_run(store, names)
    if as_json:
        click.echo(json.dumps(report))
        return
    out = stdout_bytes()
    for ws in report["workspaces"]:
        out.write(line_bytes(f"workspace {ws['workspace']}: {ws['versions']} versions, would drop "
                        f"{ws['dropped_versions']} ({human_size(ws['dropped_bytes'])} logical), keep {ws['kept_versions']}"))
        for p in ws["paths"]:
            seqs = ", ".join(str(s) for s in p["dropped"])
            out.write(line_bytes(f"  {p['path']}: drop {len(p['dropped'])} of {p['versions']} (seqs {seqs})"))
    out.write(line_bytes(f"would free {report['freed_chunks']} chunks, {human_size(report['freed_bytes'])} stored "
                    f"({human_size(report['freed_raw_bytes'])} before compression); dry run, nothing changed"))


def _print_gc(result: dict) -> None:
    click.echo(f"pruned {result['pruned_versions']} versions of {', '.join(result['workspaces']) or 'no workspace'} "
               f"({result['pruned_records']} inode records)")
    click.echo(f"freed {result['freed_contents']} contents ({human_size(result['freed_logical_bytes'])} logical), "
               f"{result['freed_chunks']} chunks, {human_size(result['freed_bytes'])} stored "
               f"({human_size(result['freed_raw_bytes'])} before compression)")
    click.echo(f"compacted: {result['packs_deleted']} packs deleted, {result['packs_written']} written; "
               f"{human_size(max(0, result['reclaimed_bytes']))} of disk space back")
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
    target = choose_target(store_opt, None)
    with open_store(target) as store, progress_bar("Checking") as progress:
        modes_changed = store.tighten_modes() if repair else 0
        report = check_store(store, repair=repair, verify_contents=verify_contents, progress=progress)
    reports = [report]
    if repair and report.metadata_rebuilt:
        # the metadata file was replaced: check (and repair) the new one, e.g. refcounts of derived records
        with open_store(target) as store, progress_bar("Checking the rebuilt metadata") as progress:
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


@cli.command()
@click.argument("where", metavar="[PATH]", required=False)
@workspace_options
@json_option
def stats(where, store_opt, ws_opt, as_json) -> None:
    """Store figures (bytes, dedup and compression, counts) and the workspace's."""
    target = in_mount(store_opt, ws_opt, where)
    with open_store(target) as store:
        figures = store.stats()
        try:
            ws = store.open_workspace(target.workspace)
        except NotFound:
            if target.workspace_chosen:
                raise
            ws = None
        if ws is not None:     # as .chronicle/stats shows them (without where a mount serves them)
            retention = gc_stats.current(store, ws, deadline=time.monotonic() + gc_stats.CLI_DEADLINE)
            figures = gc_stats.workspace_figures(store, ws, retention)
            figures["retention_refreshing"] = False
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    rows = []
    for key, value in figures.items():
        if key.endswith("_bytes") and value is not None:
            value = f"{human_size(value)} ({value})"
        elif key == "last_gc" and isinstance(value, dict):
            value = (f"{value['time']}: pruned {value['pruned_versions']} versions, freed "
                     f"{value.get('freed_chunks', 0)} chunks, {human_size(value.get('freed_bytes'))}, "
                     f"{human_size(max(0, value.get('reclaimed_bytes') or 0))} of disk space back "
                     f"in {value.get('duration_seconds', 0):.1f} s")
        elif value is None:
            value = "-"
        rows.append([key.replace("_", " ") + ":", str(value)])
    print_table(rows)
