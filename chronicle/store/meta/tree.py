"""Reading a workspace's tree at its head or at any past seq.

Vocabulary: a **layer** is ``(ws id, bound)``: a workspace's own records with
seq at most ``bound``. A workspace's **layers** are itself, then (if it is a
fork) its parent bounded by the fork seq, and so on up the fork chain. A read
takes the first layer that has a record for the key. That is what makes a
fork O(1): it starts with no records of its own.

A **view** (:class:`TreeView`) is a workspace at one seq (``None`` = head).
Head lookups use the ``dirents`` table of the first layer (current entries
plus whiteouts) and fall back to the parent's history at the fork seq; past
lookups use ``dirent_hist`` in every layer.

Threads: views hold no transaction; every method takes the caller's ``txn``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from chronicle.errors import NotADirectory, NotFound
from chronicle.store import model
from chronicle.store.meta import schema
from chronicle.store.meta.schema import SEQ_MAX
from chronicle.store.model import Attrs


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of a view: workspace ``ws``'s records with seq at most ``bound``."""

    ws: int
    bound: int      # records with seq <= bound belong to the view


class TreeView:
    """One workspace's tree at ``seq`` (None: the head), read through its layers.

    ``dbs``: the store's named databases; ``chain`` lists ``(ws id, fork
    seq)`` from the workspace up its fork chain (``Store.fork_chain``):
    ``[(ws, fork_seq), (parent, parent_fork_seq), ..., (root ws, None)]``,
    which becomes :attr:`layers`; ``root``: the workspace's root inode.
    """

    def __init__(self, dbs: dict, chain: list[tuple[int, int | None]], root: int, seq: int | None = None):
        self.dbs = dbs
        self.root = root
        self.seq = seq
        self.ws = chain[0][0]
        self.layers = self._layers(chain, seq)

    @staticmethod
    def _layers(chain: list[tuple[int, int | None]], seq: int | None) -> list[Layer]:
        layers = []
        bound = SEQ_MAX if seq is None else seq
        for i, (ws, _fork) in enumerate(chain):
            if i > 0:
                fork_seq = chain[i - 1][1]
                bound = min(bound, fork_seq)
            layers.append(Layer(ws, bound))
        return layers

    # -- inodes ------------------------------------------------------------------

    def attrs(self, txn: lmdb.Transaction, ino: int) -> Attrs | None:
        """The inode's attributes in this view, or None if it has none."""
        found = self.attrs_with_seq(txn, ino)
        return found[0] if found else None

    def attrs_with_seq(self, txn: lmdb.Transaction, ino: int) -> tuple[Attrs, int] | None:
        """``(attrs, seq of the record)`` or None."""
        db = self.dbs["inodes"]
        with txn.cursor(db=db) as cur:
            for layer in self.layers:
                prefix = schema.inode_prefix(layer.ws, ino)
                if cur.set_range(schema.inode_key(layer.ws, ino, layer.bound)):
                    key = cur.key()
                    if key[:12] == prefix:
                        return Attrs.decode(cur.value()), schema.inode_key_seq(key)
        return None

    def need_attrs(self, txn: lmdb.Transaction, ino: int) -> Attrs:
        """:meth:`attrs`, raising :class:`NotFound` instead of returning None."""
        attrs = self.attrs(txn, ino)
        if attrs is None:
            raise NotFound(f"no inode {ino}")
        return attrs

    # -- directory entries -----------------------------------------------------

    def lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> tuple[int, int] | None:
        """``(ino, kind)`` of ``name`` in directory ``parent``, or None."""
        if self.seq is None:
            raw = txn.get(schema.dirent_key(self.layers[0].ws, parent, name), db=self.dbs["dirents"])
            if raw is not None:
                return schema.decode_dirent(raw)
            layers = self.layers[1:]
        else:
            layers = self.layers
        if not layers:
            return None
        db = self.dbs["dirent_hist"]
        with txn.cursor(db=db) as cur:
            for layer in layers:
                prefix = schema.dirent_hist_prefix(layer.ws, parent, name)
                if cur.set_range(schema.dirent_hist_key(layer.ws, parent, name, layer.bound)):
                    key = cur.key()
                    if key[:len(prefix)] == prefix:
                        return schema.decode_dirent(cur.value())
        return None

    def entries(self, txn: lmdb.Transaction, parent: int) -> list[tuple[bytes, int, int]]:
        """``(name, ino, kind)`` of every entry of directory ``parent``, sorted by name."""
        result: dict[bytes, tuple[int, int] | None] = {}
        start = 0
        if self.seq is None:
            prefix = schema.dir_prefix(self.layers[0].ws, parent)
            with txn.cursor(db=self.dbs["dirents"]) as cur:
                if cur.set_range(prefix):
                    for key, value in cur:
                        if key[:12] != prefix:
                            break
                        result[bytes(key[12:])] = schema.decode_dirent(value)
            start = 1
        for layer in self.layers[start:]:
            for name, value in self._hist_entries(txn, layer, parent):
                if name not in result:
                    result[name] = value
        return sorted((name, v[0], v[1]) for name, v in result.items() if v is not None)

    def _hist_entries(self, txn: lmdb.Transaction, layer: Layer, parent: int) -> Iterator[tuple[bytes, tuple | None]]:
        """The latest record at or before ``layer.bound`` of every name ever in
        ``parent`` in that layer (None for removed names)."""
        prefix = schema.dir_prefix(layer.ws, parent)
        with txn.cursor(db=self.dbs["dirent_hist"]) as cur:
            if not cur.set_range(prefix):
                return
            while True:
                key = cur.key()
                if key[:12] != prefix:
                    return
                name, seq = schema.split_dirent_hist_key(key)
                if seq <= layer.bound:
                    yield name, schema.decode_dirent(cur.value())
                    # Skip this name's older records.
                    if not cur.set_range(prefix + name + b"\x01"):
                        return
                else:
                    # Records are newest first: jump to this name's newest record <= bound.
                    if not cur.set_range(schema.dirent_hist_key(layer.ws, parent, name, layer.bound)):
                        return

    def resolve(self, txn: lmdb.Transaction, path: bytes) -> tuple[int, int]:
        """``(ino, kind)`` at ``path`` (relative, ``/``-separated; ``b""`` is the root).

        Raises :class:`NotFound` or :class:`NotADirectory`.
        """
        ino, kind = self.root, model.KIND_DIR
        for part in path.split(b"/"):
            if not part or part == b".":
                continue
            if kind != model.KIND_DIR:
                raise NotADirectory(f"not a directory on the way to {path.decode(errors='replace')!r}")
            found = self.lookup(txn, ino, part)
            if found is None:
                raise NotFound(f"no such file or directory: {path.decode(errors='replace')!r}")
            ino, kind = found
        return ino, kind

    def walk(self, txn: lmdb.Transaction, ino: int | None = None, prefix: bytes = b"") -> Iterator[tuple[bytes, int, int]]:
        """Every ``(path, ino, kind)`` below ``ino`` (default the root), depth first,
        directories before their children."""
        stack = [(ino if ino is not None else self.root, prefix)]
        while stack:
            dir_ino, dir_path = stack.pop()
            children = self.entries(txn, dir_ino)
            for name, child, kind in children:
                path = dir_path + b"/" + name if dir_path else name
                yield path, child, kind
            for name, child, kind in reversed(children):
                if kind == model.KIND_DIR:
                    stack.append((child, dir_path + b"/" + name if dir_path else name))
