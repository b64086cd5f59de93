"""``chronicle policy show|set``, ``gc --dry-run`` and the retention figures of ``stats``."""

from __future__ import annotations

import json

import pytest

from chronicle.cli import cli
from chronicle.store.store import Store
from test_cli import run
from tests.storeutil import write


@pytest.fixture
def store(tmp_path):
    """Workspace ``default`` with f.txt written 5 times (distinct contents)."""
    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("default", writable=True, create=True)
    for i in range(5):
        write(ws, ws.root, b"f.txt", bytes([i]) * 50_000)
    st.close()
    return path


def _du(path) -> int:
    """Bytes of the files below ``path`` (``du -b --files0``-like: directories left out)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_show_the_default_then_set(runner, store):
    doc = json.loads(run(runner, "policy", "show", "-s", store, "--json").stdout)
    assert doc["default"] is True and doc["workspace"] == "default"
    assert doc["keep_within"] == 86400 and doc["keep_hourly"] == 48 and "node_modules/" in doc["ignore"]
    text = run(runner, "policy", "show", "-s", store).stdout
    assert "(default policy)" in text and "24h" not in text and "1d" in text
    run(runner, "policy", "set", "-s", store, "--keep-last", 2, "--keep-within", "12h", "--keep-daily", 0,
        "--ignore", "build/", "--no-ignore", "*.pyc")
    doc = json.loads(run(runner, "policy", "show", "-s", store, "--json").stdout)
    assert doc["default"] is False and doc["keep_last"] == 2 and doc["keep_within"] == 12 * 3600
    assert doc["keep_daily"] == 0 and doc["keep_weekly"] == 52          # not given: unchanged
    assert "build/" in doc["ignore"] and "*.pyc" not in doc["ignore"]


@pytest.mark.parametrize("args, match", [
    (["--keep-within", "7 days"], "bad duration"),
    (["--keep-within", "1y"], "bad duration"),
    (["--keep-last", "-1"], "--keep-last"),
    (["--keep-hourly", "lots"], "--keep-hourly"),
    (["--ignore", ""], "bad ignore pattern"),
])
def test_bad_policy_input_is_one_line(runner, store, args, match):
    result = runner.invoke(cli, ["policy", "set", "-s", str(store), *args], catch_exceptions=False)
    assert result.exit_code in (1, 2) and match in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def test_policy_of_an_unknown_workspace(runner, store):
    result = run(runner, "policy", "show", "-s", store, "-w", "nope", code=1)
    assert "no workspace named 'nope'" in result.stderr


def test_gc_dry_run_and_plain_gc(runner, store):
    run(runner, "policy", "set", "-s", store, "--keep-last", 2, "--keep-within", "0s", "--keep-hourly", 0,
        "--keep-daily", 0, "--keep-weekly", 0, "--keep-turns", 0)
    doc = json.loads(run(runner, "gc", "--dry-run", "-s", store, "--json").stdout)
    mine = doc["workspaces"][0]
    assert mine["dropped_versions"] == 3 and doc["freed_raw_bytes"] == 3 * 50_000
    text = run(runner, "gc", "--dry-run", "-s", store, "--all").stdout
    assert "would drop 3" in text and "f.txt: drop 3 of 5" in text and "nothing changed" in text
    again = json.loads(run(runner, "gc", "--dry-run", "-s", store, "--json").stdout)
    assert again == doc                                  # the dry run changed nothing
    before = _du(store / "packs")
    done = json.loads(run(runner, "gc", "-s", store, "--json").stdout)
    assert done["pruned_versions"] == 3 and done["freed_bytes"] == doc["freed_bytes"]   # what the dry run promised
    assert done["freed_raw_bytes"] == 3 * 50_000 and done["packs_deleted"] >= 1
    assert _du(store / "packs") < before
    text = run(runner, "gc", "-s", store).stdout                     # nothing left to do
    assert "pruned 0 versions of default" in text and "freed 0 contents" in text
    assert "versions" not in run(runner, "gc", "--dry-run", "-s", store).stdout.split("would free")[1]
    versions = json.loads(run(runner, "log", "-s", store, "f.txt", "--json").stdout)["versions"]
    assert [bool(v.get("pruned")) for v in versions] == [True] * 3 + [False] * 2
    assert run(runner, "log", "-s", store, "f.txt").stdout.count(" pruned ") == 3     # a visible mark
    assert "not both" in run(runner, "gc", "--dry-run", "-s", store, "--all", "-w", "default", code=2).stderr


def test_stats_shows_retention_figures(runner, store):
    run(runner, "policy", "set", "-s", store, "--keep-last", 1, "--keep-within", "0s", "--keep-hourly", 0,
        "--keep-daily", 0, "--keep-weekly", 0)
    figures = json.loads(run(runner, "stats", "-s", store, "--json").stdout)
    assert figures["head_logical_bytes"] == 50_000
    assert figures["history_logical_bytes"] == 50_000
    assert figures["policy_would_drop_versions"] == 4
    assert figures["policy_would_drop_logical_bytes"] == 4 * 50_000
    assert figures["policy_would_free_bytes"] > 0 and figures["last_gc"] is None
    run(runner, "gc", "-s", store)
    figures = json.loads(run(runner, "stats", "-s", store, "--json").stdout)
    assert figures["last_gc"]["pruned_versions"] == 4 and figures["policy_would_drop_versions"] == 0
    assert figures["last_gc"]["freed_bytes"] > 0 and figures["policy_would_free_bytes"] == 0
    assert "pruned 4 versions" in run(runner, "stats", "-s", store).stdout


def test_log_text_names_what_a_dropped_line_summarises(runner, tmp_path):
    """A gc-dropped run of an ignored path is one ``dropped`` line; the text log says through which seq and
    how many events it stands for, as the JSON line does."""
    import time

    from chronicle.store.gc import collect
    from tests.storeutil import A

    path = tmp_path / "store"
    st = Store.init(path)
    ws = st.open_workspace("default", writable=True, create=True)
    nm = ws.mkdir(ws.root, b"node_modules", 0o755, A)[0]
    for i in range(4):
        write(ws, nm, b"f%d.js" % i, b"x" * 100 + bytes([i]))
    for i in range(4):
        ws.unlink(nm, b"f%d.js" % i, A)
    ws.rmdir(ws.root, b"node_modules", A)
    collect.collect(st, ["default"], now_ns=time.time_ns() + 400 * 86400 * 10**9)
    st.close()
    lines = [json.loads(x) for x in run(runner, "log", "-s", path, "--json").stdout.splitlines()]
    summary = [x for x in lines if x["event"] == "dropped"]
    assert len(summary) == 1 and summary[0]["events"] > 4
    text = [x for x in run(runner, "log", "-s", path).stdout.splitlines() if " dropped " in x]
    assert len(text) == 1
    assert f"through {summary[0]['through']}" in text[0] and f"events {summary[0]['events']}" in text[0]
