"""The cost of read tracking (issue 12 §2), run by ``agent_bench.py --reads``.

(d) **Read tracking on vs off.** The same agents with ``track_reads`` True
(the default) and False:

- per-turn overhead: a no-op agent (``noop``), and one that reads one
  4 KiB file per turn (``read4k``: a one-entry read-set, one LMDB write at
  the turn's end), the median ms of a turn through the runtime (``Runtime.ask``);
- sequential read throughput through the agent's mount: the agent reads a
  ``--read-mib`` file (default 256 MiB) front to back in 1 MiB ``read``\\ s
  inside a turn, median of 7 rounds, MiB/s. ``cold``: the file's cached
  pages dropped first (``posix_fadvise(POSIX_FADV_DONTNEED)``), so every
  byte comes from the daemon; ``warm``: read again at once — untracked, the
  kernel's page cache answers; tracked, the open drops the cache (a
  tracked turn must see its reads) and the daemon serves it again.
"""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from pathlib import Path

from chronicle.store.history.reads import ReadLog

from agent_runtime import Runtime

READ_AGENTS = textwrap.dedent('''
    import json, os, time
    from agent_runtime import BaseAgent, DeltaState

    class Noop(BaseAgent):
        class State(DeltaState):
            _entity_type = "noop"

        async def on_message(self, ctx, message):
            pass

    class NoopUntracked(Noop):
        track_reads = False

    class Reader(BaseAgent):
        class State(DeltaState):
            _entity_type = "reader"

        async def on_message(self, ctx, message):
            msg = await ctx.send_message("")
            if "make" in message:                      # write the file (no reads)
                block = os.urandom(1 << 20)
                with open(message["make"][0], "wb") as f:
                    for _ in range(message["make"][1]):
                        f.write(block)
                await msg.stream_token("made", final=True)
                return
            path = message["read"]
            started = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                if message.get("cold"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    started = time.perf_counter()
                total = 0
                while chunk := f.read(1 << 20):
                    total += len(chunk)
            await msg.stream_token(json.dumps([total, time.perf_counter() - started]), final=True)

    class ReaderUntracked(Reader):
        track_reads = False
''')

ROUNDS = 7


async def _turns(rt: Runtime, agent: str, message: dict, turns: int) -> float:
    """Seconds for ``turns`` turns of ``agent``, one after the other."""
    started = time.perf_counter()
    for _ in range(turns):
        result = await rt.ask(agent, message)
        if result["status"] != "completed":
            raise RuntimeError(f"turn of {agent}: {result['status']}: {result['error']}")
    return time.perf_counter() - started


async def _rate(rt: Runtime, agent: str, mib: int, cold: bool) -> float:
    """MiB/s of one read of the big file by ``agent``, timed in the agent."""
    result = await rt.ask(agent, {"read": "big.bin", "cold": cold})
    total, seconds = json.loads(result["reply"])
    if total != mib << 20:
        raise RuntimeError(f"{agent} read {total} bytes of {mib} MiB")
    return total / (1 << 20) / seconds


async def read_tracking(rt: Runtime, src: Path, turns: int, mib: int) -> dict:
    """The figures of (d) (module docstring), as a dict. Tracked and
    untracked agents take turns one by one (turn times: medians) and rounds,
    each first half of the time, so drift of the machine's load falls on both."""
    (src / "bench_reads.py").write_text(READ_AGENTS)
    keys = {"tracked": "", "untracked": "Untracked"}
    out: dict = {"turns": turns, "read_mib": mib, "rounds": ROUNDS}
    for key, suffix in keys.items():
        await rt.create(f"noop-{key}", f"bench_reads:Noop{suffix}", cwd=src)
        await rt.create(f"reader-{key}", f"bench_reads:Reader{suffix}", cwd=src)
        await rt.ask(f"reader-{key}", {"make": ["big.bin", mib]})   # (the workspace is mounted from now on)
        (rt.mountpoint(f"reader-{key}") / "small.bin").write_bytes(b"x" * 4096)
        await _turns(rt, f"noop-{key}", {}, 10)                      # warm-up: worker, mount
        await _turns(rt, f"reader-{key}", {"read": "small.bin"}, 10)
    times: dict = {(key, kind): [] for key in keys for kind in ("noop", "read4k")}
    order = [list(keys), list(reversed(keys))]        # each goes first half of the time
    for i in range(turns):
        for key in order[i % 2]:
            times[key, "noop"].append(await _turns(rt, f"noop-{key}", {}, 1))
            times[key, "read4k"].append(await _turns(rt, f"reader-{key}", {"read": "small.bin"}, 1))
    rates: dict = {(key, cold): [] for key in keys for cold in (True, False)}
    for i in range(ROUNDS):
        for key in order[i % 2]:
            for cold in (True, False):
                rates[key, cold].append(await _rate(rt, f"reader-{key}", mib, cold))
    for key in keys:
        reader = f"reader-{key}"
        reads = ReadLog(rt.store).turn_reads(reader, reader, rt.turns(reader)[-1]["turn"])
        out[key] = {"noop_ms": statistics.median(times[key, "noop"]) * 1000,
                    "read4k_ms": statistics.median(times[key, "read4k"]) * 1000,
                    "cold_mib_s": statistics.median(rates[key, True]),
                    "warm_mib_s": statistics.median(rates[key, False]),
                    "last_read_set": [(r["path"], r["bytes"]) for r in reads]}   # tracked: the whole file
        await rt.shutdown_agent(f"noop-{key}")
        await rt.shutdown_agent(reader)
    return out


def report(d: dict, ms) -> None:
    """Print (d); ``ms`` formats seconds as milliseconds (agent_bench's)."""
    print(f"(d) Read tracking on vs off (track_reads): {d['turns']:,} turns each (medians); "
          f"a {d['read_mib']} MiB file read in 1 MiB reads, median of {d['rounds']}")
    rows = [("", "tracked", "untracked", "tracked/untracked")]
    t, u = d["tracked"], d["untracked"]
    for label, name, unit in (("no-op turn", "noop_ms", "ms"), ("turn reading a 4 KiB file", "read4k_ms", "ms"),
                              ("sequential read, cold", "cold_mib_s", "MiB/s"),
                              ("sequential read, warm", "warm_mib_s", "MiB/s")):
        fmt = (lambda v: ms(v / 1000)) if unit == "ms" else (lambda v: f"{v:,.0f}")
        rows.append((f"{label} ({unit})", fmt(t[name]), fmt(u[name]), f"{t[name] / u[name]:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("  cold: cached pages dropped first; warm: read again at once (untracked: the page cache answers)")
