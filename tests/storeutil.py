"""Helpers shared by the store tests (no mount): a workspace written through
its Python API as the FUSE adapter and the CLI do, and its history read back."""

from __future__ import annotations

import json
from array import array

from chronicle.store.chunks.ids import HOLE_ID, hash_bytes
from chronicle.store.meta.schema import ContentRecord
from chronicle.store.model import Actor
from chronicle.store.namespace.content import BuiltContent
from chronicle.store.namespace.workspace import Workspace
from tools.storeapi import write_file

A = Actor(uid=0, gid=0, pid=4242)


def write(ws: Workspace, parent: int, name: bytes, data: bytes, *, exists_ok: bool = True) -> int:
    """create (or open with O_TRUNC) + write + close, as ``open(..., "wb")`` does. Returns the inode."""
    return write_file(ws, parent, name, data, A, exists_ok=exists_ok)


def history(ws: Workspace, path: bytes) -> list[dict]:
    """The versions list of ``.chronicle/history/<path>``."""
    with ws.read_txn() as txn:
        return json.loads(ws.history.render_query(txn, path))["versions"]


def log_lines(ws: Workspace) -> list[dict]:
    """Every ``.chronicle/log`` line of ``ws``, oldest first."""
    with ws.read_txn() as txn:
        return [json.loads(x) for x in ws.history.log_lines(txn)]


def names_at_every_seq(ws: Workspace) -> None:
    """Every past tree of ``ws`` lists names whose inodes read (no dangling entry)."""
    for seq in range(1, ws.head_seq + 1):
        view = ws.view(seq)
        with ws.read_txn() as txn:
            stack = [ws.root]
            while stack:
                parent = stack.pop()
                for name, ino, _kind in view.entries(txn, parent):
                    attrs = view.attrs(txn, ino)
                    assert attrs is not None and attrs.nlink >= 1, (seq, name)
                    if attrs.is_dir:
                        stack.append(ino)


def read(ws: Workspace, path: bytes) -> bytes:
    """The whole content of the file at ``path`` (head, with uncommitted writes)."""
    ino, _ = ws.resolve(path)
    return ws.files.read(ino, 0, 1 << 30)


def write_format3(ws: Workspace, parent: int, name: bytes, data: bytes, *, hole: int = 0,
                  piece: int = 100_000) -> int:
    """create + write + close of ``parent``/``name`` committed as store format 3
    did (the old record layout): a flat extent list cut at fixed ``piece``
    bytes (not the canonical chunking), keyed by the BLAKE3 of the bytes; with
    ``hole``, the file is a hole of that many bytes then ``data``, keyed by
    the BLAKE3 of its extent list with no hash (format 3's "too sparse to
    hash"). Returns the inode."""
    ino, _ = ws.create(parent, name, 0o100644, A)
    ws.files.open(ino, created=True)
    ws.files.write(ino, hole, data, A.pid)
    ws.files.commit_begin(ino)
    ids, lengths = [], array("Q")
    if hole:
        ids.append(HOLE_ID)
        lengths.append(hole)
    for pos in range(0, len(data), piece):
        chunk = data[pos:pos + piece]
        ids.append(hash_bytes(chunk))
        lengths.append(len(chunk))
        ws.store.chunks.put(ids[-1], chunk)
    if hole:
        digest = None
        content_id = hash_bytes(b"chronicle-sparse:" + b"".join(ids) + lengths.tobytes())
    else:
        digest = content_id = hash_bytes(data)
    record = ContentRecord(hole + len(data), digest, b"".join(ids), lengths)      # v4 clear: format 3
    ws.files.commit_finish(ino, BuiltContent(content_id, record))
    ws.files.release(ino)
    return ino
