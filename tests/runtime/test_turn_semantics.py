"""Turns as transactions, durable steps, lineage and reads during a turn (SPEC §5, issue 8).

Real mounts and real worker processes, with the harness of
``test_agent_runtime`` (its ``env`` fixture: cleanup by PID, daemon logs
checked). The agents' code is ``turnagents.py`` in the test's source
directory; each message says what its turn does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from chronicle.errors import NotFound

try:
    from .test_agent_runtime import env, first_token   # noqa: F401  (the fixture)
except ImportError:
    from test_agent_runtime import env, first_token     # noqa: F401

pytestmark = pytest.mark.mount

AGENTS = '''
import asyncio, os, subprocess
from agent_runtime import BaseAgent, DeltaState, RetryPolicy

TRACE = os.environ["AGENT_TEST_TRACE"]

def trace(line):
    with open(TRACE, "a") as f:
        f.write(line + "\\n")

def write(path, text, mode=None):
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)
    return len(text)

class Files(BaseAgent):
    class State(DeltaState):
        _entity_type = "files"
        count: int = 0

    async def on_message(self, ctx, message):
        ctx.state.count += 1
        for op, *args in message.get("ops", []):
            if op == "write":
                write(*args)
            elif op == "mkdir":
                os.makedirs(args[0], exist_ok=True)
            elif op == "chmod":
                os.chmod(args[0], args[1])
            elif op == "rm":
                os.unlink(args[0])
            elif op == "rmdir":
                os.rmdir(args[0])
            elif op == "rename":
                os.rename(args[0], args[1])
            elif op == "symlink":
                os.symlink(args[0], args[1])
            elif op == "background":            # a child that outlives the turn
                subprocess.Popen(["sh", "-c", args[0]], cwd=ctx.workspace, start_new_session=False)
            elif op == "trace":
                trace(args[0])
            elif op == "wait_file":
                while not os.path.exists(args[0]):
                    await asyncio.sleep(0.01)
            elif op == "raise":
                raise RuntimeError(args[0])
        msg = await ctx.send_message("")
        await msg.stream_token(f"turn {ctx.turn}", final=True)

class Keeper(Files):
    atomic_turns = False

class Flaky(Exception):
    pass

class Stepper(Files):
    retry_policy = RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=0.5, retry_on=(Flaky,))

    async def on_message(self, ctx, message):
        ctx.state.count += 1
        mode = message.get("mode")
        if mode == "two_steps":
            one = await ctx.step("one", write, "one.txt", "first")
            trace(f"after one {one}")
            if not os.path.exists(message["killed"]):
                write("junk.txt", "written after step one by the attempt that dies")
                trace("waiting")
                while True:
                    await asyncio.sleep(0.01)
            two = await ctx.step("two", write, "two.txt", "second")
            trace(f"after two {two}")
        elif mode == "flaky":
            async def fetch(n):
                trace("fetch")
                if len(open(TRACE).read().split("fetch")) <= n:
                    raise Flaky("not yet")
                return {"got": n}
            got = await ctx.step("fetch", fetch, message["n"], retry=RetryPolicy(max_attempts=5, initial_delay=0.01,
                                                                            retry_on=(Flaky,)))
            ctx.state.count += got["got"]
        elif mode == "flaky_turn":
            await ctx.step("once", write, "once.txt", "x")
            if not os.path.exists(message["flag"]):
                write(message["flag"], "")
                raise Flaky("the first attempt fails")
        elif mode == "duplicate":
            await ctx.step("same", lambda: 1)
            await ctx.step("same", lambda: 2)
        elif mode == "not_json":
            await ctx.step("bad", lambda: {1, 2})
        msg = await ctx.send_message("")
        await msg.stream_token(f"turn {ctx.turn}", final=True)
'''

FILES, KEEPER, STEPPER = "turnagents:Files", "turnagents:Keeper", "turnagents:Stepper"


def tree(root: Path) -> dict:
    """Every name under ``root`` (but ``.chronicle``): its kind, permission bits and content or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != ".chronicle"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


BASE_OPS = [["write", "a.txt", "a", 0o644], ["write", "run.sh", "#!/bin/sh\n", 0o755], ["mkdir", "d/e"],
            ["write", "d/e/f.txt", "f"], ["write", "gone.txt", "g"], ["write", "keep.txt", "k"],
            ["mkdir", "empty"], ["symlink", "a.txt", "link"]]
# Everything a turn can do to a tree: new, changed, chmod'ed, deleted, renamed files; new and removed dirs.
WRECK_OPS = [["write", "partial.txt", "partial"], ["write", "a.txt", "changed"], ["chmod", "run.sh", 0o600],
             ["rm", "gone.txt"], ["rename", "keep.txt", "d/moved.txt"], ["mkdir", "new/deep"],
             ["write", "new/deep/x.txt", "x"], ["rmdir", "empty"], ["rm", "link"], ["symlink", "nowhere", "link"]]


async def base_turn(rt, env, agent, target=FILES):
    await rt.create(agent, target, cwd=env.src)
    first = await rt.ask(agent, {"ops": BASE_OPS})
    assert first["status"] == "completed"
    ws = Path(rt.mountpoint(agent))
    return ws, tree(ws)


async def traced(env, line: str, timeout: float = 30.0) -> None:
    """Until the agent traced ``line``."""
    deadline = time.monotonic() + timeout
    while line not in env.trace_lines():
        assert time.monotonic() < deadline, f"the agent did not trace {line!r}: {env.trace_lines()}"
        await asyncio.sleep(0.01)


def log_events(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / ".chronicle" / "log").read_text().splitlines()]


def labels_of(ws: Path, path: str) -> list:
    """The ``turn`` label of every ``.chronicle/log`` event of ``path``, oldest first."""
    return [e.get("turn") for e in log_events(ws) if e.get("path") == path]


@pytest.fixture
def agents(env):
    (env.src / "turnagents.py").write_text(AGENTS)
    return env


def test_failed_turn_leaves_the_previous_turns_tree(agents):
    async def program(rt):
        ws, before = await base_turn(rt, agents, "a")
        state = rt.state("a")
        failed = await rt.ask("a", {"ops": WRECK_OPS + [["raise", "boom"]]})
        assert failed["status"] == "failed" and "boom" in failed["error"]
        assert tree(ws) == before                       # names, kinds, modes, contents, link targets
        assert rt.state("a") == state
        # The attempt stays inspectable: its events, and its tree at its label's end.
        shown = rt.show_turn("a", failed["turn"])
        assert shown["undone"] == {"to_seq": rt.show_turn("a", failed["turn"] - 1)["end_seq"]}
        assert {"partial.txt", "gone.txt", "new/deep/x.txt"} <= {e["path"] for e in shown["files"]}
        attempt = ws / ".chronicle" / "at" / f"turn:a:{failed['turn']}"
        assert (attempt / "partial.txt").read_text() == "partial" and not (attempt / "gone.txt").exists()
        assert [t["undone"] for t in rt.turns("a")] == [False, False, True]
        # The undo is a new event after the label's end, carrying no turn label.
        after = [e for e in log_events(ws) if e["seq"] > shown["end_seq"]]
        assert [e["event"] for e in after] == ["restore"] and after[0].get("turn") is None
        ok = await rt.ask("a", {"ops": [["write", "after.txt", "1"]]})
        assert ok["status"] == "completed" and tree(ws) == {**before, "after.txt": ("file", 0o644, b"1")}
    agents.run(program)


def test_cancelled_turn_leaves_the_previous_turns_tree(agents):
    go = agents.tmp / "never"

    async def program(rt):
        ws, before = await base_turn(rt, agents, "c")
        reply = await rt.send("c", {"ops": WRECK_OPS + [["trace", "wrecked"], ["wait_file", str(go)]]})
        await traced(agents, "wrecked")
        assert await rt.cancel("c")
        result = await reply.result(30)
        assert result["status"] == "cancelled"
        assert tree(ws) == before
        assert (ws / ".chronicle" / "at" / f"turn:c:{result['turn']}" / "partial.txt").exists()
    agents.run(program)


def test_kill_9_of_the_worker_leaves_the_previous_turns_tree(agents):
    go = agents.tmp / "never"

    async def program(rt):
        ws, before = await base_turn(rt, agents, "k")
        pid = rt.worker_pid("k")
        reply = await rt.send("k", {"ops": WRECK_OPS + [["trace", "wrecked"], ["wait_file", str(go)]]})
        await traced(agents, "wrecked")
        os.kill(pid, signal.SIGKILL)
        result = await reply.result(30)
        assert result["status"] == "interrupted"
        assert tree(ws) == before
        assert {"partial.txt"} <= {e["path"] for e in rt.show_turn("k", result["turn"])["files"]}
        assert (await rt.ask("k", {}))["status"] == "completed" and tree(ws) == before
    agents.run(program)


def test_atomic_turns_false_keeps_the_partial_files(agents):
    async def program(rt):
        ws, before = await base_turn(rt, agents, "p", KEEPER)
        failed = await rt.ask("p", {"ops": [["write", "partial.txt", "kept"], ["raise", "boom"]]})
        assert failed["status"] == "failed" and "undone" not in rt.show_turn("p", failed["turn"])
        assert tree(ws) == {**before, "partial.txt": ("file", 0o644, b"kept")}
        assert rt.state("p")["count"] == 1                  # the state is still all-or-nothing
    agents.run(program)


def test_a_child_still_running_after_its_turn_writes_into_no_turn(agents):
    async def program(rt):
        ws, _ = await base_turn(rt, agents, "b")
        done = await rt.ask("b", {"ops": [["background", "sleep 0.5; echo late > late.txt"]]})
        assert done["status"] == "completed"
        deadline = time.monotonic() + 30
        while not (ws / "late.txt").exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)                            # its close is committed
        await rt.ask("b", {})
        assert labels_of(ws, "late.txt") and all(label is None for label in labels_of(ws, "late.txt"))
        assert (ws / "late.txt").read_text() == "late\n"
    agents.run(program)


def test_kill_9_between_two_steps_resumes_from_the_second(agents):
    killed = agents.tmp / "killed"

    async def program(rt):
        await rt.create("s", STEPPER, cwd=agents.src)
        ws = Path(rt.mountpoint("s"))
        pid = rt.worker_pid("s")
        reply = await rt.send("s", {"mode": "two_steps", "killed": str(killed)})
        await traced(agents, "waiting")
        running = rt.show_turn("s", 1)
        assert running["status"] == "running" and [s["name"] for s in running["steps"]] == ["one"]
        assert running["steps"][0]["result"] == 5
        killed.touch()
        os.kill(pid, signal.SIGKILL)
        result = await reply.result(60)
        assert result["status"] == "completed" and result["reply"] == "turn 1"
        assert rt.worker_pid("s") != pid
        # Step one ran once (its result reused); the attempt's writes after it were rolled back.
        assert agents.trace_lines() == ["after one 5", "waiting", "after one 5", "after two 6"]
        assert (ws / "one.txt").read_text() == "first" and (ws / "two.txt").read_text() == "second"
        assert not (ws / "junk.txt").exists()
        record = rt.show_turn("s", 1)
        assert record["attempts"] == 2 and [s["name"] for s in record["steps"]] == ["one", "two"]
        assert record["steps"][0]["seq"] < record["steps"][1]["seq"]
        assert rt.state("s") == {"count": 1}
        assert rt.turns("s")[1]["steps"] == 2 and rt.turns("s")[1]["attempts"] == 2
    agents.run(program)


def test_retry_policies_per_step_and_per_class(agents):
    flag = agents.tmp / "flag"

    async def program(rt):
        await rt.create("r", STEPPER, cwd=agents.src)
        ws = Path(rt.mountpoint("r"))
        got = await rt.ask("r", {"mode": "flaky", "n": 3})           # the step's own policy: 3 tries
        assert got["status"] == "completed" and rt.state("r")["count"] == 4
        assert agents.trace_lines().count("fetch") == 3
        again = await rt.ask("r", {"mode": "flaky_turn", "flag": str(flag)})   # the class policy: the turn
        assert again["status"] == "completed" and rt.show_turn("r", again["turn"])["attempts"] == 2
        assert (ws / "once.txt").read_text() == "x"
        assert rt.state("r")["count"] == 5                            # the failed attempt's +1 dropped
    agents.run(program)


def test_step_names_are_unique_and_results_json(agents):
    async def program(rt):
        await rt.create("u", STEPPER, cwd=agents.src)
        dup = await rt.ask("u", {"mode": "duplicate"})
        assert dup["status"] == "failed" and "step 'same' already ran in turn 1" in dup["error"]
        bad = await rt.ask("u", {"mode": "not_json"})
        assert bad["status"] == "failed" and "step 'bad' returned set, which is not JSON" in bad["error"]
        assert "steps" not in rt.show_turn("u", bad["turn"])
    agents.run(program)


def test_fork_numbering_continues_along_the_lineage(agents):
    async def program(rt):
        await rt.create("a", FILES, cwd=agents.src)
        for _ in range(3):
            await rt.ask("a", {})
        await rt.fork("a", "b", at=2)
        assert rt.agent("b")["parent"] == {"agent": "a", "turn": 2} and rt.agent("b")["first_turn"] == 2
        first = await rt.ask("b", {"ops": [["write", "b.txt", "b"]]})
        assert first["turn"] == 3 and first["reply"] == "turn 3"        # ctx.turn goes on: no t001 overwritten
        await rt.fork("b", "c")                                         # a fork of a fork, at b's turn 3
        assert (await rt.ask("c", {}))["turn"] == 4
        assert [(t["turn"], t["inherited"]) for t in rt.turns("c")] == \
            [(0, "a"), (1, "a"), (2, "b"), (3, None), (4, None)]
        assert rt.state("c", 1) == rt.state("a", 1) and rt.state("c") == {"count": 4}
        # An inherited turn can be rolled back to: files and state of a's turn 1.
        back = await rt.rollback("c", 1)
        assert back["status"] == "completed" and rt.state("c") == rt.state("a", 1)
        assert not (Path(rt.mountpoint("c")) / "b.txt").exists()
        with pytest.raises(NotFound):
            rt.show_turn("c", 9)
    agents.run(program)


def test_reads_answer_while_a_turn_runs(agents):
    go = agents.tmp / "go"

    async def program(rt):
        await rt.create("q", FILES, cwd=agents.src)
        await rt.ask("q", {"ops": [["write", "a.txt", "a"]]})
        reply = await rt.send("q", {"ops": [["write", "b.txt", "b"], ["trace", "in turn"],
                                            ["wait_file", str(go)]]})
        await traced(agents, "in turn")
        timings = {}
        for name, call in {"state": lambda: rt.state("q"), "turns": lambda: rt.turns("q"),
                           "history": lambda: rt.history("q"), "show": lambda: rt.show_turn("q", 2)}.items():
            started = time.perf_counter()
            timings[name] = (call(), time.perf_counter() - started)
        assert timings["state"][0] == {"count": 1}
        assert timings["turns"][0][-1]["status"] == "running"
        assert timings["history"][0][-1]["status"] == "running"
        assert timings["show"][0]["status"] == "running"
        assert all(seconds < 0.5 for _, seconds in timings.values()), timings
        assert not reply.done
        go.touch()
        assert (await reply.result(30))["status"] == "completed"
    agents.run(program)
