"""npm-like churn in an ignored ``node_modules/`` through a real mount: gc drops its records, past trees stay whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chronicle.store.store import Store
from tests.mount.test_full_disk import fsck_clean

CLI = [sys.executable, "-m", "chronicle"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("Chronicle's gc")


def _records_named(store: Path, needle: bytes) -> dict[str, int]:
    """Per database, the workspace records whose key or value names ``needle`` (paths, log lines)."""
    st = Store.open(store)
    try:
        out = {}
        with st.env.begin() as txn:
            for db in ("paths", "path_heads", "dirent_hist"):
                with txn.cursor(db=st.dbs[db]) as cur:
                    out[db] = sum(1 for key, _v in cur if needle in bytes(key))
            out["inodes"] = txn.stat(st.dbs["inodes"])["entries"]
        return out
    finally:
        st.close()


def _last_seq(root: Path) -> int:
    return json.loads((root / ".chronicle" / "log").read_text().splitlines()[-1])["seq"]


def test_npm_like_churn_in_node_modules_leaves_no_records(mount_factory):
    m = mount_factory()
    root = m.path
    (root / "package.json").write_text('{"name": "app"}\n')
    old_seqs = []
    for r in range(3):
        for p in range(12):
            pkg = root / "node_modules" / f"pkg{p}" / "lib"
            pkg.mkdir(parents=True)
            for i in range(25):
                (pkg / f"f{i}.js").write_text(f"module.exports = {r * 1000 + p * 25 + i};\n" * 20)
            os.symlink("lib/f0.js", root / "node_modules" / f"pkg{p}" / "index.js")
        old_seqs.append(_last_seq(root))                # a tree with node_modules in it
        shutil.rmtree(root / "node_modules")
        (root / "package.json").write_text('{"name": "app", "round": %d}\n' % r)
    store, name = m.store, m.workspace
    m.stop()
    before = _records_named(store, b"node_modules")
    assert before["paths"] > 3 * 300
    env = dict(os.environ, PYTHONPATH=str(REPO))
    gc = json.loads(subprocess.run(CLI + ["gc", "-s", str(store), "-w", name, "--json"], capture_output=True, text=True,
                                   check=True, env=env, timeout=300).stdout)
    assert gc["dropped_inodes"] == 3 * (1 + 12 * 28)      # node_modules, per package its dir, lib/, 25 files, a link
    after = _records_named(store, b"node_modules")
    assert after["paths"] == after["path_heads"] == 0
    assert after["dirent_hist"] == 0                      # (node_modules's own name is in the root's history: gone)
    assert after["inodes"] < before["inodes"] / 20
    fsck_clean(store)
    m2 = mount_factory(store=store, workspace=name)
    root = m2.path
    for seq in old_seqs + [1, old_seqs[-1] + 1]:
        at = root / ".chronicle" / "at" / str(seq)
        for dirpath, dirnames, filenames in os.walk(at):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))      # no dangling name (EIO, ENOENT)
        assert (at / "package.json").exists()
    log = [json.loads(line) for line in (root / ".chronicle" / "log").read_text().splitlines()]
    assert [e["path"] for e in log if e["event"] == "dropped"] == ["node_modules"] * 3
    assert json.loads((root / "package.json").read_text())["round"] == 2
    m2.stop()
    fsck_clean(store)
