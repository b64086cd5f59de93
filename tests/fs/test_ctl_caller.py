"""``.chronicle/ctl`` answers its owner only (issue 7 §6), on the adapter called directly.

Only the user who mounted the workspace and root may open ``ctl``
(EACCES for anyone else, whoever owns the workspace root), and a file
restore needs the caller's write permission on what it changes. The mount
test (``tests/mount/test_history_permissions.py``) shows the open check
through the kernel; here a mount by uid 1000 is played by setting
``MagicTree.owner``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from types import SimpleNamespace

import pyfuse3
import trio

from chronicle.fs.magic import MAGIC_BASE, STATIC
from chronicle.store.history.nodes import CtlFile
from chronicle.store.model import Actor

OWNER = SimpleNamespace(uid=1000, gid=1000, pid=2 ** 22 + 1, umask=0o022)
OTHER = SimpleNamespace(uid=1001, gid=1001, pid=2 ** 22 + 2, umask=0o022)
ROOT_CTX = SimpleNamespace(uid=0, gid=0, pid=2 ** 22 + 3, umask=0o022)
CTL = MAGIC_BASE + STATIC[CtlFile()]


def write_file(ws, name: bytes, data: bytes, mode: int = 0o644, uid: int = 0) -> int:
    actor = Actor(uid, uid, 4242)
    ino, _ = ws.create(ws.root, name, stat.S_IFREG | mode, actor)
    ws.files.open(ino, created=True)
    ws.files.write(ino, 0, data, 4242)
    ws.files.commit(ino)
    ws.files.release(ino)
    return ino


async def ctl_command(fs, ctx, command: dict) -> dict:
    fi = await fs.open(CTL, os.O_RDWR, ctx)
    try:
        await fs.write(fi.fh, 0, json.dumps(command).encode() + b"\n")
        return json.loads(await fs.read(fi.fh, 0, 1 << 16))
    finally:
        await fs.release(fi.fh)


def test_only_the_mount_owner_and_root_open_ctl(fs):
    fs.magic.owner = 1000
    fs.ws.setattr(fs.ws.root, Actor(0, 0, 1), uid=OTHER.uid, gid=OTHER.gid)   # the other user owns the root

    async def main():
        entry = await fs.getattr(CTL, ROOT_CTX)
        assert (entry.st_uid, entry.st_mode & 0o7777) == (1000, 0o600)
        try:
            await fs.open(CTL, os.O_RDWR, OTHER)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EACCES
        else:
            raise AssertionError("another user opened ctl")
        assert (await ctl_command(fs, OWNER, {"cmd": "sync"}))["ok"]
        assert (await ctl_command(fs, ROOT_CTX, {"cmd": "sync"}))["ok"]
    trio.run(main)


def test_a_file_restore_needs_write_permission(fs):
    fs.magic.owner = 1000
    ws = fs.ws
    ino = write_file(ws, b"private", b"one\n", 0o600)
    ws.files.open(ino, truncate=True)
    ws.files.write(ino, 0, b"two\n", 4242)
    ws.files.commit(ino)
    ws.files.release(ino)
    write_file(ws, b"mine", b"a\n", 0o644, uid=1000)

    async def main():
        reply = await ctl_command(fs, OWNER, {"cmd": "restore", "path": "private", "version": 1})
        assert reply["ok"] is False and reply["kind"] == "PermissionDenied", reply
        assert ws.files.read(ino, 0, 100) == b"two\n"
        reply = await ctl_command(fs, ROOT_CTX, {"cmd": "restore", "path": "private", "version": 1})
        assert reply["ok"] is True, reply
        assert ws.files.read(ino, 0, 100) == b"one\n"
    trio.run(main)
