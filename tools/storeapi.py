"""Writing files through a workspace's Python API, as the FUSE adapter does —
for benchmarks, trials and tests that build stores without a mount.

One helper, shared by ``tests/storeutil.py``, ``tests/ui/uiutil.py``,
``tools/meta_damage.py`` and ``tools/bench/{receipt,history}_bench.py``.
"""

from __future__ import annotations

from chronicle.errors import Exists
from chronicle.store.model import Actor
from chronicle.store.namespace.workspace import Workspace


def write_file(ws: Workspace, parent: int, name: bytes, data: bytes, actor: Actor, *,
               exists_ok: bool = True) -> int:
    """create (or open with O_TRUNC) + write + close of ``parent``/``name``, as
    ``open(..., "wb")`` does, by ``actor``; one version. Returns the inode.
    Raises :class:`~chronicle.errors.Exists` if it exists and not ``exists_ok``,
    and what ``Workspace`` raises (``NotFound``, ``NoSpace``, ...)."""
    try:
        ino, _ = ws.create(parent, name, 0o100644, actor)
        ws.files.open(ino, created=True)
    except Exists:
        if not exists_ok:
            raise
        ino, _ = ws.lookup(parent, name)
        ws.files.open(ino, truncate=True)
    ws.files.write(ino, 0, data, actor.pid)
    ws.files.commit(ino)
    ws.files.release(ino)
    return ino
