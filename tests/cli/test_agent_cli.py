"""``chronicle agent ...`` end to end: the real CLI in subprocesses, real stores, mounts and workers.

Every command runs as ``python -m chronicle agent ...`` against a fresh store
in ``tmp_path``, driving the two examples of ``examples/`` and a streaming
agent written into ``tmp_path/src``. ``serve`` runs as a subprocess on a free
port and is driven over HTTP with ``urllib``.

Cleanup always happens, even when a test fails: every process a test started
is stopped by its PID, then every worker of the test's store (found by its
``AGENT_WORKSPACE``) and every mount daemon the store registered, and every
mount under the store is unmounted; anything still running or mounted after a
test fails it, and so does a WARNING/ERROR in a mount daemon's log.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from . import mounts
except ImportError:
    import mounts

pytestmark = pytest.mark.mount

REPO = mounts.REPO_ROOT
QUICKSTART = str(REPO / "examples" / "quickstart.py") + ":MyAgent"
FILE_AGENT = str(REPO / "examples" / "file_agent.py") + ":FileAgent"

STREAMER = '''
import asyncio, os
from agent_runtime import BaseAgent, DeltaState

def trace(line):
    with open(os.environ["AGENT_TEST_TRACE"], "a") as f:
        f.write(line + "\\n")

class Streamer(BaseAgent):
    class State(DeltaState):
        _entity_type = "streamer"
        count: int = 0
        words: list[str] = []

    async def on_shutdown(self, ctx):
        trace(f"shutdown {ctx.agent_id}")

    async def on_message(self, ctx, message):
        ctx.state.count += 1
        if message.get("raise"):
            raise RuntimeError(message["raise"])
        words = message.get("words") or [message.get("text", "")]
        msg = await ctx.send_message("")
        for i, word in enumerate(words):
            await msg.stream_token(word + " ")
            if i == 0 and message.get("wait_file"):        # until the test creates it
                while not os.path.exists(message["wait_file"]):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(message.get("sleep", 0))
        ctx.state.words.extend(words)
        await msg.stream_token(f"#{ctx.state.count}", final=True)
'''


# --- harness -------------------------------------------------------------------------------


alive = mounts.alive


def workers_of(store: Path) -> list[int]:
    """PIDs of the agent workers whose workspace lies in ``store``."""
    prefix = b"AGENT_WORKSPACE=" + str(store).encode() + b"/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"agent_runtime.worker" not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(prefix) for e in env) and alive(int(entry)):
            pids.append(int(entry))
    return pids


def one_line_error(proc: subprocess.CompletedProcess, pattern: str, code: int | None = None) -> None:
    """A failed command printed exactly one line, ``chronicle: error: ...``, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chronicle: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert pattern in lines[0], lines[0]


class Env:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.store = tmp_path / "store"
        self.src = tmp_path / "src"
        self.src.mkdir()
        (self.src / "streamer.py").write_text(STREAMER)
        self.trace = tmp_path / "trace.txt"
        self.env = dict(os.environ, PYTHONPATH=str(REPO), CHRONICLE_HOME=str(tmp_path / "home"),
                        AGENT_TEST_TRACE=str(self.trace))
        self.env.pop("CHRONICLE_DEBUG", None)
        self.procs: list[subprocess.Popen] = []
        self.stores = [self.store, tmp_path / "home" / "store"]

    def cli(self, *args: str, input: str | None = None, store: bool = True, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "chronicle", "agent", *args] + (["--store", str(self.store)] if store else [])
        return subprocess.run(argv, input=input if input is not None else "", capture_output=True, text=True,
                              cwd=cwd or REPO, env=self.env, timeout=timeout)

    def ok(self, *args: str, **kwargs) -> str:
        proc = self.cli(*args, **kwargs)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        assert "Traceback" not in proc.stderr
        return proc.stdout

    def json(self, *args: str, **kwargs):
        return json.loads(self.ok(*args, "--json", **kwargs))

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "chronicle", "agent", *args], env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        self.procs.append(proc)
        return proc

    def trace_lines(self) -> list[str]:
        return self.trace.read_text().splitlines() if self.trace.exists() else []

    def cleanup(self) -> list[str]:
        problems = []
        for proc in self.procs:
            if proc.poll() is None:
                problems.append(f"{proc.args[3:5]} (pid {proc.pid}) was still running")
                proc.kill()
            proc.wait(30)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        for store in self.stores:
            for pid in workers_of(store):
                problems.append(f"worker {pid} was still running")
                os.killpg(pid, signal.SIGKILL)
            problems += mounts.clean_store_mounts(store)
            run = store / "run"
            for log in sorted(run.glob("mount-*.log")) if run.exists() else []:
                problems += [f"{log.name}: {p}" for p in mounts.log_problems(log.read_text(errors="replace"))]
        return problems


@pytest.fixture
def env(tmp_path):
    reason = mounts.fuse_unavailable_reason()
    if reason:
        pytest.fail(f"this test needs FUSE and cannot get it: {reason}")
    e = Env(tmp_path)
    try:
        yield e
    finally:
        problems = e.cleanup()
    if problems:
        pytest.fail("after the test:\n" + "\n".join(problems), pytrace=False)


# --- chat and the reads ---------------------------------------------------------------------


def test_chat_quickstart_then_turns_show_state_list(env):
    out = env.ok("chat", QUICKSTART, "--id", "hello", input='hi\n{"text": "as JSON", "n": 1}\n\n{not json\n')
    assert out == "".join(f"Hello! You've sent {n} messages.\n" for n in (1, 2, 3))
    # Again: the agent exists and keeps its state; --json prints the stream as JSON lines.
    lines = [json.loads(line) for line in env.ok("chat", QUICKSTART, "--id", "hello", "--json",
                                                 input="again\n").splitlines()]
    assert lines[0] == {"token": "Hello! You've sent 4 messages."}
    assert lines[1]["result"]["status"] == "completed" and lines[1]["result"]["turn"] == 4
    assert len(lines) == 2

    turns = env.json("turns", "hello")
    assert [(t["turn"], t["kind"], t["status"], t["patch_ops"], t["events"]) for t in turns] == \
        [(0, "create", "completed", 0, 0)] + [(n, "message", "completed", 2, 0) for n in (1, 2, 3, 4)]
    table = env.ok("turns", "hello").splitlines()
    assert table[0].split() == ["TURN", "KIND", "STATUS", "TIME", "MS", "PATCH", "FILES", "MESSAGE", "ID", "NOTE"]
    assert table[2].split()[:3] == ["1", "message", "completed"] and table[2].split()[-2] == turns[1]["message_id"]

    shown = env.json("show", "hello", "2")
    assert {"turn", "message", "patch", "files", "reply", "status"} <= set(shown)
    assert shown["message"] == {"text": "as JSON", "n": 1}
    assert shown["patch"] == [{"op": "replace", "path": "/count", "value": 2},
                              {"op": "add", "path": "/history/1", "value": "as JSON"}]
    assert (shown["reply"], shown["status"], shown["files"]) == ("Hello! You've sent 2 messages.", "completed", [])
    assert env.json("show", "hello", "3")["message"] == {"text": "{not json"}
    text = env.ok("show", "hello", "2")
    assert "message, completed" in text and '/history/1 "as JSON"' in text and "files: 0 event(s)" in text

    assert env.json("state", "hello") == {"count": 4, "history": ["hi", "as JSON", "{not json", "again"]}
    assert env.json("state", "hello", "--turn", "1") == {"count": 1, "history": ["hi"]}
    assert json.loads(env.ok("state", "hello", "--turn", "0")) == {"count": 0, "history": []}

    [record] = env.json("list")
    assert (record["id"], record["status"], record["last_turn"], record["mounted"]) == ("hello", "stopped", 4, False)
    assert record["target"] == QUICKSTART
    assert env.ok("list").splitlines()[1].split()[:3] == ["hello", "stopped", "4"]

    # Without --store: $CHRONICLE_HOME/store, as for `chronicle mount`; a dotted module from the cwd.
    assert env.cli("list", store=False).stderr.startswith("chronicle: error: no Chronicle store")
    (env.src / "agents_pkg").mkdir()
    (env.src / "agents_pkg" / "__init__.py").write_text("")
    (env.src / "agents_pkg" / "quick.py").write_text((REPO / "examples" / "quickstart.py").read_text())
    assert env.ok("chat", "agents_pkg.quick:MyAgent", "--id", "home", store=False, cwd=env.src,
                  input="x\n") == "Hello! You've sent 1 messages.\n"
    assert [a["id"] for a in json.loads(env.ok("list", "--json", store=False))] == ["home"]


def test_chat_file_agent_attributes_files_then_rollback_fork_delete(env):
    lines = ["todo: write the report", "note: the meeting moved to 3pm", "todo: call Ann", "done: write the report"]
    out = env.ok("chat", FILE_AGENT, "--id", "files", input="\n".join(lines) + "\n").splitlines()
    assert len(out) == 4
    assert out[0].startswith("added 'write the report' to todo.md; 1 open, 0 done [git ")
    assert out[3].startswith("ticked off 'write the report' (line 1 of todo.md, with sed -i); 1 open, 1 done [git ")

    turns = env.json("turns", "files")
    assert [t["status"] for t in turns] == ["completed"] * 5
    shown = env.json("show", "files", "4")
    label = {"agent": "files", "turn": 4, "message_id": shown["message_id"]}
    assert shown["files"] and all(e["turn"] == label for e in shown["files"])
    events = {(e["event"], e["path"]) for e in shown["files"]}
    # sed -i writes a temp file and renames it over todo.md; git writes objects and moves its ref.
    assert any(ev == "rename" and path == "todo.md" for ev, path in events), events
    assert any(path.startswith(".git/objects/") for _, path in events)
    assert ("rename", ".git/refs/heads/main") in events
    assert turns[4]["events"] == len(shown["files"])
    assert {e["path"] for e in env.json("show", "files", "1")["files"]} >= {"todo.md", ".git/HEAD"}
    assert shown["patch"] == [{"op": "remove", "path": "/todo/0"},
                              {"op": "add", "path": "/done/0", "value": "write the report"},
                              {"op": "add", "path": "/commits/3", "value": env.json("state", "files")["commits"][3]}]
    assert "todo.md <- sed" in env.ok("show", "files", "4")
    # The workspace's own log says the same (`chronicle log --turn`).
    log = subprocess.run([sys.executable, "-m", "chronicle", "log", "--store", str(env.store), "--workspace",
                          "files", "--turn", "files:4", "--json"], capture_output=True, text=True, env=env.env)
    assert [json.loads(line) for line in log.stdout.splitlines()] == shown["files"]

    def head(workspace: str, path: str) -> str:
        return subprocess.run([sys.executable, "-m", "chronicle", "show", "--store", str(env.store), "--workspace",
                               workspace, path], capture_output=True, text=True, env=env.env, check=True).stdout

    assert head("files", "todo.md") == "- [x] write the report\n- [ ] call Ann\n"

    # Rollback: files and state back to turn 2, as a new turn.
    out = env.ok("rollback", "files", "--to", "2")
    assert out.startswith("Rolled agent 'files' back to turn 2: new turn 5")
    assert env.json("state", "files") == env.json("state", "files", "--turn", "2")
    assert head("files", "todo.md") == "- [ ] write the report\n"
    assert [e["event"] for e in env.json("show", "files", "5")["files"]] == ["restore"]
    assert env.json("turns", "files")[4]["status"] == "completed"                 # history is kept
    record = json.loads(env.ok("rollback", "files", "--to", "4", "--json"))
    assert record["kind"] == "rollback" and record["rollback_to"] == 4 and record["turn"] == 6

    # Fork at turn 3: the new agent has the state and files of then, and runs on its own.
    assert env.ok("fork", "files", "files-b", "--at", "3") == "Forked agent 'files' at turn 3 as 'files-b'\n"
    assert env.json("state", "files-b") == env.json("state", "files", "--turn", "3")
    out = env.ok("chat", FILE_AGENT, "--id", "files-b", input="done: call Ann\n")
    assert out.startswith("ticked off 'call Ann' (line 2 of todo.md, with sed -i); 1 open, 1 done")
    assert head("files-b", "todo.md") == "- [ ] write the report\n- [x] call Ann\n"
    assert head("files", "todo.md") == "- [x] write the report\n- [ ] call Ann\n"
    assert env.json("list")[1]["parent"] == {"agent": "files", "turn": 3}

    # Delete: asks on a terminal, refuses without one, refuses a parent of a fork.
    one_line_error(env.cli("delete", "files"), "without confirmation: stdin is not a terminal (pass --yes)", 2)
    one_line_error(env.cli("delete", "files", "--yes"), "files-b was forked from it")
    assert env.ok("delete", "files-b", "--yes") == "Deleted agent 'files-b'\n"
    assert env.ok("delete", "files", "-y") == "Deleted agent 'files'\n"
    assert env.json("list") == []
    assert not (env.store / "agents" / "files").exists()


def test_chat_sigint_cancels_the_running_turn(env):
    go = env.tmp / "never"
    proc = env.popen("chat", "streamer:Streamer", "--id", "s", "--store", str(env.store), "--json",
                     cwd=env.src, stdin=subprocess.PIPE)
    proc.stdin.write('first\n{"words": ["slow", "never"], "wait_file": "%s"}\n' % go)
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"token": "first "}
    assert json.loads(proc.stdout.readline()) == {"token": "#1"}
    assert json.loads(proc.stdout.readline())["result"]["status"] == "completed"
    assert json.loads(proc.stdout.readline()) == {"token": "slow "}
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    [result] = [json.loads(line)["result"] for line in rest.splitlines()]
    assert result["status"] == "cancelled"
    assert "was cancelled" in err and "Traceback" not in err
    assert env.json("state", "s") == {"count": 1, "words": ["first"]}
    assert env.trace_lines() == ["shutdown s"]


def test_bad_input_gets_one_line_errors(env):
    one_line_error(env.cli("list"), "no Chronicle store at", 2)
    env.ok("chat", QUICKSTART, "--id", "ok", input="hi\n")
    for args, pattern in [
        (("turns", "ghost"), "no agent named 'ghost'"),
        (("show", "ghost", "1"), "no agent named 'ghost'"),
        (("state", "ghost"), "no agent named 'ghost'"),
        (("rollback", "ghost", "--to", "1"), "no agent named 'ghost'"),
        (("fork", "ghost", "g2"), "no agent named 'ghost'"),
        (("delete", "ghost", "--yes"), "no agent named 'ghost'"),
        (("cancel", "ghost"), "no agent named 'ghost'"),
        (("show", "ok", "7"), "agent 'ok' has no turn 7"),
        (("state", "ok", "--turn", "7"), "agent 'ok' has no turn 7"),
        (("rollback", "ok", "--to", "7"), "agent 'ok' has no turn 7"),
        (("fork", "ok", "ok2", "--at", "7"), "agent 'ok' has no turn 7"),
        (("fork", "ok", "ok"), "agent 'ok' already exists"),
        (("cancel", "ok"), "no `chronicle agent serve` is running for"),
    ]:
        one_line_error(env.cli(*args), pattern)
    # A registration left by a coordinator killed with -9 (its pid reused by a live process) is ignored.
    (env.store / "run" / "agent-serve.json").write_text(json.dumps({"pid": os.getpid(), "url": f"http://127.0.0.1:{free_port()}"}))
    one_line_error(env.cli("cancel", "ok"), "no `chronicle agent serve` is running for")
    assert env.ok("rollback", "ok", "--to", "0").startswith("Rolled agent 'ok' back to turn 0")
    for target, pattern in [
        ("no_colon", "expected MODULE:CLASS"),
        ("no_such_module:X", "cannot import 'no_such_module'"),
        ("streamer:Nope", "'streamer' has no 'Nope'"),
        ("json:JSONDecoder", "is not a subclass of agent_runtime.BaseAgent"),
        ("missing.py:X", "no file"),
    ]:
        one_line_error(env.cli("chat", target, "--id", "x", cwd=env.src, input="hi\n"), pattern, 2)
    one_line_error(env.cli("chat", "streamer:Streamer", "--id", "bad/name", cwd=env.src), "invalid workspace name", 2)
    assert [a["id"] for a in env.json("list")] == ["ok"]
    # Another class for an existing agent must hold the same kind of state.
    one_line_error(env.cli("chat", "streamer:Streamer", "--id", "ok", cwd=env.src, input="x\n"),
                   "holds state of kind 'my_agent'")
    assert env.json("list")[0]["target"] == QUICKSTART                  # it keeps the code it had
    # A turn that fails: reported on stderr, exit status 1; the agent serves on.
    failed = env.cli("chat", "streamer:Streamer", "--id", "st", cwd=env.src, input='{"raise": "boom"}\nfine\n')
    assert failed.returncode == 1 and failed.stdout == "fine #1\n"
    assert failed.stderr == "chronicle: turn 1 of agent 'st' failed: RuntimeError: boom\n"
    usage = env.cli("show", "ok", "notanumber")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


# --- serve --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, url: str):
        self.url = url

    def __call__(self, method: str, path: str, body=None, headers: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stream(self, agent: str, message: dict):
        req = urllib.request.Request(f"{self.url}/agents/{agent}/messages", data=json.dumps(message).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=60)


def start_serve(env: Env, port: int) -> tuple[subprocess.Popen, Api]:
    proc = env.popen("serve", "--store", str(env.store), "--port", str(port), "--idle-timeout", "0", cwd=env.src)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=60)
    except queue.Empty:
        raise AssertionError("serve did not start within 60 s") from None
    assert first.startswith("Serving the agents of"), first + proc.stderr.read() if proc.poll() is not None else first
    url = first.split(" at ")[1].split()[0]
    assert url == f"http://127.0.0.1:{port}"
    return proc, Api(url)


def test_serve_http_api(env):
    port = free_port()
    proc, api = start_serve(env, port)
    go = env.tmp / "go"

    status, body = api("GET", "/")
    assert status == 200 and body["pid"] == proc.pid and body["agents"] == []
    status, record = api("POST", "/agents", {"id": "s", "target": "streamer:Streamer"})   # from serve's cwd
    assert status == 201 and record["id"] == "s" and record["running_here"]
    assert api("POST", "/agents", {"id": "s"})[0] == 200

    # Streaming: tokens arrive in order while the turn runs, then the result.
    with api.stream("s", {"words": ["one", "two", "three"], "wait_file": str(go)}) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        assert json.loads(resp.readline()) == {"token": "one "}
        status, turns = api("GET", "/agents/s/turns")
        assert turns[-1]["status"] == "running"                         # the handler waits for `go`
        go.touch()
        rest = [json.loads(line) for line in resp]
    assert rest[:-1] == [{"token": "two "}, {"token": "three "}, {"token": "#1"}]
    result = rest[-1]["result"]
    assert (result["turn"], result["status"], result["reply"]) == (1, "completed", "one two three #1")
    assert result["message_id"] == resp.headers["X-Message-Id"]

    # Send without waiting, then wait for idle.
    sent = [api("POST", "/agents/s/send", {"text": f"q{i}", "sleep": 0.1}) for i in range(3)]
    assert all(status == 202 for status, _ in sent)
    assert api("POST", "/agents/s/wait?timeout=60") == (200, {"idle": True})
    replies = [api("GET", f"/agents/s/replies/{body['message_id']}")[1] for _, body in sent]
    assert [(r["done"], r["turn"], r["result"]["reply"]) for r in replies] == \
        [(True, 2, "q0 #2"), (True, 3, "q1 #3"), (True, 4, "q2 #4")]
    assert api("GET", "/agents/s/state")[1] == {"count": 4, "words": ["one", "two", "three", "q0", "q1", "q2"]}
    assert api("GET", "/agents/s/state?turn=1")[1]["words"] == ["one", "two", "three"]
    status, shown = api("GET", "/agents/s/turns/2")
    assert status == 200 and shown["message"] == {"text": "q0", "sleep": 0.1} and shown["reply"] == "q0 #2"
    assert [h["reply"] for h in api("GET", "/agents/s/history")[1]] == ["one two three #1", "q0 #2", "q1 #3", "q2 #4"]

    # Cancel over HTTP: the turn is recorded cancelled, the state stays.
    never = str(env.tmp / "never")
    status, sent = api("POST", "/agents/s/send", {"words": ["slow", "x"], "wait_file": never})
    mid = sent["message_id"]
    deadline = time.monotonic() + 30
    while not api("GET", f"/agents/s/replies/{mid}")[1]["text"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert api("POST", "/agents/s/cancel") == (200, {"cancelled": True})
    assert api("POST", "/agents/s/wait?timeout=30")[0] == 200
    reply = api("GET", f"/agents/s/replies/{mid}")[1]
    assert reply["result"]["status"] == "cancelled" and reply["text"] == "slow "
    assert api("GET", "/agents/s/state")[1]["count"] == 4
    assert api("POST", "/agents/s/cancel") == (200, {"cancelled": False})

    # The CLI goes through the coordinator that runs the agent: cancel, rollback, chat.
    status, sent = api("POST", "/agents/s/send", {"words": ["slow", "x"], "wait_file": never})
    while not api("GET", f"/agents/s/replies/{sent['message_id']}")[1]["text"]:
        time.sleep(0.02)
    assert env.ok("cancel", "s") == "Cancelled the running turn of agent 's'\n"
    assert env.ok("cancel", "s") == "Agent 's' has no running turn\n"
    assert env.ok("rollback", "s", "--to", "2").startswith("Rolled agent 's' back to turn 2: new turn 7")
    assert api("GET", "/agents/s/state")[1] == {"count": 2, "words": ["one", "two", "three", "q0"]}
    out = env.ok("chat", "streamer:Streamer", "--id", "s", input="via chat\n", cwd=env.src)
    assert out == "via chat #3\n"
    assert env.trace_lines() == ["shutdown s"]                           # chat's EOF shut it down

    # Rollback and fork over HTTP.
    status, record = api("POST", "/agents/s/rollback", {"to": 1})
    assert status == 200 and record["kind"] == "rollback" and record["status"] == "completed"
    assert api("GET", "/agents/s/state")[1] == {"count": 1, "words": ["one", "two", "three"]}
    status, forked = api("POST", "/agents/s/fork", {"id": "s2", "at": 4})
    assert status == 201 and forked["parent"] == {"agent": "s", "turn": 4}
    with api.stream("s2", {"text": "fork"}) as resp:
        lines = [json.loads(line) for line in resp]
    assert lines[-1]["result"]["reply"] == "fork #5"
    assert api("GET", "/")[1]["agents"] == ["s2"]                     # awake: s slept since the chat

    # Errors: one JSON line each, with the right status.
    for method, path, body, code, kind in [
        ("GET", "/agents/ghost/turns", None, 404, "AgentNotFound"),
        ("POST", "/agents/ghost/messages", {"text": "x"}, 404, "AgentNotFound"),
        ("GET", "/agents/s/turns/99", None, 404, "NotFound"),
        ("GET", "/agents/s/turns/x", None, 400, "UsageError"),
        ("POST", "/agents", {"id": "bad", "target": "nope:X"}, 400, "AgentLoadError"),
        ("POST", "/agents", {"target": "streamer:Streamer"}, 400, "UsageError"),
        ("POST", "/agents/s/messages", ["not", "an", "object"], 400, "UsageError"),
        ("POST", "/agents/s/rollback", {"to": 99}, 404, "NotFound"),
        ("POST", "/agents/s/fork", {"id": "s2"}, 409, "AgentExists"),
        ("DELETE", "/agents/s", None, 409, "Busy"),
        ("POST", "/agents/s/wait?timeout=soon", None, 400, "UsageError"),
        ("GET", "/no/such/route", None, 404, "HTTPError"),
    ]:
        status, body = api(method, path, body)
        assert (status, body["kind"]) == (code, kind), (path, body)
        assert body["error"] and "\n" not in body["error"]
    assert api("GET", "/agents", headers={"Origin": "http://example.com"})[0] == 403
    assert api("GET", "/agents", headers={"Host": "example.com"})[0] == 403
    if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):      # another local user is refused
        probe = ("import urllib.request, urllib.error\ntry: urllib.request.urlopen(%r)\n"
                 "except urllib.error.HTTPError as e: print(e.code, e.read().decode())") % (api.url + "/agents")
        other = subprocess.run(["/usr/bin/python3", "-c", probe], user="nobody", capture_output=True, text=True,
                               cwd="/", timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert other.stdout.startswith('403 {"error": "only root may use this coordinator'), other

    # A second coordinator: the port is in use / the store is served.
    other = env.cli("serve", "--port", str(port), store=False)
    one_line_error(other, f"cannot listen on 127.0.0.1:{port}: the port is in use", 1)
    one_line_error(env.cli("serve", "--port", "0"), "a coordinator already serves")

    assert api("DELETE", "/agents/s2") == (200, {"deleted": "s2"})
    assert [a["id"] for a in api("GET", "/agents")[1]] == ["s"]

    # SIGTERM: every agent shut down, nothing left mounted, the registration gone.
    assert (env.store / "run" / "agent-serve.json").exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and " ERROR " not in err and " WARNING " not in err, err
    assert env.trace_lines() == ["shutdown s", "shutdown s2"]
    assert not (env.store / "run" / "agent-serve.json").exists()
    assert not list((env.store / "run").glob("mount-*.json"))
    assert workers_of(env.store) == []
    assert not any(mounts.mount_entries(mp) for mp in (env.store / "agents").glob("*/workspace"))
    assert env.json("state", "s") == {"count": 1, "words": ["one", "two", "three"]}

    # POST /shutdown stops it the same way.
    proc, api = start_serve(env, port)
    with api.stream("s", {"text": "last"}) as resp:
        assert json.loads(resp.read().splitlines()[-1])["result"]["reply"] == "last #2"
    assert api("POST", "/shutdown") == (202, {"stopping": True})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert env.trace_lines()[-1] == "shutdown s"
    assert not (env.store / "run" / "agent-serve.json").exists() and workers_of(env.store) == []


def test_reads_answer_while_a_turn_runs_under_serve(env):
    """state, history, turns and show answer over HTTP and from the CLI while the agent is mid-turn."""
    port = free_port()
    proc, api = start_serve(env, port)
    go = env.tmp / "go"
    try:
        assert api("POST", "/agents", {"id": "s", "target": "streamer:Streamer"})[0] == 201
        with api.stream("s", {"words": ["one", "two"], "wait_file": str(go)}) as resp:
            assert json.loads(resp.readline()) == {"token": "one "}         # the handler now waits for `go`
            for path in ("/agents/s/state", "/agents/s/history", "/agents/s/turns", "/agents/s/turns/1"):
                started = time.monotonic()
                status, body = api("GET", path)
                assert status == 200 and time.monotonic() - started < 5, (path, body)
            assert api("GET", "/agents/s/turns/1")[1]["status"] == "running"
            assert api("GET", "/agents/s/state")[1] == {"count": 0, "words": []}
            assert env.json("turns", "s")[-1]["status"] == "running"        # the CLI, in another process
            assert env.json("state", "s") == {"count": 0, "words": []}
            assert json.loads(env.ok("show", "s", "1", "--json"))["status"] == "running"
            go.touch()
            rest = [json.loads(line) for line in resp]
        assert rest[-1]["result"]["status"] == "completed"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 0


PAUSER = '''
from agent_runtime import BaseAgent

class Pauser(BaseAgent):
    quota_keys = ("api",)

    async def on_message(self, ctx, message):
        if message.get("hit"):
            ctx.record_quota_hit(message["hit"], key="api")
        await ctx.send_message("ok")
        if message.get("pause"):
            await ctx.pause(message["pause"])
'''


def test_list_shows_paused_agents_and_through_serve_the_quota_registry(env):
    (env.src / "pauser.py").write_text(PAUSER)
    out = env.ok("chat", "pauser:Pauser", "--id", "p", input='{"pause": "needs a human"}\n', cwd=env.src)
    assert out == "ok\n"
    header, row = env.ok("list").splitlines()
    assert header.split()[-1] == "WAITING" and row.endswith("paused (needs a human)")
    assert env.json("list")[0]["waiting"] == "paused (needs a human)"
    port = free_port()
    proc, api = start_serve(env, port)
    status, lines = api("POST", "/agents", {"id": "q", "target": "pauser:Pauser"})
    assert status == 201
    with api.stream("q", {"hit": 30}) as resp:
        assert json.loads(resp.read().splitlines()[-1])["result"]["status"] == "completed"
    status, quotas = api("GET", "/quotas")
    assert status == 200 and quotas["api"]["backing_off"] and quotas["api"]["last_agent"] == "q"
    listed = {a["id"]: a for a in env.json("list")}          # through the coordinator: its registry
    assert listed["q"]["quota"]["api"]["backing_off"] and listed["p"]["waiting"] == "paused (needs a human)"
    assert "quota api backing off until" in env.ok("list")
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    assert proc.returncode == 0
