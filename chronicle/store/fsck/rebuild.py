"""``fsck`` of damaged metadata: the checks read a salvaged copy.

The salvage itself — reading ``data.mdb`` by hand, deriving what damaged
records said, swapping the copy in — is ``chronicle.store.meta.salvage``
(``Store.open`` salvages too); :class:`SoundCopy` lets fsck's checks read
the copy as they read a store.

Threads: one fsck run, one thread.
"""

from __future__ import annotations

from pathlib import Path

import lmdb

from chronicle.store.chunks.index import ChunkStore
from chronicle.store.meta import schema
from chronicle.store.meta.salvage import Rebuilt, build, scan, swap_in

__all__ = ["Rebuilt", "SoundCopy", "build", "scan", "swap_in"]


class SoundCopy:
    """The metadata built in ``work`` (:func:`build`) beside ``store``'s
    packs, as the checks read a store: ``path``, ``meta_dir``, ``modes``,
    ``env``, ``dbs``, ``chunks``. Read-only; :meth:`close` it."""

    def __init__(self, store, work: Path, names: tuple[str, ...] = schema.DATABASES):
        self.path, self.meta_dir, self.modes = store.path, store.meta_dir, store.modes
        self.env = lmdb.open(str(work), max_dbs=len(names) + 2, readonly=True, lock=False)
        self.dbs = {name: self.env.open_db(name.encode(), create=False) for name in names}
        self.chunks = ChunkStore(self.env, self.dbs["chunks"], store.chunks.backend, meta_db=self.dbs["meta"])

    def close(self) -> None:
        self.env.close()
