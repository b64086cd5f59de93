"""Group commit of the mount's durability requests: fsyncs arriving together share one ``Store.sync``.

Vocabulary: a **sync** is one :meth:`chronicle.store.store.Store.sync` (the
packs and ``data.mdb`` flushed, ``synced.rec`` written); a **request** is an
``fsync``/``fdatasync``/``fsyncdir``, a ctl ``sync`` or the daemon's periodic
sync, each after committing what it must make durable.

A request is answered once a sync that *started after it arrived* has
finished: a sync already running when it arrives may have read its txnid
before the request's commit, so it does not count. Requests arriving while
a sync runs all wait for it and then share the next one — one sync (one
fdatasync per pack file, one of ``data.mdb``, one of ``synced.rec``) for
the whole group, instead of one per request (PostgreSQL's and ext4's jbd2
group commit, with the "started after" rule of a ticket lock). Durability
is unchanged: when a request returns, everything committed before it is as
durable as one ``Store.sync`` of its own would have made it.

Errors: a failed sync raises in the request that ran it (``NoSpace``, an
``OSError``); the requests waiting on it then run a sync of their own.

Threads: the trio thread (the FUSE loop) calls :meth:`GroupSync.sync`; the
sync itself runs in a worker thread under the given limiter.
"""

from __future__ import annotations

import trio

from chronicle.store.store import Store


class GroupSync:
    """Shares one ``Store.sync`` among the requests that arrive while one runs (module docstring).

    ``store``: the store to sync; ``limiter``: the worker-thread limiter
    the syncs run under (the adapter's ``sync_limiter``). ``syncs`` counts
    the syncs run (for tests and the bench).
    """

    def __init__(self, store: Store, limiter: trio.CapacityLimiter):
        self.store = store
        self.limiter = limiter
        self.syncs = 0                       # syncs finished successfully
        self._started = 0                    # generation of the last sync started
        self._done = 0                       # generation of the last sync that finished successfully
        self._running: trio.Event | None = None

    async def sync(self) -> None:
        """Return once a sync that started after this call has finished.
        Raises what ``Store.sync`` raised, if this call ran the sync that failed."""
        want = self._started + 1             # the running sync (if any) is generation _started: too early
        while self._done < want:
            if self._running is not None:
                await self._running.wait()
                continue
            self._started += 1
            generation = self._started
            done = self._running = trio.Event()
            try:
                await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)
                self._done = generation
                self.syncs += 1
            finally:
                self._running = None
                done.set()


__all__ = ["GroupSync"]
