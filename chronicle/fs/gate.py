"""The adapter's MutationGate: the workspace stays single-threaded while a
long job (ctl ``restore --at``) runs in a worker thread.

Vocabulary: a **mutation** is a FUSE handler or ctl command that changes the
tree, a file, the open-file table or the workspace's caches; a **job** is a
blocking workspace mutation run in a worker thread
(``ChronicleOperations.run_exclusive``) while it **holds** the gate.

Threads: only the trio thread (the FUSE loop) calls the gate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from chronicle.errors import ChronicleError


class MutationGate:
    """Keeps the workspace single-threaded while a long job runs in a worker.

    The Workspace is used from one thread by contract (its module docstring):
    its caches (head attributes, path links, open files) are plain dicts the
    loop reads and writes without locks. ``ctl restore --at`` over 20,000
    paths is one event, one LMDB write transaction, and takes seconds; on the
    loop, every request of the mount would wait for it.

    Chosen: the job runs whole in a worker thread while the workspace is
    locked against mutation, rather than planned off-thread and applied on
    the loop in batches — a restore is one event (one seq, one transaction,
    SPEC), and batches would split it. While the job holds the gate:

    - mutations (every handler that changes the tree, a file, the open-file
      table or the caches; ctl commands) wait at the gate; the job starts
      only once the mutations in flight have finished (:meth:`mutation`);
    - reads that the kernel sends most — ``lookup``, ``getattr``, ``opendir``,
      ``readdir`` — are answered from the committed tree in LMDB (MVCC:
      before the job commits they see the old head, after it the new one)
      without touching the workspace's caches, which belong to the worker;
      what they would have recorded (path links) is recorded on the loop once
      the job is done (:meth:`defer`). No file has uncommitted writes then
      (a restore refuses to start otherwise), so committed attributes are the
      attributes;
    - other reads (``readlink``, xattrs, the ``.chronicle`` tree's lookups)
      wait like mutations (:meth:`wait_free`).

    Only the trio thread calls the gate.
    """

    def __init__(self) -> None:
        self._active = 0                              # mutations in flight
        self._held = False
        self._released = trio.Event()
        self._released.set()
        self._idle = trio.Event()
        self._deferred: list[Callable[[], object]] = []

    @property
    def exclusive(self) -> bool:
        """True while a job holds (or is waiting to hold) the gate."""
        return self._held

    async def wait_free(self) -> None:
        """Return once no job holds the gate."""
        while self._held:
            await self._released.wait()

    def mutation(self) -> _Mutation:
        """``async with gate.mutation():`` holds off jobs for the duration of one
        mutation (shared: many at once). A plain object, not a generator-based
        context manager: it is entered on every mutating request."""
        return _Mutation(self)

    def _enter(self) -> None:
        self._active += 1

    def _exit(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold the gate alone: new mutations wait, those in flight are waited for."""
        await self.wait_free()
        self._held = True
        self._released = trio.Event()
        try:
            while self._active:
                self._idle = trio.Event()
                await self._idle.wait()
            yield
        finally:
            deferred, self._deferred = self._deferred, []
            self._held = False
            for record in deferred:
                try:
                    record()
                except ChronicleError:
                    pass                              # gone since: nothing to record
            self._released.set()

    def defer(self, record: Callable[[], object]) -> None:
        """Run ``record`` on the loop once the job is done (ChronicleErrors ignored)."""
        self._deferred.append(record)


class _Mutation:
    """The context of one :meth:`MutationGate.mutation`."""

    __slots__ = ("_gate",)

    def __init__(self, gate: MutationGate):
        self._gate = gate

    async def __aenter__(self) -> None:
        if self._gate._held:
            await self._gate.wait_free()
        self._gate._enter()

    async def __aexit__(self, *exc: object) -> None:
        self._gate._exit()


__all__ = ["MutationGate"]
