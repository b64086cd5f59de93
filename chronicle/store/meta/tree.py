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

**Damage.** LMDB keeps no checksums: a damaged page shows up as an
``lmdb.Error`` of the read that reaches it, and it marks the caller's read
transaction bad for every later read. A view given the environment
(``env``) reads *tolerantly*: a read that failed only because an earlier
failure marked its transaction bad is tried again in a fresh one; a read
that met a damaged page is done again by hand (``meta.pages.PageWalk``:
LMDB must not touch a damaged page again, some of its checks abort the
process). A directory listing whose ``dirents`` are damaged is read past
the damage, and the names on a damaged page are found in ``dirent_hist``,
whose newest record of a name is its head entry (the journal writes both);
only what neither holds is lost. A read that cannot be answered raises
:class:`~chronicle.errors.Corrupt` naming what is damaged (the adapter
answers EIO for that path alone), never an ``lmdb.Error``. The second read
sees the latest commit, which is the caller's snapshot as long as no commit
comes between (the one writer of a workspace does not commit inside a
read; fsck runs on a store nobody writes).

Threads: views hold no transaction; every method takes the caller's ``txn``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from chronicle.errors import Corrupt, NotADirectory, NotFound
from chronicle.store import model
from chronicle.store.meta import schema
from chronicle.store.meta.damaged import DamagedRange
from chronicle.store.meta.pages import PageWalk
from chronicle.store.meta.schema import SEQ_MAX
from chronicle.store.model import Attrs

log = logging.getLogger(__name__)


def _after_prefix(prefix: bytes) -> bytes:
    """The first key above every key that starts with ``prefix`` (a
    directory prefix: never all 0xff bytes)."""
    return (int.from_bytes(prefix, "big") + 1).to_bytes(len(prefix), "big")


def _dirent_or_damaged(value: bytes) -> tuple[int, int] | None | bool:
    """:func:`schema.decode_dirent`, or False for a value of the wrong length."""
    try:
        return schema.decode_dirent(value)
    except struct.error:
        return False


def _hist_or_damaged(key: bytes, value: bytes, bound: int) -> tuple[int, int] | None | bool:
    """:func:`schema.hist_at` of a ``dirent_hist`` record (a run's version at
    ``bound``), or False if it is damaged."""
    try:
        return schema.hist_at(value, schema.split_dirent_hist_key(key)[1], bound)
    except struct.error:
        return False


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
    which becomes :attr:`layers`; ``root``: the workspace's root inode;
    ``env``: the store's environment, for tolerant reads (module docstring;
    None: an ``lmdb.Error`` of a damaged page reaches the caller);
    ``damaged``: key ranges a salvage lost (``Store.damaged``): a name
    not found there raises :class:`Corrupt`, not None.
    """

    def __init__(self, dbs: dict, chain: list[tuple[int, int | None]], root: int, seq: int | None = None,
                 env: lmdb.Environment | None = None, damaged: list[DamagedRange] | None = None):
        self.dbs = dbs
        self.root = root
        self.seq = seq
        self.ws = chain[0][0]
        self.layers = self._layers(chain, seq)
        self.env = env
        self.damaged = [r for r in damaged or () if r.db in ("dirents", "dirent_hist")]

    def _tolerant(self, exc: Exception, read_lmdb, read_pages):
        """After ``exc`` from a read in the caller's transaction: if it only
        said the transaction was marked bad by an earlier failure
        (``MDB_BAD_TXN``), ``read_lmdb(txn)`` in a fresh one; else (or if that
        fails too) ``read_pages(walk)`` — the same read done by hand
        (``meta.pages.PageWalk``), never letting LMDB near a damaged page,
        while a read transaction keeps the pages it reads from being reused."""
        if isinstance(exc, lmdb.BadTxnError):
            try:
                with self.env.begin() as txn:
                    return read_lmdb(txn)
            except (lmdb.Error, struct.error):
                pass
        with self.env.begin():
            with PageWalk(Path(self.env.path()) / "data.mdb") as walk:
                return read_pages(walk)

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
        """``(attrs, seq of the record)`` or None. Raises :class:`Corrupt`
        if the inode's record is on a damaged page (tolerant views)."""
        try:
            return self._attrs_with_seq(txn, ino)
        except lmdb.Error as exc:
            if self.env is None:
                raise
            failed = exc
        return self._tolerant(failed, lambda t: self._attrs_with_seq(t, ino), lambda w: self._attrs_walk(w, ino))

    def _attrs_walk(self, walk: PageWalk, ino: int) -> tuple[Attrs, int] | None:
        for layer in self.layers:
            prefix = schema.inode_prefix(layer.ws, ino)
            for key, value in walk.items("inodes", schema.inode_key(layer.ws, ino, layer.bound),
                                         _after_prefix(prefix)):
                return model.attrs_at(value, schema.inode_key_seq(key), layer.bound)
        if walk.damaged:
            raise Corrupt(f"the record of inode {ino} is on a damaged metadata page ({walk.damaged[0].error})")
        return None

    def _attrs_with_seq(self, txn: lmdb.Transaction, ino: int) -> tuple[Attrs, int] | None:
        db = self.dbs["inodes"]
        with txn.cursor(db=db) as cur:
            for layer in self.layers:
                prefix = schema.inode_prefix(layer.ws, ino)
                if cur.set_range(schema.inode_key(layer.ws, ino, layer.bound)):
                    key = cur.key()
                    if key[:12] == prefix:       # (a run record may hold versions past the bound)
                        return model.attrs_at(cur.value(), schema.inode_key_seq(key), layer.bound)
        return None

    def need_attrs(self, txn: lmdb.Transaction, ino: int) -> Attrs:
        """:meth:`attrs`, raising :class:`NotFound` instead of returning None."""
        attrs = self.attrs(txn, ino)
        if attrs is None:
            raise NotFound(f"no inode {ino}")
        return attrs

    # -- directory entries -----------------------------------------------------

    def lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> tuple[int, int] | None:
        """``(ino, kind)`` of ``name`` in directory ``parent``, or None.
        Raises :class:`Corrupt` if neither the head entry nor its history
        can be read (tolerant views)."""
        try:
            found = self._lookup(txn, parent, name)
        except (lmdb.Error, struct.error) as exc:
            if self.env is None:
                raise
            found = self._tolerant(exc, lambda t: self._lookup(t, parent, name),
                                   lambda w: self._lookup_walk(w, parent, name))
        if found is None and self.damaged:
            self._check_salvaged(parent, name)
        return found

    def _check_salvaged(self, parent: int, name: bytes) -> None:
        """Raise :class:`Corrupt` if ``parent/name`` may have been lost by a
        salvage (``meta.salvage``), so that not found is not known: its
        history was on a damaged page (and, at the head, its head entry too —
        else the head entry says)."""
        head = schema.dirent_key(self.layers[0].ws, parent, name)
        hist = schema.dirent_hist_prefix(self.layers[0].ws, parent, name)

        def hit(db: str, lo: bytes, hi: bytes) -> bool:
            return any(r.db == db and (r.after is None or r.after < hi) and (r.before is None or r.before > lo)
                       for r in self.damaged)

        if hit("dirent_hist", hist, hist + b"\xff" * 8) and (self.seq is not None or hit("dirents", head, head)):
            raise Corrupt(f"the entry {name.decode(errors='replace')!r} of directory inode {parent} may have been "
                          "on a damaged metadata page, salvaged without it (chronicle fsck says what was lost)")

    def _lookup_walk(self, walk: PageWalk, parent: int, name: bytes) -> tuple[int, int] | None:
        """:meth:`lookup` by hand: the head entry, else (it is on a damaged
        page) the first layer's newest history record, then the other layers'."""
        layers = self.layers
        if self.seq is None:
            key = schema.dirent_key(self.layers[0].ws, parent, name)
            for _key, value in walk.items("dirents", key, key + b"\x00"):
                found = _dirent_or_damaged(value)
                if found is not False:
                    return found
            if not walk.damaged:
                layers = self.layers[1:]      # no head entry: the first layer has none
        for layer in layers:
            prefix = schema.dirent_hist_prefix(layer.ws, parent, name)
            for key, value in walk.items("dirent_hist", schema.dirent_hist_key(layer.ws, parent, name, layer.bound),
                                         prefix + b"\xff" * 9):
                found = _hist_or_damaged(key, value, layer.bound)
                if found is not False:
                    return found
        if walk.damaged:
            raise Corrupt(f"the entry {name.decode(errors='replace')!r} of directory inode {parent} is on a "
                          f"damaged metadata page ({walk.damaged[0].error})")
        return None

    def _lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> tuple[int, int] | None:
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
                    if key[:len(prefix)] == prefix:       # (a run may hold versions past the bound)
                        return schema.hist_at(cur.value(), schema.split_dirent_hist_key(key)[1], layer.bound)
        return None

    def entries(self, txn: lmdb.Transaction, parent: int) -> list[tuple[bytes, int, int]]:
        """``(name, ino, kind)`` of every entry of directory ``parent``, sorted
        by name. A tolerant view leaves out only the names it cannot read
        anywhere (module docstring), and raises :class:`Corrupt` only if
        it can read none."""
        try:
            return self._entries(txn, parent)
        except (lmdb.Error, struct.error) as exc:
            if self.env is None:
                raise
            failed = exc
        return self._tolerant(failed, lambda t: self._entries(t, parent), lambda w: self._entries_walk(w, parent))

    def _entries(self, txn: lmdb.Transaction, parent: int) -> list[tuple[bytes, int, int]]:
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
                    yield name, schema.hist_at(cur.value(), seq, layer.bound)
                    # Skip this name's older records.
                    if not cur.set_range(prefix + name + b"\x01"):
                        return
                else:
                    # Records are newest first: jump to this name's newest record <= bound.
                    if not cur.set_range(schema.dirent_hist_key(layer.ws, parent, name, layer.bound)):
                        return

    def _entries_walk(self, walk: PageWalk, parent: int) -> list[tuple[bytes, int, int]]:
        """:meth:`entries` by hand, past damaged pages (module docstring):
        the readable head entries, the names of damaged head pages from the
        first layer's history, the other layers' history. Logs a WARNING
        saying what was read from where; raises :class:`Corrupt` if no
        entry at all can be read."""
        result: dict[bytes, tuple[int, int] | None] = {}
        from_history = 0
        start = 0
        if self.seq is None:
            prefix = schema.dir_prefix(self.layers[0].ws, parent)
            end = _after_prefix(prefix)
            for key, value in walk.items("dirents", prefix, end):
                decoded = _dirent_or_damaged(value)
                if decoded is not False:
                    result[key[12:]] = decoded
            for rng in list(walk.damaged):
                lo = prefix + rng.after[12:] + b"\x01" if rng.after and rng.after[:12] == prefix else prefix
                hi = rng.before + b"\x00" if rng.before and rng.before[:12] == prefix else end
                for name, value in self._hist_walk(walk, self.layers[0], parent, lo, hi):
                    if name not in result:
                        result[name] = value
                        from_history += value is not None
            start = 1
        for layer in self.layers[start:]:
            prefix = schema.dir_prefix(layer.ws, parent)
            for name, value in self._hist_walk(walk, layer, parent, prefix, _after_prefix(prefix)):
                if name not in result:
                    result[name] = value
        entries = sorted((name, v[0], v[1]) for name, v in result.items() if v is not None)
        damaged = [r.describe() for r in walk.damaged]
        if not entries and damaged:
            raise Corrupt(f"the entries of directory inode {parent} are damaged: {damaged[0]}")
        if damaged:
            log.warning("directory inode %d: its entries are on damaged metadata pages; %d entries read, %d of them "
                        "from the history (%s)", parent, len(entries), from_history, "; ".join(damaged[:3]))
        return entries

    def _hist_walk(self, walk: PageWalk, layer: Layer, parent: int, lo: bytes, hi: bytes
                   ) -> Iterator[tuple[bytes, tuple | None]]:
        """The newest readable ``dirent_hist`` record at or before
        ``layer.bound`` of each name of ``parent`` with keys in ``[lo, hi)``
        (None for a removed name), read by hand."""
        current = None
        for key, value in walk.items("dirent_hist", lo, hi):
            if len(key) < 21:
                continue
            name, seq = schema.split_dirent_hist_key(key)
            if name == current or seq > layer.bound:
                continue
            decoded = _hist_or_damaged(key, value, layer.bound)
            if decoded is False:
                continue
            current = name
            yield name, decoded

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
