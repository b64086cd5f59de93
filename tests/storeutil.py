"""Helpers shared by the store tests (no mount): a workspace written through
its Python API as the FUSE adapter and the CLI do, and its history read back."""

from __future__ import annotations

import json

from chronicle.store.model import Actor
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


def read(ws: Workspace, path: bytes) -> bytes:
    """The whole content of the file at ``path`` (head, with uncommitted writes)."""
    ino, _ = ws.resolve(path)
    return ws.files.read(ino, 0, 1 << 30)
