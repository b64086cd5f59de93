"""The store is private (issue 7 §7), and the CLI's read commands answer as the invoking user (§5).

A new store is directories 0700 and files 0600; ``chronicle init
--shared-group GROUP`` makes it 2770/0660 of GROUP, recorded in
``store.json``; an old store (0755/0644) is tightened when opened, with a
warning line, and ``fsck --repair`` leaves it tight. The read commands run
in a child process that became ``nobody`` (a member of the shared group)
show that user only what it could read.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from storeutil import A, write

from chronicle.cli import cli
from chronicle.store.store import Store

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, a second user)")


def modes(root: Path) -> dict[str, tuple[int, str]]:
    """``relative path -> (permission bits, group name)`` of everything in the store."""
    out = {}
    for directory, _dirs, files in os.walk(root):
        for path in [Path(directory)] + [Path(directory) / f for f in files]:
            st = path.lstat()
            out[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name)
    return out


def fill(path: Path, **init) -> None:
    """A store with workspace ``w``: ``p`` (0600 after its version 1), ``c/`` (0700) with ``i``,
    ``open``; a pack, registrations and locks exist."""
    store = Store.init(path, **init)
    ws = store.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"p", b"secret\n")
    ws.setattr(ws.resolve(b"p")[0], A, mode=0o600)
    c, _ = ws.mkdir(ws.root, b"c", 0o700, A)
    write(ws, c, b"i", b"s2\n")
    write(ws, ws.root, b"open", b"public\n")
    store.register_mount("w", "/nowhere", os.getpid())
    store.sync()
    store.close()


def test_a_new_store_is_private(tmp_path):
    fill(tmp_path / "s")
    found = modes(tmp_path / "s")
    assert any(name.endswith(".pack") for name in found) and "meta/data.mdb" in found
    assert "run/mount-w.json" in found and "store.json" in found
    for name, (mode, _group) in found.items():
        assert mode == (0o700 if (tmp_path / "s" / name).is_dir() else 0o600), name


def test_an_old_store_is_tightened_on_open_with_a_warning(tmp_path, caplog):
    fill(tmp_path / "s")
    for name in modes(tmp_path / "s"):
        path = tmp_path / "s" / name
        path.chmod(0o755 if path.is_dir() else 0o644)       # as stores were made before
    with caplog.at_level("WARNING", logger="chronicle.store.store"):
        Store.open(tmp_path / "s").close()
    assert [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert {mode for mode, _ in modes(tmp_path / "s").values()} == {0o700, 0o600}
    # fsck --repair finds nothing left to tighten, and the store is clean
    for name in modes(tmp_path / "s"):
        if not (tmp_path / "s" / name).is_dir():
            (tmp_path / "s" / name).chmod(0o644)
    result = CliRunner().invoke(cli, ["fsck", "--repair", "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert {mode for mode, _ in modes(tmp_path / "s").values()} == {0o700, 0o600}


@needs_root
def test_init_shared_group(tmp_path):
    tmp_path.chmod(0o755)
    result = CliRunner().invoke(cli, ["init", "--shared-group", "nogroup", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "s" / "store.json").read_text())
    assert (config["shared_group"], config["gid"]) == ("nogroup", grp.getgrnam("nogroup").gr_gid)
    fill_existing = Store.open(tmp_path / "s")
    ws = fill_existing.open_workspace("w", writable=True, create=True)
    write(ws, ws.root, b"f", b"x\n")
    fill_existing.sync()
    fill_existing.close()
    for name, (mode, group) in modes(tmp_path / "s").items():
        assert group == "nogroup", name
        assert mode == (0o2770 if (tmp_path / "s" / name).is_dir() else 0o660), (name, oct(mode))
    bad = CliRunner().invoke(cli, ["init", "--shared-group", "no-such-group-here", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "no group 'no-such-group-here'" in bad.output
    assert not (tmp_path / "t").exists()


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in a child process that became ``nobody`` (groups: its own
    primary group only); returns its exit status and stdout + stderr."""
    user = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # the child: never returns
        try:
            os.close(read_fd)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            os.setgroups([user.pw_gid])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            sys.stdout = open(1, "w", closefd=False)          # not pytest's capture
            sys.stderr = open(2, "w", closefd=False)
            code = 0
            try:
                cli.main(argv, prog_name="chronicle", standalone_mode=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        finally:
            os._exit(99)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        output = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


@needs_root
def test_read_commands_answer_as_the_invoking_user(tmp_path):
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:                           # nobody must reach the store
        if parent.stat().st_mode & 0o001 == 0:
            parent.chmod(parent.stat().st_mode | 0o001)
    fill(tmp_path / "s", shared_group="nogroup")
    store = ["--store", str(tmp_path / "s"), "--workspace", "w"]
    code, out = as_nobody(["log", "--json", *store])
    assert code == 0, out
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert "open" in paths and "c" in paths and "c/i" not in paths
    code, out = as_nobody(["show", "p@1", *store])
    assert code == 1 and "permission denied" in out and "secret" not in out, out
    code, out = as_nobody(["show", "c/i", *store])
    assert code == 1 and "permission denied" in out, out
    code, out = as_nobody(["show", "open", *store])
    assert (code, out) == (0, "public\n")
    code, out = as_nobody(["log", "p", *store])
    assert code == 1 and "permission denied" in out, out
    # root reads everything
    result = CliRunner().invoke(cli, ["show", "p@1", *store])
    assert result.output == "secret\n"
