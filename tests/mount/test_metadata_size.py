"""The metadata file a mount leaves (issue 9 §6): a daemon's run of many small
commits grows ``data.mdb`` by a sync window's pages, and its clean unmount
rebuilds it to the records in use (meta.compact); the next mount reads it all."""

from __future__ import annotations

import json

import lmdb
import pytest

from chronicle.store.meta import compact


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("Chronicle's own metadata")


def test_an_unmount_leaves_the_metadata_file_the_size_of_its_records(mount_factory):
    store = mount_factory.new_store()
    mount = mount_factory(store=store)
    for i in range(600):                                   # ~600 commits: far more pages than records
        (mount.path / f"f{i % 30:02d}").write_bytes(b"version %d\n" % i)
    data = store / "meta" / "data.mdb"
    grown = data.stat().st_size
    mount.stop()
    left = data.stat().st_size
    env = lmdb.open(str(store / "meta"), readonly=True, max_dbs=64, lock=False)
    try:
        used = (compact.used_pages(env) + 2) * env.stat()["psize"]
    finally:
        env.close()
    assert grown > 4 * used and left <= used + 64 * 1024, (grown, left, used)
    mount = mount_factory(store=store)
    assert {p.name: p.read_bytes() for p in mount.path.iterdir() if p.name.startswith("f")} == \
        {f"f{j:02d}": b"version %d\n" % (570 + j) for j in range(30)}
    versions = json.loads((mount.path / ".chronicle" / "query" / "f07").read_bytes())["versions"]
    assert len(versions) == 20
    lines = (mount.path / ".chronicle" / "log").read_bytes().splitlines()
    assert len(lines) >= 600 and all(json.loads(line)["seq"] for line in lines)
    mount.stop()
