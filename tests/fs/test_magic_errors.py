"""Adapter tests of the ``.chronicle`` tree: the ``Operations`` object called
directly (as ``test_operations.py`` does), for the one rule the views layer
and its adapter must keep together: only a missing path is ENOENT. A
``Corrupt`` store or a bug under a ``.chronicle/`` lookup is EIO, logged,
and the next call works.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import trio

from chronicle.errors import Corrupt
from chronicle.fs.magic import MAGIC_BASE
from chronicle.store.history import points

ROOT = pyfuse3.ROOT_INODE
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=4242, umask=0o022)



async def fuse_errno(coro) -> int | None:
    try:
        await coro
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return None


def failing(exc: BaseException):
    def fail(*_args, **_kwargs):
        raise exc
    return fail


def test_a_corrupt_store_under_chronicle_is_eio_not_enoent(fs, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="chronicle")

    async def main():
        fi, _ = await fs.create(ROOT, b"f", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, CTX)
        await fs.release(fi.fh)
        query = (await fs.lookup(MAGIC_BASE, b"query", CTX)).st_ino
        at = (await fs.lookup(MAGIC_BASE, b"at", CTX)).st_ino
        assert await fuse_errno(fs.lookup(query, b"never", CTX)) == errno.ENOENT
        assert await fuse_errno(fs.lookup(at, b"no-such-point", CTX)) == errno.ENOENT
        assert await fuse_errno(fs.lookup(at, b"turn:malformed", CTX)) == errno.ENOENT

        with monkeypatch.context() as patch:
            patch.setattr(fs.ws.history, "followed", failing(Corrupt("damaged path index")))
            assert await fuse_errno(fs.lookup(query, b"f", CTX)) == errno.EIO
            assert await fuse_errno(fs.lookup(query, b"never", CTX)) == errno.EIO
        with monkeypatch.context() as patch:
            patch.setattr(points, "snapshot_seq", failing(Corrupt("damaged snapshots")))
            assert await fuse_errno(fs.lookup(at, b"some-point", CTX)) == errno.EIO
        with monkeypatch.context() as patch:
            patch.setattr(fs.store, "get_turn", failing(RuntimeError("a bug in the turn log")))
            assert await fuse_errno(fs.lookup(at, b"turn:bot:1", CTX)) == errno.EIO

        # The next calls work.
        assert stat.S_ISREG((await fs.lookup(query, b"f", CTX)).st_mode)
        assert stat.S_ISDIR((await fs.lookup(at, b"0", CTX)).st_mode)

    trio.run(main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 4 and "damaged path index" in caplog.text and "damaged snapshots" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text         # the bug is logged with its traceback


def test_a_log_handle_is_o1_to_open_and_keeps_its_content(fs):
    async def main():
        for n in range(50):
            await fs.mkdir(ROOT, b"d%d" % n, 0o755, CTX)
        log = (await fs.lookup(MAGIC_BASE, b"log", CTX)).st_ino
        fi = await fs.open(log, os.O_RDONLY, CTX)
        assert fi.direct_io and not fi.keep_cache
        await fs.mkdir(ROOT, b"after", 0o755, CTX)
        first = await fs.read(fi.fh, 0, 100)
        rest = await fs.read(fi.fh, 100, 1 << 20)
        assert (first + rest).count(b"\n") == 50 and b'"after"' not in rest
        assert await fs.read(fi.fh, 0, 100) == first
        await fs.release(fi.fh)
        assert await fuse_errno(fs.read(fi.fh, 0, 100)) == errno.EBADF

    trio.run(main)
