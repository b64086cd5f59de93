"""Long names and long paths on a real mount, side by side with ext4
(issue 7 §1): every name up to NAME_MAX (255 bytes) and every path up to
PATH_MAX (4,096 bytes) -- and deeper, reached through directory fds --
works for create, mkdir, mknod, symlink, link and rename; a longer name
gets ENAMETOOLONG exactly where ext4 gives it; the files keep their history
in ``query/``, ``versions/``, ``at/`` and ``log``, across a remount; and the
CLI's log, show, diff and restore name them.

Paths past PATH_MAX cannot be passed to one system call, so the tests walk
them with ``dir_fd`` (``openat``), as a deep ``cd`` would.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner
from fsutil import outcome

from chronicle.cli import cli
from chronicle.store.model import Actor
from chronicle.store.store import Store

NAME_MAX = 255


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")


def operations(fd: int, name: str) -> list:
    """create, write, mkdir, mknod (FIFO), symlink, link and rename of ``name`` in
    directory ``fd``: their outcomes, comparable across two file systems."""
    def create():
        f = os.open(name + "f", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(f, b"data")
        os.close(f)

    out = [outcome(create)]
    out.append(outcome(lambda: os.mkdir(name + "d", 0o755, dir_fd=fd)))
    out.append(outcome(lambda: os.mkfifo(name + "p", 0o644, dir_fd=fd)))
    out.append(outcome(lambda: os.symlink("target", name + "s", dir_fd=fd)))
    out.append(outcome(lambda: os.link(name + "f", name + "l", src_dir_fd=fd, dst_dir_fd=fd)))
    out.append(outcome(lambda: os.rename(name + "f", name + "r", src_dir_fd=fd, dst_dir_fd=fd)))
    out.append(outcome(lambda: sorted(os.listdir(fd))))
    return out


def names_of_length(n: int) -> str:
    return "n" * (n - 1)                     # operations() appends one letter


def test_names_up_to_name_max_work_and_longer_ones_fail_as_on_ext4(mount, tmp_path):
    for root in (tmp_path / "ref", mount.path / "m"):
        root.mkdir()
    results = {}
    for root in (tmp_path / "ref", mount.path / "m"):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            results[root] = [operations(fd, names_of_length(n)) for n in (1, 254, 255, 256, 300)]
        finally:
            os.close(fd)
    ref, mnt = results.values()
    assert mnt == ref
    assert ref[2][0] == ("ok", None) and ref[3][0] == ("err", "ENAMETOOLONG")


def walk_down(fd: int, depth: int) -> list[int]:
    """mkdir + open ``depth`` directories of 255-byte names below ``fd``; returns their fds."""
    fds = []
    for i in range(depth):
        name = "%03d" % i + "x" * (NAME_MAX - 3)
        os.mkdir(name, 0o755, dir_fd=fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        fds.append(fd)
    return fds


def open_below(fd: int, path: str) -> int:
    """The fd of ``path`` below directory ``fd``, one component at a time."""
    parts = path.split("/")
    fds = [fd]
    for part in parts[:-1]:
        fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    try:
        return os.open(parts[-1], os.O_RDONLY, dir_fd=fds[-1])
    finally:
        for f in fds[1:]:
            os.close(f)


def test_paths_up_to_and_past_path_max_keep_their_history(mount_factory, tmp_path):
    mount = mount_factory()
    ref_root, mnt_root = tmp_path / "ref", mount.path / "deep"
    depth = 17                                     # 17 x 256 bytes: past PATH_MAX
    outcomes = {}
    for root in (ref_root, mnt_root):
        root.mkdir()
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        fds = walk_down(top, depth)
        try:
            outcomes[root] = [operations(fd, "f") for fd in fds]
            for n, fd in enumerate(fds):             # a second version of each file
                f = os.open("fr", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
                os.write(f, b" %d" % n)
                os.close(f)
            # a full path in one system call: the kernel's PATH_MAX, the same on both
            long_path = str(root) + "".join("/%03d" % i + "x" * (NAME_MAX - 3) for i in range(depth))
            outcomes[root].append(outcome(lambda: os.stat(long_path) and None))
        finally:
            for fd in reversed(fds):
                os.close(fd)
            os.close(top)
    assert outcomes[mnt_root] == outcomes[ref_root]
    assert outcomes[ref_root][-1] == ("err", "ENAMETOOLONG")

    rel = "deep/" + "/".join("%03d" % i + "x" * (NAME_MAX - 3) for i in range(depth)) + "/fr"
    assert len(rel.encode()) > 4096
    for remount in (False, True):
        if remount:
            mount.stop()
            mount = mount_factory.restart(mount)
        m = mount
        chron = os.open(m.path / ".chronicle", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = open_below(chron, "query/" + rel)
            doc = json.loads(os.read(fd, 1 << 20))
            os.close(fd)
            assert doc["path"] == rel
            assert [v["event"] for v in doc["versions"]][-2:] == ["rename", "write"]
            numbers = [v["version"] for v in doc["versions"] if v["event"] == "write"]
            fd = open_below(chron, "versions/" + rel.rpartition("/")[0] + "/fr")
            os.close(fd)
            vdir = open_below(chron, "versions/" + rel.rpartition("/")[0])
            os.close(vdir)
            fd = open_below(chron, f"versions/{rel}/{numbers[-1]}")
            assert os.read(fd, 100) == b"data %d" % (depth - 1)
            os.close(fd)
            fd = open_below(chron, f"at/{doc['versions'][-1]['seq']}/{rel}")
            assert os.read(fd, 100) == b"data %d" % (depth - 1)
            os.close(fd)
            log = (m.path / ".chronicle" / "log").read_text().splitlines()
            assert any(json.loads(line)["path"] == rel for line in log)
        finally:
            os.close(chron)


def test_the_issue_reproduction_mkdir_and_a_move_that_makes_paths_long(mount_factory, tmp_path):
    mount = mount_factory()
    a, b, c = "a" * 200, "b" * 200, "c" * 100
    results = {}
    for root in (tmp_path / "ref", mount.path):
        if root != mount.path:
            root.mkdir()
        os.makedirs(root / a / b)
        results.setdefault(root, []).append(outcome(lambda: os.mkdir(root / a / b / c)))
        os.makedirs(root / "p" / a / b)
        (root / "p" / a / b / "f").write_bytes(b"one\n")
        os.rename(root / "p", root / ("P" * 100))
        with open(root / ("P" * 100) / a / b / "f", "ab") as f:
            f.write(b"two\n")                       # the close used to fail with EIO
        results[root].append((root / ("P" * 100) / a / b / "f").read_bytes())
    assert results[mount.path] == results[tmp_path / "ref"] == [("ok", None), b"one\ntwo\n"]
    mount.stop()
    mount = mount_factory.restart(mount)
    assert (mount.path / ("P" * 100) / a / b / "f").read_bytes() == b"one\ntwo\n"
    doc = json.loads((mount.path / ".chronicle" / "query" / ("P" * 100) / a / b / "f").read_bytes())
    assert [(v["version"], v["event"]) for v in doc["versions"]] == [(1, "write"), (2, "write")]
    assert (mount.path / ".chronicle" / "versions" / ("P" * 100) / a / b / "f" / "1").read_bytes() == b"one\n"
    assert stat.S_ISDIR(os.stat(mount.path / ".chronicle" / "query" / a / b / c).st_mode)


def test_the_cli_names_long_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONICLE_HOME", str(tmp_path / "home"))
    actor = Actor(os.getuid(), os.getgid(), 4242)
    path = b""
    with Store.init(tmp_path / "store") as st:
        ws = st.open_workspace("default", writable=True, create=True)
        ino = ws.root
        for i in range(18):                            # 18 x 256 bytes
            name = b"%03d" % i + b"y" * (NAME_MAX - 3)
            ino, _ = ws.mkdir(ino, name, 0o755, actor)
            path += name + b"/"
        f, _ = ws.create(ino, b"f", 0o100644, actor)
        for data in (b"one\n", b"one\ntwo\n"):
            ws.files.open(f, truncate=True, created=data == b"one\n")
            ws.files.write(f, 0, data, actor.pid)
            ws.files.commit(f)
            ws.files.release(f)
    path = (path + b"f").decode()
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        return result

    store = tmp_path / "store"
    doc = json.loads(run("log", "--store", store, "--json", path).stdout)
    assert [v["version"] for v in doc["versions"] if v["event"] == "write"] == [1, 2]
    assert run("show", "--store", store, f"{path}@1").stdout_bytes == b"one\n"
    assert "+two" in run("diff", "--store", store, path, 1, 2).stdout
    run("restore", "--store", store, path, "--version", 1)
    assert run("show", "--store", store, path).stdout_bytes == b"one\n"
