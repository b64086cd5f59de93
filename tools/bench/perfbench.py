#!/usr/bin/env python3
"""Issue 11's benchmark: ext4, the pass-through, JuiceFS and Chronicle side by side.

    .venv/bin/python tools/bench/perfbench.py [--quick] [--rounds 2]
        [--targets ext4,passthrough,juicefs,chronicle] [--workloads seq,randwrite,...]
        [--git-repo BARE] [--json PATH] [--workdir /var/tmp]

All targets are mounted at once; each workload then runs ``--rounds`` times,
every round on every target in turn (the order rotates by one per round), and
each figure printed is the median over the rounds. One table: a row per
figure, a column per target, and the ratios Chronicle/ext4,
Chronicle/pass-through and Chronicle/JuiceFS (figure over figure: above 1 is
better for a rate, worse for a time -- the ``better`` column says which).

fsbench's five workloads (tools/bench/workloads.py) plus issue 11's
(tools/bench/perf_workloads.py). Exit status: 0 if every workload ran on every
available target, 1 if one failed (its cells say ``error``, the traceback goes
to stderr), 2 on bad arguments. See tools/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from tools.bench import fsbench  # noqa: E402
from tools.bench import perf_workloads as pw  # noqa: E402
from tools.bench import workloads as wl  # noqa: E402
from tools.bench.juicefs import JuiceFSTarget  # noqa: E402
from tools.bench.targets import TARGETS, Target, TargetUnavailable  # noqa: E402
from tools.passthrough import cache_dir  # noqa: E402

ALL_TARGETS: dict[str, type[Target]] = {"ext4": TARGETS["ext4"], "passthrough": TARGETS["passthrough"],
                                        "juicefs": JuiceFSTarget, "chronicle": TARGETS["chronicle"]}
HEADERS = {"ext4": "ext4", "passthrough": "pass-through", "juicefs": "JuiceFS", "chronicle": "Chronicle"}

# workload -> the metrics it produces, in table order
WORKLOADS: dict[str, list[str]] = {
    "seq": ["seqwrite", "seqread"],
    "randwrite": ["randwrite"],
    "createstat": ["createstat"],
    "untar": ["untar", "gitadd"],
    "append": ["append_0M", "append_8M", "append_64M"],
    "fsync": ["fsync"],
    "edits": ["edits_ms", "edits_growth"],
    "sqlite": ["sqlite_normal", "sqlite_full"],
    "checkout": ["checkout"],
    "tree": ["tree_untar", "tree_rm"],
}

# metric -> (row title, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "seqwrite": ("sequential write {seq} + close, MiB/s", True),
    "seqread": ("sequential read, fresh mount, caches dropped, MiB/s", True),
    "randwrite": ("{ops:,} random 4 KiB writes + fsync, IOPS", True),
    "createstat": ("create + stat + unlink of {files:,} files, files/s", True),
    "untar": ("untar of the Python stdlib, files/s", True),
    "gitadd": ("git init + git add -A of it, files/s", True),
    "append_0M": ("append {append} B + close at 0 MiB, median ms", False),
    "append_8M": ("append {append} B + close at 8 MiB, median ms", False),
    "append_64M": ("append {append} B + close at 64 MiB, median ms", False),
    "fsync": ("append {append} B + fsync, median µs", False),
    "edits_ms": ("{edits} ten-byte edits of {edit} + fsync each, total ms", False),
    "edits_growth": ("  store growth of those edits (chunks + metadata), MiB", False),
    "sqlite_normal": ("sqlite WAL {inserts:,} inserts, synchronous=NORMAL, inserts/s", True),
    "sqlite_full": ("sqlite WAL {inserts:,} inserts, synchronous=FULL, inserts/s", True),
    "checkout": ("git checkout -f replay of {commits} commits, total s", False),
    "tree_untar": ("untar of a {tree:,}-file tree, files/s", True),
    "tree_rm": ("rm -rf of that tree, files/s", True),
}

QUICK_PERF = {"append_sizes": (0, 8 * wl.MiB, 64 * wl.MiB), "append_reps": 3, "fsync_ops": 30,
              "edits": 16, "sqlite_inserts": 1_000, "git_files": 100, "git_commits": 30, "tree_files": 1_000}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="perfbench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=fsbench._csv(list(ALL_TARGETS)), default=list(ALL_TARGETS),
                   help=f"comma-separated, default: {','.join(ALL_TARGETS)}")
    p.add_argument("--workloads", type=fsbench._csv(list(WORKLOADS)), default=list(WORKLOADS),
                   help=f"comma-separated, default: {','.join(WORKLOADS)}")
    p.add_argument("--rounds", type=int, default=2, help="rounds per workload (default 2); medians over them")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (see the README)")
    p.add_argument("--size", type=fsbench.parse_size, help="seq file size (default 512M; quick 64M)")
    p.add_argument("--rand-file-size", type=fsbench.parse_size, help="randwrite file (default 256M)")
    p.add_argument("--rand-ops", type=int, help="random 4 KiB writes (default 8000)")
    p.add_argument("--files", type=int, help="files for createstat (default 3000)")
    p.add_argument("--append-sizes", help="comma-separated file sizes for append (default 0,8M,64M)")
    p.add_argument("--edit-file-size", type=fsbench.parse_size, help="file for the small edits (default 32M)")
    p.add_argument("--sqlite-inserts", type=int, help="inserts per sqlite run (default 20000)")
    p.add_argument("--git-commits", type=int, help="commits to replay (default 300)")
    p.add_argument("--git-files", type=int, help="files in the generated repository (default 300)")
    p.add_argument("--git-repo", type=Path, metavar="BARE", help="replay this bare clone instead")
    p.add_argument("--tree-files", type=int, help="files in the untar + rm -rf tree (default 5000)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every round's figures here")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="parent of the run's temp dir (default %(default)s, must be local disk)")
    args = p.parse_args(argv)
    bench_cache = cache_dir() / "bench"
    cfg = wl.Config(seq_size=512 * wl.MiB, rand_ops=8_000, files=3_000, cache_dir=bench_cache)
    perf = pw.PerfConfig(cache_dir=bench_cache)
    if args.quick:
        for k, v in fsbench.QUICK.items():
            setattr(cfg, k, v)
        for k, v in QUICK_PERF.items():
            setattr(perf, k, v)
    for opt, obj, attr in (("size", cfg, "seq_size"), ("rand_file_size", cfg, "rand_file_size"),
                           ("rand_ops", cfg, "rand_ops"), ("files", cfg, "files"),
                           ("edit_file_size", perf, "edit_file_size"), ("sqlite_inserts", perf, "sqlite_inserts"),
                           ("git_commits", perf, "git_commits"), ("git_files", perf, "git_files"),
                           ("tree_files", perf, "tree_files"), ("git_repo", perf, "git_repo")):
        if getattr(args, opt) is not None:
            setattr(obj, attr, getattr(args, opt))
    if args.append_sizes is not None:
        try:
            perf.append_sizes = tuple(0 if s.strip() == "0" else fsbench.parse_size(s)
                                      for s in args.append_sizes.split(","))
        except argparse.ArgumentTypeError as exc:
            p.error(f"--append-sizes: {exc}")
        WORKLOADS["append"] = [f"append_{s // wl.MiB}M" for s in perf.append_sizes]
        for s in perf.append_sizes:
            METRICS.setdefault(f"append_{s // wl.MiB}M", (f"append {{append}} B + close at {s // wl.MiB} MiB, "
                                                          "median ms", False))
    counts = [cfg.rand_ops, cfg.files, perf.sqlite_inserts, perf.git_commits, perf.git_files,
              perf.tree_files, args.rounds]
    if min(counts) <= 0:
        p.error("counts and --rounds must be positive")
    if args.git_repo is not None and not (args.git_repo / "HEAD").exists():
        p.error(f"--git-repo {args.git_repo}: not a git repository (no HEAD)")
    args.cfg, args.perf = cfg, perf
    return args


def steps(cfg: wl.Config, perf: pw.PerfConfig) -> dict[str, Callable[[Target], list[wl.Measurement]]]:
    return {
        "seq": lambda t: wl.sequential(t, cfg, write=True, read=True),
        "randwrite": lambda t: wl.random_writes(t, cfg),
        "createstat": lambda t: wl.create_stat_unlink(t, cfg),
        "untar": lambda t: wl.untar_git_add(t, cfg),
        "append": lambda t: pw.append_close(t, perf),
        "fsync": lambda t: pw.fsync_latency(t, perf),
        "edits": lambda t: pw.small_edits(t, perf),
        "sqlite": lambda t: pw.sqlite_wal(t, perf),
        "checkout": lambda t: pw.git_checkout(t, perf),
        "tree": lambda t: pw.tree_untar_rm(t, perf),
    }


def run(targets: dict[str, Target], workloads: list[str], rounds: int, cfg: wl.Config,
        perf: pw.PerfConfig) -> tuple[dict, bool]:
    """Run every workload ``rounds`` times over the opened targets, round-robin.

    Returns ({metric: {target: [round figures] | {"error": text}}}, failed).
    """
    table: dict[str, dict] = {}
    failed = False
    names = list(targets)
    if not names:
        return table, False
    for workload in workloads:
        step = steps(cfg, perf)[workload]
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                print(f"perfbench: round {r + 1}/{rounds}: {name}: {workload} ...", file=sys.stderr, flush=True)
                try:
                    got = step(targets[name])
                except Exception as exc:  # report, go on with the next target
                    traceback.print_exc(file=sys.stderr)
                    failed = True
                    for metric in WORKLOADS[workload]:
                        table.setdefault(metric, {})[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                for m in got:
                    print(f"perfbench: {name}: {m.metric} {m.value:,.2f} {m.unit}", file=sys.stderr, flush=True)
                    cell = table.setdefault(m.metric, {}).setdefault(name, [])
                    if isinstance(cell, list):  # not an error from an earlier round
                        cell.append({"value": m.value, "unit": m.unit, "seconds": m.seconds,
                                     "details": m.details})
    return table, failed


def medians(table: dict) -> dict[str, dict[str, float | None]]:
    return {metric: {name: (statistics.median(r["value"] for r in cell) if isinstance(cell, list) and cell
                            else None) for name, cell in row.items()}
            for metric, row in table.items()}


def report(table: dict, status: dict, workloads: list[str], cfg: wl.Config, perf: pw.PerfConfig,
           rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 170)
    fields = {"seq": fsbench.human_size(cfg.seq_size), "ops": cfg.rand_ops, "files": cfg.files,
              "append": pw.APPEND, "edits": perf.edits, "edit": fsbench.human_size(perf.edit_file_size),
              "inserts": perf.sqlite_inserts, "commits": perf.git_commits, "tree": perf.tree_files}
    names = list(status)
    med = medians(table)
    out = Table(title=f"medians of {rounds} interleaved round(s)", title_justify="left")
    out.add_column("workload")
    for name in names:
        out.add_column(HEADERS[name], justify="right")
    refs = [r for r in ("ext4", "passthrough", "juicefs") if r in names and "chronicle" in names]
    for ref in refs:
        out.add_column(f"C/{HEADERS[ref]}", justify="right")
    out.add_column("better")
    for workload in workloads:
        for metric in WORKLOADS[workload]:
            title, higher = METRICS[metric]
            row = table.get(metric, {})
            cells = []
            for name in names:
                if not status[name]["available"]:
                    cells.append("n/a")
                elif isinstance(row.get(name), dict):
                    cells.append("error")
                elif med.get(metric, {}).get(name) is None:
                    cells.append("—")
                else:
                    cells.append(fsbench.fmt(med[metric][name]))
            chron = med.get(metric, {}).get("chronicle")
            for ref in refs:
                base = med.get(metric, {}).get(ref)
                cells.append(f"{chron / base:.2f}x" if chron is not None and base else "—")
            out.add_row(title.format(**fields), *cells, "higher" if higher else "lower")
    console.print(out)
    for name in names:
        if not status[name]["available"]:
            console.print(f"note: {name} unavailable: {status[name]['error']}", markup=False, highlight=False)
    for metric, row in table.items():
        for name, cell in row.items():
            if isinstance(cell, dict):
                console.print(f"note: {metric} on {name}: {cell['error']}", markup=False, highlight=False)
    growth = table.get("edits_growth", {})
    for name, cell in growth.items():
        if isinstance(cell, list) and cell:
            d = cell[-1]["details"]
            console.print(f"note: edits store growth on {name} (last round): chunks {d['chunks_mib'] * 1024:,.1f} KiB"
                          f" + metadata {d['metadata_mib'] * 1024:,.1f} KiB", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.workdir.is_dir():
        print(f"perfbench: --workdir {args.workdir} is not a directory", file=sys.stderr)
        return 2
    fsbench.check_space(args.workdir, args.cfg, ["seqwrite"] if "seq" in args.workloads else [])
    signal.signal(signal.SIGTERM, fsbench._raise_interrupt)
    signal.signal(signal.SIGHUP, fsbench._raise_interrupt)
    status: dict[str, dict] = {}
    opened: dict[str, Target] = {}
    run_dir = Path(tempfile.mkdtemp(prefix="perfbench-", dir=args.workdir))
    try:
        # Inputs are built (and cached) before anything is timed.
        if "untar" in args.workloads:
            wl.stdlib_tarball(args.cfg.cache_dir)
        if "checkout" in args.workloads and args.perf.git_repo is None:
            pw.gitrepo.build_repo(args.perf.cache_dir, args.perf.git_files, args.perf.git_commits)
        if "tree" in args.workloads:
            pw.gitrepo.tree_tarball(args.perf.cache_dir, args.perf.tree_files)
        for name in args.targets:
            target = ALL_TARGETS[name](run_dir / name)
            status[name] = {"available": True, "error": None}
            try:
                target.open()
            except TargetUnavailable as exc:
                target.close()
                status[name] = {"available": False, "error": str(exc)}
                print(f"perfbench: {name}: unavailable: {exc}", file=sys.stderr, flush=True)
                continue
            opened[name] = target
        table, failed = run(opened, args.workloads, args.rounds, args.cfg, args.perf)
    finally:
        for target in opened.values():
            target.close()
        fsbench.remove_run_dir(run_dir)
    report(table, status, args.workloads, args.cfg, args.perf, args.rounds)
    if args.json:
        config = {"fs": asdict(args.cfg), "perf": asdict(args.perf), "rounds": args.rounds,
                  "workloads": args.workloads}
        args.json.write_text(json.dumps({"meta": fsbench.machine_info(), "config": config, "targets": status,
                                         "rounds": table, "medians": medians(table)},
                                        indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("perfbench: interrupted; mounts and temp dirs cleaned up", file=sys.stderr)
        sys.exit(130)
