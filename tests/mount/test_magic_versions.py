"""``.chronicle/versions/<file>/`` of a real mount with a long history
(issue 7 §8): listing 20,000 versions takes under a second — the listing
is computed once per directory handle and each entry's attributes come from
the same numbered history, not from recomputing it per entry (which made
``ls`` quadratic: 2,000 versions took 55 s).

The versions are written into the store before it is mounted, as the
journal writes them (100 distinct contents, reused), so the test does not
spend its time making them through the mount.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from chronicle.store.meta import schema
from chronicle.store.meta.journal import EventWriter
from chronicle.store.meta.schema import P_BUMPS, P_CONTENT
from chronicle.store.model import Actor
from chronicle.store.store import Store

VERSIONS = 20000
DISTINCT = 100


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")


def store_with_versions(path, n: int) -> list[bytes]:
    """A store whose workspace ``test`` has file ``f`` with ``n`` versions;
    returns the content of each version, oldest first."""
    actor = Actor(os.getuid(), os.getgid(), os.getpid())
    datas = [b"version %d\n" % i for i in range(DISTINCT)]
    with Store.init(path) as store:
        ws = store.open_workspace("test", writable=True, create=True)
        ino, _ = ws.create(ws.root, b"f", 0o100644, actor)
        ws.files.open(ino, created=True)
        for data in datas:                          # the contents, through the real write path
            ws.files.truncate(ino, 0, actor.pid)
            ws.files.write(ino, 0, data, actor.pid)
            ws.files.commit(ino)
        ws.files.release(ino)
        with ws.read_txn() as txn:
            ids = [v.entry.content for _, v in sorted(ws.history.content_versions(txn, b"f").items())]
        attrs = ws.head_attrs(ino)
        sizes = [len(d) for d in datas]
        with store.env.begin(write=True) as txn:
            for seq in range(ws.head_seq + 1, ws.head_seq + 1 + n - DISTINCT):
                w = EventWriter(txn, store.dbs, ws.id, seq, is_fork=False, turn=None, pid=actor.pid,
                                history=ws.history)
                k = seq % DISTINCT
                w.put_attrs(ino, attrs.replace(content=ids[k], size=sizes[k]))
                version = w.path_entry(b"f", "write", ino=ino, flags=P_BUMPS | P_CONTENT, content=ids[k],
                                       size=sizes[k])
                w.log("write", b"f", version=version, size=sizes[k])
            txn.put(schema.ws_key(ws.id), schema.U64.pack(seq), db=store.dbs["heads"])
        store.note_commit()
        return datas + [datas[s % DISTINCT] for s in range(ws.head_seq + 1, seq + 1)]


def test_20000_versions_list_without_quadratic_cost(mount_factory):
    """All 20,000 versions listed and readable; the time is only a loose
    complexity guard (the 1 s budget is measured by tools/bench/history_bench.py)."""
    store = mount_factory.new_store()
    datas = store_with_versions(store, VERSIONS)
    mount = mount_factory(store=store)
    versions = mount.path / ".chronicle" / "versions" / "f"
    os.stat(versions)                              # the lookup is not what is measured
    started = time.perf_counter()
    out = subprocess.run(["ls", str(versions)], check=True, capture_output=True).stdout
    took = time.perf_counter() - started
    names = out.split()
    assert len(names) == VERSIONS and sorted(map(int, names)) == list(range(1, VERSIONS + 1))
    assert took < 10.0, f"ls of {VERSIONS} versions took {took:.2f} s"
    for n in (1, 2, DISTINCT + 1, VERSIONS // 2, VERSIONS):
        assert (versions / str(n)).read_bytes() == datas[n - 1]
    started = time.perf_counter()
    listed = os.listdir(versions)                  # a second listing: a new handle, same cost
    assert len(listed) == VERSIONS and time.perf_counter() - started < 10.0
