"""``chronicle.store.chunks.backends``: the chunk-backend contract (``base``),
driven only through the protocol, and what the local backend adds.

``TestContract`` runs against every backend in ``BACKENDS`` (only the local
directory today; an S3 backend adds a factory there, e.g. one bucket prefix
per test on a SeaweedFS fixture). ``TestLocal`` checks the local backend's own
business: files under the store, ``run/active`` registrations, fdatasync,
a full disk.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chronicle.errors import Busy, Corrupt, Exists, InvalidArgument, NoSpace, NotFound
from chronicle.store.chunks.backends.base import ChunkBackend, ObjectInfo, ObjectWriter
from chronicle.store.chunks.backends.local import LocalBackend


def local_backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "store")


BACKENDS: dict[str, Callable[[Path], ChunkBackend]] = {"local": local_backend}


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request, tmp_path) -> Iterator[Callable[[], ChunkBackend]]:
    """``make()``: a backend over this test's store (each call a new instance
    over the same place, as another process or a restart would see it)."""
    made: list[ChunkBackend] = []

    def make() -> ChunkBackend:
        backend = BACKENDS[request.param](tmp_path)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend) -> ChunkBackend:
    return make_backend()


def name(group: int, n: int) -> str:
    return f"packs/{group:06x}/{n:010x}.pack"


def write(backend: ChunkBackend, obj: str, *parts: bytes) -> None:
    writer = backend.create(obj)
    writer.append(list(parts))
    writer.close()


class TestContract:
    def test_is_a_chunk_backend(self, backend):
        assert isinstance(backend, ChunkBackend)
        assert isinstance(backend.durable_while_open, bool)
        writer = backend.create(name(1, 1))
        assert isinstance(writer, ObjectWriter) and writer.name == name(1, 1)
        writer.close()

    def test_append_then_range_reads(self, backend):
        writer = backend.create(name(1, 1))
        writer.append([b"abc", memoryview(b"defg"), bytearray(b"")])
        writer.append([b"h" * 100_000])
        # what was appended is readable through this backend before the object is closed
        assert backend.read(name(1, 1), 2, 3) == b"cde"
        writer.close()
        assert backend.read(name(1, 1), 0, 7) == b"abcdefg"
        assert backend.read(name(1, 1), 7, 100_000) == b"h" * 100_000
        assert backend.read(name(1, 1), 5, 0) == b""
        assert backend.size(name(1, 1)) == 100_007

    def test_closed_object_is_there_for_a_new_instance(self, make_backend):
        first = make_backend()
        write(first, name(2, 0x201), b"durable bytes")
        first.sync()
        first.close()
        second = make_backend()
        assert second.read(name(2, 0x201), 8, 5) == b"bytes"
        assert [info.name for info in second.list("packs/")] == [name(2, 0x201)]

    def test_create_is_exclusive(self, backend):
        write(backend, name(1, 1), b"first")
        # an object store may only find out at close; either way the object keeps its bytes
        with pytest.raises(Exists):
            writer = backend.create(name(1, 1))
            writer.append([b"second"])
            writer.close()
        assert backend.read(name(1, 1), 0, 5) == b"first"

    def test_reading_past_the_end_is_corrupt(self, backend):
        write(backend, name(1, 1), b"0123456789")
        with pytest.raises(Corrupt):
            backend.read(name(1, 1), 5, 6)
        with pytest.raises(Corrupt):
            backend.read(name(1, 1), 11, 1)
        assert backend.read(name(1, 1), 5, 5) == b"56789"

    def test_missing_object_is_not_found(self, backend):
        with pytest.raises(NotFound):
            backend.read(name(9, 9), 0, 1)
        with pytest.raises(NotFound):
            backend.size(name(9, 9))
        backend.advise(name(9, 9), 0, 4096)           # a hint never raises

    def test_list_by_prefix_sorted_with_sizes(self, backend):
        objects = {name(0x10, 0x1001): b"a", name(0x10, 0x1002): b"bb", name(0x11, 0x1100): b"ccc",
                   name(0x20, 0x2000): b"dddd"}
        for obj in reversed(list(objects)):
            write(backend, obj, objects[obj])
        assert list(backend.list("packs/")) == [ObjectInfo(n, len(d)) for n, d in sorted(objects.items())]
        assert [i.name for i in backend.list("packs/000010/")] == [name(0x10, 0x1001), name(0x10, 0x1002)]
        # a plain string prefix, not a directory: it may end inside a component
        assert [i.name for i in backend.list("packs/00001")] == [name(0x10, 0x1001), name(0x10, 0x1002),
                                                                  name(0x11, 0x1100)]
        assert [i.name for i in backend.list("pa")] == sorted(objects)
        assert [i.name for i in backend.list("")] == sorted(objects)
        assert list(backend.list("packs/ffffff/")) == []
        assert list(backend.list("nothing/")) == []

    def test_delete_is_idempotent(self, backend):
        write(backend, name(1, 1), b"x")
        write(backend, name(1, 2), b"y")
        assert backend.read(name(1, 1), 0, 1) == b"x"        # (a local backend caches a descriptor)
        backend.delete(name(1, 1))
        with pytest.raises(NotFound):
            backend.read(name(1, 1), 0, 1)
        backend.delete(name(1, 1))                           # again: not an error
        backend.delete(name(7, 7))                           # never there: not an error
        backend.sync()
        assert [i.name for i in backend.list("packs/")] == [name(1, 2)]

    def test_an_object_being_written_cannot_be_deleted(self, backend):
        writer = backend.create(name(1, 1))
        writer.append([b"x"])
        with pytest.raises(Busy):
            backend.delete(name(1, 1))
        writer.close()
        backend.delete(name(1, 1))

    def test_put_is_atomic_and_idempotent(self, backend):
        backend.put(name(3, 0x300), b"immutable")
        assert backend.read(name(3, 0x300), 0, 9) == b"immutable"
        backend.put(name(3, 0x300), memoryview(b"immutable"))     # the same bytes again: nothing happens
        with pytest.raises(Exists):
            backend.put(name(3, 0x300), b"different")
        assert backend.read(name(3, 0x300), 0, 9) == b"immutable"
        assert list(backend.list("packs/")) == [ObjectInfo(name(3, 0x300), 9)]

    def test_durability_calls_are_idempotent(self, backend):
        backend.sync()                                        # nothing written: fine
        writer = backend.create(name(1, 1))
        writer.append([b"x" * 1000])
        writer.sync()
        writer.sync()
        backend.sync()
        backend.sync()
        writer.close()
        writer.close()
        backend.sync()
        assert backend.read(name(1, 1), 0, 1000) == b"x" * 1000

    def test_close_closes_open_writers(self, make_backend):
        first = make_backend()
        writer = first.create(name(1, 1))
        writer.append([b"kept"])
        first.close()
        first.close()
        assert make_backend().read(name(1, 1), 0, 4) == b"kept"

    @pytest.mark.parametrize("bad", ["", "packs", "/packs/x", "packs/../x", "packs//x", "packs/.tmp",
                                     "packs/a b", "meta/data.mdb", "packs/x/"])
    def test_bad_names_are_invalid(self, backend, bad):
        with pytest.raises(InvalidArgument):
            backend.create(bad)
        with pytest.raises(InvalidArgument):
            backend.read(bad, 0, 1)
        with pytest.raises(InvalidArgument):
            backend.put(bad, b"x")


class TestLocal:
    def test_objects_are_files_under_the_store(self, tmp_path):
        backend = LocalBackend(tmp_path / "store")
        write(backend, name(1, 1), b"data")
        assert (tmp_path / "store" / name(1, 1)).read_bytes() == b"data"
        assert backend.path(name(1, 1)) == tmp_path / "store" / name(1, 1)
        # other files of the store and temporary files are not objects
        (tmp_path / "store" / "meta").mkdir()
        (tmp_path / "store" / "meta" / "data.mdb").write_bytes(b"lmdb")
        (tmp_path / "store" / "packs" / "000001" / ".x.pack.tmp").write_bytes(b"tmp")
        assert [i.name for i in backend.list("")] == [name(1, 1)]
        backend.close()

    def test_open_objects_are_registered_until_closed(self, tmp_path):
        backend = LocalBackend(tmp_path / "store")
        active = tmp_path / "store" / "run" / "active"
        writer = backend.create(name(1, 1))
        marker = active / name(1, 1).replace("/", "+")
        assert marker.read_text().strip() == str(os.getpid())
        writer.append([b"x"])
        backend.sync()
        assert marker.exists()                  # still open: more may be appended
        writer.close()
        assert not marker.exists()
        backend.close()

    def test_sync_fdatasyncs_own_and_other_processes_objects(self, tmp_path, monkeypatch):
        store = tmp_path / "store"
        other = LocalBackend(store, active_dir=tmp_path / "elsewhere")   # its registrations are not seen
        write(other, name(2, 0x200), b"from a dead process")
        write(other, name(2, 0x201), b"from a live process")
        dead = subprocess.Popen(["true"])
        dead.wait()
        active = store / "run" / "active"
        active.mkdir(parents=True)
        (active / name(2, 0x200).replace("/", "+")).write_text(f"{dead.pid}\n")
        (active / name(2, 0x201).replace("/", "+")).write_text("1\n")               # pid 1 is alive
        (active / name(2, 0x2ff).replace("/", "+")).write_text("1\n")               # its object is gone
        (active / "00000000beef").write_text(f"{dead.pid}\n")                       # not an object name

        backend = LocalBackend(store)
        writer = backend.create(name(1, 1))
        writer.append([b"ours"])
        synced: list[str] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        backend.sync()
        assert sorted(Path(p).name for p in synced) == sorted(Path(n).name for n in
                                                               (name(1, 1), name(2, 0x200), name(2, 0x201)))
        left = sorted(p.name for p in active.iterdir())
        assert left == sorted(n.replace("/", "+") for n in (name(1, 1), name(2, 0x201)))
        synced.clear()
        backend.sync()                          # nothing new appended by us: our object is not synced again
        assert [Path(p).name for p in synced] == [Path(name(2, 0x201)).name]
        writer.close()
        backend.close()
        other.close()

    def test_large_appends_go_direct_and_read_back_exactly(self, tmp_path, monkeypatch):
        """Appends from DIRECT_MIN bytes on are written with O_DIRECT (from
        an aligned copy, the last partial block with pwrite), mixed with
        small ones at every alignment: the file is exactly what was
        appended, readable through the backend at once."""
        import random

        import chronicle.store.chunks.backends.local as local

        opened = []
        real_open = os.open
        monkeypatch.setattr(local.os, "open", lambda path, flags, *a: (opened.append(flags), real_open(path, flags, *a))[1])
        rng = random.Random(5)
        backend = LocalBackend(tmp_path / "store")
        writer = backend.create(name(1, 1))
        expect = bytearray()
        sizes = [16, local.DIRECT_MIN, 3, local.DIRECT_MIN + 4095, 1, 5 * 1024 * 1024 + 17, 4096 - 21,
                 local.DIRECT_MIN - 1, 6 * 1024 * 1024]
        for size in sizes:
            data = rng.randbytes(size)
            pieces = [data[:size // 3], memoryview(data)[size // 3:]]   # several buffers, bytes and views
            writer.append(pieces)
            expect += data
            assert backend.size(name(1, 1)) == len(expect)
            assert backend.read(name(1, 1), 0, len(expect)) == bytes(expect)
        writer.close()
        assert (tmp_path / "store" / name(1, 1)).read_bytes() == bytes(expect)
        assert any(flags & os.O_DIRECT for flags in opened)
        backend.close()

    def test_a_failed_direct_append_is_rolled_back(self, tmp_path, monkeypatch):
        """ENOSPC in the middle of a direct append: the file is truncated back
        to its end before it, and the next append continues from there."""
        import chronicle.store.chunks.backends.local as local

        backend = LocalBackend(tmp_path / "store")
        writer = backend.create(name(1, 1))
        writer.append([b"head" * 5])
        real_pwrite, calls = os.pwrite, []

        def filling(fd, data, offset):
            calls.append(offset)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(local.os, "pwrite", filling)
        with pytest.raises(NoSpace):
            writer.append([b"\x01" * (9 * 1024 * 1024)])     # two stage-fulls: the second write fails
        monkeypatch.undo()
        assert backend.size(name(1, 1)) == 20
        writer.append([b"\x02" * local.DIRECT_MIN])
        writer.close()
        assert (tmp_path / "store" / name(1, 1)).read_bytes() == b"head" * 5 + b"\x02" * local.DIRECT_MIN
        backend.close()

    def test_a_file_system_without_o_direct_gets_writev(self, tmp_path, monkeypatch):
        import chronicle.store.chunks.backends.local as local

        real_open = os.open

        def no_direct(path, flags, *a):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)

        monkeypatch.setattr(local.os, "open", no_direct)
        backend = LocalBackend(tmp_path / "store")
        writer = backend.create(name(1, 1))
        writer.append([b"x" * 10, b"y" * local.DIRECT_MIN])
        writer.append([b"z" * local.DIRECT_MIN])
        writer.close()
        assert not backend.direct_writes
        assert (tmp_path / "store" / name(1, 1)).read_bytes() == b"x" * 10 + b"y" * local.DIRECT_MIN + \
            b"z" * local.DIRECT_MIN
        backend.close()

    def test_a_full_disk_is_no_space(self, tmp_path):
        mnt = tmp_path / "small"
        mnt.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
        try:
            backend = LocalBackend(mnt)
            writer = backend.create(name(1, 1))
            with pytest.raises(NoSpace):
                for _ in range(100):
                    writer.append([b"\xff" * 65536])
            with pytest.raises(NoSpace):
                backend.put(name(1, 2), b"\xff" * (1 << 20))
            assert [i.name for i in backend.list("packs/")] == [name(1, 1)]   # put left nothing behind
            writer.close()
            backend.delete(name(1, 1))
            backend.put(name(1, 2), b"fits now")                           # space came back
            assert backend.read(name(1, 2), 0, 8) == b"fits now"
            backend.close()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
