"""Read-sets (issue 12 §2): which file versions a turn read, and stale turns.

Two levels, both against real mount daemons: the ctl turn commands alone
(``turn-begin``/``turn-end``, reads by this process and its children), then
the agent runtime with real workers (the ``env`` fixture of
``test_agent_runtime``: cleanup by PID, daemon logs checked), and ``chronicle
agent show``/``agent stale`` on what they recorded.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chronicle.store.chunks.tree import hash_data
from chronicle.control import ControlChannel
from chronicle.store.history.reads import ReadLog
from chronicle.store.store import Store

try:
    from .test_agent_runtime import env   # noqa: F401  (the fixture)
except ImportError:
    from test_agent_runtime import env     # noqa: F401

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parents[2]


def _turn(ctl: ControlChannel, n: int, **fields) -> None:
    ctl.request({"cmd": "turn-begin", "agent": "bot", "turn": n, "record": {"kind": "message"}, **fields})


def _end(ctl: ControlChannel) -> dict:
    return ctl.request({"cmd": "turn-end", "record": {"status": "completed"}})


def test_ctl_turn_records_reads_of_this_process_and_a_child(agent_mount):
    mount, store, _log = agent_mount
    big = os.urandom(3 << 20)
    (mount.path / "a.txt").write_text("alpha\n")
    (mount.path / "b.bin").write_bytes(big)
    (mount.path / "a.txt").read_text()                       # cached by the kernel before the turn
    with ControlChannel(mount.path) as ctl:
        _turn(ctl, 1)
        assert (mount.path / "a.txt").read_text() == "alpha\n"
        subprocess.run(["dd", f"if={mount.path / 'b.bin'}", "of=/dev/null", "bs=4096", "skip=256", "count=1",
                        "status=none"], check=True)
        list((mount.path / ".chronicle").iterdir())
        (mount.path / ".chronicle" / "log").read_bytes()       # not a file of the workspace
        _end(ctl)
    reads = {r["path"]: r for r in ReadLog(store).turn_reads("bot", "bot", 1)}
    assert set(reads) == {"a.txt", "b.bin"}
    a, b = reads["a.txt"], reads["b.bin"]
    assert (a["version"], a["ranges"], a["bytes"], a["size"]) == (1, [[0, 6]], 6, 6)
    with store.env.begin() as txn:
        history = store.open_workspace("bot").history
        assert a["seq"] == history.versions(txn, b"a.txt")[-1].seq
    assert b["version"] == 1 and b["size"] == len(big)
    [(start, end)] = b["ranges"]                              # the block, with the kernel's read-ahead
    assert start <= 256 * 4096 and end >= 257 * 4096 and end <= len(big)
    assert a["hash"] == hash_data(b"alpha\n").hex()


def test_untracked_turn_and_reads_outside_turns_record_nothing(agent_mount):
    mount, store, _log = agent_mount
    (mount.path / "a.txt").write_text("alpha\n")
    (mount.path / "a.txt").read_text()
    with ControlChannel(mount.path) as ctl:
        _turn(ctl, 1, track_reads=False)
        (mount.path / "a.txt").read_text()
        _end(ctl)
        (mount.path / "a.txt").read_text()                   # no turn open
        _turn(ctl, 2)
        with open(mount.path / "a.txt", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:5] == b"alpha"                          # an mmap read: a page fault, then read()
        _end(ctl)
    log = ReadLog(store)
    assert log.turn_reads("bot", "bot", 1) == []
    assert [(r["path"], r["ranges"]) for r in log.turn_reads("bot", "bot", 2)] == [("a.txt", [[0, 6]])]


# --- through the runtime: real workers ---------------------------------------------------------

READERS = '''
import json, subprocess
from agent_runtime import BaseAgent, DeltaState

class Reader(BaseAgent):
    class State(DeltaState):
        _entity_type = "reader"
        turns: int = 0

    async def on_message(self, ctx, message):
        ctx.state.turns += 1
        out = []
        for op, *args in message.get("steps", []):
            if op == "read":                        # the agent itself, relative to the workspace
                with open(args[0]) as f:
                    out.append(f.read())
            elif op == "sh":                        # a child process
                subprocess.run(["sh", "-c", args[0]], check=True, cwd=ctx.workspace, stdout=subprocess.DEVNULL)
            elif op == "write":
                with open(args[0], "w") as f:
                    f.write(args[1])
        msg = await ctx.send_message("")
        await msg.stream_token(json.dumps(out), final=True)

class Untracked(Reader):
    track_reads = False
'''


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chronicle", "agent", *args, "--store", str(store)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def _ok(store: Path, *args: str) -> str:
    proc = _cli(store, *args)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def test_a_turns_reads_by_agent_and_child_then_stale_after_a_write(env):
    (env.src / "readers.py").write_text(READERS)

    async def program(rt):
        await rt.create("bot", "readers:Reader", cwd=env.src)
        first = await rt.ask("bot", {"steps": [["write", "a.txt", "alpha\n"], ["write", "b.txt", "beta beta\n"]]})
        assert first["status"] == "completed"
        second = await rt.ask("bot", {"steps": [["read", "a.txt"], ["sh", "cat b.txt"]]})
        assert second["reply"] == json.dumps(["alpha\n"])
        # Turn 3 reads a.txt and then writes it itself: not stale for that.
        third = await rt.ask("bot", {"steps": [["read", "a.txt"], ["write", "a.txt", "alpha 2\n"]]})
        assert third["status"] == "completed"
        await rt.fork("bot", "bot-b", 3)                         # inherits turns 0-2, with turn 3's files
        return rt.show_turn("bot", 2)
    shown = env.run(program)
    reads = ReadLog(Store.open(env.store)).turn_reads("bot", "bot", 2)
    assert [(r["path"], r["version"], r["ranges"], r["size"]) for r in reads] == [
        ("a.txt", 1, [[0, 6]], 6), ("b.txt", 1, [[0, 10]], 10)]
    assert shown["reads"] == reads                                   # Runtime.show_turn (and GET /agents/ID/turns/N)
    a, b = reads
    assert a["seq"] < shown["begin_seq"] and b["seq"] < shown["begin_seq"]      # versions of turn 1
    assert len(a["pids"]) == 1 and len(b["pids"]) == 1 and a["pids"] != b["pids"]   # agent, then its child

    # Through the CLI: `agent show` lists the read-set, `agent stale` finds turn 2 stale (a.txt changed).
    shown_json = json.loads(_ok(env.store, "show", "bot", "2", "--json"))
    assert shown_json["reads"] == reads
    text = _ok(env.store, "show", "bot", "2")
    assert "reads: 2 file version(s)" in text
    assert [line.split()[:4] for line in text.splitlines() if line.startswith("  a.txt")] == [["a.txt", "v1",
                                                                                             str(a["seq"]), "6"]]
    [stale] = json.loads(_ok(env.store, "stale", "bot", "--json"))
    assert (stale["turn"], [c["path"] for c in stale["changed"]]) == (2, ["a.txt"])
    change = stale["changed"][0]
    assert change["read"]["version"] == 1 and change["now"]["version"] == 2 and change["deleted"] is False
    table = _ok(env.store, "stale", "bot").splitlines()
    assert table[0].split() == ["TURN", "PATH", "READ", "NOW"] and table[1].split() == ["2", "a.txt", "v1", "v2"]

    # The fork inherited turn 2 with its read-set, and its a.txt is turn 3's: stale there too.
    inherited = json.loads(_ok(env.store, "show", "bot-b", "2", "--json"))
    assert inherited["inherited"] == "bot" and inherited["reads"] == reads
    [in_fork] = json.loads(_ok(env.store, "stale", "bot-b", "--json"))
    assert (in_fork["turn"], in_fork["owner"], in_fork["changed"]) == (2, "bot", stale["changed"])
    assert _ok(env.store, "stale", "bot-b").splitlines()[1].split() == ["bot:2", "a.txt", "v1", "v2"]

    # A deleted file counts as changed; turn 3 (which wrote a.txt itself) is stale only once it is gone.
    async def delete(rt):
        await rt.ask("bot", {"steps": [["sh", "rm b.txt a.txt"]]})
    env.run(delete)
    stale = json.loads(_ok(env.store, "stale", "bot", "--json"))
    assert [(t["turn"], [(c["path"], c["deleted"]) for c in t["changed"]]) for t in stale] == [
        (2, [("a.txt", True), ("b.txt", True)]), (3, [("a.txt", True)])]
    assert _ok(env.store, "stale", "bot").splitlines()[1].split() == ["2", "a.txt", "v1", "deleted"]


def test_track_reads_false_keeps_no_read_set(env):
    (env.src / "readers.py").write_text(READERS)

    async def program(rt):
        await rt.create("quiet", "readers:Untracked", cwd=env.src)
        await rt.ask("quiet", {"steps": [["write", "a.txt", "alpha\n"]]})
        result = await rt.ask("quiet", {"steps": [["read", "a.txt"], ["sh", "cat a.txt"]]})
        assert result["reply"] == json.dumps(["alpha\n"])
        await rt.ask("quiet", {"steps": [["write", "a.txt", "changed\n"]]})
    env.run(program)
    assert json.loads(_ok(env.store, "show", "quiet", "2", "--json"))["reads"] == []
    assert json.loads(_ok(env.store, "stale", "quiet", "--json")) == []
    assert "reads: 0 file version(s)" in _ok(env.store, "show", "quiet", "2")
