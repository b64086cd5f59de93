"""The web timeline in a real browser: headless Debian chromium driven by Playwright.

Each test starts ``chronicle ui`` on a store (built through the store API, or
by a real agent run with ``chronicle agent chat``), clicks through its pages as
a person would, checks what they show against the store, performs the
confirmed actions and checks the store after them. Screenshots of every page
visited are saved (the ``shots`` fixture prints where).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chronicle.store.history.access import invoking_user
from chronicle.store.history import points
from chronicle.store.history.turns import TurnLog
from chronicle.store.history.views import HistoryViews
from chronicle.store.store import Store
from chronicle.ui import data

try:
    from . import uiutil
except ImportError:
    import uiutil

try:
    from .. import mounts
except ImportError:
    import mounts


def head_content(store: Path, workspace: str, path: bytes) -> bytes | None:
    with Store.open(store) as st:
        views = HistoryViews(st.open_workspace(workspace), caller=invoking_user())
        return data.content_at(views, views.ws.head_seq, path)


def test_click_through_an_agent_and_a_turn(tmp_path, ui_server, browser, shots):
    store = uiutil.build_store(tmp_path / "store")
    url, _proc = ui_server(store)
    page = browser
    page.goto(url + "/")
    # The fork trees: bot2 drawn under bot, for the agents and for their workspaces.
    assert page.locator("ul.tree > li > ul.tree a.agent-link", has_text="bot2").count() == 1
    assert "forked from bot turn 2" in page.locator("ul.tree ul li").first.inner_text()
    page.screenshot(path=shots / "1-index.png", full_page=True)

    page.locator("a.agent-link", has_text="bot").first.click()
    page.wait_for_url("**/agents/bot")
    rows = page.locator("tr.turn")
    assert rows.count() == 6 and rows.first.get_attribute("data-turn") == "5"        # newest first
    row = page.locator("tr.turn[data-turn='3']").inner_text()
    assert "please do step 3" in row and "did step 3" in row and "completed" in row and "input_tokens 30" in row
    page.screenshot(path=shots / "2-agent.png", full_page=True)

    page.locator("tr.turn[data-turn='3'] td a").first.click()
    page.wait_for_url("**/agents/bot/turns/3")
    # The state patch: before and after, the changed values marked (an append to a list too).
    changed_after = " ".join(page.locator("pre.json.after span.chg").all_inner_texts())
    assert '"count": 3' in changed_after and '"mood": "busy"' in changed_after and changed_after.count("3") >= 2
    changed_before = " ".join(page.locator("pre.json.before span.chg").all_inner_texts())
    assert '"count": 2' in changed_before and '"mood": "fresh"' in changed_before
    assert '"done"' in " ".join(page.locator("pre.json.after span.same").all_inner_texts())
    # Its file events and the unified diff of each file it changed.
    assert page.locator("table.events tr.event").count() == 3
    diff = page.locator("section.filediff[data-path='log.txt'] .diff").inner_text()
    assert "--- a/log.txt" in diff and "+step 3" in diff and " step 2" in diff and "-step" not in diff
    created = page.locator("section.filediff[data-path='turn-3.txt'] .diff").inner_text()
    assert "--- /dev/null" in created and "+written by turn 3" in created
    page.screenshot(path=shots / "3-turn.png", full_page=True)

    page.click("a[rel=next]")
    page.wait_for_url("**/agents/bot/turns/4")
    assert "+step 4" in page.locator("section.filediff[data-path='log.txt'] .diff").inner_text()

    # A file's history: the last two versions diffed by default, any two on request, any version shown.
    page.locator("tr.event a", has_text="log.txt").first.click()
    page.wait_for_url("**/w/bot/file?path=log.txt")
    assert page.locator("tr.version").count() == 5
    assert "+step 5" in page.locator(".filediff .diff").inner_text()
    page.select_option("select[name=a]", "1")
    page.select_option("select[name=b]", "3")
    page.click("#compare")
    page.wait_for_url("**a=1&b=3")
    shown = page.locator(".filediff .diff").inner_text()
    assert "+step 2" in shown and "+step 3" in shown and "+step 4" not in shown
    page.screenshot(path=shots / "4-file.png", full_page=True)
    page.locator("tr.version[data-version='2'] a", has_text="view").click()
    page.wait_for_url("**v=2")
    assert page.locator(".content").inner_text().split() == ["step", "1", "step", "2"]

    # The tree browser at a turn, at a seq, at a time, at a snapshot.
    page.goto(url + "/agents/bot/turns/2")
    page.click("text=files at the end of this turn")
    page.wait_for_url("**/w/bot/tree?at=turn*")
    names = page.locator("table.listing tr.entry td:first-child").all_inner_texts()
    assert names == ["log.txt", "turn-1.txt", "turn-2.txt"]
    page.screenshot(path=shots / "5-tree.png", full_page=True)
    page.fill("#at", "0")
    page.click("#go")
    page.wait_for_url("**at=0**")
    assert page.locator("table.listing tr.entry").count() == 0
    with Store.open(store) as st:
        ws = st.open_workspace("bot")
        t1_end = st.get_turn(ws, "bot", 1)["end_time"]
    page.fill("#at", t1_end)
    page.click("#go")
    page.wait_for_load_state()
    assert page.locator("table.listing tr.entry td:first-child").all_inner_texts() == ["log.txt", "turn-1.txt"]
    page.goto(url + "/w/notes/tree?at=planned&path=notes")
    page.locator("table.listing a", has_text="todo.md").first.click()
    assert "ship" in page.locator(".content").inner_text()


def test_snapshot_restore_and_fork_behind_confirmations(tmp_path, ui_server, browser, shots):
    store = uiutil.build_store(tmp_path / "store")
    url, _proc = ui_server(store)
    page = browser
    page.goto(url + "/w/notes")
    page.fill("input[name=name]", "reviewed")
    page.click("#snapshot")
    page.wait_for_url("**/w/notes/snapshot?name=reviewed")
    assert "Name the current state of workspace 'notes'" in page.locator(".confirm-text").inner_text()
    with Store.open(store) as st:                 # a confirmation page changes nothing
        assert points.snapshot_seq(st.open_workspace("notes"), "reviewed") is None
    page.screenshot(path=shots / "1-confirm-snapshot.png", full_page=True)
    page.click("#confirm")
    page.wait_for_url("**/w/notes?done=*")
    assert "snapshot 'reviewed'" in page.locator(".done").inner_text()
    with Store.open(store) as st:
        ws = st.open_workspace("notes")
        assert points.snapshot_seq(ws, "reviewed") == ws.head_seq

    page.goto(url + "/w/notes/file?path=notes/todo.md")
    page.locator("tr.version[data-version='1'] a.restore").click()
    page.wait_for_url("**/w/notes/restore?*")
    page.click("text=cancel")                     # cancelled: nothing happens
    page.wait_for_url("**/w/notes/file?path=notes%2Ftodo.md")
    assert head_content(store, "notes", b"notes/todo.md").endswith(b"- [ ] ship\n")
    page.locator("tr.version[data-version='1'] a.restore").click()
    page.screenshot(path=shots / "2-confirm-restore.png", full_page=True)
    page.click("#confirm")
    page.wait_for_url("**done=*")
    assert "restored at seq" in page.locator(".done").inner_text()
    assert head_content(store, "notes", b"notes/todo.md") == b"- [ ] write\n"
    assert page.locator("tr.version").first.get_attribute("data-version") == "4"
    page.screenshot(path=shots / "3-restored.png", full_page=True)

    # Fork an agent at a turn: the new agent's name is asked on the confirmation page.
    page.goto(url + "/agents/bot/turns/3")
    page.click("#fork")
    page.wait_for_url("**/agents/bot/fork?at=3")
    page.fill("#ask", "bot3")
    page.screenshot(path=shots / "4-confirm-fork.png", full_page=True)
    page.click("#confirm")
    page.wait_for_url("**/agents/bot3")
    assert page.locator("tr.turn").first.get_attribute("data-turn") == "3"
    assert "forked from bot turn 3" in page.locator("p.meta").first.inner_text()
    with Store.open(store) as st:
        record = TurnLog(st).get("bot3")
        assert record["parent"] == {"agent": "bot", "turn": 3} and TurnLog(st).state_at("bot3").state["count"] == 3
        assert st.workspace_record("bot3").fork_seq == TurnLog(st).record("bot", 3)["end_seq"]
    page.goto(url + "/agents/bot/fork?at=3")
    page.fill("#ask", "bot3")
    page.click("#confirm")                        # the name is taken: one line, nothing changed
    assert "already exists" in page.locator("#error").inner_text()

    # A bad snapshot name is one line on an error page, and changes nothing.
    page.goto(url + "/w/notes/snapshot?name=12")
    assert page.locator("#error").count() == 1 and "Traceback" not in page.content()


PLANNER = '''
from agent_runtime import BaseAgent, DeltaState


class Planner(BaseAgent):
    class State(DeltaState):
        _entity_type = "planner"
        steps: list[str] = []

    async def on_message(self, ctx, message):
        step = message.get("text", "")
        with open("plan.md", "a") as f:
            f.write(f"- {step}\\n")
        ctx.state.steps.append(step)
        msg = await ctx.send_message("")
        await msg.stream_token(f"planned {len(ctx.state.steps)} steps", final=True)
'''


@pytest.mark.mount
def test_rollback_of_a_real_agent(tmp_path, ui_server, browser, shots):
    reason = mounts.fuse_unavailable_reason()
    if reason:
        pytest.fail(f"this test needs FUSE and cannot get it: {reason}")
    store = tmp_path / "store"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "planner.py").write_text(PLANNER)
    target = str(tmp_path / "src" / "planner.py") + ":Planner"

    def agent(*args: str, stdin: str = "") -> str:
        done = subprocess.run([sys.executable, "-m", "chronicle", "agent", *args, "--store", str(store)],
                              input=stdin, capture_output=True, text=True, env=ui_server.env, cwd=tmp_path,
                              timeout=180)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        agent("chat", target, "--id", "planner", stdin="outline\ndraft\nreview\n")
        url, _proc = ui_server(store)
        page = browser
        page.goto(url + "/agents/planner")
        assert page.locator("tr.turn").count() == 4
        page.locator("tr.turn[data-turn='1'] td a").first.click()
        page.wait_for_url("**/agents/planner/turns/1")
        assert "+- outline" in page.locator("section.filediff[data-path='plan.md'] .diff").inner_text()
        page.click("#rollback")
        page.wait_for_url("**/agents/planner/rollback?to=1")
        page.screenshot(path=shots / "1-confirm-rollback.png", full_page=True)
        started = time.monotonic()
        page.click("#confirm")
        page.wait_for_url("**/agents/planner/turns/4?done=*", timeout=180_000)
        print(f"rollback through the web timeline: {time.monotonic() - started:.1f} s")
        assert "Rolled back to turn 1" in page.locator(".done").inner_text()
        assert page.locator("dd.status").inner_text() == "completed"
        assert "rollback" in page.locator("dl.facts").inner_text()
        page.screenshot(path=shots / "2-rolled-back.png", full_page=True)

        turns = json.loads(agent("turns", "planner", "--json"))
        assert (turns[-1]["turn"], turns[-1]["kind"], turns[-1]["status"]) == (4, "rollback", "completed")
        assert json.loads(agent("state", "planner", "--json")) == {"steps": ["outline"]}
        assert head_content(store, "planner", b"plan.md") == b"- outline\n"
        # The rollback's own turn page shows the files it put back.
        assert "-- draft" in page.locator("section.filediff[data-path='plan.md'] .diff").inner_text()
    finally:
        problems = mounts.clean_store_mounts(store)
    assert problems == []
