"""Adapter tests: the pyfuse3 ``Operations`` object called directly, no mount
(STYLE.md "Tests"; S3QL's ``t3_fs_api``).

A store is built with ``Store.init``; ``ChronicleOperations`` is driven
inside ``trio.run`` as pyfuse3 would drive it. The request context is a
plain object with ``uid``, ``gid``, ``pid`` and ``umask`` (all the adapter
reads); ``SetattrFields`` likewise. ``readdir`` (needs a kernel token) and
the ``ctl`` restore (sends kernel invalidations) are left to the mount tests.

What is checked is what the kernel, and so a user, gets back: entries and
bytes, the errno of every failure (ext4's), versions recorded, and that an
internal error is EIO, logged with its traceback, and the next call works.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from chronicle.store.chunks.tree import hash_data
from chronicle.fs import magic
from chronicle.store.namespace.staging import MAX_FILE_SIZE

ROOT = pyfuse3.ROOT_INODE
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=4242, umask=0o022)
FILE = stat.S_IFREG | 0o644
DIR = 0o755
LONG = b"n" * 256


def fields(**set_) -> SimpleNamespace:
    """A ``SetattrFields`` stand-in (its attributes are read-only in pyfuse3)."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid",
             "update_size")
    return SimpleNamespace(**{name: set_.get(name, False) for name in names})


def attr(**values) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    for key, value in values.items():
        setattr(a, key, value)
    return a



async def fuse_errno(coro) -> int | None:
    """The errno a handler answers with (None: it succeeded)."""
    try:
        await coro
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return None


def history(ops, path: bytes) -> list[dict]:
    with ops.ws.read_txn() as txn:
        return json.loads(ops.ws.history.render_query(txn, path))["versions"]


def log(ops) -> list[dict]:
    with ops.ws.read_txn() as txn:
        return [json.loads(line) for line in ops.ws.history.log_lines(txn)]


async def make_file(ops, parent: int, name: bytes, data: bytes) -> int:
    """create + write + flush + release, as ``open(O_CREAT)``/``write``/``close`` do."""
    fi, entry = await ops.create(parent, name, FILE, os.O_WRONLY | os.O_CREAT, CTX)
    if data:
        assert await ops.write(fi.fh, 0, data) == len(data)
    await ops.flush(fi.fh)
    await ops.release(fi.fh)
    return entry.st_ino


async def read_all(ops, ino: int) -> bytes:
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    try:
        return await ops.read(fi.fh, 0, 1 << 30)
    finally:
        await ops.release(fi.fh)


# -- files and versions ----------------------------------------------------------------------------


def test_create_write_read_flush_release_makes_one_version(fs):
    async def main():
        fi, entry = await fs.create(ROOT, b"f.txt", FILE, os.O_WRONLY | os.O_CREAT, CTX)
        assert stat.S_ISREG(entry.st_mode) and stat.S_IMODE(entry.st_mode) == 0o644
        assert entry.st_ino not in (0, ROOT) and entry.st_ino < magic.MAGIC_BASE
        assert (entry.st_size, entry.st_uid, entry.st_gid) == (0, CTX.uid, CTX.gid)
        assert await fs.write(fi.fh, 0, b"hello ") == 6
        assert await fs.write(fi.fh, 6, b"world") == 5
        assert await fs.read(fi.fh, 0, 100) == b"hello world"        # uncommitted writes read back
        assert await fs.read(fi.fh, 6, 3) == b"wor"
        assert (await fs.getattr(entry.st_ino)).st_size == 11
        assert history(fs, b"f.txt")[-1]["event"] == "create"        # nothing committed before close
        await fs.flush(fi.fh)                                        # close(2)
        await fs.release(fi.fh)

        found = await fs.lookup(ROOT, b"f.txt", CTX)
        assert found.st_ino == entry.st_ino and found.st_size == 11
        assert await read_all(fs, found.st_ino) == b"hello world"
        versions = history(fs, b"f.txt")
        assert [(v["version"], v["event"], v["size"]) for v in versions] == [(1, "write", 11)]
        assert versions[0]["hash"] == hash_data(b"hello world").hex()
        assert versions[0]["pid"] == CTX.pid

    trio.run(main)


def test_fsync_commits_while_open_and_unchanged_content_makes_no_version(fs):
    async def main():
        fi, entry = await fs.create(ROOT, b"f", FILE, os.O_RDWR | os.O_CREAT, CTX)
        ino = entry.st_ino
        await fs.write(fi.fh, 0, b"abc")
        await fs.fsync(fi.fh, False)
        assert [v["size"] for v in history(fs, b"f") if v["event"] == "write"] == [3]
        await fs.write(fi.fh, 2, b"d")
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        head = fs.ws.head_seq

        # O_TRUNC and the same bytes again, a read-only open, a flush without writes: no new version.
        fi = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)
        await fs.write(fi.fh, 0, b"abd")
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        fi = await fs.open(ino, os.O_RDWR, CTX)
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        assert await read_all(fs, ino) == b"abd"
        assert fs.ws.head_seq == head
        assert [v["version"] for v in history(fs, b"f") if v["event"] == "write"] == [1, 2]

    trio.run(main)


def test_setattr_truncate_and_chmod_are_recorded(fs):
    async def main():
        ino = await make_file(fs, ROOT, b"f", b"0123456789")
        entry = await fs.setattr(ino, attr(st_size=4), fields(update_size=True), None, CTX)
        assert entry.st_size == 4
        assert await read_all(fs, ino) == b"0123"
        entry = await fs.setattr(ino, attr(st_mode=FILE & ~0o777 | 0o600), fields(update_mode=True), None, CTX)
        assert stat.S_IMODE(entry.st_mode) == 0o600
        assert [v["event"] for v in history(fs, b"f")] == ["write", "truncate", "chmod"]
        assert history(fs, b"f")[1]["hash"] == hash_data(b"0123").hex()
        # Truncating through an open handle is committed with that handle's close.
        fi = await fs.open(ino, os.O_WRONLY, CTX)
        await fs.setattr(ino, attr(st_size=1), fields(update_size=True), fi.fh, CTX)
        assert (await fs.getattr(ino)).st_size == 1
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        assert await read_all(fs, ino) == b"0"
        assert len([v for v in history(fs, b"f") if v["event"] in ("write", "truncate")]) == 3

    trio.run(main)


# -- errno mapping ----------------------------------------------------------------------------------


def test_every_failure_gets_the_errno_ext4_gives(fs):
    async def main():
        d = (await fs.mkdir(ROOT, b"d", DIR, CTX)).st_ino
        await fs.mkdir(ROOT, b"empty", DIR, CTX)
        f = await make_file(fs, ROOT, b"f", b"data")
        await make_file(fs, d, b"g", b"in d")
        fi = await fs.open(f, os.O_WRONLY, CTX)
        chron = await fs.lookup(ROOT, b".chronicle", CTX)
        assert chron.st_ino == magic.MAGIC_BASE
        log_ino = (await fs.lookup(chron.st_ino, b"log", CTX)).st_ino
        query_ino = (await fs.lookup(chron.st_ino, b"query", CTX)).st_ino
        qfile = (await fs.lookup(query_ino, b"f", CTX)).st_ino
        assert min(log_ino, query_ino, qfile) >= magic.MAGIC_BASE
        log_fh = (await fs.open(log_ino, os.O_RDONLY, CTX)).fh
        head = fs.ws.head_seq

        cases = {
            errno.ENOENT: [
                fs.unlink(ROOT, b"missing", CTX), fs.rmdir(ROOT, b"missing", CTX),
                fs.rename(ROOT, b"missing", ROOT, b"x", 0, CTX), fs.getattr(999999, CTX),
                fs.rename(ROOT, b"f", ROOT, b"missing", pyfuse3.RENAME_EXCHANGE, CTX),
                fs.lookup(query_ino, b"never-existed", CTX),
            ],
            errno.EEXIST: [
                fs.create(ROOT, b"f", FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CTX),
                fs.mkdir(ROOT, b"d", DIR, CTX), fs.mkdir(ROOT, b"f", DIR, CTX),
                fs.symlink(ROOT, b"f", b"target", CTX), fs.link(f, ROOT, b"d", CTX),
                fs.mknod(ROOT, b"f", stat.S_IFIFO | 0o644, 0, CTX),
                fs.rename(ROOT, b"empty", ROOT, b"d", pyfuse3.RENAME_NOREPLACE, CTX),
            ],
            errno.ENOTEMPTY: [
                fs.rmdir(ROOT, b"d", CTX), fs.rename(ROOT, b"empty", ROOT, b"d", 0, CTX),
            ],
            errno.EISDIR: [
                fs.unlink(ROOT, b"d", CTX), fs.open(d, os.O_WRONLY, CTX), fs.open(d, os.O_RDONLY, CTX),
                fs.rename(ROOT, b"f", ROOT, b"empty", 0, CTX),
            ],
            errno.ENOTDIR: [
                fs.rmdir(ROOT, b"f", CTX), fs.lookup(f, b"x", CTX), fs.mkdir(f, b"x", DIR, CTX),
                fs.create(f, b"x", FILE, os.O_WRONLY | os.O_CREAT, CTX), fs.opendir(f, CTX),
                fs.rename(ROOT, b"empty", ROOT, b"f", 0, CTX), fs.symlink(f, b"x", b"t", CTX),
            ],
            errno.ENAMETOOLONG: [
                fs.create(ROOT, LONG, FILE, os.O_WRONLY | os.O_CREAT, CTX), fs.mkdir(ROOT, LONG, DIR, CTX),
                fs.lookup(ROOT, LONG, CTX), fs.symlink(ROOT, LONG, b"t", CTX), fs.link(f, ROOT, LONG, CTX),
                fs.rename(ROOT, b"f", ROOT, LONG, 0, CTX), fs.mknod(ROOT, LONG, stat.S_IFIFO | 0o644, 0, CTX),
                fs.symlink(ROOT, b"s", b"t" * 4096, CTX),
            ],
            errno.EFBIG: [
                fs.write(fi.fh, MAX_FILE_SIZE, b"x"), fs.write(fi.fh, MAX_FILE_SIZE - 1, b"xy"),
                fs.write(fi.fh, 2 ** 63 - 1, b"x"),
                fs.setattr(f, attr(st_size=MAX_FILE_SIZE + 1), fields(update_size=True), fi.fh, CTX),
                fs.setattr(f, attr(st_size=MAX_FILE_SIZE + 1), fields(update_size=True), None, CTX),
            ],
            errno.EPERM: [fs.link(d, ROOT, b"dirlink", CTX)],
            errno.EINVAL: [
                fs.rename(ROOT, b"d", d, b"inside", 0, CTX),
                fs.rename(ROOT, b"f", ROOT, b"x", pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE, CTX),
                fs.readlink(f, CTX),
            ],
            errno.EROFS: [
                fs.mkdir(magic.MAGIC_BASE, b"x", DIR, CTX), fs.mkdir(query_ino, b"x", DIR, CTX),
                fs.create(magic.MAGIC_BASE, b"x", FILE, os.O_WRONLY | os.O_CREAT, CTX),
                fs.create(query_ino, b"new", FILE, os.O_WRONLY | os.O_CREAT, CTX),
                fs.mknod(query_ino, b"p", stat.S_IFIFO | 0o644, 0, CTX),
                fs.unlink(magic.MAGIC_BASE, b"log", CTX), fs.rmdir(magic.MAGIC_BASE, b"query", CTX),
                fs.symlink(magic.MAGIC_BASE, b"s", b"t", CTX),
                fs.rename(ROOT, b"f", magic.MAGIC_BASE, b"x", 0, CTX),
                fs.rename(magic.MAGIC_BASE, b"log", ROOT, b"x", 0, CTX),
                fs.link(f, magic.MAGIC_BASE, b"x", CTX), fs.link(log_ino, ROOT, b"x", CTX),
                fs.setattr(log_ino, attr(st_mode=0o100777), fields(update_mode=True), None, CTX),
                fs.setattr(qfile, attr(st_size=0), fields(update_size=True), None, CTX),
                fs.setattr(magic.MAGIC_BASE, attr(st_uid=1), fields(update_uid=True), None, CTX),
                fs.setxattr(log_ino, b"user.k", b"v", CTX), fs.removexattr(log_ino, b"user.k", CTX),
                fs.setxattr(magic.MAGIC_BASE, b"user.k", b"v", CTX),
                fs.open(log_ino, os.O_WRONLY, CTX), fs.open(qfile, os.O_RDWR, CTX),
                fs.open(log_ino, os.O_WRONLY | os.O_TRUNC, CTX),
                fs.write(log_fh, 0, b"x"),
                # The name .chronicle at the root is reserved.
                fs.create(ROOT, b".chronicle", FILE, os.O_WRONLY | os.O_CREAT, CTX),
                fs.mkdir(ROOT, b".chronicle", DIR, CTX), fs.symlink(ROOT, b".chronicle", b"t", CTX),
                fs.mknod(ROOT, b".chronicle", stat.S_IFIFO | 0o644, 0, CTX),
                fs.link(f, ROOT, b".chronicle", CTX), fs.unlink(ROOT, b".chronicle", CTX),
                fs.rmdir(ROOT, b".chronicle", CTX), fs.rename(ROOT, b"f", ROOT, b".chronicle", 0, CTX),
                fs.rename(ROOT, b".chronicle", ROOT, b"x", 0, CTX),
            ],
        }
        wrong = []
        for expected, coros in cases.items():
            for i, coro in enumerate(coros):
                got = await fuse_errno(coro)
                if got != expected:
                    wrong.append(f"{errno.errorcode[expected]} case {i} ({coro.cr_code.co_name}): got "
                                 f"{errno.errorcode.get(got, got)}")
        assert not wrong, "\n".join(wrong)

        # A missing name is a negative entry (the kernel answers ENOENT and caches it).
        assert (await fs.lookup(ROOT, b"missing", CTX)).st_ino == 0
        # Nothing failed half-way: no event, the tree as it was, the handles still usable.
        assert fs.ws.head_seq == head
        assert await fs.read(fi.fh, 0, 10) == b"data"
        await fs.release(fi.fh)
        await fs.release(log_fh)
        assert await read_all(fs, f) == b"data"
        assert (await fs.getattr(f)).st_size == 4

    trio.run(main)


# -- internal errors ----------------------------------------------------------------------------------


def once(fn, exc: BaseException):
    """``fn`` that raises ``exc`` on its first call only."""
    calls = []

    def wrapper(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise exc
        return fn(*args, **kwargs)

    return wrapper


def test_an_internal_error_is_eio_logged_with_its_traceback_and_the_next_call_works(fs, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="chronicle")

    async def main():
        ino = await make_file(fs, ROOT, b"f", b"content")

        # A workspace method fails unexpectedly.
        monkeypatch.setattr(fs.ws, "mkdir", once(fs.ws.mkdir, RuntimeError("boom in mkdir")))
        assert await fuse_errno(fs.mkdir(ROOT, b"d", DIR, CTX)) == errno.EIO
        assert (await fs.mkdir(ROOT, b"d", DIR, CTX)).st_ino > 0

        # A store method fails under open: EIO, and no handle is left half-open.
        monkeypatch.setattr(fs.store, "content_map", once(fs.store.content_map, RuntimeError("boom in the store")))
        fs.ws.forget(ino)                    # so the next open reads the content from the store
        assert await fuse_errno(fs.open(ino, os.O_RDONLY, CTX)) == errno.EIO
        assert ino not in fs.ws.files
        assert await read_all(fs, ino) == b"content"

        # A failing write: EIO, and the file is still writable and closes to a version.
        fi = await fs.open(ino, os.O_WRONLY, CTX)
        monkeypatch.setattr(fs.ws.files, "write", once(fs.ws.files.write, RuntimeError("boom in write")))
        assert await fuse_errno(fs.write(fi.fh, 0, b"C")) == errno.EIO
        assert await fs.write(fi.fh, 0, b"C") == 1
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        assert await read_all(fs, ino) == b"Content"

        # A full disk is ENOSPC, not an internal error.
        fi = await fs.open(ino, os.O_WRONLY, CTX)
        monkeypatch.setattr(fs.ws.files, "write", once(fs.ws.files.write, OSError(errno.ENOSPC, "full")))
        assert await fuse_errno(fs.write(fi.fh, 0, b"x")) == errno.ENOSPC
        await fs.release(fi.fh)

    trio.run(main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3, [r.getMessage() for r in errors]
    for record, handler, message in zip(errors, ("mkdir", "open", "write"),
                                        ("boom in mkdir", "boom in the store", "boom in write")):
        assert record.name.startswith("chronicle")
        assert handler in record.getMessage()
        assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
        assert str(record.exc_info[1]) == message
        assert "Traceback (most recent call last)" in caplog.text


# -- lookup counts --------------------------------------------------------------------------------------


def test_lookup_counts_keep_inodes_until_forget(fs):
    async def main():
        ino = await make_file(fs, ROOT, b"f", b"x")            # one count from create
        assert (await fs.lookup(ROOT, b"f", CTX)).st_ino == ino
        assert (await fs.lookup(ROOT, b"f", CTX)).st_ino == ino
        await fs.forget([(ino, 2)])
        assert (await fs.getattr(ino)).st_size == 1
        assert await read_all(fs, ino) == b"x"
        await fs.forget([(ino, 1)])                            # the kernel holds none now
        assert (await fs.lookup(ROOT, b"f", CTX)).st_ino == ino  # and looks it up again
        assert await read_all(fs, ino) == b"x"
        await fs.forget([(ROOT, 5)])                           # the root stays
        assert stat.S_ISDIR((await fs.getattr(ROOT)).st_mode)
        assert (await fs.lookup(ROOT, b"f", CTX)).st_ino == ino

        # A .chronicle inode lives exactly as long as the kernel holds a count on it.
        query_ino = (await fs.lookup(magic.MAGIC_BASE, b"query", CTX)).st_ino
        qfile = (await fs.lookup(query_ino, b"f", CTX)).st_ino
        assert (await fs.lookup(query_ino, b"f", CTX)).st_ino == qfile
        await fs.forget([(qfile, 1)])
        assert stat.S_ISREG((await fs.getattr(qfile)).st_mode)
        fi = await fs.open(qfile, os.O_RDONLY, CTX)
        doc = json.loads(await fs.read(fi.fh, 0, 1 << 20))
        await fs.release(fi.fh)
        assert doc["path"] == "f" and doc["versions"][-1]["hash"] == hash_data(b"x").hex()
        await fs.forget([(qfile, 1)])
        assert await fuse_errno(fs.getattr(qfile)) == errno.ENOENT   # a stale number, not another node
        assert stat.S_ISREG((await fs.lookup(query_ino, b"f", CTX)).st_mode)

    trio.run(main)


# -- unlink of an open file ------------------------------------------------------------------------------


def test_an_unlinked_open_file_stays_readable_and_writable_until_release(fs):
    async def main():
        fi, entry = await fs.create(ROOT, b"f", FILE, os.O_RDWR | os.O_CREAT, CTX)
        ino = entry.st_ino
        await fs.write(fi.fh, 0, b"data")
        await fs.flush(fi.fh)
        await fs.unlink(ROOT, b"f", CTX)
        head = fs.ws.head_seq
        assert (await fs.lookup(ROOT, b"f", CTX)).st_ino == 0
        assert await fs.read(fi.fh, 0, 100) == b"data"
        assert await fs.write(fi.fh, 4, b" more") == 5
        assert await fs.read(fi.fh, 0, 100) == b"data more"
        st = await fs.getattr(ino)
        assert (st.st_nlink, st.st_size) == (0, 9)
        other = await fs.open(ino, os.O_RDONLY, CTX)            # e.g. /proc/PID/fd/N
        assert await fs.read(other.fh, 0, 100) == b"data more"
        await fs.fsync(fi.fh, False)
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        assert await fs.read(other.fh, 5, 100) == b"more"
        await fs.release(other.fh)
        # Writes to a file no path reaches are no version of any path.
        assert fs.ws.head_seq == head
        assert [v["event"] for v in history(fs, b"f")] == ["write", "delete"]
        # The name is free for a new, unrelated file.
        new = await make_file(fs, ROOT, b"f", b"")
        assert new != ino and await read_all(fs, new) == b""

    trio.run(main)


@pytest.mark.parametrize("removed", ["new-link", "old-name-while-open"])
def test_after_a_hard_link_is_removed_writes_are_versions_of_the_remaining_name(fs, removed):
    """``echo one > f; ln f g; rm g; echo two >> f`` (or ``ln f g; exec 3>>f;
    rm f; echo two >&3``): the file keeps a name, so each write is a version of it."""
    async def main():
        ino = await make_file(fs, ROOT, b"f", b"one\n")
        await fs.link(ino, ROOT, b"g", CTX)
        if removed == "new-link":
            await fs.unlink(ROOT, b"g", CTX)
            remaining = b"f"
            fi = await fs.open(ino, os.O_WRONLY | os.O_APPEND, CTX)   # f's dentry is cached: no LOOKUP
        else:
            assert (await fs.lookup(ROOT, b"f", CTX)).st_ino == ino  # the kernel reached it as f last
            fi = await fs.open(ino, os.O_WRONLY | os.O_APPEND, CTX)
            await fs.unlink(ROOT, b"f", CTX)
            remaining = b"g"
        await fs.write(fi.fh, 4, b"two\n")
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        assert await read_all(fs, (await fs.lookup(ROOT, remaining, CTX)).st_ino) == b"one\ntwo\n"
        writes = [v for v in history(fs, remaining) if v["event"] == "write"]
        assert writes and writes[-1]["hash"] == hash_data(b"one\ntwo\n").hex(), history(fs, remaining)
        assert all(line["path"] is not None for line in log(fs)), log(fs)

    trio.run(main)


def test_statfs_reports_name_max_255(fs):
    async def main():
        st = await fs.statfs(CTX)
        assert st.f_namemax == 255 and st.f_bsize > 0 and st.f_blocks > 0

    trio.run(main)


def test_fsync_after_close_syncs_what_close_committed_and_one_with_nothing_new_runs_no_sync(fs):
    """close commits without a disk flush; an fsync on a new descriptor must still make that
    version durable. Once it is (and nothing else was committed), another fsync or an fsyncdir
    has nothing to do and answers without running a sync."""
    async def main():
        ino = await make_file(fs, ROOT, b"f", b"closed, not yet synced")
        assert not fs.store.synced
        fi = await fs.open(ino, os.O_RDONLY, CTX)
        syncs = fs.group_sync.syncs
        await fs.fsync(fi.fh, False)
        assert fs.group_sync.syncs == syncs + 1 and fs.store.synced
        await fs.fsync(fi.fh, False)
        await fs.fsyncdir(0, False)
        assert fs.group_sync.syncs == syncs + 1
        await fs.release(fi.fh)
        await fs.setattr(ino, attr(st_mode=FILE & ~0o777 | 0o600), fields(update_mode=True), None, CTX)   # metadata only
        assert not fs.store.synced
        await fs.fsyncdir(0, False)
        assert fs.group_sync.syncs == syncs + 2 and fs.store.synced

    trio.run(main)


def test_the_kernels_write_times_fold_into_the_version_and_a_touch_is_its_own_event(fs):
    """The writeback cache's rule (``ChronicleOperations.setattr``): SETATTR(mtime, ctime) with a
    writable handle's fh is the times of the writes the kernel held -- no event; without one it
    is a touch."""
    fs.enable_writeback_cache = True              # as a mount with -o writeback_cache

    async def main():
        fi, entry = await fs.create(ROOT, b"f", FILE, os.O_WRONLY | os.O_CREAT, CTX)
        ino = entry.st_ino
        assert await fs.write(fi.fh, 0, b"data") == 4
        kernel = attr(st_mtime_ns=1_500_000_000_000_000_000, st_ctime_ns=1_500_000_000_000_000_001)
        await fs.setattr(ino, kernel, fields(update_mtime=True, update_ctime=True), fi.fh, CTX)
        await fs.flush(fi.fh)
        # Nothing pending any more: the kernel's later report of the same times records nothing.
        await fs.setattr(ino, kernel, fields(update_mtime=True, update_ctime=True), fi.fh, CTX)
        await fs.release(fi.fh)
        assert [e["event"] for e in log(fs)] == ["create", "write"]
        st = await fs.getattr(ino)
        assert (st.st_mtime_ns, st.st_ctime_ns) == (1_500_000_000_000_000_000, 1_500_000_000_000_000_001)

        # A read-only handle's fh, or none (utimensat, touch): the caller's own change.
        ro = await fs.open(ino, os.O_RDONLY, CTX)
        await fs.setattr(ino, attr(st_mtime_ns=7), fields(update_mtime=True, update_ctime=True), ro.fh, CTX)
        await fs.release(ro.fh)
        await fs.setattr(ino, attr(st_mtime_ns=8), fields(update_mtime=True, update_ctime=True), None, CTX)
        assert [e["event"] for e in log(fs)] == ["create", "write", "utimens", "utimens"]
        assert (await fs.getattr(ino)).st_mtime_ns == 8

        # ftruncate with the kernel's times: one truncate version at the close, no utimens.
        fi = await fs.open(ino, os.O_WRONLY, CTX)
        await fs.setattr(ino, attr(st_size=2, st_mtime_ns=9, st_ctime_ns=10),
                         fields(update_size=True, update_mtime=True, update_ctime=True), fi.fh, CTX)
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        assert [e["event"] for e in log(fs)][-1] == "truncate"
        st = await fs.getattr(ino)
        assert (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (2, 9, 10)

    trio.run(main)


def test_the_kernels_time_report_after_a_rename_of_a_closed_file_records_nothing(fs):
    """Writes committed before the kernel reported their times (ctl sync, turn-end): the report is
    dropped, and its repeat without a handle after a rename (fuse_update_ctime) makes no event."""
    fs.enable_writeback_cache = True              # as a mount with -o writeback_cache

    async def main():
        fi, entry = await fs.create(ROOT, b"f", FILE, os.O_WRONLY | os.O_CREAT, CTX)
        ino = entry.st_ino
        await fs.write(fi.fh, 0, b"data")
        await fs.commit_all()
        kernel = attr(st_mtime_ns=1_600_000_000_000_000_000, st_ctime_ns=1_600_000_000_000_000_001)
        await fs.setattr(ino, kernel, fields(update_mtime=True, update_ctime=True), fi.fh, CTX)
        await fs.flush(fi.fh)
        await fs.release(fi.fh)
        await fs.rename(ROOT, b"f", ROOT, b"g", 0, CTX)
        await fs.setattr(ino, kernel, fields(update_mtime=True, update_ctime=True), None, CTX)
        assert [e["event"] for e in log(fs)] == ["create", "write", "rename"]
        # A touch with another time is still the caller's change.
        await fs.setattr(ino, attr(st_mtime_ns=5), fields(update_mtime=True, update_ctime=True), None, CTX)
        assert [e["event"] for e in log(fs)] == ["create", "write", "rename", "utimens"]

    trio.run(main)
