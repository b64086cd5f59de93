"""History obeys permissions, and ``ctl`` answers its owner only (issue 7 §5, §6), on a real root mount.

A root mount has ``allow_other``: another user reaches it like any
directory. That user must not read through ``.chronicle/`` what it cannot
read in the tree — a 0600 file's versions, a 0700 directory's children, log
lines about them — and must not drive ``ctl``, whoever owns the workspace
root. The other user is ``nobody`` (created with ``useradd`` if missing);
commands run as it through ``runuser``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import mounts
import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs root (allow_other) and runuser")

USER = "nobody"


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture
def root_mount(mount_target, daemon_log):
    """A fresh mount whose mountpoint every user can reach (``tmp_path`` is 0700)."""
    if mount_target != "chronicle":
        pytest.skip("the .chronicle tree is Chronicle's own")
    base = Path(tempfile.mkdtemp(prefix="chronicle-perm-", dir="/tmp"))
    base.chmod(0o711)
    factory = mounts.MountFactory(base, mount_target, guard=daemon_log)
    try:
        mount = factory()
        mount.path.parent.chmod(0o711)
        mount.path.chmod(0o755)
        yield mount
    finally:
        factory.close()
        shutil.rmtree(base, ignore_errors=True)


def as_user(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_history_hides_what_the_user_cannot_read(root_mount, other_user):
    m = root_mount.path
    (m / "p").write_text("secret\n")
    (m / "p").chmod(0o600)
    (m / "c").mkdir(mode=0o700)
    (m / "c").chmod(0o700)
    (m / "c" / "i").write_text("s2\n")
    (m / "open").write_text("public\n")
    h = m / ".chronicle"

    assert as_user("cat", str(m / "p")).returncode != 0
    # the 0600 file's past (written while it was 0644) is hidden by today's mode
    denied = as_user("cat", str(h / "versions/p/1"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert "secret" not in denied.stdout
    assert as_user("cat", str(h / "query/p")).returncode != 0
    assert as_user("ls", str(h / "versions/p")).stdout.split() == []
    # the 0700 directory lists nothing, its file's history is unreachable
    listing = as_user("ls", str(h / "query/c"))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr, listing
    assert as_user("ls", str(h / "versions/c")).returncode != 0
    assert as_user("cat", str(h / "versions/c/i/1")).returncode != 0
    assert as_user("cat", str(h / "query/c/i")).returncode != 0
    # past trees were already checked by mode; they still are
    assert as_user("ls", str(h / "at/head/c")).returncode != 0
    # the log leaves out what the user cannot see
    lines = [json.loads(line) for line in as_user("cat", str(h / "log")).stdout.splitlines()]
    paths = {line["path"] for line in lines}
    assert "c/i" not in paths and "open" in paths
    # what the user can read, it still reads
    assert as_user("cat", str(h / "versions/open/1")).stdout == "public\n", as_user("cat", str(h / "versions/open/1"))
    assert json.loads(as_user("cat", str(h / "query/open")).stdout)["path"] == "open"
    # root sees everything
    assert (h / "versions/p/1").read_text() == "secret\n"
    assert "c/i" in {json.loads(line)["path"] for line in (h / "log").read_text().splitlines()}


def test_a_group_member_reads_what_its_group_may(root_mount, other_user):
    m = root_mount.path
    (m / "g").write_text("for the group\n")
    os.chown(m / "g", 0, other_user.pw_gid)
    (m / "g").chmod(0o640)
    h = m / ".chronicle"
    # version 1 was written 0644 root:root, then chgrp + chmod 640: readable then and now
    assert as_user("cat", str(h / "versions/g/1")).stdout == "for the group\n"


def test_ctl_answers_only_the_mount_owner(root_mount, other_user):
    m = root_mount.path
    (m / "sec").mkdir()
    (m / "sec" / "private").write_text("one\n")
    (m / "sec" / "private").write_text("two\n")
    (m / "sec" / "private").chmod(0o600)
    os.chown(m, other_user.pw_uid, other_user.pw_gid)        # the user owns the workspace root
    ctl = m / ".chronicle" / "ctl"
    st = ctl.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    script = (f"import sys\ntry:\n    f = open({str(ctl)!r}, 'r+b', buffering=0)\n"
              "except OSError as e:\n    print(e.errno); sys.exit(0)\n"
              "f.write(b'{\"cmd\":\"restore\",\"path\":\"sec/private\",\"version\":1}\\n'); print(f.read(4096))\n")
    done = as_user("/usr/bin/python3", "-c", script)
    assert done.stdout.strip() == "13", done               # EACCES
    assert (m / "sec" / "private").read_text() == "two\n"
    # root still drives it
    with open(ctl, "r+b", buffering=0) as f:
        f.write(b'{"cmd":"sync"}\n')
        assert json.loads(f.read(4096))["ok"] is True
