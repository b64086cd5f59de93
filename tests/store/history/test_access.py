"""The permission rules of history (``chronicle.store.history.access``), without a mount.

A caller sees a version if it could read the file when the version was
recorded and can read the path now; a directory of ``query/``/``versions/``
if it may search (list) it now; a log line if it may search the directories
above its paths. Root sees everything.
"""

from __future__ import annotations

import json
import os

import pytest
from storeutil import A, write

from chronicle.errors import PermissionDenied
from chronicle.store.history.access import ROOT, Caller, caller_of, permits
from chronicle.store.history.nodes import QueryDir, VersionFile, VersionsDir
from chronicle.store.history.views import HistoryViews
from chronicle.store.model import Attrs

U = Caller(1000, frozenset({1000}))
MEMBER = Caller(1001, frozenset({1001, 50}))


def attrs(mode: int, uid: int = 0, gid: int = 0) -> Attrs:
    return Attrs(mode, uid, gid, 1, 0, 0, 0, 0)


def chmod(ws, path: bytes, mode: int, gid: int | None = None) -> None:
    ino, _ = ws.resolve(path)
    ws.setattr(ino, A, mode=mode, gid=gid)


def test_permits_follows_the_owner_group_other_classes():
    assert permits(attrs(0o100604), U, 4)                     # other may read
    assert not permits(attrs(0o100640), U, 4)
    assert permits(attrs(0o100640, gid=50), MEMBER, 4)        # a supplementary group
    assert not permits(attrs(0o100064, uid=1000), U, 4)       # the owner class wins even when narrower
    assert permits(attrs(0o100000), ROOT, 4)                  # root reads anything,
    assert not permits(attrs(0o100600), ROOT, 1)              # searches a file only with an x bit
    assert permits(attrs(0o040700), ROOT, 1)


def test_caller_of_reads_the_groups_of_the_process():
    me = caller_of(os.getuid(), os.getgid(), os.getpid())
    assert set(os.getgroups()) | {os.getgid()} == me.gids
    assert caller_of(5, 6, 2 ** 22 + 12345).gids == {6}        # no such process: the primary gid


@pytest.fixture
def tree(ws):
    """``p`` written 0644 then chmod 600; ``c/`` 0700 holding ``i``; ``open`` 0644;
    ``g`` 0640 of group 50."""
    write(ws, ws.root, b"p", b"secret\n")
    chmod(ws, b"p", 0o600)
    c, _ = ws.mkdir(ws.root, b"c", 0o700, A)
    write(ws, c, b"i", b"s2\n")
    write(ws, ws.root, b"open", b"public\n")
    write(ws, ws.root, b"g", b"group\n")
    chmod(ws, b"g", 0o640, gid=50)
    return ws


def test_versions_and_query_hide_what_the_caller_cannot_read(tree):
    views = HistoryViews(tree, caller=U)
    with pytest.raises(PermissionDenied):
        views.lookup(VersionsDir(b"p"), b"1")                 # readable then (0644), not now (0600)
    assert views.listing(VersionsDir(b"p")) == []
    with pytest.raises(PermissionDenied):
        views.query(b"p")
    with pytest.raises(PermissionDenied):
        views.listing(QueryDir(b"c"))                         # 0700: may not list
    with pytest.raises(PermissionDenied):
        views.lookup(QueryDir(b"c"), b"i")                    # nor search
    with pytest.raises(PermissionDenied):
        views.open(VersionFile(b"c/i", 1))
    with pytest.raises(PermissionDenied):
        views.file_versions(b"p")
    assert views.open(views.lookup(VersionsDir(b"open"), b"1")).read(0, 100) == b"public\n"
    assert views.query(b"open") == HistoryViews(tree).query(b"open")


def test_a_version_readable_only_then_or_only_now_is_hidden(ws):
    write(ws, ws.root, b"f", b"one\n")
    chmod(ws, b"f", 0o600)
    write(ws, ws.root, b"f", b"two\n")            # version 2: written 0600
    chmod(ws, b"f", 0o644)                         # readable now
    views = HistoryViews(ws, caller=U)
    numbers = [name for name, _ in views.listing(VersionsDir(b"f"))]
    assert b"2" not in numbers and b"1" in numbers
    doc = json.loads(views.query(b"f"))
    assert 2 not in [v["version"] for v in doc["versions"] if v["event"] == "write"]


def test_group_membership_counts(tree):
    assert HistoryViews(tree, caller=MEMBER).version(b"g", 1).seq > 0
    with pytest.raises(PermissionDenied):
        HistoryViews(tree, caller=U).version(b"g", 1)


def test_the_log_leaves_out_paths_the_caller_cannot_see(tree):
    mine = [json.loads(line)["path"] for line in HistoryViews(tree, caller=U).log()]
    everything = [json.loads(line)["path"] for line in HistoryViews(tree).log()]
    assert "c/i" in everything and "c/i" not in mine
    assert "c" in mine and "open" in mine and "p" in mine      # the root directory may be searched
    assert len(everything) - len(mine) == everything.count("c/i")


def test_root_and_the_owner_see_everything(tree):
    assert HistoryViews(tree).open(VersionFile(b"p", 1)).read(0, 100) == b"secret\n"
    owner = HistoryViews(tree, caller=Caller(0, frozenset({0})))
    assert [n for n, _ in owner.listing(QueryDir(b"c"))] == [b"i"]
