"""The agent runtime end to end: real mounts, real worker processes (SPEC §5).

Each test runs one asyncio program against a fresh store in ``tmp_path``; the
agents' code is a module written into ``tmp_path/src`` (imported from there,
as ``module:Class`` from the current directory would be). Cleanup always
happens, even when a test fails: the runtime is closed (graceful stop, unmount),
then every worker and mount daemon the test started is stopped by PID and every
mount under the store is unmounted. A WARNING/ERROR in a mount daemon's log
fails the test (STYLE.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from chronicle.errors import AgentExists, AgentLoadError, AgentNotFound, Busy, NotFound, UsageError
from chronicle.store.fsck.checks import fsck
from chronicle.store.store import Store
from agent_runtime import Runtime
from agent_runtime import process as runtime_process

try:
    from . import mounts
except ImportError:
    import mounts

pytestmark = pytest.mark.mount

QUICKSTART = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.py").read_text()   # the seed, unchanged

# A scripted agent: each message lists steps to run, so one class serves every test.
AGENTS = '''
import asyncio, os, subprocess, time
from pathlib import Path
from typing import Any
from agent_runtime import BaseAgent, AgentContext, DeltaState

TRACE = os.environ.get("AGENT_TEST_TRACE")

def trace(line):
    if TRACE:
        with open(TRACE, "a") as f:
            f.write(line + "\\n")

class Scripted(BaseAgent):
    class State(DeltaState):
        _entity_type = "scripted"
        count: int = 0
        notes: list[str] = []
        extra: Any = None

    async def on_init(self, ctx):
        trace(f"init {ctx.state.count} {ctx.workspace} {os.environ['AGENT_WORKSPACE']} {os.getcwd()}")

    async def on_idle_timeout(self, ctx):
        trace("idle")
        return True

    async def on_shutdown(self, ctx):
        trace("shutdown")

    async def on_message(self, ctx, message):
        ctx.state.count += 1
        ctx.state.notes.append(message.get("text", ""))
        msg = None
        for step in message.get("steps", []):
            op, args = step[0], step[1:]
            if op == "write":                       # ordinary file I/O, relative to the workspace
                with open(args[0], "w") as f:
                    f.write(args[1])
            elif op == "sh":                        # a child process
                subprocess.run(["sh", "-c", args[0]], check=True, cwd=ctx.workspace,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elif op == "token":
                if msg is None:
                    msg = await ctx.send_message("")
                await msg.stream_token(args[0])
            elif op == "new_message":
                msg = await ctx.send_message(args[0])
            elif op == "wait_file":                 # until the test creates it (outside the workspace)
                deadline = time.monotonic() + args[1]
                while not os.path.exists(args[0]):
                    if time.monotonic() > deadline:
                        raise TimeoutError(args[0])
                    await asyncio.sleep(0.01)
            elif op == "sleep":
                await asyncio.sleep(args[0])
            elif op == "block":                     # ignores cancellation
                time.sleep(args[0])
            elif op == "raise":
                raise RuntimeError(args[0])
            elif op == "set_extra":
                ctx.state.extra = args[0]
            elif op == "set_not_json":
                ctx.state.extra = {1, 2}
            elif op == "usage":
                ctx.record_usage(input_tokens=args[0], output_tokens=args[1])
        if msg is None:
            msg = await ctx.send_message("")
        await msg.stream_token(f"done {ctx.state.count}", final=True)

class NotAnAgent:
    pass

class Migrated(Scripted):
    class State(DeltaState):
        _entity_type = "scripted"
        _version = 2
        count: int = 0
        notes: list[str] = []
        extra: Any = None
        total_chars: int = 0

        @classmethod
        def migrate(cls, data, from_version):
            data["total_chars"] = sum(len(n) for n in data.get("notes", []))
            return data
'''


# --- harness -------------------------------------------------------------------------------


alive = mounts.alive


class Env:
    """A store, the agents' source directory, and everything to clean up."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.store = tmp_path / "store"
        self.src = tmp_path / "src"
        self.src.mkdir()
        (self.src / "quickstart.py").write_text(QUICKSTART)
        (self.src / "agents.py").write_text(AGENTS)
        self.trace = tmp_path / "trace.txt"
        self.worker_pids: list[int] = []
        self.expected_log = []          # regexes of daemon log records a test expects

    def runtime(self, **kwargs) -> Runtime:
        kwargs.setdefault("cancel_grace", 2.0)
        return Runtime(self.store, **kwargs)

    def run(self, program, **runtime_kwargs):
        """Run ``await program(rt)`` with a fresh Runtime; always closes it."""
        async def main():
            rt = self.runtime(**runtime_kwargs)
            try:
                return await program(rt)
            finally:
                await asyncio.wait_for(rt.close(), 120)
        return asyncio.run(main())

    def trace_lines(self) -> list[str]:
        return self.trace.read_text().splitlines() if self.trace.exists() else []

    def cleanup(self) -> list[str]:
        """Stop what is left (by PID), unmount what is mounted; returns problems."""
        return mounts.stop_workers(self.worker_pids, self.store)

    def daemon_log_problems(self) -> list[str]:
        import re
        allowed = [re.compile(p) for p in self.expected_log]
        out = []
        for log in sorted((self.store / "run").glob("mount-*.log")) if (self.store / "run").exists() else []:
            out += [f"{log.name}: {p}" for p in mounts.log_problems(log.read_text(errors="replace"), allowed)]
        return out


@pytest.fixture
def env(tmp_path, monkeypatch):
    reason = mounts.fuse_unavailable_reason()
    if reason:
        pytest.fail(f"this test needs FUSE and cannot get it: {reason}")
    e = Env(tmp_path)
    monkeypatch.setenv("AGENT_TEST_TRACE", str(e.trace))
    original = runtime_process.WorkerProcess.spawn.__func__

    async def spawn(cls, *args, **kwargs):
        worker = await original(cls, *args, **kwargs)
        e.worker_pids.append(worker.pid)
        return worker

    monkeypatch.setattr(runtime_process.WorkerProcess, "spawn", classmethod(spawn))
    try:
        yield e
    finally:
        problems = e.cleanup()
        problems += e.daemon_log_problems()
    if problems:
        pytest.fail("after the test:\n" + "\n".join(problems), pytrace=False)


SCRIPTED = "agents:Scripted"


async def first_token(reply, timeout=30.0):
    it = reply.__aiter__()
    return await asyncio.wait_for(it.__anext__(), timeout), it


def statuses(rt, agent):
    return [(t["turn"], t["kind"], t["status"]) for t in rt.turns(agent)]


# --- tests ---------------------------------------------------------------------------------


def test_quickstart_streams_and_counts(env):
    async def program(rt):
        await rt.create("bot", "quickstart:MyAgent", cwd=env.src)
        replies = []
        for text in ("a", "b", "c"):
            replies.append([token async for token in rt.stream("bot", {"text": text})])
        assert replies == [["Hello! You've sent 1 messages."], ["Hello! You've sent 2 messages."],
                           ["Hello! You've sent 3 messages."]]
        assert rt.state("bot") == {"count": 3, "history": ["a", "b", "c"]}
        assert rt.state("bot", 1) == {"count": 1, "history": ["a"]}
        assert rt.state("bot", 0) == {"count": 0, "history": []}
        assert rt.turn_count("bot") == 3
        assert statuses(rt, "bot") == [(0, "create", "completed")] + [(n, "message", "completed") for n in (1, 2, 3)]
        shown = rt.show_turn("bot", 2)
        assert shown["message"] == {"text": "b"}
        assert shown["reply"] == "Hello! You've sent 2 messages."
        assert shown["status"] == "completed"
        assert shown["patch"] == [{"op": "replace", "path": "/count", "value": 2},
                                  {"op": "add", "path": "/history/1", "value": "b"}]
        assert shown["files"] == []
        assert [(h["message"], h["reply"]) for h in rt.history("bot")] == [
            ({"text": "a"}, "Hello! You've sent 1 messages."), ({"text": "b"}, "Hello! You've sent 2 messages."),
            ({"text": "c"}, "Hello! You've sent 3 messages.")]
        result = await rt.ask("bot", {"text": "d"})
        assert result["status"] == "completed" and result["turn"] == 4
        assert result["reply"] == "Hello! You've sent 4 messages."
        [agent] = rt.list_agents()
        assert agent["id"] == "bot" and agent["entity_type"] == "my_agent" and agent["running_here"]
        assert agent["workspace"] == str(env.store / "agents" / "bot" / "workspace")
    env.run(program)


def test_tokens_stream_before_the_turn_ends(env):
    go = env.tmp / "go"

    async def program(rt):
        await rt.create("s", SCRIPTED, cwd=env.src)
        reply = await rt.send("s", {"steps": [["token", "first "], ["wait_file", str(go), 30],
                                              ["token", "second"], ["new_message", "again"]]})
        token, rest = await first_token(reply)
        assert token == "first "
        assert not reply.done                     # the handler is still waiting for `go`
        go.touch()
        tokens = [token] + [t async for t in rest]
        assert "".join(tokens) == "first second\nagaindone 1"
        result = await reply.result()
        assert result["reply"] == "first second\nagaindone 1"
        assert result["messages"] == ["first second", "againdone 1"]
    env.run(program)


def test_file_events_carry_the_turn_label(env):
    async def program(rt):
        await rt.create("writer", SCRIPTED, cwd=env.src)
        ws = Path(rt.mountpoint("writer"))
        r1 = await rt.ask("writer", {"steps": [
            ["write", "notes.txt", "hello\n"],
            ["sh", "mkdir -p sub && echo from-sh > sub/sh.txt && sed -i s/hello/HELLO/ notes.txt"],
            ["sh", "git init -q repo && cd repo && echo x > f && git add f && "
                   "git -c user.name=a -c user.email=a@b commit -qm one"],
        ]}, message_id="m-1")
        assert r1["status"] == "completed", r1
        r2 = await rt.ask("writer", {"steps": [["write", "second.txt", "2"]]})
        assert (ws / "notes.txt").read_text() == "HELLO\n"
        assert os.environ.get("AGENT_WORKSPACE") is None     # only the worker has it
        shown = rt.show_turn("writer", r1["turn"])
        paths = {e["path"] for e in shown["files"]}
        assert {"notes.txt", "sub", "sub/sh.txt", "repo/f"} <= paths
        assert any(p.startswith("repo/.git/objects/") for p in paths)
        label = {"agent": "writer", "turn": r1["turn"], "message_id": "m-1"}
        assert all(e["turn"] == label for e in shown["files"])
        # The mount's own log says the same, and the tree at the end of the turn is there.
        log = [json.loads(line) for line in (ws / ".chronicle" / "log").read_text().splitlines()]
        turn_events = [e for e in log if e["turn"] == label]
        assert len(turn_events) == len(shown["files"]) and turn_events == shown["files"]
        assert {e["path"] for e in log if e["turn"] and e["turn"]["turn"] == r2["turn"]} == {"second.txt"}
        at = ws / ".chronicle" / "at" / f"turn:writer:{r1['turn']}"
        assert (at / "notes.txt").read_text() == "HELLO\n"
        assert not (at / "second.txt").exists()
        assert rt.turns("writer")[r1["turn"]]["events"] == len(shown["files"])
    env.run(program)
    trace = env.trace_lines()
    mp = str(env.store / "agents" / "writer" / "workspace")
    assert trace[0] == f"init 0 {mp} {mp} {mp}"        # ctx.workspace, $AGENT_WORKSPACE and the cwd


def test_failed_turn_keeps_state_and_agent_serves_on(env):
    async def program(rt):
        await rt.create("f", SCRIPTED, cwd=env.src)
        await rt.ask("f", {"text": "one"})
        before = rt.state("f")
        reply = await rt.send("f", {"text": "two", "steps": [["token", "partial"], ["set_extra", [1]],
                                                           ["write", "during-failure.txt", "x"], ["raise", "boom"]]})
        tokens = [t async for t in reply]
        result = await reply.result()
        assert tokens == ["partial"]
        assert result["status"] == "failed"
        assert "RuntimeError: boom" in result["error"]
        assert rt.state("f") == before == {"count": 1, "notes": ["one"], "extra": None}
        shown = rt.show_turn("f", result["turn"])
        assert shown["status"] == "failed" and shown["patch"] == [] and shown["reply"] == "partial"
        assert {e["path"] for e in shown["files"]} == {"during-failure.txt"}    # files are not undone
        # A state value that is not JSON fails the turn with DeltaState's StateError.
        bad = await rt.ask("f", {"text": "three", "steps": [["set_not_json"]]})
        assert bad["status"] == "failed" and "StateError" in bad["error"] and "not a JSON value" in bad["error"]
        assert rt.state("f") == before
        ok = await rt.ask("f", {"text": "four"})
        assert ok["status"] == "completed" and ok["reply"] == "done 2"
        assert rt.state("f") == {"count": 2, "notes": ["one", "four"], "extra": None}
        assert [s for _, k, s in statuses(rt, "f") if k == "message"] == ["completed", "failed", "failed",
                                                                            "completed"]
    env.run(program)


def test_kill_9_of_the_worker_mid_turn(env):
    go = env.tmp / "never"

    async def program(rt):
        await rt.create("k", SCRIPTED, cwd=env.src)
        await rt.ask("k", {"text": "one", "steps": [["write", "a.txt", "1"]]})
        pid = rt.worker_pid("k")
        reply = await rt.send("k", {"text": "two", "steps": [["set_extra", "half"], ["write", "b.txt", "2"],
                                                           ["token", "working"], ["wait_file", str(go), 60]]})
        token, _ = await first_token(reply)
        assert token == "working"
        os.kill(pid, signal.SIGKILL)
        result = await reply.result(30)
        assert result["status"] == "interrupted"
        assert result["reply"] == "working"
        assert rt.show_turn("k", result["turn"])["status"] == "interrupted"
        assert rt.state("k") == {"count": 1, "notes": ["one"], "extra": None}
        # The next message starts a new worker from the last completed turn's state.
        after = await rt.ask("k", {"text": "three"})
        assert after["status"] == "completed" and after["reply"] == "done 2"
        assert rt.worker_pid("k") != pid
        assert rt.state("k") == {"count": 2, "notes": ["one", "three"], "extra": None}
        assert [s for _, k, s in statuses(rt, "k") if k == "message"] == ["completed", "interrupted", "completed"]
        # Its files are undone (SPEC §5: all-or-nothing), but its events stay, labelled, and its tree too.
        ws = Path(rt.mountpoint("k"))
        assert not (ws / "b.txt").exists() and (ws / "a.txt").read_text() == "1"
        assert {e["path"] for e in rt.show_turn("k", result["turn"])["files"]} == {"b.txt"}
        assert (ws / ".chronicle" / "at" / f"turn:k:{result['turn']}" / "b.txt").read_text() == "2"
    env.run(program)


def test_restart_restores_from_snapshot_and_patches(env):
    async def first(rt):
        await rt.create("r", SCRIPTED, cwd=env.src)
        for i in range(7):
            await rt.ask("r", {"text": f"m{i}"})
        return rt.state("r")

    state = env.run(first, snapshot_every=3)
    assert state["count"] == 7

    async def second(rt):
        at = rt.turn_log.state_at("r")
        assert at.snapshot_turn == 6 and at.patches == 1
        assert rt.state("r") == state
        # A rollback of an agent that is not running mounts its workspace for the restore only.
        record = await rt.rollback("r", to=2)
        assert record["turn"] == 8 and record["status"] == "completed" and record["snapshot"]
        assert not rt.agent("r")["mounted"]
        assert rt.state("r")["notes"] == ["m0", "m1"]
        result = await rt.ask("r", {"text": "again"})
        assert result["reply"] == "done 3"
        assert rt.state("r")["notes"] == ["m0", "m1", "again"]
        assert rt.state("r", 4)["notes"] == ["m0", "m1", "m2", "m3"]        # history stays

    env.run(second, snapshot_every=3)


def test_mount_daemon_killed_between_turns_is_remounted(env):
    async def program(rt):
        await rt.create("d", SCRIPTED, cwd=env.src)
        await rt.ask("d", {"text": "one", "steps": [["write", "a.txt", "1"]]})
        daemon = rt.store.mount_info("d")["pid"]
        os.kill(daemon, signal.SIGKILL)
        while alive(daemon):
            await asyncio.sleep(0.02)
        result = await rt.ask("d", {"text": "two", "steps": [["sh", "cat a.txt > b.txt"]]})
        assert result["status"] == "completed" and result["reply"] == "done 2"
        assert (Path(rt.mountpoint("d")) / "b.txt").read_text() == "1"
        assert rt.store.mount_info("d")["pid"] != daemon
    env.run(program)


def test_mount_daemon_killed_mid_turn(env):
    """The turn's end cannot reach the daemon: the turn is interrupted (recorded so
    by the next daemon), the worker restarts from the store, the agent serves on."""
    go = env.tmp / "go"

    async def program(rt):
        await rt.create("dm", SCRIPTED, cwd=env.src)
        await rt.ask("dm", {"text": "one"})
        daemon, worker = rt.store.mount_info("dm")["pid"], rt.worker_pid("dm")
        reply = await rt.send("dm", {"text": "two", "steps": [["write", "lost.txt", "x"], ["token", "t"],
                                                             ["wait_file", str(go), 60]]})
        await first_token(reply)
        os.kill(daemon, signal.SIGKILL)
        while alive(daemon):
            await asyncio.sleep(0.02)
        go.touch()
        result = await reply.result(30)
        assert result["status"] == "interrupted" and "mount daemon" in result["error"]
        after = await rt.ask("dm", {"text": "three"})
        assert after["status"] == "completed" and after["reply"] == "done 2"
        assert rt.worker_pid("dm") != worker and rt.store.mount_info("dm")["pid"] != daemon
        assert [s for _, k, s in statuses(rt, "dm") if k == "message"] == ["completed", "interrupted", "completed"]
        assert "mount daemon stopped" in rt.show_turn("dm", result["turn"])["error"]
        assert rt.state("dm")["notes"] == ["one", "three"]
        assert not (Path(rt.mountpoint("dm")) / "lost.txt").exists()     # undone when the agent woke again
    env.run(program)


def test_turn_records_longer_than_a_ctl_line(env, monkeypatch):
    """A message, a patch and a state snapshot of megabytes reach the turn log
    (sent ahead in ctl turn-data pieces) and come back whole."""
    big = "x" * (3 << 20) + "\u00e9\"\\"
    sent = []
    control = runtime_process.WorkspaceMount.control

    async def spy(self, command, **kwargs):
        sent.append(command["cmd"])
        return await control(self, command, **kwargs)

    monkeypatch.setattr(runtime_process.WorkspaceMount, "control", spy)

    async def first(rt):
        await rt.create("big", SCRIPTED, cwd=env.src)
        result = await rt.ask("big", {"text": big, "steps": [["set_extra", {"blob": big}]]})
        assert result["status"] == "completed"
        shown = rt.show_turn("big", result["turn"])
        assert shown["message"]["text"] == big and shown["snapshot"] is True
        assert rt.state("big") == {"count": 1, "notes": [big], "extra": {"blob": big}}
        assert rt.turn_log.state_at("big").patches == 0              # from the snapshot of turn 1
        assert sent.count("turn-data") >= 2 * 12                    # turn-begin's and turn-end's, 256k each
        await rt.ask("big", {"text": "small"})

    env.run(first, snapshot_every=1)

    async def second(rt):
        assert rt.state("big") == {"count": 2, "notes": [big, "small"], "extra": {"blob": big}}
        assert (await rt.ask("big", {"text": "again"}))["reply"] == "done 3"
    env.run(second)


def test_runtime_killed_mid_turn_then_restarted(env):
    """kill -9 of the coordinator itself: its mount survives and is adopted; the turn is interrupted."""
    go = env.tmp / "never"
    script = env.tmp / "coordinator.py"
    script.write_text(textwrap.dedent(f'''
        import asyncio, sys
        from agent_runtime import Runtime
        async def main():
            rt = Runtime({str(env.store)!r})
            await rt.create("c", "agents:Scripted", cwd={str(env.src)!r})
            await rt.ask("c", {{"text": "one"}})
            reply = await rt.send("c", {{"text": "two", "steps": [["write", "lost.txt", "x"], ["token", "t"],
                                                                ["wait_file", {str(go)!r}, 60]]}})
            async for token in reply:
                print("WORKER", rt.worker_pid("c"), flush=True)
                await asyncio.sleep(3600)
        asyncio.run(main())
    '''))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(mounts.REPO_ROOT)))
    try:
        line = proc.stdout.readline()
        assert line.startswith("WORKER"), line
        env.worker_pids.append(int(line.split()[1]))
    finally:
        proc.kill()
        proc.wait()

    async def program(rt):
        assert rt.agent("c")["mounted"]                      # the daemon outlived its runtime
        result = await rt.ask("c", {"text": "three"})
        assert result["reply"] == "done 2"
        assert [s for _, k, s in statuses(rt, "c") if k == "message"] == ["completed", "interrupted", "completed"]
        assert rt.state("c")["notes"] == ["one", "three"]
        assert "runtime stopped" in rt.show_turn("c", 2)["error"]
        assert not (Path(rt.mountpoint("c")) / "lost.txt").exists()      # the lost turn's files undone at the wake
        assert {e["path"] for e in rt.show_turn("c", 2)["files"]} == {"lost.txt"}
    env.run(program)


def test_rollback_brings_files_and_state_back_as_new_events(env):
    async def program(rt):
        await rt.create("rb", SCRIPTED, cwd=env.src)
        ws = Path(rt.mountpoint("rb"))
        t1 = await rt.ask("rb", {"text": "one", "steps": [["write", "a.txt", "v1"]]})
        await rt.ask("rb", {"text": "two", "steps": [["write", "a.txt", "v2"], ["write", "b.txt", "b"],
                                                    ["set_extra", {"k": 1}]]})
        head_before = rt.turns("rb")[-1]
        record = await rt.rollback("rb", to=t1["turn"])
        assert record["kind"] == "rollback" and record["status"] == "completed"
        assert record["rollback_to"] == t1["turn"] and record["turn"] == head_before["turn"] + 1
        assert (ws / "a.txt").read_text() == "v1"
        assert not (ws / "b.txt").exists()
        assert rt.state("rb") == rt.state("rb", t1["turn"]) == {"count": 1, "notes": ["one"], "extra": None}
        shown = rt.show_turn("rb", record["turn"])
        assert [e["event"] for e in shown["files"]] == ["restore"]
        assert shown["patch"]                                  # the state change, as JSON Patch
        assert rt.turns("rb")[head_before["turn"]] == head_before   # history is not rewritten
        hist = json.loads((ws / ".chronicle" / "query" / "a.txt").read_text())["versions"]
        assert [v["event"] for v in hist][-1] == "restore" and len(hist) == 3
        # The running worker got the rolled-back state.
        result = await rt.ask("rb", {"text": "three"})
        assert result["reply"] == "done 2"
        assert rt.state("rb") == {"count": 2, "notes": ["one", "three"], "extra": None}
        with pytest.raises(NotFound, match="no turn 99"):
            await rt.rollback("rb", to=99)
    env.run(program)


def test_fork_is_copy_on_write_and_evolves_independently(env):
    async def program(rt):
        await rt.create("a", SCRIPTED, cwd=env.src)
        t1 = await rt.ask("a", {"text": "one", "steps": [["write", "f.txt", "one"]]})
        await rt.ask("a", {"text": "two", "steps": [["write", "f.txt", "two"], ["write", "g.txt", "g"]]})
        forked = await rt.fork("a", "b", at=t1["turn"])
        assert forked["parent"] == {"agent": "a", "turn": t1["turn"]}
        assert rt.state("b") == rt.state("a", t1["turn"])
        [ws_b] = [w for w in rt.store.workspaces() if w.name == "b"]
        assert ws_b.parent == "a" and ws_b.fork_seq == rt.show_turn("a", t1["turn"])["end_seq"]
        rb = await rt.ask("b", {"text": "b-two", "steps": [["write", "f.txt", "b"]]})
        ra = await rt.ask("a", {"text": "three", "steps": [["write", "h.txt", "h"]]})
        assert rb["reply"] == "done 2" and ra["reply"] == "done 3"
        wa, wb = Path(rt.mountpoint("a")), Path(rt.mountpoint("b"))
        assert (wa / "f.txt").read_text() == "two" and (wb / "f.txt").read_text() == "b"
        assert (wa / "h.txt").exists() and not (wb / "h.txt").exists() and not (wb / "g.txt").exists()
        assert rt.state("a")["notes"] == ["one", "two", "three"]
        assert rt.state("b")["notes"] == ["one", "b-two"]
        assert [(h["agent"], h["turn"]) for h in rt.history("b")] == [("a", t1["turn"]), ("b", rb["turn"])]
        # Lineage: b's own turns number on from its fork turn; the ones before are a's, shown as inherited.
        assert rb["turn"] == t1["turn"] + 1
        assert [(t["turn"], t["kind"], t["inherited"]) for t in rt.turns("b")] == \
            [(0, "create", "a"), (t1["turn"], "fork", None), (rb["turn"], "message", None)]
        assert rt.show_turn("b", 0)["inherited"] == "a"
        # The fork's first turn names its starting tree.
        assert (wb / ".chronicle" / "at" / f"turn:b:{t1['turn']}" / "f.txt").read_text() == "one"
        with pytest.raises(AgentExists):
            await rt.fork("a", "b", at=1)
    env.run(program)


def test_cancel_a_running_turn(env):
    async def program(rt):
        await rt.create("c", SCRIPTED, cwd=env.src)
        await rt.ask("c", {"text": "one"})
        before = rt.state("c")
        reply = await rt.send("c", {"text": "slow", "steps": [["set_extra", 1], ["token", "t"], ["sleep", 60]]})
        await first_token(reply)
        pid = rt.worker_pid("c")
        started = time.monotonic()
        assert await rt.cancel("c")
        result = await reply.result()
        assert result["status"] == "cancelled" and time.monotonic() - started < 5
        assert rt.state("c") == before and rt.worker_pid("c") == pid      # cancelled in the worker
        # A handler that ignores cancellation (blocking code) loses its worker after cancel_grace.
        reply = await rt.send("c", {"text": "stuck", "steps": [["token", "t"], ["block", 60]]})
        await first_token(reply)
        assert await rt.cancel("c")
        result = await reply.result()
        assert result["status"] == "cancelled"
        assert rt.state("c") == before
        assert not await rt.cancel("c")                                   # nothing runs now
        ok = await rt.ask("c", {"text": "two"})
        assert ok["reply"] == "done 2" and rt.worker_pid("c") != pid
        assert [s for _, k, s in statuses(rt, "c") if k == "message"] == ["completed", "cancelled", "cancelled",
                                                                            "completed"]
        # A cancel that lands while the agent is still waking (mount, worker, on_init) cancels the turn
        # before its handler runs.
        await rt.shutdown_agent("c")
        reply = await rt.send("c", {"text": "never", "steps": [["set_extra", "x"]]})
        await asyncio.sleep(0.05)
        assert await rt.cancel("c")
        result = await reply.result()
        assert result["status"] == "cancelled" and rt.state("c")["notes"] == ["one", "two"]
    env.run(program)


def test_scale_to_zero_and_wake(env):
    async def program(rt):
        await rt.create("z", SCRIPTED, cwd=env.src)
        ws = Path(rt.mountpoint("z"))
        await rt.ask("z", {"text": "one", "steps": [["write", "kept.txt", "kept"]]})
        assert os.path.ismount(ws)
        deadline = time.monotonic() + 20
        while os.path.ismount(ws) or rt.worker_pid("z") is not None or rt.agent("z")["status"] != "sleeping":
            assert time.monotonic() < deadline, "the agent did not scale to zero"
            await asyncio.sleep(0.1)
        assert rt.agent("z")["status"] == "sleeping" and not rt.agent("z")["mounted"]
        assert rt.is_idle("z")
        result = await rt.ask("z", {"text": "two", "steps": [["sh", "cat kept.txt > copy.txt"]]})
        assert result["reply"] == "done 2"
        assert (ws / "copy.txt").read_text() == "kept"
        assert rt.state("z")["notes"] == ["one", "two"]
    env.run(program, idle_timeout=1.0)
    lines = env.trace_lines()
    assert [line.split()[0] for line in lines][:3] == ["init", "idle", "init"]
    assert lines[-1] == "shutdown"


def test_usage_accounting_and_history(env):
    async def program(rt):
        await rt.create("u", SCRIPTED, cwd=env.src)
        await rt.ask("u", {"text": "a", "steps": [["usage", 10, 3]]})
        await rt.ask("u", {"text": "b", "steps": [["usage", 5, 2], ["usage", 1, 1]]})
        assert rt.last_turn_usage("u") == {"input_tokens": 6, "output_tokens": 3}
        assert rt.total_usage("u") == {"input_tokens": 16, "output_tokens": 6}
        failed = await rt.ask("u", {"text": "c", "steps": [["usage", 4, 0], ["raise", "x"]]})
        assert failed["usage"] == {"input_tokens": 4}                     # spent tokens count even so
        assert rt.total_usage("u") == {"input_tokens": 20, "output_tokens": 6}
        assert [h["message"]["text"] for h in rt.history("u")] == ["a", "b", "c"]
        rt.clear_history("u")
        assert rt.history("u") == []
        await rt.ask("u", {"text": "d"})
        assert [h["message"]["text"] for h in rt.history("u")] == ["d"]
        assert rt.turn_count("u") == 4 and len(rt.turns("u")) == 5
        # send() does not wait; the messages run one at a time, in order.
        replies = [await rt.send("u", {"text": f"q{i}", "steps": [["sleep", 0.05]]}) for i in range(3)]
        assert not rt.is_idle("u")
        await rt.wait_for_idle("u", timeout=30)
        assert rt.is_idle("u") and all(r.done for r in replies)
        assert [(await r.result())["turn"] for r in replies] == [5, 6, 7]
        assert rt.state("u")["notes"][-3:] == ["q0", "q1", "q2"] and rt.state("u")["count"] == 6
    env.run(program)


def test_state_migration_on_start_with_new_code(env):
    async def program(rt):
        await rt.create("m", SCRIPTED, cwd=env.src)
        await rt.ask("m", {"text": "abc"})
        await rt.shutdown_agent("m")
        await rt.start("m", "agents:Migrated", cwd=env.src)
        init = rt.turns("m")[-1]
        assert init["kind"] == "init" and init["status"] == "completed"
        assert rt.show_turn("m", init["turn"])["migrated_from"] == 1
        assert rt.state("m") == {"count": 1, "notes": ["abc"], "extra": None, "total_chars": 3}
        assert rt.state("m", 1) == {"count": 1, "notes": ["abc"], "extra": None}   # as stored then
        result = await rt.ask("m", {"text": "de"})
        assert result["reply"] == "done 2"
        assert rt.agent("m")["state_version"] == 2
    env.run(program)


def test_bad_input_gets_clear_errors(env):
    (env.src / "broken.py").write_text("raise ValueError('broken on import')\n")

    async def program(rt):
        for target, pattern in [
            ("no_colon", "expected MODULE:CLASS"),
            ("agents:", "is not a class name"),
            ("no_such_module:X", "cannot import 'no_such_module'"),
            ("agents:Nope", "'agents' has no 'Nope'"),
            ("agents:NotAnAgent", "is not a subclass of agent_runtime.BaseAgent"),
            ("missing.py:X", "no file"),
            ("broken:X", "ValueError: broken on import"),
        ]:
            with pytest.raises(AgentLoadError, match=pattern):
                await rt.create("x", target, cwd=env.src)
        assert rt.list_agents() == [] and rt.store.workspaces() == []
        await rt.create("ok", str(env.src / "agents.py") + ":Scripted", cwd=env.tmp)     # a .py path works
        with pytest.raises(AgentExists):
            await rt.create("ok", SCRIPTED, cwd=env.src)
        with pytest.raises(UsageError, match="invalid workspace name"):
            await rt.create("bad/name", SCRIPTED, cwd=env.src)
        for call in (rt.send("ghost", {"text": "hi"}), rt.rollback("ghost", 1), rt.fork("ghost", "g2"),
                     rt.shutdown_agent("ghost"), rt.delete("ghost")):
            with pytest.raises(AgentNotFound, match="no agent named 'ghost'"):
                await call
        for read in (rt.turns, rt.state, rt.history, rt.turn_count, rt.agent, rt.is_idle):
            with pytest.raises(AgentNotFound):
                read("ghost")
        with pytest.raises(UsageError, match="a message is a dict"):
            await rt.send("ok", "hello")
        with pytest.raises(UsageError, match="not JSON"):
            await rt.send("ok", {"when": object()})
        with pytest.raises(NotFound, match="no turn 7"):
            rt.show_turn("ok", 7)
        with pytest.raises(NotFound, match="no turn 7"):
            rt.state("ok", 7)
        assert (await rt.ask("ok", {"text": "fine"}))["status"] == "completed"
        # One runtime process at a time runs an agent; another one can read it meanwhile.
        other = textwrap.dedent(f'''
            import asyncio
            from agent_runtime import Runtime
            async def main():
                rt = Runtime({str(env.store)!r})
                try:
                    print(rt.state("ok")["notes"])
                    await rt.send("ok", {{"text": "from elsewhere"}})
                except Exception as exc:
                    print(type(exc).__name__, exc)
                finally:
                    await rt.close()
            asyncio.run(main())
        ''')
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", other], capture_output=True,
                                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(mounts.REPO_ROOT)))
        assert proc.stdout.splitlines() == ["['fine']", "AgentBusy agent 'ok' is run by another runtime process"], \
            proc.stderr
    env.run(program)


def test_delete_agent_and_workspace(env):
    async def program(rt):
        await rt.create("p", SCRIPTED, cwd=env.src)
        t1 = await rt.ask("p", {"steps": [["write", "x.txt", "x" * 1000]]})
        await rt.fork("p", "child", at=t1["turn"])
        with pytest.raises(Busy, match="child was forked from it"):
            await rt.delete("p")
        await rt.delete("child")
        await rt.delete("p")
        assert rt.list_agents() == [] and rt.store.workspaces() == []
        assert not (env.store / "agents" / "p").exists()
        await rt.create("p", SCRIPTED, cwd=env.src)              # the name is free again, fresh
        assert rt.state("p")["count"] == 0 and len(rt.turns("p")) == 1
    env.run(program)
    with Store.open(env.store) as store:
        report = fsck(store)
    assert [p for p in report.problems if p.severity in ("error", "warning")] == []
