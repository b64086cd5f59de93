"""Bursts of metadata operations as tar, git and npm issue them, on a real mount:
every one is in the history, in the order it happened, with consecutive seqs
(``.chronicle/log``, SPEC §4), and a no-op (tar's chown to the owner a file
already has) makes no event."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("Chronicle's event log")


def log_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / ".chronicle" / "log").read_bytes().splitlines()]


def test_a_burst_of_creates_renames_and_unlinks_is_recorded_in_order(mount_factory):
    m = mount_factory()
    root = m.path
    start = len(log_lines(root))
    expected = []
    (root / "d").mkdir()
    expected.append(("mkdir", "d"))
    for i in range(40):
        p = root / "d" / f"f{i}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"%d" % i)
        os.close(fd)
        expected.append(("write", f"d/f{i}"))              # the create folds into its first write
        if i % 3 == 0:
            os.rename(p, root / "d" / f"g{i}")
            expected.append(("rename", f"d/g{i}"))
        elif i % 3 == 1:
            os.unlink(p)
            expected.append(("delete", f"d/f{i}"))
        else:
            os.chmod(p, 0o600)
            expected.append(("chmod", f"d/f{i}"))
    lines = log_lines(root)[start:]
    events = [(e["event"], e["path"]) for e in lines if e["event"] != "create"]
    assert events == expected
    seqs = [e["seq"] for e in lines]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sorted(os.listdir(root / "d")) == sorted(
        [f"g{i}" for i in range(0, 40, 3)] + [f"f{i}" for i in range(2, 40, 3)])


def test_untar_as_its_owner_records_each_file_once_and_no_chown(mount_factory, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(20):
            data = b"file %d\n" % i
            info = tarfile.TarInfo(f"pkg/f{i}.txt")
            info.size, info.mode, info.mtime = len(data), 0o640, 1_600_000_000 + i
            info.uid, info.gid = os.getuid(), os.getgid()           # the owner the files get anyway
            tar.addfile(info, io.BytesIO(data))
    tarball = tmp_path / "t.tar"
    tarball.write_bytes(buf.getvalue())
    m = mount_factory()
    root = m.path
    start = len(log_lines(root))
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(root)], check=True)
    lines = log_lines(root)[start:]
    assert not [e for e in lines if e["event"] == "chown"]
    for i in range(20):
        path = root / "pkg" / f"f{i}.txt"
        assert path.read_bytes() == b"file %d\n" % i
        st = path.stat()
        assert st.st_mtime == 1_600_000_000 + i and st.st_mode & 0o777 == 0o640
        assert [e["event"] for e in lines if e["path"] == f"pkg/f{i}.txt"][:2] == ["create", "write"]
