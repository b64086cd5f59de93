"""The chunk-backend protocol: named, immutable-once-closed objects of bytes.

A **backend** is the place where pack bytes live: a local directory today
(:class:`~chronicle.store.chunks.backends.local.LocalBackend`) or an S3 bucket
(:class:`~chronicle.store.chunks.backends.s3.S3Backend`). It knows nothing of chunks, records or LMDB; the pack format
(``chronicle.store.chunks.packs``) and the chunk index
(``chronicle.store.chunks.index``) are built on top of it. The contract below
is written method by method, as restic documents its ``Backend`` interface
(``internal/backend/backend.go``): what is durable when a call returns, what
is idempotent, which errors are permanent.

Vocabulary:

- **object** — a sequence of bytes under a **name**. A name is a stable
  ``/``-separated string of components made of ``[A-Za-z0-9._-]`` that do not
  start with ``.``, e.g. ``packs/000001/00000001a3.pack``; its first
  component is a **namespace** (only ``packs`` today; metadata shipped to a
  bucket will add its own). The local backend keeps an object in the file
  ``<store>/<name>``; an object store keeps it under ``<prefix>/<name>``.
- **writer** (:class:`ObjectWriter`) — an object being written: created
  exclusively, then appended to, then **closed**. A closed object never
  changes again until it is deleted: that is what lets an object store upload
  it as one ``PUT`` with ``If-None-Match: *`` at close, and a cache keep it.
- **durable** — survives a machine crash (power loss, kernel panic), not just
  a killed process.

Errors. Every method may raise these, which are **permanent** (retrying the
same call gives the same answer until something else changes the store):

- :class:`~chronicle.errors.NotFound` — no object of that name;
- :class:`~chronicle.errors.Exists` — an exclusive create found the name taken;
- :class:`~chronicle.errors.Corrupt` — a range beyond the end of an object was
  asked for (the object is shorter than its reader expected: a truncated pack);
- :class:`~chronicle.errors.NoSpace` — the device or quota is full (permanent
  until space is freed; GC may free some and the caller may try again);
- :class:`~chronicle.errors.InvalidArgument` — a malformed name.

Anything else (``OSError`` such as ``EIO`` locally; timeouts and 5xx answers
from an object store, *after* the backend's own retries with backoff:
:class:`~chronicle.errors.Unavailable`) is **transient**: the store may be fine and a later retry may succeed. A
transient error from :meth:`ObjectWriter.append` leaves the writer's object
in an unknown state: close the writer and write its records again elsewhere.

Threads: a backend's methods may be called from any thread, concurrently. One
:class:`ObjectWriter` is appended to by one thread at a time (the pack
writer's flusher), but its :meth:`~ObjectWriter.sync` may run in another
thread meanwhile (:meth:`ChunkBackend.sync` syncs every open writer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Buffer", "ChunkBackend", "NotCached", "ObjectInfo", "ObjectWriter"]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as :meth:`ChunkBackend.list` finds it: its name and size in bytes."""

    name: str
    size: int


class NotCached(Exception):
    """Raised by a read inside a remote backend's ``cached_only()`` block
    (the S3 backend's) when the bytes are not on this machine: the FUSE loop
    must not wait for the network. :meth:`fetch` brings them in (blocking:
    call it in a worker thread); then the read can be tried again."""

    def __init__(self, name: str, fetch):
        super().__init__(f"{name}: not in the local cache")
        self.name = name
        self._fetch = fetch

    def fetch(self) -> None:
        """Fetch the missing bytes into the cache (raises what a read would)."""
        self._fetch()


@runtime_checkable
class ObjectWriter(Protocol):
    """An object being written (from :meth:`ChunkBackend.create`)."""

    name: str

    def append(self, buffers: Sequence[Buffer]) -> None:
        """Add ``buffers``, in order, at the end of the object.

        When it returns the bytes are handed over (locally: in the kernel's
        page cache; they survive a killed process) and readable with
        :meth:`ChunkBackend.read` through this backend, but not yet durable.
        Raises :class:`~chronicle.errors.NoSpace`; after any error the object's
        end is unknown (see the module docstring). Not idempotent."""
        ...

    def sync(self) -> None:
        """Make every byte appended before this call durable, if the backend
        can do that for an open object (:attr:`ChunkBackend.durable_while_open`);
        otherwise a no-op: only :meth:`close` makes the object durable.
        Idempotent. Raises :class:`~chronicle.errors.NoSpace`."""
        ...

    def close(self) -> None:
        """Finish the object: when it returns it is durable, complete and
        immutable, and listed by :meth:`ChunkBackend.list` everywhere.
        Idempotent (a second close does nothing). An object store uploads it
        here and may raise :class:`~chronicle.errors.Exists` if another
        writer took the name meanwhile (the data is then not stored); raises
        :class:`~chronicle.errors.NoSpace`."""
        ...


@runtime_checkable
class ChunkBackend(Protocol):
    """Where pack bytes live; see the module docstring for names and errors."""

    durable_while_open: bool
    """True if :meth:`sync` makes the bytes appended to objects that are still
    open durable (local files). False for object stores, where an object
    exists only once its writer closed it: the pack writer then closes its
    open pack before it calls :meth:`sync`."""

    def create(self, name: str) -> ObjectWriter:
        """Start a new object ``name`` and return its writer.

        Exclusive: raises :class:`~chronicle.errors.Exists` if ``name`` exists
        (an object store may only find out at :meth:`ObjectWriter.close`;
        callers use fresh random names so that a clash is all but impossible
        and simply retry with another). Locally the empty object exists and
        is listed as soon as this returns; it is durable at the next
        :meth:`sync`. Raises :class:`~chronicle.errors.NoSpace`."""
        ...

    def put(self, name: str, data: Buffer) -> None:
        """Store a whole immutable object in one call (an object store's
        ``PUT`` with ``If-None-Match: *``). Durable when it returns.

        Idempotent: writing the same bytes again under an existing name does
        nothing; different bytes raise :class:`~chronicle.errors.Exists`. A
        reader never sees a partial object. Raises
        :class:`~chronicle.errors.NoSpace`."""
        ...

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``name`` from byte ``offset`` (a range
        ``GET``). Sees whatever was appended through this backend before the
        call, and (locally) what other processes appended.

        Raises :class:`~chronicle.errors.NotFound` if there is no such object
        and :class:`~chronicle.errors.Corrupt` if it ends before
        ``offset + length`` (restic: "the file is too short" is permanent).
        Reading is idempotent and never changes the store."""
        ...

    def size(self, name: str) -> int:
        """The current size of ``name`` in bytes. Raises :class:`~chronicle.errors.NotFound`."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a plain string
        prefix, as S3's ``ListObjectsV2``: ``packs/`` or ``packs/0000``), in
        ascending name order, with its size. Objects still being written may
        be listed (locally, with their current size) or not (object stores).
        Objects created or deleted while the listing runs may or may not
        appear. A prefix naming nothing gives an empty listing."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name``. Idempotent: deleting a missing object is not an
        error. The deletion is durable after the next :meth:`sync`. An
        object with an open writer cannot be deleted
        (:class:`~chronicle.errors.Busy`). Locally its disk space comes back
        once no process has it open (this backend closes its own read
        descriptors of it here)."""
        ...

    def sync(self) -> None:
        """Make durable everything written to the store so far — by this
        backend's writers and, locally, by every other process's open
        writers (the ``run/active`` registrations): bytes appended before the
        call, objects created or deleted before it. This is what the store
        calls before it syncs metadata that refers to those bytes.
        Idempotent. Raises :class:`~chronicle.errors.NoSpace`."""
        ...

    def advise(self, name: str, offset: int, length: int) -> None:
        """A hint that ``[offset, offset + length)`` of ``name`` will be read
        soon: start reading it ahead asynchronously (locally
        ``posix_fadvise(WILLNEED)``; an object store may fetch it into its
        cache). Never raises, never blocks for long."""
        ...

    def release_deleted(self) -> None:
        """Let go of cached handles of objects another process deleted (GC
        deleting compacted packs), so their space comes back; a later read
        of such an object raises :class:`~chronicle.errors.NotFound`.
        Optional: callers use it if the backend has it. Never raises."""
        ...

    def close(self) -> None:
        """Close every open writer (each durable, as :meth:`ObjectWriter.close`)
        and release descriptors and connections. Idempotent."""
        ...
