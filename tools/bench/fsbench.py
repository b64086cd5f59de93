#!/usr/bin/env python3
"""Run the same filesystem workloads on ext4, passthroughfs and Chronicle.

    .venv/bin/python tools/bench/fsbench.py [--quick] [--targets ext4,passthrough,chronicle]
        [--workloads seqwrite,seqread,randwrite,createstat,untar] [--size 1G]
        [--json PATH] [--workdir /var/tmp]

Prints one table per measured figure with a row per target: the figure
(higher is better), its ratio to ext4 and to passthrough. A target that cannot
be mounted (e.g. the Chronicle CLI is not there yet) is reported as
unavailable and the others still run. Exit status: 0 if every workload ran on
every available target, 1 if a workload failed, 2 on bad arguments.

Everything lives in one fresh directory under ``--workdir``; every mount is
unmounted and that directory removed in a ``finally`` (also on Ctrl-C and
SIGTERM). See tools/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from chronicle import procs  # noqa: E402
from tools.bench import workloads as wl  # noqa: E402
from tools.bench.targets import TARGETS, TargetUnavailable  # noqa: E402
from tools.passthrough import cache_dir  # noqa: E402

WORKLOADS = ["seqwrite", "seqread", "randwrite", "createstat", "untar"]

# metric -> (title template, workload that produces it)
METRICS = {
    "seqwrite": ("1. Sequential write, {seq} file in 1 MiB blocks, incl. close", "seqwrite"),
    "seqread": ("2. Sequential read of that file, 1 MiB blocks, fresh mount + dropped page cache",
                "seqread"),
    "randwrite": ("3. {ops:,} random 4 KiB pwrites on a {rand} file, incl. fsync + close",
                  "randwrite"),
    "createstat": ("4. create + stat + unlink of {files:,} empty files in one directory",
                   "createstat"),
    "untar": ("5a. tar -xf of the Python stdlib", "untar"),
    "gitadd": ("5b. git init + git add -A of that tree", "untar"),
}

UNITS = {"seqwrite": "MiB/s", "seqread": "MiB/s", "randwrite": "IOPS", "createstat": "files/s",
         "untar": "files/s", "gitadd": "files/s"}

QUICK = {"seq_size": 64 * wl.MiB, "rand_file_size": 64 * wl.MiB, "rand_ops": 2_000, "files": 1_000}


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``512MiB``, ``1048576`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 1G)")
    value = int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))
    if value <= 0 or value % wl.MiB:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB: {text!r}")
    return value


def _csv(choices: list[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad) or '(empty)'}; choose from {','.join(choices)}")
        return [c for c in choices if c in items]  # canonical order
    return parse


def human_size(n: int) -> str:
    return f"{n // wl.GiB} GiB" if n % wl.GiB == 0 else f"{n // wl.MiB} MiB"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fsbench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default = [t for t in TARGETS if t != "chronicle-s3"]      # chronicle-s3 starts a SeaweedFS server: on request
    p.add_argument("--targets", type=_csv(list(TARGETS)), default=default,
                   help=f"comma-separated from {','.join(TARGETS)}; default: {','.join(default)}")
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=WORKLOADS,
                   help=f"comma-separated, default: {','.join(WORKLOADS)}")
    p.add_argument("--size", type=parse_size, help="file size for seqwrite/seqread (default 1G)")
    p.add_argument("--rand-file-size", type=parse_size, help="file size for randwrite (default 256M)")
    p.add_argument("--rand-ops", type=int, help="number of 4 KiB random writes (default 20000)")
    p.add_argument("--files", type=int, help="files for createstat (default 10000)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-run sizes: 64M files, 2000 random writes, 1000 files")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the raw results here")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="parent of the run's temp dir (default %(default)s, must be local disk)")
    args = p.parse_args(argv)
    cfg = wl.Config(cache_dir=cache_dir() / "bench")
    if args.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    for opt, attr in (("size", "seq_size"), ("rand_file_size", "rand_file_size"),
                      ("rand_ops", "rand_ops"), ("files", "files")):
        if getattr(args, opt) is not None:
            setattr(cfg, attr, getattr(args, opt))
    if cfg.rand_ops <= 0 or cfg.files <= 0:
        p.error("--rand-ops and --files must be positive")
    args.cfg = cfg
    return args


def run_target(target, workloads: list[str], cfg: wl.Config) -> tuple[list, list]:
    """Run the selected workloads on an opened target; returns (measurements, errors)."""
    measurements, errors = [], []
    steps = []
    if "seqwrite" in workloads or "seqread" in workloads:
        steps.append((["seqwrite", "seqread"], lambda: wl.sequential(
            target, cfg, write="seqwrite" in workloads, read="seqread" in workloads)))
    if "randwrite" in workloads:
        steps.append((["randwrite"], lambda: wl.random_writes(target, cfg)))
    if "createstat" in workloads:
        steps.append((["createstat"], lambda: wl.create_stat_unlink(target, cfg)))
    if "untar" in workloads:
        steps.append((["untar"], lambda: wl.untar_git_add(target, cfg)))
    for names, step in steps:
        label = "+".join(n for n in names if n in workloads)
        print(f"fsbench: {target.name}: {label} ...", file=sys.stderr, flush=True)
        try:
            got = step()
        except Exception as exc:  # report, clean up, go on with the next workload
            traceback.print_exc(file=sys.stderr)
            produced = [m for m, (_, w) in METRICS.items() if w in names and w in workloads]
            errors.extend((m, f"{type(exc).__name__}: {exc}") for m in produced)
            continue
        for m in got:
            print(f"fsbench: {target.name}: {m.metric} {m.value:,.1f} {m.unit} ({m.seconds:.2f} s)",
                  file=sys.stderr, flush=True)
        measurements.extend(got)
    return measurements, errors


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def detail_text(metric: str, m: wl.Measurement) -> str:
    d = m.details
    if metric == "seqwrite":
        return f"{m.seconds:.2f} s, close {d['close_s']:.3f} s"
    if metric == "seqread":
        return f"{m.seconds:.2f} s" + ("" if d["cache_dropped"] else ", page cache NOT dropped")
    if metric == "randwrite":
        return f"{m.seconds:.2f} s, of which fsync+close {d['fsync_close_s']:.3f} s"
    if metric == "untar":
        return f"{m.seconds:.2f} s, {d['files']:,} files, {d['MiB']:.0f} MiB"
    if metric == "gitadd":
        return f"{m.seconds:.2f} s, {d['indexed']:,} files indexed"
    return f"{m.seconds:.2f} s"


def report(results: dict, cfg: wl.Config, targets: list[str], workloads: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=None if sys.stdout.isatty() else 130)
    fields = {"seq": human_size(cfg.seq_size), "rand": human_size(cfg.rand_file_size),
              "ops": cfg.rand_ops, "files": cfg.files}
    for metric, (title, workload) in METRICS.items():
        if workload not in workloads:
            continue
        rows = results["metrics"].get(metric, {})
        console.print(Text(title.format(**fields), style="bold"))
        table = Table()
        table.add_column("target")
        table.add_column(UNITS[metric], justify="right")
        table.add_column("vs ext4", justify="right")
        table.add_column("vs passthrough", justify="right")
        table.add_column("details")
        for name in targets:
            status = results["targets"][name]
            row = rows.get(name)
            if not status["available"]:
                table.add_row(name, "—", "—", "—", "unavailable (see below)")
                continue
            if row is None or "error" in row:
                table.add_row(name, "—", "—", "—", Text(f"error: {row['error'] if row else 'not run'}"))
                continue
            ratios = []
            for ref in ("ext4", "passthrough"):
                base = rows.get(ref, {}).get("value")
                ratios.append(f"{row['value'] / base:.2f}x" if base else "—")
            table.add_row(name, fmt(row["value"]), *ratios, Text(row["text"]))
        console.print(table)
    notes = [f"{name} unavailable: {results['targets'][name]['error']}"
             for name in targets if not results["targets"][name]["available"]]
    if any(not r.get("details", {}).get("cache_dropped", True)
           for r in results["metrics"].get("seqread", {}).values()):
        notes.append("the page cache could not be dropped (not root?): reads may come from memory")
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)


def machine_info() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import pyfuse3
        info["pyfuse3"] = pyfuse3.__version__
    except Exception:  # the bench still runs ext4 without pyfuse3
        pass
    return info


def check_space(workdir: Path, cfg: wl.Config, workloads: list[str]) -> None:
    """Refuse to start when the work dir obviously cannot hold one target's data."""
    need = 256 * wl.MiB
    if "seqwrite" in workloads or "seqread" in workloads:
        need += cfg.seq_size
    if "randwrite" in workloads:
        need += cfg.rand_file_size
    free = shutil.disk_usage(workdir).free
    if free < 2 * need:  # Chronicle keeps history (and passthrough reads its backing dir)
        raise SystemExit(f"fsbench: {workdir} has {free // wl.MiB} MiB free, "
                         f"needs about {2 * need // wl.MiB} MiB")


def remove_run_dir(run_dir: Path) -> None:
    """Remove the run's directory -- never through a mount that is still live."""
    live = procs.mounted_under(run_dir)
    if live:
        print(f"fsbench: warning: leaving {run_dir}: still mounted: {', '.join(live)}",
              file=sys.stderr)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = args.cfg
    if not args.workdir.is_dir():
        print(f"fsbench: --workdir {args.workdir} is not a directory", file=sys.stderr)
        return 2
    check_space(args.workdir, cfg, args.workloads)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally below runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    results = {"meta": machine_info(), "config": {
        "seq_size": cfg.seq_size, "rand_file_size": cfg.rand_file_size,
        "rand_ops": cfg.rand_ops, "files": cfg.files, "workloads": args.workloads},
        "targets": {}, "metrics": {}}
    failed = False
    run_dir = Path(tempfile.mkdtemp(prefix="fsbench-", dir=args.workdir))
    try:
        if "untar" in args.workloads:  # build the cached tarball before any timing
            wl.stdlib_tarball(cfg.cache_dir)
        for name in args.targets:
            target = TARGETS[name](run_dir / name)
            status = results["targets"][name] = {"available": True, "error": None}
            try:
                try:
                    target.open()
                except TargetUnavailable as exc:
                    status.update(available=False, error=str(exc))
                    print(f"fsbench: {name}: unavailable: {exc}", file=sys.stderr, flush=True)
                    continue
                measurements, errors = run_target(target, args.workloads, cfg)
            finally:
                target.close()
            failed |= bool(errors)
            for m in measurements:
                results["metrics"].setdefault(m.metric, {})[name] = {
                    "value": m.value, "unit": m.unit, "seconds": m.seconds,
                    "details": m.details, "text": detail_text(m.metric, m)}
            for metric, error in errors:
                results["metrics"].setdefault(metric, {})[name] = {"error": error}
    finally:
        remove_run_dir(run_dir)
    report(results, cfg, args.targets, args.workloads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("fsbench: interrupted; mounts and temp dirs cleaned up", file=sys.stderr)
        sys.exit(130)
