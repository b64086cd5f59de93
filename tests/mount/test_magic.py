"""The ``.chronicle/`` tree of a real mount (SPEC §3 and §4).

What a user of the mount relies on: ``.chronicle`` answers at the root but no
tool that walks the tree ever sees it; everything under it is read-only
(EROFS) except ``ctl``; ``query``, ``versions``, ``at``, ``snapshots``,
``log`` and ``stats`` show the recorded history with the exact shapes of
SPEC §4; ``ctl`` runs every command and answers malformed input with an
error reply, never a crash, and the daemon logs nothing for it.

Every test mounts a fresh store (``mount``): restores and turn labels
change the whole workspace.
"""

from __future__ import annotations

from chronicle.store.chunks.tree import hash_data

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fsutil import errname, payload, snapshot, tree_diff

ROOT_NAMES = ["at", "blame", "ctl", "hash", "log", "query", "snapshots", "stats", "turns", "versions"]
ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
VERSION_KEYS = {"version", "seq", "time", "event", "turn", "pid"}
CONTENT_KEYS = {"size", "hash"}
LOG_KEYS = {"seq", "time", "event", "path", "turn", "pid"}


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")


# -- helpers --------------------------------------------------------------------------------------


def magic(mount) -> Path:
    return mount.path / ".chronicle"


def b3(data: bytes) -> str:
    return hash_data(data).hex()


def query(mount, path: str) -> dict:
    return json.loads((magic(mount) / "query" / path).read_bytes())


def log_lines(mount) -> list[dict]:
    return [json.loads(line) for line in (magic(mount) / "log").read_bytes().splitlines()]


def head_seq(mount) -> int:
    return log_lines(mount)[-1]["seq"]


def fails_with(code: int, fn, *args) -> None:
    """``fn(*args)`` must raise ``OSError`` with errno ``code``.

    EROFS is what root gets (the daemon answers); other users may get EACCES
    first from the kernel's mode checks (``default_permissions``) on the
    read-only modes of ``.chronicle``.
    """
    try:
        fn(*args)
    except OSError as exc:
        if code == errno.EROFS and os.geteuid() != 0 and exc.errno == errno.EACCES:
            return
        assert exc.errno == code, f"{fn.__name__}{args}: {errname(exc)}, expected {errno.errorcode[code]}"
        return
    pytest.fail(f"{fn.__name__}{args} succeeded, expected {errno.errorcode[code]}")


def open_for_write(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY))


def parse_time(text: str) -> datetime:
    assert ISO_TIME.match(text), f"not ISO-8601 UTC with microseconds and Z: {text!r}"
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def read_tree(root: Path) -> dict:
    """Everything comparable about the tree under ``root`` (``fsutil.snapshot``):
    kinds, modes, owners, sizes, contents, symlink targets, xattrs, hard links."""
    return snapshot(root)


class Ctl:
    """The raw ``ctl`` protocol: bytes in, the JSON reply lines that are ready out.

    The daemon has a command's reply ready when ``write`` returns (ctl.py),
    so ``replies()`` reads what is there until the handle gives no more.
    """

    def __init__(self, mount):
        self.fd = os.open(magic(mount) / "ctl", os.O_RDWR)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Ctl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def replies(self) -> list[dict]:
        raw = b""
        while True:
            piece = os.read(self.fd, 1 << 20)
            if not piece:
                break
            raw += piece
        assert raw == b"" or raw.endswith(b"\n"), f"a reply is not a whole line: {raw[-200:]!r}"
        out = []
        for line in raw.splitlines():
            reply = json.loads(line)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), line
            if not reply["ok"]:
                assert isinstance(reply.get("error"), str) and reply["error"], line
            out.append(reply)
        return out

    def request(self, command) -> dict:
        self.send(json.dumps(command).encode() + b"\n")
        replies = self.replies()
        assert len(replies) == 1, f"{command!r}: expected one reply, got {replies!r}"
        return replies[0]

    def ok(self, command) -> dict:
        reply = self.request(command)
        assert reply["ok"] is True, f"{command!r}: {reply!r}"
        return reply

    def refused(self, command) -> dict:
        reply = self.request(command)
        assert reply["ok"] is False, f"{command!r} was accepted: {reply!r}"
        return reply


def ctl_ok(mount, command: dict) -> dict:
    with Ctl(mount) as ctl:
        return ctl.ok(command)


# -- .chronicle at the root: resolvable, never listed -----------------------------------------------


def test_chronicle_resolves_at_the_root_but_no_tool_lists_it(mount):
    root = mount.path
    (root / "a.txt").write_bytes(b"a\n")
    (root / "d").mkdir()
    (root / "d" / "b.txt").write_bytes(b"b\n")

    st = os.stat(root / ".chronicle")
    assert stat.S_ISDIR(st.st_mode)
    assert sorted(os.listdir(root / ".chronicle")) == ROOT_NAMES
    ls = subprocess.run(["ls", ".chronicle"], cwd=root, capture_output=True, text=True, check=True)
    assert ls.stdout.split() == ROOT_NAMES

    assert sorted(os.listdir(root)) == ["a.txt", "d"]
    assert subprocess.run(["ls", "-a"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.split() == [".", "..", "a.txt", "d"]
    found = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    assert sorted(found.split()) == [".", "./a.txt", "./d", "./d/b.txt"]
    walked = [os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files]
    assert sorted(walked) == ["a.txt", "d", "d/b.txt"]
    du = subprocess.run(["du", "-a", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    assert ".chronicle" not in du
    tar = subprocess.run("tar cf - . | tar tf -", shell=True, cwd=root, capture_output=True, text=True,
                         check=True).stdout
    assert sorted(tar.split()) == ["./", "./a.txt", "./d/", "./d/b.txt"]
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_NOSYSTEM="1", HOME=str(mount.path.parent))
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    files = subprocess.run(["git", "ls-files"], cwd=root, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files == ["a.txt", "d/b.txt"]
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root, env=env,
                            capture_output=True, text=True, check=True).stdout
    assert ".chronicle" not in status
    # The listing of the root still has no .chronicle after all these lookups of it.
    assert ".chronicle" not in os.listdir(root)


def test_a_chronicle_name_below_the_root_is_an_ordinary_file(mount):
    sub = mount.path / "sub"
    sub.mkdir()
    (sub / ".chronicle").write_bytes(b"just a file\n")
    assert os.listdir(sub) == [".chronicle"]
    assert (sub / ".chronicle").read_bytes() == b"just a file\n"
    os.unlink(sub / ".chronicle")
    assert os.listdir(sub) == []


def test_everything_under_chronicle_is_read_only_except_ctl(mount):
    root = mount.path
    (root / "a").write_bytes(b"x")
    (root / "d").mkdir()
    (root / "d" / "b").write_bytes(b"y")
    c = root / ".chronicle"
    seq = head_seq(mount)
    ctl_ok(mount, {"cmd": "snapshot", "name": "s"})
    before = log_lines(mount)

    for path in (c / "query" / "a", c / "versions" / "a" / "1", c / "log", c / "stats",
                 c / "at" / str(seq) / "a", c / "snapshots" / "s" / "d" / "b"):
        fails_with(errno.EROFS, open_for_write, path)
        fails_with(errno.EROFS, os.truncate, path, 0)
        fails_with(errno.EROFS, os.unlink, path)
        fails_with(errno.EROFS, os.chmod, path, 0o777)
        fails_with(errno.EROFS, os.chown, path, 1, 1)
        fails_with(errno.EROFS, os.utime, path, (1, 1))
        fails_with(errno.EROFS, os.setxattr, path, "user.k", b"v")
        fails_with(errno.EROFS, os.removexattr, path, "user.k")
        fails_with(errno.EROFS, os.rename, path, root / "moved-out")
        fails_with(errno.EROFS, os.link, path, root / "linked-out")
    for directory in (c, c / "query", c / "query" / "d", c / "versions", c / "at", c / "snapshots",
                      c / "at" / str(seq), c / "at" / str(seq) / "d", c / "snapshots" / "s"):
        fails_with(errno.EROFS, os.open, directory / "new", os.O_WRONLY | os.O_CREAT, 0o644)
        fails_with(errno.EROFS, os.open, directory / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fails_with(errno.EROFS, os.mkdir, directory / "newdir")
        fails_with(errno.EROFS, os.symlink, "a", directory / "newlink")
        fails_with(errno.EROFS, os.mkfifo, directory / "fifo")
        fails_with(errno.EROFS, os.rename, root / "a", directory / "moved-in")
        fails_with(errno.EROFS, os.link, root / "a", directory / "linked-in")
        fails_with(errno.EROFS, os.chmod, directory, 0o777)
        fails_with(errno.EROFS, os.setxattr, directory, "user.k", b"v")
    fails_with(errno.EROFS, os.rename, root / "a", c / "query" / "a")     # over an existing magic file
    fails_with(errno.EROFS, os.rmdir, c / "query")
    fails_with(errno.EROFS, os.rmdir, c)
    fails_with(errno.EROFS, os.rename, c, root / "renamed")
    fails_with(errno.EROFS, os.rename, root / "d", c)
    fails_with(errno.EROFS, os.chmod, c / "ctl", 0o777)
    fails_with(errno.EEXIST, os.mkdir, c)

    # ctl is the one writable file.
    fd = os.open(c / "ctl", os.O_RDWR)
    os.close(fd)
    # Nothing changed: no event was recorded, the tree and the magic tree are whole.
    assert log_lines(mount) == before
    assert sorted(os.listdir(root)) == ["a", "d"]
    assert sorted(os.listdir(c)) == ROOT_NAMES
    assert (root / "a").read_bytes() == b"x"


# -- query ------------------------------------------------------------------------------------------


def check_entry(entry: dict, path: str) -> None:
    """The SPEC §4 shape of one entry of ``query/<path>``."""
    assert VERSION_KEYS <= set(entry), f"{path}: {entry} lacks {VERSION_KEYS - set(entry)}"
    assert isinstance(entry["version"], int) and entry["version"] >= 0, entry
    assert isinstance(entry["seq"], int) and entry["seq"] >= 1, entry
    when = parse_time(entry["time"])
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 120, f"not UTC now: {entry['time']}"
    assert isinstance(entry["event"], str), entry
    assert entry["turn"] is None or set(entry["turn"]) == {"agent", "turn", "message_id"}, entry
    assert isinstance(entry["pid"], int) and entry["pid"] > 0, entry
    if entry["event"] in ("create", "write", "truncate", "restore") and entry.get("hash") is not None:
        assert CONTENT_KEYS <= set(entry), entry
    if "hash" in entry:
        assert HEX64.match(entry["hash"]), entry
        assert isinstance(entry["size"], int), entry


def test_query_has_the_spec_shape_and_true_blake3_hashes(mount):
    root = mount.path
    path = root / "notes.txt"
    contents = [b"one\n", b"two two\n", b"two two\nthree\n", payload(7, (1 << 20) + 4321)]
    path.write_bytes(contents[0])
    path.write_bytes(contents[1])
    with open(path, "ab") as f:
        f.write(b"three\n")
    os.chmod(path, 0o600)
    path.write_bytes(contents[3])

    doc = query(mount, "notes.txt")
    assert set(doc) == {"path", "versions"} and doc["path"] == "notes.txt"
    entries = doc["versions"]
    for entry in entries:
        check_entry(entry, "notes.txt")
    writes = [e for e in entries if e["event"] == "write"]
    assert [e["version"] for e in writes] == [1, 2, 3, 4]
    assert [e["size"] for e in writes] == [len(c) for c in contents]
    assert [e["hash"] for e in writes] == [b3(c) for c in contents]
    assert all(e["pid"] == os.getpid() and e["turn"] is None for e in entries)
    chmods = [e for e in entries if e["event"] == "chmod"]
    assert len(chmods) == 1 and chmods[0]["version"] == 3      # no new content, no new version
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(set(seqs))
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    # Every entry is the path's line of that seq in the log.
    by_seq = {line["seq"]: line for line in log_lines(mount)}
    for entry in entries:
        line = by_seq[entry["seq"]]
        assert (line["event"], line["path"], line["time"]) == (entry["event"], "notes.txt", entry["time"])
    # The hash is of the whole content of that version, as versions/ serves it.
    for entry, content in zip(writes, contents):
        data = (magic(mount) / "versions" / "notes.txt" / str(entry["version"])).read_bytes()
        assert data == content and b3(data) == entry["hash"]


def test_query_follows_a_file_moved_to_a_new_name(mount):
    root = mount.path
    (root / "old.txt").write_bytes(b"v1\n")
    (root / "old.txt").write_bytes(b"v2\n")
    (root / "dir").mkdir()
    os.rename(root / "old.txt", root / "dir" / "new.txt")
    (root / "dir" / "new.txt").write_bytes(b"v3\n")

    new = query(mount, "dir/new.txt")
    assert new["path"] == "dir/new.txt"
    assert [(e["event"], e["version"]) for e in new["versions"]] == [
        ("write", 1), ("write", 2), ("rename", 2), ("write", 3)]
    assert new["versions"][2]["from"] == "old.txt"
    assert [e["hash"] for e in new["versions"] if e["event"] == "write"] == [b3(b"v1\n"), b3(b"v2\n"), b3(b"v3\n")]
    old = query(mount, "old.txt")
    assert [e["event"] for e in old["versions"]] == ["write", "write", "rename"]
    assert old["versions"][-1]["to"] == "dir/new.txt"
    assert sorted(os.listdir(magic(mount) / "versions" / "dir" / "new.txt"), key=int) == ["1", "2", "3"]
    assert (magic(mount) / "versions" / "dir" / "new.txt" / "1").read_bytes() == b"v1\n"


def test_query_follows_a_renamed_parent_directory(mount):
    root = mount.path
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_bytes(b"x = 1\n")
    (root / "src" / "pkg" / "mod.py").write_bytes(b"x = 2\n")
    os.rename(root / "src", root / "lib")
    (root / "lib" / "pkg" / "mod.py").write_bytes(b"x = 3\n")

    doc = query(mount, "lib/pkg/mod.py")
    writes = [e for e in doc["versions"] if e["event"] == "write"]
    assert [(e["version"], e["hash"]) for e in writes] == [
        (1, b3(b"x = 1\n")), (2, b3(b"x = 2\n")), (3, b3(b"x = 3\n"))]
    versions = magic(mount) / "versions" / "lib" / "pkg" / "mod.py"
    assert [(versions / str(n)).read_bytes() for n in (1, 2, 3)] == [b"x = 1\n", b"x = 2\n", b"x = 3\n"]
    # The old path keeps its own history; its directory is gone but still queryable.
    assert [e["version"] for e in query(mount, "src/pkg/mod.py")["versions"] if e["event"] == "write"] == [1, 2]
    assert os.path.isdir(magic(mount) / "query" / "src")


def test_editor_atomic_save_is_a_new_version_of_the_same_path(mount):
    root = mount.path
    (root / "doc.txt").write_bytes(b"draft 1\n")
    for n in (2, 3):
        tmp = root / ".doc.txt.swp"
        with open(tmp, "wb") as f:
            f.write(f"draft {n}\n".encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "doc.txt")

    assert (root / "doc.txt").read_bytes() == b"draft 3\n"
    doc = query(mount, "doc.txt")
    bumps = [(e["version"], e["event"], e["hash"]) for e in doc["versions"]]
    assert bumps == [(1, "write", b3(b"draft 1\n")), (2, "rename", b3(b"draft 2\n")),
                     (3, "rename", b3(b"draft 3\n"))]
    assert all(e.get("from") == ".doc.txt.swp" for e in doc["versions"][1:])
    versions = magic(mount) / "versions" / "doc.txt"
    assert sorted(os.listdir(versions), key=int) == ["1", "2", "3"]
    assert [(versions / n).read_bytes() for n in ("1", "2", "3")] == [b"draft 1\n", b"draft 2\n", b"draft 3\n"]


def test_a_deleted_path_keeps_its_history_and_one_that_never_existed_is_enoent(mount):
    root = mount.path
    (root / "gone.txt").write_bytes(b"bye\n")
    os.unlink(root / "gone.txt")
    (root / "olddir").mkdir()
    (root / "olddir" / "f").write_bytes(b"f\n")
    shutil.rmtree(root / "olddir")

    assert not (root / "gone.txt").exists()
    doc = query(mount, "gone.txt")
    assert [e["event"] for e in doc["versions"]] == ["write", "delete"]
    assert (magic(mount) / "versions" / "gone.txt" / "1").read_bytes() == b"bye\n"
    assert os.path.isdir(magic(mount) / "query" / "olddir")
    assert [e["event"] for e in query(mount, "olddir/f")["versions"]] == ["write", "delete"]

    q, v = magic(mount) / "query", magic(mount) / "versions"
    for missing in (q / "never.txt", q / "olddir" / "never", q / "nodir" / "x", v / "never.txt",
                    v / "gone.txt" / "2", v / "gone.txt" / "0"):
        fails_with(errno.ENOENT, os.stat, missing)
        fails_with(errno.ENOENT, os.open, missing, os.O_RDONLY)


def test_query_of_a_directory_mirrors_its_children(mount):
    root = mount.path
    (root / "proj" / "src").mkdir(parents=True)
    (root / "proj" / "src" / "main.py").write_bytes(b"print(1)\n")
    (root / "proj" / "README.md").write_bytes(b"# proj\n")
    (root / "top.txt").write_bytes(b"t\n")

    q = magic(mount) / "query"
    assert sorted(os.listdir(q)) == ["proj", "top.txt"]
    assert stat.S_ISDIR(os.stat(q / "proj").st_mode) and stat.S_ISDIR(os.stat(q / "proj" / "src").st_mode)
    assert sorted(os.listdir(q / "proj")) == ["README.md", "src"]
    assert os.listdir(q / "proj" / "src") == ["main.py"]
    assert stat.S_ISREG(os.stat(q / "proj" / "src" / "main.py").st_mode)
    assert json.loads((q / "proj" / "src" / "main.py").read_bytes())["path"] == "proj/src/main.py"
    v = magic(mount) / "versions"
    assert sorted(os.listdir(v / "proj")) == ["README.md", "src"]
    assert os.listdir(v / "proj" / "src" / "main.py") == ["1"]
    found = subprocess.run(["find", "."], cwd=q, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(found) == [".", "./proj", "./proj/README.md", "./proj/src", "./proj/src/main.py", "./top.txt"]


def test_a_file_keeps_its_history_after_a_hard_link_to_it_is_removed(mount):
    root = mount.path
    subprocess.run("echo one > f; ln f g; rm g; echo two >> f", shell=True, cwd=root, check=True)
    assert (root / "f").read_bytes() == b"one\ntwo\n"
    writes = [e for e in query(mount, "f")["versions"] if e["event"] == "write"]
    assert [(e["version"], e["hash"]) for e in writes] == [(1, b3(b"one\n")), (2, b3(b"one\ntwo\n"))], writes
    assert (magic(mount) / "versions" / "f" / "2").read_bytes() == b"one\ntwo\n"
    assert all(line["path"] is not None for line in log_lines(mount))


# -- versions ---------------------------------------------------------------------------------------


def test_versions_list_numbers_and_read_exact_bytes(mount):
    root = mount.path
    contents = [b"", payload(1, 3 * (1 << 20) + 17), b"small\n", payload(2, 70000)]
    (root / "data.bin").touch()
    for content in contents[1:]:
        (root / "data.bin").write_bytes(content)

    versions = magic(mount) / "versions" / "data.bin"
    assert stat.S_ISDIR(os.stat(versions).st_mode)
    assert sorted(os.listdir(versions), key=int) == ["1", "2", "3", "4"]
    for number, content in enumerate(contents, 1):
        path = versions / str(number)
        assert os.stat(path).st_size == len(content)
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o222 == 0
        with open(path, "rb") as f:
            assert f.read() == content
            if len(content) > 100:                     # random access, not just a stream
                f.seek(len(content) // 2)
                assert f.read(100) == content[len(content) // 2:len(content) // 2 + 100]
    fails_with(errno.EROFS, open_for_write, versions / "2")
    fails_with(errno.EROFS, os.unlink, versions / "2")
    fails_with(errno.ENOENT, os.stat, versions / "5")
    assert (root / "data.bin").read_bytes() == contents[-1]


# -- points in history: at/ and snapshots/ -----------------------------------------------------------


def build_tree(root: Path) -> None:
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f.txt").write_bytes(b"in d\n")
    (root / "d" / "sub" / "deep.bin").write_bytes(payload(3, 200000))
    os.symlink("a.txt", root / "link")
    (root / "doomed.txt").write_bytes(b"deleted later\n")
    os.link(root / "a.txt", root / "d" / "hard.txt")
    os.setxattr(root / "d" / "f.txt", "user.tag", b"blue")
    os.chmod(root / "d" / "f.txt", 0o640)


def change_tree(root: Path) -> None:
    (root / "a.txt").write_bytes(b"alpha changed\n")
    os.unlink(root / "doomed.txt")
    shutil.rmtree(root / "d" / "sub")
    os.unlink(root / "link")
    os.symlink("d/f.txt", root / "link")
    (root / "new.txt").write_bytes(b"new\n")
    os.chmod(root / "d" / "f.txt", 0o600)


def test_at_seq_time_and_snapshots_are_read_only_trees_of_the_past(mount):
    root = mount.path
    build_tree(root)
    then = read_tree(root)
    last = log_lines(mount)[-1]
    seq, when = last["seq"], last["time"]
    ctl_ok(mount, {"cmd": "snapshot", "name": "before"})
    cli = subprocess.run([sys.executable, "-m", "chronicle", "snapshot", "before-cli"], cwd=root,
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    time.sleep(0.01)
    between = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    time.sleep(0.01)
    change_tree(root)
    now = read_tree(root)
    assert tree_diff(then, now) is not None

    c = magic(mount)
    assert sorted(os.listdir(c / "snapshots")) == ["before", "before-cli"]
    points = [c / "at" / str(seq), c / "at" / when, c / "at" / between,
              c / "snapshots" / "before", c / "snapshots" / "before-cli"]
    for point in points:
        assert tree_diff(then, read_tree(point)) is None, f"{point}:\n{tree_diff(then, read_tree(point))}"
        assert (point / "doomed.txt").read_bytes() == b"deleted later\n"
        assert os.readlink(point / "link") == "a.txt"
        assert (point / "link").read_bytes() == b"alpha\n"
        assert (point / "d" / "sub" / "deep.bin").read_bytes() == payload(3, 200000)
        fails_with(errno.EROFS, open_for_write, point / "a.txt")
        fails_with(errno.EROFS, os.mkdir, point / "d" / "x")
        fails_with(errno.EROFS, os.unlink, point / "doomed.txt")
        fails_with(errno.EROFS, os.rename, point / "a.txt", point / "b.txt")
    # The head is the changed tree; the past did not move.
    assert tree_diff(now, read_tree(root)) is None
    # A seq before anything happened is an empty tree; one in the future is no tree.
    assert os.listdir(c / "at" / "0") == []
    fails_with(errno.ENOENT, os.stat, c / "at" / str(head_seq(mount) + 1000))
    fails_with(errno.ENOENT, os.stat, c / "at" / "no-such-point")
    fails_with(errno.ENOENT, os.stat, c / "snapshots" / "no-such-snapshot")


def test_a_turn_labels_its_file_events_and_at_turn_is_the_tree_at_its_end(mount):
    root = mount.path
    (root / "before.txt").write_bytes(b"before the turn\n")
    label = {"agent": "alice", "turn": 1, "message_id": "msg-1"}
    with Ctl(mount) as ctl:
        ctl.ok({"cmd": "turn-begin", **label})
        (root / "t1.txt").write_bytes(b"in the turn\n")
        child = subprocess.run(["sh", "-c", "echo x > t2.txt; echo $$"], cwd=root, capture_output=True,
                               text=True, check=True)
        child_pid = int(child.stdout)
        end = ctl.ok({"cmd": "turn-end"})
        assert end["turn"]["agent"] == "alice" and end["turn"]["turn"] == 1
        ctl.refused({"cmd": "turn-end"})              # no turn open any more
    (root / "t1.txt").write_bytes(b"after the turn\n")
    (root / "t3.txt").write_bytes(b"after\n")

    turn_dir = magic(mount) / "at" / "turn:alice:1"
    assert sorted(os.listdir(turn_dir)) == ["before.txt", "t1.txt", "t2.txt"]
    assert (turn_dir / "t1.txt").read_bytes() == b"in the turn\n"
    assert (turn_dir / "t2.txt").read_bytes() == b"x\n"
    at_end = read_tree(turn_dir)

    lines = log_lines(mount)
    labelled = [x for x in lines if x["turn"] is not None]
    assert {x["path"] for x in labelled} == {"t1.txt", "t2.txt"}
    assert all(x["turn"] == label for x in labelled)
    assert [x["seq"] for x in labelled] == list(range(labelled[0]["seq"], labelled[-1]["seq"] + 1))
    assert {x["pid"] for x in labelled if x["path"] == "t2.txt"} == {child_pid}
    assert all(x["turn"] is None for x in lines if x["path"] in ("before.txt", "t3.txt"))
    t1 = query(mount, "t1.txt")["versions"]
    assert [(e["version"], e["turn"]) for e in t1 if e["event"] == "write"] == [(1, label), (2, None)]
    t2 = query(mount, "t2.txt")["versions"]
    assert t2 and all(e["turn"] == label and e["pid"] == child_pid for e in t2)

    # The end of the turn is also a point to restore to.
    ctl_ok(mount, {"cmd": "restore", "at": "turn:alice:1"})
    assert tree_diff(at_end, read_tree(root)) is None


# -- log and stats ---------------------------------------------------------------------------------


def test_log_is_json_lines_oldest_first(mount):
    root = mount.path
    (root / "f").write_bytes(b"hello")
    (root / "d").mkdir()
    os.rename(root / "f", root / "d" / "g")
    os.symlink("d/g", root / "l")
    os.chmod(root / "d" / "g", 0o600)
    os.setxattr(root / "d" / "g", "user.k", b"v")
    os.unlink(root / "l")
    (root / "d" / "e").mkdir()
    os.rmdir(root / "d" / "e")
    os.truncate(root / "d" / "g", 2)

    raw = (magic(mount) / "log").read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.split(b"\n")[:-1]]
    assert [x["event"] for x in lines] == ["create", "write", "mkdir", "rename", "symlink", "chmod", "setxattr",
                                           "delete", "mkdir", "rmdir", "truncate"]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    assert [x["path"] for x in lines] == ["f", "f", "d", "d/g", "l", "d/g", "d/g", "l", "d/e", "d/e", "d/g"]
    times = [parse_time(x["time"]) for x in lines]
    assert times == sorted(times)
    for line in lines:
        assert LOG_KEYS <= set(line), line
        assert line["turn"] is None and line["pid"] == os.getpid(), line
    write, rename, truncate = lines[1], lines[3], lines[10]
    assert (write["version"], write["size"], write["hash"]) == (1, 5, b3(b"hello"))
    assert rename["from"] == "f"
    assert (truncate["size"], truncate["hash"]) == (2, b3(b"he"))


def test_stats_has_store_and_workspace_figures(mount):
    root = mount.path
    before = json.loads((magic(mount) / "stats").read_bytes())
    assert isinstance(before, dict)
    assert before["store"] == str(Path(mount.store).resolve())
    assert before["workspace"] == mount.workspace
    for key in ("logical_bytes", "stored_bytes", "unique_bytes", "events", "contents", "chunks"):
        assert isinstance(before[key], int) and before[key] >= 0, key

    data = payload(11, 300000)
    (root / "big.bin").write_bytes(data)
    after = json.loads((magic(mount) / "stats").read_bytes())
    assert after["logical_bytes"] - before["logical_bytes"] >= len(data)
    assert after["stored_bytes"] - before["stored_bytes"] >= len(data) // 2      # incompressible
    assert after["events"] == before["events"] + 2                                 # create + write
    # The store figures agree with `chronicle stats --json` on the same store.
    cli = subprocess.run([sys.executable, "-m", "chronicle", "stats", "--json", "--store", str(mount.store),
                          "--workspace", mount.workspace], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    figures = json.loads(cli.stdout)
    for key in ("logical_bytes", "unique_bytes", "stored_bytes", "events", "contents", "chunks",
                "workspaces", "head_seq"):
        assert figures[key] == after[key], key
    assert figures["workspace"] == after["workspace"]
    assert os.path.realpath(figures["store"]) == after["store"]


def test_a_magic_file_keeps_the_content_it_had_when_opened(mount):
    root = mount.path
    (root / "f").write_bytes(b"1")
    c = magic(mount)
    handles = {name: open(c / name, "rb", buffering=0) for name in ("log", "query/f", "stats")}
    try:
        then = {name: (c / name).read_bytes() for name in handles}
        first = handles["log"].read(10)              # a partial read before the changes
        (root / "f").write_bytes(b"22")
        (root / "g").write_bytes(b"333")
        assert first + handles["log"].readall() == then["log"]
        assert handles["query/f"].readall() == then["query/f"]
        assert handles["stats"].readall() == then["stats"]
        handles["log"].seek(0)
        assert handles["log"].readall() == then["log"]  # and again: it stays that content
    finally:
        for f in handles.values():
            f.close()
    now = {name: (c / name).read_bytes() for name in handles}
    assert now["log"].startswith(then["log"]) and len(now["log"].splitlines()) == len(then["log"].splitlines()) + 3
    assert len(json.loads(now["query/f"])["versions"]) == 2
    assert json.loads(now["stats"])["events"] == json.loads(then["stats"])["events"] + 3


# -- ctl: the commands ---------------------------------------------------------------------------------


def test_ctl_snapshot(mount):
    root = mount.path
    (root / "f").write_bytes(b"one")
    with Ctl(mount) as ctl:
        reply = ctl.ok({"cmd": "snapshot", "name": "first"})
        assert reply["seq"] == head_seq(mount)
        assert "exists" in ctl.refused({"cmd": "snapshot", "name": "first"})["error"]
        for bad in ("", "a/b", ".", ".."):
            ctl.refused({"cmd": "snapshot", "name": bad})
    (root / "f").write_bytes(b"two")
    assert os.listdir(magic(mount) / "snapshots") == ["first"]
    assert (magic(mount) / "snapshots" / "first" / "f").read_bytes() == b"one"


def test_ctl_restore_of_a_file_version_shows_at_once(mount):
    root = mount.path
    f = root / "f.txt"
    f.write_bytes(b"first\n")
    f.write_bytes(b"the second version\n")
    assert f.read_bytes() == b"the second version\n"      # now in the kernel's page and attribute cache
    with Ctl(mount) as ctl:
        reply = ctl.ok({"cmd": "restore", "path": "f.txt", "version": 1})
        assert reply["changed"] is True
        assert f.read_bytes() == b"first\n"
        assert os.stat(f).st_size == 6
        entries = query(mount, "f.txt")["versions"]
        assert (entries[-1]["event"], entries[-1]["version"], entries[-1]["hash"]) == ("restore", 3, b3(b"first\n"))
        assert (magic(mount) / "versions" / "f.txt" / "3").read_bytes() == b"first\n"

        # A deleted file comes back, though the kernel had cached that it is gone.
        (root / "g.txt").write_bytes(b"g1\n")
        os.unlink(root / "g.txt")
        assert not (root / "g.txt").exists()
        ctl.ok({"cmd": "restore", "path": "g.txt", "version": 1})
        assert (root / "g.txt").read_bytes() == b"g1\n"
        assert "g.txt" in os.listdir(root)

        ctl.refused({"cmd": "restore", "path": "f.txt", "version": 99})
        ctl.refused({"cmd": "restore", "path": "never.txt", "version": 1})
        (root / "dir").mkdir()
        ctl.refused({"cmd": "restore", "path": "dir", "version": 1})
    assert f.read_bytes() == b"first\n"


def test_ctl_restore_of_the_whole_workspace_by_seq_time_and_snapshot(mount):
    root = mount.path
    (root / "x.txt").write_bytes(b"x at A\n")
    (root / "y.txt").write_bytes(b"y at A\n")
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "z.txt").write_bytes(b"z at A\n")
    os.symlink("x.txt", root / "l")
    state_a = read_tree(root)
    last = log_lines(mount)[-1]
    seq_a, time_a = last["seq"], last["time"]
    ctl_ok(mount, {"cmd": "snapshot", "name": "A"})

    def change(tag: str) -> dict:
        (root / "x.txt").write_bytes(f"x at {tag}, longer\n".encode())
        if (root / "y.txt").exists():
            os.unlink(root / "y.txt")
        (root / f"w-{tag}.txt").write_bytes(tag.encode())
        if (root / "d").exists():
            shutil.rmtree(root / "d")
        (root / "e" / tag).mkdir(parents=True, exist_ok=True)
        os.unlink(root / "l")
        os.symlink(f"w-{tag}.txt", root / "l")
        os.chmod(root / "x.txt", 0o600)
        state = read_tree(root)                        # everything read: the kernel caches it all
        assert not (root / "y.txt").exists() and not (root / "d").exists()
        return state

    state_b = change("B")
    seq_b = head_seq(mount)
    with Ctl(mount) as ctl:
        reply = ctl.ok({"cmd": "restore", "at": seq_a})
        assert reply["at"] == seq_a and reply["seq"] > seq_b
        assert tree_diff(state_a, read_tree(root)) is None, tree_diff(state_a, read_tree(root))
        # History is not rewritten: the later state is still there to go back to.
        ctl.ok({"cmd": "restore", "at": seq_b})
        assert tree_diff(state_b, read_tree(root)) is None, tree_diff(state_b, read_tree(root))

        change("C")
        reply = ctl.ok({"cmd": "restore", "at": time_a})
        assert reply["at"] == seq_a
        assert tree_diff(state_a, read_tree(root)) is None, tree_diff(state_a, read_tree(root))

        change("D")
        ctl.ok({"cmd": "restore", "at": "A"})
        assert tree_diff(state_a, read_tree(root)) is None, tree_diff(state_a, read_tree(root))
        assert ctl.ok({"cmd": "restore", "at": "A"})["changed"] is False

        ctl.refused({"cmd": "restore", "at": head_seq(mount) + 100})
        ctl.refused({"cmd": "restore", "at": "no-such-snapshot"})
    lines = log_lines(mount)
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    assert [x["event"] for x in lines].count("restore") >= 4


def test_ctl_sync_commits_open_files(mount):
    root = mount.path
    fd = os.open(root / "s.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"not closed yet")
        reply = ctl_ok(mount, {"cmd": "sync"})
        assert reply["seq"] == head_seq(mount)
        doc = query(mount, "s.txt")
        assert doc["versions"][-1]["hash"] == b3(b"not closed yet")
        os.write(fd, b", still open")
        ctl_ok(mount, {"cmd": "sync"})
        hashes = [e["hash"] for e in query(mount, "s.txt")["versions"] if e["event"] == "write"]
        assert hashes[-1] == b3(b"not closed yet, still open")
    finally:
        os.close(fd)
    # Closing with nothing new makes no further version.
    assert [e["hash"] for e in query(mount, "s.txt")["versions"] if e["event"] == "write"] == hashes


# -- ctl: malformed input ---------------------------------------------------------------------------------


MALFORMED = [
    b"not json",
    b"{\"cmd\": \"sync\"",                               # cut short
    b"[1, 2]",
    b"[{\"cmd\": \"sync\"}]",
    b"null",
    b"\"sync\"",
    b"42",
    b"{}",
    b"{\"cmd\": null}",
    b"{\"cmd\": 5}",
    b"{\"cmd\": [\"sync\"]}",
    b"{\"cmd\": \"nope\"}",
    b"{\"cmd\": \"SNAPSHOT\", \"name\": \"x\"}",
    b"{\"cmd\": \"snapshot\"}",
    b"{\"cmd\": \"snapshot\", \"name\": 5}",
    b"{\"cmd\": \"snapshot\", \"name\": null}",
    b"{\"cmd\": \"snapshot\", \"name\": [\"x\"]}",
    b"{\"cmd\": \"restore\"}",
    b"{\"cmd\": \"restore\", \"path\": \"f\"}",
    b"{\"cmd\": \"restore\", \"version\": 1}",
    b"{\"cmd\": \"restore\", \"path\": \"f\", \"version\": \"1\"}",
    b"{\"cmd\": \"restore\", \"path\": \"f\", \"version\": 1.5}",
    b"{\"cmd\": \"restore\", \"path\": \"f\", \"version\": true}",
    b"{\"cmd\": \"restore\", \"path\": 7, \"version\": 1}",
    b"{\"cmd\": \"restore\", \"path\": \"f\", \"version\": 1e400}",
    b"{\"cmd\": \"restore\", \"at\": [1]}",
    b"{\"cmd\": \"restore\", \"at\": {\"seq\": 1}}",
    b"{\"cmd\": \"restore\", \"at\": true}",
    b"{\"cmd\": \"restore\", \"at\": -1}",
    b"{\"cmd\": \"restore\", \"at\": \"2026-13-45T99:00:00Z\"}",
    b"{\"cmd\": \"restore\", \"at\": \"turn:x\"}",
    b"{\"cmd\": \"restore\", \"at\": \"turn:x:y\"}",
    b"{\"cmd\": \"restore\", \"at\": \"turn:nobody:1\"}",
    b"{\"cmd\": \"turn-begin\"}",
    b"{\"cmd\": \"turn-begin\", \"agent\": \"a\"}",
    b"{\"cmd\": \"turn-begin\", \"agent\": 1, \"turn\": 1}",
    b"{\"cmd\": \"turn-begin\", \"agent\": \"a\", \"turn\": \"1\"}",
    b"{\"cmd\": \"turn-begin\", \"agent\": \"a\", \"turn\": -1}",
    b"{\"cmd\": \"turn-begin\", \"agent\": \"\", \"turn\": 1}",
    b"{\"cmd\": \"turn-begin\", \"agent\": \"a\", \"turn\": 1, \"message_id\": [1]}",
    b"{\"cmd\": \"turn-end\"}",                          # no turn is open
    b"\xff\xfe\x00garbage",
    b"{\"cmd\": \"sync\"}\x00",
]


def test_ctl_answers_malformed_input_with_errors_and_keeps_serving(mount, daemon_log):
    root = mount.path
    (root / "f").write_bytes(b"v1")
    with Ctl(mount) as ctl:
        for line in MALFORMED:
            ctl.send(line + b"\n")
            replies = ctl.replies()
            assert len(replies) == 1 and replies[0]["ok"] is False, f"{line!r}: {replies!r}"

        # Binary garbage: one error reply per non-blank line, nothing else.
        garbage = os.urandom(64 * 1024).replace(b"\n", b"\n\n") + b"\n"
        lines = [x for x in garbage.split(b"\n")[:-1] if x.strip()]
        ctl.send(garbage)
        replies = ctl.replies()
        assert len(replies) == len(lines) and not any(r["ok"] for r in replies)

        # (over-long lines: test_ctl_an_over_long_line_gets_exactly_one_reply)

        # Blank lines are no commands: no reply.
        ctl.send(b"\n")
        ctl.send(b"   \n\t\n")
        assert ctl.replies() == []

        # Several commands in one write: one reply each, in order.
        ctl.send(b'{"cmd": "snapshot", "name": "m1"}\n{"cmd": "nope"}\n\n{"cmd": "sync"}\n')
        replies = ctl.replies()
        assert [r["ok"] for r in replies] == [True, False, True], replies
        assert replies[0]["name"] == "m1"

        # A command split across two writes: the reply comes with the second.
        ctl.send(b'{"cmd": "snap')
        assert ctl.replies() == []
        ctl.send(b'shot", "name": "m2"}\n')
        replies = ctl.replies()
        assert len(replies) == 1 and replies[0]["ok"] is True and replies[0]["name"] == "m2"

        # And the same handle still works for good commands.
        assert ctl.ok({"cmd": "sync"})["seq"] == head_seq(mount)
        ctl.ok({"cmd": "restore", "path": "f", "version": 1})

    # The mount still serves normally.
    (root / "f").write_bytes(b"v2")
    assert (root / "f").read_bytes() == b"v2"
    assert sorted(os.listdir(magic(mount) / "snapshots")) == ["m1", "m2"]
    assert [e["version"] for e in query(mount, "f")["versions"] if e["event"] == "write"] == [1, 2]
    assert mount.alive()
    # An error reply is not a daemon error.
    assert not [r.text for r in daemon_log.records() if r.is_problem]


@pytest.mark.parametrize("size", [2 << 20, 5 << 19], ids=["2MiB", "2.5MiB"])
def test_ctl_an_over_long_line_gets_exactly_one_reply(mount, size):
    """A line over the limit is one error; the rest of that line must not be
    read as a command of its own, or every later reply is off by one."""
    with Ctl(mount) as ctl:
        ctl.send(b"x" * size + b"\n")
        first = ctl.replies()
        ctl.send(b'{"cmd": "sync"}\n')
        second = ctl.replies()
        assert len(first) == 1 and first[0]["ok"] is False, first
        assert len(second) == 1 and second[0]["ok"] is True, second
        # A long line that does end in time is an ordinary (bad) command.
        ctl.send(b" " * (1 << 19) + b'{"cmd": "sync"}\n')
        assert [r["ok"] for r in ctl.replies()] == [True]


# Well-formed JSON that the store cannot take: each must be a clean error
# reply (a user error), not an "internal error" the daemon logs with a traceback.
UNSTORABLE = [
    {"cmd": "turn-begin", "agent": "a", "turn": 2 ** 32},
    {"cmd": "turn-begin", "agent": "a" * 600, "turn": 1},
    {"cmd": "turn-begin", "agent": "\ud800", "turn": 1},
    {"cmd": "snapshot", "name": "\ud800"},
    {"cmd": "restore", "path": "\ud800", "version": 1},
]


@pytest.mark.parametrize("command", UNSTORABLE + ["deep"],
                         ids=["turn-2**32", "agent-600-bytes", "agent-surrogate", "snapshot-surrogate",
                              "path-surrogate", "nested-100000"])
def test_ctl_values_the_store_cannot_hold_are_user_errors(mount, command):
    line = b"[" * 100000 if command == "deep" else json.dumps(command).encode()
    with Ctl(mount) as ctl:
        ctl.send(line + b"\n")
        replies = ctl.replies()
        assert len(replies) == 1 and replies[0]["ok"] is False, replies
        assert not replies[0]["error"].startswith("internal error"), replies[0]
        assert ctl.ok({"cmd": "sync"})
    # (the daemon_log guard fails this test if the daemon logged an ERROR for it)


@pytest.mark.daemon_log_expected(r"ctl command failed")
def test_ctl_a_refused_turn_begin_labels_nothing(mount):
    root = mount.path
    with Ctl(mount) as ctl:
        ctl.refused({"cmd": "turn-begin", "agent": "a", "turn": 2 ** 32})
        (root / "after.txt").write_bytes(b"not in any turn\n")
        entries = query(mount, "after.txt")["versions"]
        assert all(e["turn"] is None for e in entries), entries
        ctl.refused({"cmd": "turn-end"})                # no turn was opened
