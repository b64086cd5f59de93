#!/usr/bin/env python3
"""Agent runtime benchmark: the cost of a turn, and restoring an agent with a long turn log.

    .venv/bin/python tools/bench/agent_bench.py [--quick] [--turns N] [--log-turns N] [--json PATH]
        [--steps N] [--workdir /var/tmp] [--reads [--read-mib N]]

(a) **Per-turn overhead.** ``--turns`` message turns of an agent that does
nothing (``noop``) and of one that changes its state a little (``counter``:
one ``replace`` and one ``add`` per turn), sent one after the other with
``Runtime.ask``: coordinator → worker IPC, ``ctl`` turn-begin/turn-end on the
agent's mount, the turn records (``running``, then final) committed to LMDB.
Against the same agent called directly in this process: ``await
agent.on_message(AgentContext(...), message)`` with no runtime, and the
state's recorded patch drained as the worker does. Prints ms/turn for both
and the ratio.

(b) **Restoring a long log.** An agent whose log holds ``--log-turns``
(10,000) message turns, written with ``TurnLog`` exactly as the mount daemon
writes them for the runtime (a ``running`` record, then the completed one with its JSON Patch;
a full state snapshot every 100 turns), then timed: ``Runtime.state()`` at the
latest turn and at the worst case (the turn just before a snapshot: the most
patches to apply), ``Runtime.turns()`` (what ``chronicle agent turns`` reads),
and waking the agent (``Runtime.start``: mount its workspace, start a worker,
load the state, ``on_init``) against waking an agent with one turn, each the
median of 3, and the first message after a wake.

(c) **Steps and reads during a turn.** The cost of one ``ctx.step`` (a
turn of ``--steps`` steps against a turn of none: each step a worker →
coordinator → ``ctl step`` → LMDB round trip), and ``Runtime.state()`` /
``Runtime.turns()`` answered while the agent is mid-turn.

(d) **Read tracking** (``--reads``): per-turn overhead and sequential read
throughput with ``track_reads`` on and off (``tools/bench/read_bench.py``).

Not a CI test (figures depend on the machine); ``tests/bench/test_bench_smoke.py``
runs ``--quick`` so it does not rot. Everything lives in one fresh directory
under ``--workdir``, removed at the end; every agent is shut down and every
mount unmounted (``Runtime.close``), also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from agent_runtime import AgentContext, Runtime  # noqa: E402
from agent_runtime.loader import load_agent_class  # noqa: E402
from tools.bench import read_bench  # noqa: E402

AGENTS = textwrap.dedent('''
    from agent_runtime import BaseAgent, DeltaState

    class Noop(BaseAgent):
        class State(DeltaState):
            _entity_type = "noop"
            count: int = 0

        async def on_message(self, ctx, message):
            pass

    class Stepper(BaseAgent):
        class State(DeltaState):
            _entity_type = "stepper"
            count: int = 0

        async def on_message(self, ctx, message):
            for i in range(message.get("steps", 0)):
                await ctx.step(f"s{i}", int, i)
            if message.get("hold"):             # (c): mid-turn until the next message is queued
                ctx.signal_idle()
                await ctx.wait_for_wakeup(60)

    class Counter(BaseAgent):
        class State(DeltaState):
            _entity_type = "counter"
            count: int = 0
            history: list[str] = []

        async def on_message(self, ctx, message):
            ctx.state.count += 1
            ctx.state.history.append(message.get("text", ""))
''')

SNAPSHOT_EVERY = 100
STARTS = 3


def ms(seconds: float) -> str:
    """Milliseconds with three significant digits (sub-microsecond direct calls included)."""
    value = seconds * 1000
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.2f}"


# -- (a) per-turn overhead --------------------------------------------------------------------


async def direct_turns(cls, workspace: Path, turns: int) -> float:
    """Seconds per turn calling ``on_message`` in process, no runtime."""
    agent = cls()
    ctx = AgentContext("direct", workspace, cls.State())
    for i in range(min(turns, 100)):                    # warm-up
        await agent.on_message(ctx, {"text": f"m{i}"})
        ctx.state.drain_patch()
    ctx.state.reset_to(cls.State().to_json())
    started = time.perf_counter()
    for i in range(turns):
        await agent.on_message(ctx, {"text": f"m{i}"})
        ctx.state.drain_patch()
    return (time.perf_counter() - started) / turns


async def runtime_turns(rt: Runtime, agent: str, target: str, src: Path, turns: int) -> float:
    """Seconds per turn through the runtime (``ask``, one message at a time)."""
    await rt.create(agent, target, cwd=src)
    for i in range(min(turns, 10)):                     # warm-up: worker, mount, page cache
        await rt.ask(agent, {"text": f"w{i}"})
    started = time.perf_counter()
    for i in range(turns):
        result = await rt.ask(agent, {"text": f"m{i}"})
        if result["status"] != "completed":
            raise RuntimeError(f"turn {result['turn']} of {agent}: {result['status']}: {result['error']}")
    elapsed = (time.perf_counter() - started) / turns
    await rt.shutdown_agent(agent)
    return elapsed


async def overhead(rt: Runtime, src: Path, work: Path, turns: int) -> dict:
    out = {}
    for name in ("noop", "counter"):
        cls_name = name.capitalize()
        cls = load_agent_class(f"bench_agents:{cls_name}", src)
        direct = await direct_turns(cls, work, turns)
        through = await runtime_turns(rt, name, f"bench_agents:{cls_name}", src, turns)
        out[name] = {"turns": turns, "direct_ms": direct * 1000, "runtime_ms": through * 1000,
                     "ratio": through / direct if direct else None}
    return out


# -- (c) steps, and reads while a turn runs ----------------------------------------------------------


async def steps_and_reads(rt: Runtime, src: Path, work: Path, steps: int) -> dict:
    """The cost of one ``ctx.step`` (a turn of ``steps`` steps against a turn
    of none, median of 5 each), and ``Runtime.state``/``turns`` while a turn
    runs (median of 50 each, the turn waiting meanwhile)."""
    await rt.create("stepper", "bench_agents:Stepper", cwd=src)
    await rt.ask("stepper", {"steps": 3})

    async def turn(message: dict) -> float:
        started = time.perf_counter()
        result = await rt.ask("stepper", message)
        if result["status"] != "completed":
            raise RuntimeError(f"the step turn failed: {result['error']}")
        return time.perf_counter() - started

    empty = statistics.median([await turn({"steps": 0}) for _ in range(5)])
    full = statistics.median([await turn({"steps": steps}) for _ in range(5)])
    reply = await rt.send("stepper", {"hold": True})
    while not rt.turns("stepper")[-1]["status"] == "running":
        await asyncio.sleep(0.001)
    reads = {}
    for name, call in (("state", lambda: rt.state("stepper")), ("turns", lambda: rt.turns("stepper"))):
        times = []
        for _ in range(50):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        reads[name] = statistics.median(times)
    running = not reply.done
    release = await rt.send("stepper", {})          # queued: wakes the held turn (ctx.wait_for_wakeup)
    await reply.result(60)
    await release.result(60)
    await rt.shutdown_agent("stepper")
    return {"steps": steps, "step_ms": (full - empty) / steps * 1000, "turn_without_steps_ms": empty * 1000,
            "state_during_turn_ms": reads["state"] * 1000, "turns_during_turn_ms": reads["turns"] * 1000,
            "turns_listed": len(rt.turns("stepper")), "turn_was_running": running}


# -- (b) restoring a long log -------------------------------------------------------------------


def write_log(rt: Runtime, agent: str, turns: int) -> float:
    """Append ``turns`` completed message turns to ``agent``'s log as its mount
    daemon does for the runtime (``TurnLog.begin`` with the ``running``
    record, then ``TurnLog.end`` with the patch; snapshots every N), holding
    the workspace's writer lock itself (the agent is shut down). Seconds."""
    state = rt.state(agent)
    ws = rt.store.open_workspace(agent, writable=True)
    started = time.perf_counter()
    try:
        for n in range(1, turns + 1):
            turn = rt.turn_log.get(agent)["last_turn"] + 1
            text = f"message {n}"
            rt.turn_log.begin(ws, agent, turn, f"m{n}", record={"kind": "message", "message": {"text": text}})
            patch = [{"op": "replace", "path": "/count", "value": state["count"] + 1},
                     {"op": "add", "path": f"/history/{len(state['history'])}", "value": text}]
            state["count"] += 1
            state["history"].append(text)
            snapshot = None
            if turn % SNAPSHOT_EVERY == 0:
                snapshot = {"version": 1, "entity_type": "counter", "state": state}
            rt.turn_log.end(ws, {"status": "completed", "patch": patch, "duration_ms": 0.1, "reply": "",
                                 "messages": []}, snapshot=snapshot)
    finally:
        rt.store.release_workspace(ws)
    rt.store.sync()
    return time.perf_counter() - started


async def timed_start(rt: Runtime, agent: str) -> float:
    await rt.shutdown_agent(agent)
    started = time.perf_counter()
    await rt.start(agent)
    return time.perf_counter() - started


async def restore(rt: Runtime, src: Path, turns: int) -> dict:
    await rt.create("long", "bench_agents:Counter", cwd=src)
    await rt.create("short", "bench_agents:Counter", cwd=src)
    await rt.ask("short", {"text": "one"})
    await rt.shutdown_agent("long")
    wrote = write_log(rt, "long", turns)
    last = rt.turn_log.get("long")["last_turn"]
    worst = last - 1 if last % SNAPSHOT_EVERY == 0 else last
    while worst % SNAPSHOT_EVERY != SNAPSHOT_EVERY - 1 and worst > 1:
        worst -= 1

    def timed(fn, *args, repeat: int = 5):
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            value = fn(*args)
            times.append(time.perf_counter() - started)
        return statistics.median(times), value

    state_latest, _ = timed(rt.state, "long")
    state_worst, _ = timed(rt.state, "long", worst)
    at_latest, at_worst = rt.turn_log.state_at("long"), rt.turn_log.state_at("long", worst)
    turns_all, listed = timed(rt.turns, "long", repeat=3)
    start_long = statistics.median([await timed_start(rt, "long") for _ in range(STARTS)])
    start_short = statistics.median([await timed_start(rt, "short") for _ in range(STARTS)])
    await rt.shutdown_agent("long")
    started = time.perf_counter()
    result = await rt.ask("long", {"text": "after the wake"})
    first_message = time.perf_counter() - started
    if result["status"] != "completed" or rt.state("long")["count"] != turns + 1:
        raise RuntimeError(f"the restored agent is wrong: {result}, count {rt.state('long')['count']}")
    return {"turns": turns, "write_s": wrote, "state_latest_ms": state_latest * 1000,
            "state_latest_patches": at_latest.patches, "state_latest_snapshot": at_latest.snapshot_turn,
            "state_worst_turn": worst, "state_worst_ms": state_worst * 1000, "state_worst_patches": at_worst.patches,
            "state_worst_snapshot": at_worst.snapshot_turn, "turns_ms": turns_all * 1000, "turns_listed": len(listed),
            "start_long_ms": start_long * 1000, "start_short_ms": start_short * 1000,
            "first_message_after_wake_ms": first_message * 1000, "isolated": rt.isolation}


# -- main -----------------------------------------------------------------------------------


def report(a: dict, b: dict, c: dict) -> None:
    print(f"Agent runtime benchmark: Python {platform.python_version()}, {os.cpu_count()} CPU(s), "
          f"{platform.system()} {platform.release()}")
    print()
    turns = next(iter(a.values()))["turns"]
    print(f"(a) Per-turn overhead, {turns:,} message turns one after another (ms per turn)")
    rows = [("agent", "direct in-process", "through the runtime", "ratio")]
    for name, r in a.items():
        rows.append((name, ms(r["direct_ms"] / 1000), ms(r["runtime_ms"] / 1000), f"{r['ratio']:,.0f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("  noop: on_message does nothing; counter: one replace + one add per turn")
    print()
    print(f"(b) Restoring an agent with {b['turns']:,} turns (a state snapshot every {SNAPSHOT_EVERY})")
    lines = [
        (f"write {b['turns']:,} turns (TurnLog, as the daemon)",
         f"{b['write_s']:.2f} s ({b['turns'] / b['write_s']:,.0f} turns/s)"),
        ("Runtime.state(), latest turn",
         f"{ms(b['state_latest_ms'] / 1000)} ms (snapshot {b['state_latest_snapshot']:,} "
         f"+ {b['state_latest_patches']} patches)"),
        (f"Runtime.state(turn={b['state_worst_turn']:,}), worst case",
         f"{ms(b['state_worst_ms'] / 1000)} ms (snapshot {b['state_worst_snapshot']:,} "
         f"+ {b['state_worst_patches']} patches)"),
        (f"Runtime.turns(), all {b['turns_listed']:,}", f"{ms(b['turns_ms'] / 1000)} ms"),
        (f"wake (Runtime.start) of the {b['turns']:,}-turn agent", f"{ms(b['start_long_ms'] / 1000)} ms"),
        ("wake (Runtime.start) of a 1-turn agent", f"{ms(b['start_short_ms'] / 1000)} ms"),
        ("first message after a wake (ask, incl. the wake)", f"{ms(b['first_message_after_wake_ms'] / 1000)} ms"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}")
    print(f"  (wakes: median of {STARTS}; a wake mounts the workspace and starts a worker process, "
          f"{'isolated' if b.get('isolated') else 'not isolated'})")
    print()
    print("(c) Durable steps, and reads while a turn runs")
    lines = [
        (f"one ctx.step (a turn of {c['steps']} steps vs one of none)", f"{ms(c['step_ms'] / 1000)} ms"),
        ("Runtime.state() while a turn runs", f"{ms(c['state_during_turn_ms'] / 1000)} ms"),
        (f"Runtime.turns() while a turn runs ({c['turns_listed']} turns)", f"{ms(c['turns_during_turn_ms'] / 1000)} ms"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}")
    print(f"  (the turn was still running after the reads: {c['turn_was_running']})")


async def run(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    src = work / "src"
    src.mkdir()
    (src / "bench_agents.py").write_text(AGENTS)
    direct_dir = work / "direct"
    direct_dir.mkdir()
    async with Runtime(work / "store", snapshot_every=SNAPSHOT_EVERY,
                       isolation=False if args.no_isolation else None) as rt:
        a = await overhead(rt, src, direct_dir, args.turns)
        b = await restore(rt, src, args.log_turns)
        c = await steps_and_reads(rt, src, work, args.steps)
        if args.reads:
            args.read_figures = await read_bench.read_tracking(rt, src, args.turns, args.read_mib)
    return a, b, c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 turns, a log of 300 turns")
    parser.add_argument("--turns", type=int, help="message turns per agent for (a) (default 1000; quick: 30)")
    parser.add_argument("--log-turns", type=int, help="turns in the long log of (b) (default 10000; quick: 300)")
    parser.add_argument("--steps", type=int, help="steps in the step turn of (c) (default 200; quick: 20)")
    parser.add_argument("--reads", action="store_true", help="also (d): read tracking on vs off")
    parser.add_argument("--read-mib", type=int, help="MiB of the file (d) reads (default 256; quick: 16)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent of the run's temp dir")
    parser.add_argument("--no-isolation", action="store_true",
                        help="workers as this user, not isolated (the runtime's default as root: isolated)")
    args = parser.parse_args(argv)
    args.turns = args.turns or (30 if args.quick else 1000)
    args.log_turns = args.log_turns or (300 if args.quick else 10_000)
    args.steps = args.steps or (20 if args.quick else 200)
    args.read_mib = args.read_mib or (16 if args.quick else 256)
    args.read_figures = None
    if args.turns < 1 or args.log_turns < 2 or args.steps < 1:
        parser.error("--turns and --steps must be >= 1 and --log-turns >= 2")
    work = Path(tempfile.mkdtemp(prefix="agent-bench-", dir=args.workdir))
    try:
        a, b, c = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(a, b, c)
    figures = {"overhead": a, "restore": b, "steps": c}
    if args.read_figures is not None:
        print()
        read_bench.report(args.read_figures, ms)
        figures["reads"] = args.read_figures
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
