"""The rest of the seed runtime's surface (SPEC §5, issue 8): ``last_response``,
compaction points, ``disconnect``, ``signal_idle``/``wait_for_wakeup``,
quota backoff.

Real mounts and worker processes (``env`` of ``test_agent_runtime``); the
serve parts reuse ``test_timers``'s subprocess harness.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest

try:
    from .test_agent_runtime import env, first_token   # noqa: F401  (the fixture)
    from .test_timers import Serve, free_port, served, wait_for   # noqa: F401
except ImportError:
    from test_agent_runtime import env, first_token     # noqa: F401
    from test_timers import Serve, free_port, served, wait_for     # noqa: F401

pytestmark = pytest.mark.mount

AGENTS = '''
import asyncio, os, time
from agent_runtime import BaseAgent, DeltaState

def trace(line):
    with open(os.environ["AGENT_TEST_TRACE"], "a") as f:
        f.write(line + "\\n")

class Talker(BaseAgent):
    class State(DeltaState):
        _entity_type = "talker"
        said: list = []

    async def on_message(self, ctx, message):
        text = message.get("text", "")
        if message.get("compact") is not None:
            ctx.compact(message["compact"], keep_last=message.get("keep", 0))
        if message.get("fail"):
            raise RuntimeError("no")
        ctx.state.said.append(text)
        msg = await ctx.send_message("")
        await msg.stream_token("re: ")
        if message.get("wait_file"):
            while not os.path.exists(message["wait_file"]):
                await asyncio.sleep(0.01)
        await msg.stream_token(text, final=True)

class Idler(BaseAgent):
    async def on_message(self, ctx, message):
        if message.get("idle"):
            if message.get("late"):
                await asyncio.sleep(message["late"])      # a message is queued meanwhile
            ctx.signal_idle()
            trace("idle")
            woke = await ctx.wait_for_wakeup(message.get("timeout"))
            await ctx.send_message(f"woke {woke and woke['reason']}")
            return
        await ctx.send_message(f"got {message.get('text')}")

class Limited(BaseAgent):
    quota_keys = ("api",)

    async def on_message(self, ctx, message):
        trace(f"{ctx.agent_id} begins {time.time()}")
        if message.get("hit"):
            ctx.record_quota_hit(message["hit"], key="api")
        await ctx.send_message("ok")

class Polite(BaseAgent):
    async def on_message(self, ctx, message):
        waited = await ctx.wait_for_quota("api")
        await ctx.send_message(f"waited {waited:.2f}")
'''


@pytest.fixture
def agents(env):
    (env.src / "surfaceagents.py").write_text(AGENTS)
    return env


def test_last_response_and_compaction_points(agents):
    async def program(rt):
        await rt.create("c", "surfaceagents:Talker", cwd=agents.src)
        assert rt.last_response("c") is None
        for text in ("one", "two", "three"):
            await rt.ask("c", {"text": text})
        assert rt.last_response("c") == "re: three"
        assert (await rt.ask("c", {"fail": True}))["status"] == "failed"
        assert rt.last_response("c") == "re: three"           # the last *completed* turn's reply
        point = await rt.ask("c", {"text": "four", "compact": "said one to three", "keep": 1})
        assert rt.compaction_indices("c") == [point["turn"]]
        shown = rt.show_turn("c", point["turn"])
        turns = [t["turn"] for t in rt.turns("c") if t["kind"] == "message"]
        # turns one, two, three and the failed one came before; the last one (the failed) is kept
        assert shown["compaction"] == {"summary": "said one to three", "keep_last": 1,
                                       "summarises": turns[:3], "state_turn": point["turn"]}
        assert shown["snapshot"] is True                       # the state it leaves is a snapshot
        history = rt.history("c")
        assert [h["compacted"] for h in history] == [True, True, True, False, False]
        assert [h["compaction"] is not None for h in history] == [False] * 4 + [True]
        # A second point summarises only what the first did not.
        await rt.ask("c", {"text": "five"})
        second = await rt.ask("c", {"text": "six", "compact": "the rest"})
        assert rt.compaction_indices("c") == [point["turn"], second["turn"]]
        assert rt.show_turn("c", second["turn"])["compaction"]["summarises"] == [turns[3], point["turn"],
                                                                                point["turn"] + 1]
        assert all(h["compacted"] for h in rt.history("c")[:-1])
    agents.run(program)


def test_disconnect_keeps_the_turn_running(agents):
    go = agents.tmp / "go"

    async def program(rt):
        await rt.create("d", "surfaceagents:Talker", cwd=agents.src)
        reply = await rt.send("d", {"text": "long", "wait_file": str(go)})
        token, stream = await first_token(reply)
        assert token == "re: "
        assert rt.disconnect("d") == 1
        with pytest.raises(StopAsyncIteration):                # the client's stream ends at once
            await asyncio.wait_for(stream.__anext__(), 5)
        assert not reply.done and not rt.is_idle("d")          # the turn goes on
        go.touch()
        result = await reply.result(30)
        assert result["status"] == "completed" and result["reply"] == "re: long"
        assert rt.last_response("d") == "re: long" and rt.state("d")["said"] == ["long"]
        assert rt.disconnect("d") == 0
    agents.run(program)


def test_disconnect_under_serve_keeps_the_reply_retrievable(served):
    go = served.tmp / "go"
    api = Serve(served, free_port())
    assert api("POST", "/agents", {"id": "h", "target": "surfaceagents:Talker"})[0] == 201
    lines: list = []

    def stream():
        req = urllib.request.Request(f"{api.url}/agents/h/messages?message_id=m1",
                                     data=json.dumps({"text": "later", "wait_file": str(go)}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            lines.extend(json.loads(line) for line in resp)

    client = threading.Thread(target=stream)
    client.start()
    wait_for(lambda: api("GET", "/agents/h/replies/m1")[1].get("text") == "re: ", 30, "the first token")
    assert api("POST", "/agents/h/disconnect")[1] == {"disconnected": 1}
    client.join(30)
    assert not client.is_alive()
    assert lines == [{"token": "re: "}, {"disconnected": True, "message_id": "m1"}]
    status, progress = api("GET", "/agents/h/replies/m1")
    assert status == 200 and progress["done"] is False          # still running
    go.touch()
    done = wait_for(lambda: (p := api("GET", "/agents/h/replies/m1")[1])["done"] and p, 30, "the turn's end")
    assert done["result"]["status"] == "completed" and done["result"]["reply"] == "re: later"
    assert api("GET", "/agents/h/last-response")[1] == {"reply": "re: later"}
    api.stop()


def test_signal_idle_and_wait_for_wakeup(agents):
    async def program(rt):
        await rt.create("i", "surfaceagents:Idler", cwd=agents.src)
        assert (await rt.ask("i", {"idle": True, "timeout": 0.3}))["reply"] == "woke None"   # timed out
        waiting = await rt.send("i", {"idle": True, "timeout": 30})
        deadline = time.monotonic() + 30
        while agents.trace_lines().count("idle") < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        second = await rt.send("i", {"text": "x"})                # wakes the waiting handler up
        assert (await waiting.result(30))["reply"] == "woke message"
        assert (await second.result(30))["reply"] == "got x"
        # The runtime's side: scale to zero now; wait for the next wake.
        await rt.signal_idle("i")
        assert not rt.agent("i")["running_here"] and rt.agent("i")["status"] == "sleeping"
        assert await rt.wait_for_wakeup("i", 0.2) is None
        later = asyncio.ensure_future(rt.wait_for_wakeup("i", 30))
        await rt.ask("i", {"text": "y"})
        assert (await later)["kind"] == "message"
    agents.run(program)


def test_a_message_queued_before_signal_idle_wakes_it_as_a_message(agents):
    """The runner hears "idle" after a message was queued: the handler's
    wait_for_wakeup still names that message (it said "job" before)."""
    async def program(rt):
        await rt.create("i", "surfaceagents:Idler", cwd=agents.src)
        waiting = await rt.send("i", {"idle": True, "late": 1.0, "timeout": 30})
        await asyncio.sleep(0.2)
        second = await rt.send("i", {"text": "x"})                # queued before the handler says idle
        assert (await waiting.result(30))["reply"] == "woke message"
        assert (await second.result(30))["reply"] == "got x"
    agents.run(program)


def test_quota_backoff_delays_another_agent_using_the_key(agents):
    def begins(agent):
        return [float(line.split()[-1]) for line in agents.trace_lines() if line.startswith(f"{agent} begins")]

    async def program(rt):
        for agent in ("q1", "q2"):
            await rt.create(agent, "surfaceagents:Limited", cwd=agents.src)
        await rt.create("q3", "surfaceagents:Polite", cwd=agents.src)
        hit = time.time()
        await rt.ask("q1", {"hit": 2.0})
        registry = rt.quota_registry()
        assert registry["api"]["backing_off"] and registry["api"]["last_agent"] == "q1"
        assert rt.agent("q2")["quota"]["api"]["backing_off"]      # q2 declared the key
        assert rt.agent("q3")["quota"] == {}                      # q3 did not
        await rt.ask("q2", {})                                    # its turn starts after the backoff
        assert begins("q2")[0] >= hit + 2.0
        polite = await rt.ask("q3", {})                           # waits through wait_for_quota
        assert polite["reply"].startswith("waited ")
        # Past the backoff nothing waits.
        start = time.monotonic()
        await rt.ask("q2", {})
        assert time.monotonic() - start < 2.0 and not rt.quota_registry()["api"]["backing_off"]
        # Another agent's hit reaches a worker already running: wait_for_quota waits for it.
        await rt.ask("q1", {"hit": 1.5})
        polite = await rt.ask("q3", {})
        assert float(polite["reply"].split()[1]) >= 1.0
    agents.run(program)
