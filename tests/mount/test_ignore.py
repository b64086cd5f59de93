"""Ignore rules through a real mount: ignored trees keep their latest content only (SPEC §4)."""

from __future__ import annotations

import json

import pytest

from chronicle.store.fsck.checks import fsck
from chronicle.store.store import Store


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("ignore rules are Chronicle's own")


def query(mount, path: str) -> dict:
    return json.loads((mount.path / ".chronicle" / "query" / path).read_bytes())


def test_node_modules_written_twice_keeps_one_version_per_file(mount):
    root = mount.path
    files = [f"node_modules/pkg{i}/lib/index.js" for i in range(5)] + ["node_modules/.bin/tool"]
    for round_ in (1, 2):
        for name in files:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"// {name} round {round_}\n" * 50)
    (root / "app.js").write_text("v1\n")
    (root / "app.js").write_text("v2\n")
    for name in files:
        doc = query(mount, name)
        assert doc["unversioned"] is True, doc
        assert len(doc["versions"]) == 1 and doc["versions"][0]["size"] == len(f"// {name} round 2\n") * 50
        assert (root / name).read_text().endswith("round 2\n")          # still an ordinary file
    app = query(mount, "app.js")
    assert "unversioned" not in app and len(app["versions"]) == 2
    assert sorted(p.name for p in (root / "node_modules").iterdir()) == [".bin"] + [f"pkg{i}" for i in range(5)]
    mount.stop()
    store = Store.open(mount.store)
    try:
        report = fsck(store)
    finally:
        store.close()
    assert report.clean, [p.message for p in report.problems]


def test_chronicleignore_edit_takes_effect(mount):
    root = mount.path
    (root / "out").mkdir()
    (root / "out" / "a.txt").write_text("1")
    (root / "out" / "a.txt").write_text("2")
    assert len(query(mount, "out/a.txt")["versions"]) == 2
    (root / ".chronicleignore").write_text("out/\n")
    for data in ("3", "4", "5"):
        (root / "out" / "a.txt").write_text(data)
    doc = query(mount, "out/a.txt")
    assert doc["unversioned"] is True and len(doc["versions"]) == 1
    assert (root / "out" / "a.txt").read_text() == "5"
    (root / ".chronicleignore").write_text("# nothing ignored here\n!node_modules/\n")
    (root / "out" / "a.txt").write_text("6")
    (root / "out" / "a.txt").write_text("7")
    doc = query(mount, "out/a.txt")
    assert "unversioned" not in doc and len(doc["versions"]) == 3
    (root / "node_modules").mkdir()
    (root / "node_modules" / "x").write_text("a")
    (root / "node_modules" / "x").write_text("b")
    assert len(query(mount, "node_modules/x")["versions"]) == 2             # re-included by the file
