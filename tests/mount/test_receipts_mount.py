"""Receipts through a real mount (issue 12 §5): ctl ``receipt`` and
``chronicle receipt`` agree with ``tools/receipt.py`` over ``cp -a`` of the
mount, every turn end stores one (equal to a checkout of ``.chronicle/at/``),
a change costs the directories on its path, and bad requests get one-line
errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chronicle.cli import cli
from test_magic import Ctl

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "receipt.py")]


@pytest.fixture(autouse=True)
def _chronicle_only(mount_target):
    if mount_target != "chronicle":
        pytest.skip("receipts are Chronicle's own")


def tool_root(directory: Path) -> dict:
    out = subprocess.run([*TOOL, str(directory), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def copy_of(source: Path, dest: Path) -> Path:
    """``cp -a SOURCE/. DEST``: a plain checkout (``.chronicle`` is never listed, so never copied)."""
    dest.mkdir()
    subprocess.run(["cp", "-a", f"{source}/.", str(dest)], check=True)
    return dest


def test_a_receipt_of_the_mount_is_the_root_of_its_checkout(mount, tmp_path, monkeypatch):
    root = mount.path
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "empty").mkdir(mode=0o700)
    (root / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (root / "README").write_bytes(b"read me\n")
    os.chmod(root / "README", 0o600)
    os.symlink("src/pkg/mod.py", root / "link")
    os.link(root / "README", root / "src" / "README.hard")
    os.mkfifo(root / "fifo", 0o640)
    fd = os.open(root / "open.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(100_000))               # still open: ctl commits it before the receipt
        with Ctl(mount) as ctl:
            receipt = ctl.ok({"cmd": "receipt"})["receipt"]
    finally:
        os.close(fd)
    copy = tool_root(copy_of(root, tmp_path / "checkout"))
    assert receipt["root"] == copy["root"]
    assert {k: receipt[k] for k in ("files", "dirs", "others", "bytes")} == \
        {"files": 4, "dirs": 3, "others": 2, "bytes": 100_000 + 8 + 8 + 12}
    assert {k: copy[k] for k in ("files", "dirs", "others")} == {"files": 4, "dirs": 3, "others": 2}

    # The CLI inside the mount goes through ctl; --verify recomputes it from scratch.
    from click.testing import CliRunner
    monkeypatch.chdir(root)
    runner = CliRunner()
    shown = runner.invoke(cli, ["receipt", "--json"], catch_exceptions=False)
    assert shown.exit_code == 0 and json.loads(shown.stdout)["root"] == receipt["root"]
    verified = runner.invoke(cli, ["receipt", "--verify"], catch_exceptions=False)
    assert verified.exit_code == 0 and "matches the stored tree" in verified.stdout
    text = runner.invoke(cli, ["receipt", "--at", str(receipt["seq"])], catch_exceptions=False).stdout
    assert text.startswith(receipt["root"]) and "4 files, 3 directories" in text


def test_every_turn_end_keeps_the_receipt_of_its_tree(mount, tmp_path):
    root = mount.path
    for d in range(20):
        (root / f"d{d:02d}").mkdir()
        for i in range(10):
            (root / f"d{d:02d}" / f"f{i}").write_bytes(b"%d %d\n" % (d, i))
    with Ctl(mount) as ctl:
        first = ctl.ok({"cmd": "receipt"})["receipt"]
        ctl.ok({"cmd": "turn-begin", "agent": "alice", "turn": 1})
        (root / "d05" / "f3").write_bytes(b"alice was here\n")
        label = ctl.ok({"cmd": "turn-end"})["turn"]
        stored = ctl.ok({"cmd": "receipt", "at": "turn:alice:1"})["receipt"]
        (root / "d06" / "late").write_bytes(b"after the turn\n")
        past = ctl.ok({"cmd": "receipt", "at": "turn:alice:1", "verify": True})
    assert label["receipt"] == stored["root"] and stored["seq"] == label["end_seq"]
    # the turn's receipt recomputed the root and d05 only, from the receipt before it
    assert stored["computed"]["base"] == first["seq"] and stored["computed"]["dirs"] == 2
    assert stored["computed"]["entries"] == 20 + 10
    assert past["verified"] is True and past["recomputed"] == label["receipt"]
    # A third party recomputes it from a checkout of the turn's tree.
    at_turn = root / ".chronicle" / "at" / "turn:alice:1"
    assert tool_root(copy_of(at_turn, tmp_path / "turn1"))["root"] == label["receipt"]
    assert tool_root(copy_of(root, tmp_path / "now"))["root"] != label["receipt"]
    record = json.loads((root / ".chronicle" / "turns" / "alice" / "1").read_text())
    assert record["end_seq"] == label["end_seq"] and record["receipt"] == label["receipt"]


def test_a_file_unlinked_while_open_leaves_receipts_incremental(mount, tmp_path):
    root = mount.path
    (root / "kept").write_bytes(b"kept\n")
    with Ctl(mount) as ctl:
        ctl.ok({"cmd": "receipt"})
        with open(root / "scratch.tmp", "wb") as f:      # unlinked while open, then written (TemporaryFile)
            os.unlink(root / "scratch.tmp")
            f.write(b"gone")
        (root / "new").write_bytes(b"new\n")
        after = ctl.ok({"cmd": "receipt"})["receipt"]
    assert after["computed"]["full"] is None and after["computed"]["dirs"] == 1
    assert after["root"] == tool_root(copy_of(root, tmp_path / "co"))["root"] and after["files"] == 2


def test_bad_receipt_requests_get_one_line_errors(mount):
    with Ctl(mount) as ctl:
        assert "'verify'" in ctl.refused({"cmd": "receipt", "verify": "yes"})["error"]
        assert ctl.refused({"cmd": "receipt", "at": "no-such-point"})["kind"] == "NotFound"
        assert ctl.refused({"cmd": "receipt", "at": True})["kind"] == "InvalidArgument"
        assert ctl.refused({"cmd": "receipt", "at": "01"})["kind"] == "InvalidArgument"
        assert ctl.refused({"cmd": "receipt", "at": 0, "verify": True})["kind"] == "NotFound"
        assert ctl.ok({"cmd": "receipt", "at": 0})["receipt"]["files"] == 0
