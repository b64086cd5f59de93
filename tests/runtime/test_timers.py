"""Durable timers: ``ctx.sleep``/``sleep_until``/``pause``, wake turns, and
their survival across ``chronicle agent serve`` restarts (SPEC §5, issue 8).

Real mounts and worker processes (the ``env`` fixture of
``test_agent_runtime``: cleanup by PID, daemon logs checked); the serve tests
run ``python -m chronicle agent serve`` as a subprocess, stopped by its PID.
Sleeps are a few seconds. Tolerance of a wake: it is never early, and at
most ``WAKE_TOLERANCE`` seconds late (the runtime schedules it on the loop's
clock; a restarted serve needs to start its worker and mount first).
"""

from __future__ import annotations

import asyncio
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
    from .test_agent_runtime import env   # noqa: F401  (the fixture)
except ImportError:
    from test_agent_runtime import env     # noqa: F401

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parents[2]
WAKE_TOLERANCE = 3.0        # seconds a wake may come after its due time (never before)

AGENTS = '''
import asyncio, os, time
from datetime import datetime, timedelta, timezone
from agent_runtime import BaseAgent, DeltaState

def trace(line):
    with open(os.environ["AGENT_TEST_TRACE"], "a") as f:
        f.write(line + "\\n")

class Sleeper(BaseAgent):
    class State(DeltaState):
        _entity_type = "sleeper"
        wakes: list = []
        naps: int = 0

    async def on_message(self, ctx, message):
        msg = await ctx.send_message("")
        if "wake" in message:
            ctx.state.wakes.append(message["wake"]["reason"])
            trace(f"woke {message['wake']['reason']} {time.time()}")
            await msg.stream_token(f"woke {message['wake']['reason']}", final=True)
            return
        op = message.get("op")
        await msg.stream_token(f"{op} ", final=True)
        if op == "sleep":
            ctx.state.naps += 1
            await ctx.sleep(message["seconds"], message.get("reason", ""))
            ctx.state.naps += 100                  # never runs: sleep ends the turn
        elif op == "until":
            ctx.state.naps += 1
            await ctx.sleep_until(datetime.now(timezone.utc) + timedelta(seconds=message["seconds"]),
                                  message.get("reason", ""))
        elif op == "pause":
            await ctx.pause(message.get("reason", ""))


class Waker(Sleeper):
    class State(DeltaState):
        _entity_type = "waker"
        wakes: list = []
        naps: int = 0

    async def on_wake(self, ctx, event):
        ctx.state.wakes.append(event)
        msg = await ctx.send_message(f"on_wake {event['reason']} late {event['late_s']}")
        await msg.stream_token("", final=True)
'''

SLEEPER, WAKER = "timeragents:Sleeper", "timeragents:Waker"


@pytest.fixture
def agents(env):
    (env.src / "timeragents.py").write_text(AGENTS)
    return env


def kinds(rt, agent):
    return [(t["kind"], t["status"]) for t in rt.turns(agent) if t["kind"] in ("message", "wake")]


def test_sleep_ends_the_turn_and_a_wake_turn_comes_on_time(agents):
    async def program(rt):
        await rt.create("s", WAKER, cwd=agents.src)
        t0 = time.time()
        slept = await rt.ask("s", {"op": "sleep", "seconds": 1.5, "reason": "nap"})
        assert slept["status"] == "completed" and slept["suspend"]["kind"] == "sleep"
        assert rt.state("s")["naps"] == 1                    # the patch up to sleep(); nothing after it
        await rt.wait_for_idle("s", 30)                      # the agent scales to zero after the reply
        record = rt.agent("s")
        assert record["waiting"].startswith("sleeping until ") and record["waiting"].endswith(" (nap)")
        assert record["status"] == "sleeping" and not record["running_here"] and not record["mounted"]
        assert record["timer"]["due"] == pytest.approx(t0 + 1.5, abs=1.0)
        woke = await rt.wait_for_wakeup("s", 1.5 + WAKE_TOLERANCE + 30)
        assert woke is not None and woke["kind"] == "wake"
        await rt.wait_for_idle("s", 30)
        shown = rt.show_turn("s", woke["turn"])
        assert shown["status"] == "completed" and shown["message"]["reason"] == "nap"
        assert shown["reply"].startswith("on_wake nap late ")
        due = record["timer"]["due"]
        assert 0 <= shown["message"]["late_s"] <= WAKE_TOLERANCE
        assert rt.state("s")["wakes"][0]["reason"] == "nap"
        assert rt.agent("s")["timer"] is None and rt.agent("s")["waiting"] is None
        assert kinds(rt, "s") == [("message", "completed"), ("wake", "completed")]
        assert due <= time.time()
        # The default on_wake is on_message(ctx, {"wake": event}); sleep_until takes a datetime.
        await rt.create("d", SLEEPER, cwd=agents.src)
        await rt.ask("d", {"op": "until", "seconds": 0.5, "reason": "soon"})
        assert (await rt.wait_for_wakeup("d", 30))["kind"] == "wake"
        await rt.wait_for_idle("d", 30)
        assert rt.last_response("d") == "woke soon" and rt.state("d")["wakes"] == ["soon"]
    agents.run(program)


def test_a_message_wakes_a_sleeping_agent_early_and_cancels_its_timer(agents):
    async def program(rt):
        await rt.create("e", SLEEPER, cwd=agents.src)
        await rt.ask("e", {"op": "sleep", "seconds": 3, "reason": "long"})
        assert rt.agent("e")["waiting"].endswith("(long)")
        early = await rt.ask("e", {"op": "hello"})
        assert early["status"] == "completed" and early["reply"] == "hello "
        assert rt.agent("e")["timer"] is None and rt.agent("e")["waiting"] is None
        await asyncio.sleep(3.5)                             # past the cancelled timer's due time
        assert kinds(rt, "e") == [("message", "completed")] * 2 and rt.state("e")["wakes"] == []
    agents.run(program)


def test_pause_waits_for_a_message(agents):
    async def program(rt):
        await rt.create("p", SLEEPER, cwd=agents.src)
        paused = await rt.ask("p", {"op": "pause", "reason": "need input"})
        assert paused["status"] == "completed" and paused["suspend"]["due"] is None
        await rt.wait_for_idle("p", 30)
        record = rt.agent("p")
        assert record["waiting"] == "paused (need input)" and record["status"] == "sleeping"
        assert await rt.wait_for_wakeup("p", 2.0) is None          # no timer: nothing wakes it
        assert not rt.agent("p")["running_here"]
        assert (await rt.ask("p", {"op": "go"}))["reply"] == "go "
        assert rt.agent("p")["waiting"] is None
    agents.run(program)


def test_sleep_and_pause_check_their_arguments(agents):
    (agents.src / "badsleep.py").write_text('''
from agent_runtime import BaseAgent
class Bad(BaseAgent):
    async def on_message(self, ctx, message):
        seconds = message["seconds"]
        await ctx.sleep(float(seconds) if seconds == "inf" else seconds)
''')

    async def program(rt):
        await rt.create("b", "badsleep:Bad", cwd=agents.src)
        for seconds in (-1, "soon", "inf", True):
            out = await rt.ask("b", {"seconds": seconds})
            assert out["status"] == "failed" and "sleep seconds must be a non-negative number" in out["error"]
        assert rt.agent("b").get("timer") is None and rt.agent("b")["waiting"] is None
    agents.run(program)


# --- under serve ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``chronicle agent serve`` on the test's store, as a subprocess."""

    def __init__(self, env, port: int):
        environ = dict(os.environ, PYTHONPATH=str(REPO), AGENT_TEST_TRACE=str(env.trace))
        self.proc = subprocess.Popen([sys.executable, "-m", "chronicle", "agent", "serve", "--store",
                                      str(env.store), "--port", str(port), "--idle-timeout", "0"],
                                     cwd=env.src, env=environ, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        env.serves.append(self.proc)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        first = lines.get(timeout=60)
        assert first.startswith("Serving the agents of"), first + (self.proc.stderr.read() if self.proc.poll()
                                                                   is not None else "")
        self.url = f"http://127.0.0.1:{port}"

    def __call__(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read()
                if resp.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                    return resp.status, [json.loads(line) for line in text.splitlines()]
                return resp.status, json.loads(text)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        return err


@pytest.fixture
def served(agents):
    agents.serves = []
    yield agents
    for proc in agents.serves:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def wake_lines(env) -> list[float]:
    return [float(line.split()[-1]) for line in env.trace_lines() if line.startswith("woke ")]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_timer_wakes_a_sleeping_agent_under_serve(served):
    api = Serve(served, free_port())
    try:
        assert api("POST", "/agents", {"id": "z", "target": SLEEPER})[0] == 201
        status, lines = api("POST", "/agents/z/messages", {"op": "sleep", "seconds": 1.5, "reason": "short"})
        assert status == 200 and lines[-1]["result"]["status"] == "completed"
        status, agents = api("GET", "/agents")
        (z,) = [a for a in agents if a["id"] == "z"]
        due = z["timer"]["due"]
        assert z["waiting"].endswith("(short)") and not z["running_here"]
        woke = wait_for(lambda: wake_lines(served), 1.5 + WAKE_TOLERANCE + 30, "the wake")
        assert due <= woke[0] <= due + WAKE_TOLERANCE
        # the handler traces "woke" before its turn ends: the reply is the last response once it has
        wait_for(lambda: api("GET", "/agents/z/last-response")[1] == {"reply": "woke short"}, 30,
                 "the wake turn's reply")
    finally:
        api.stop()


def test_a_timer_survives_a_serve_restart(served):
    port = free_port()
    api = Serve(served, port)
    assert api("POST", "/agents", {"id": "r", "target": SLEEPER})[0] == 201
    status, lines = api("POST", "/agents/r/messages", {"op": "sleep", "seconds": 6, "reason": "across"})
    assert lines[-1]["result"]["status"] == "completed"
    due = api("GET", "/agents/r")[1]["timer"]["due"]
    api.stop()                                            # while the agent sleeps
    assert wake_lines(served) == []
    # `chronicle agent list` (no coordinator) reads the timer from the store.
    out = subprocess.run([sys.executable, "-m", "chronicle", "agent", "list", "--store", str(served.store)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert out.returncode == 0 and "sleeping until " in out.stdout and "(across)" in out.stdout, out
    time.sleep(1.0)
    api = Serve(served, port)
    try:
        woke = wait_for(lambda: wake_lines(served), 6 + WAKE_TOLERANCE + 30, "the wake after the restart")
        assert due <= woke[0] <= due + WAKE_TOLERANCE, (woke[0] - due)
        turns = api("GET", "/agents/r/turns")[1]
        assert [t["kind"] for t in turns if t["kind"] in ("message", "wake")] == ["message", "wake"]
    finally:
        api.stop()
