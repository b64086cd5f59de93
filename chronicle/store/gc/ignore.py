"""Ignore rules: paths that keep their latest content only (SPEC §4).

The rules of a workspace are gitignore patterns (read by the ``pathspec``
library with git's semantics: ``GitIgnoreSpec``), the policy's ``ignore``
patterns first, then the lines of the ``.chronicleignore`` file at the
workspace root, so the file can re-include (``!pattern``) what the policy
ignores. The file itself is never ignored.

:class:`IgnoreRules` reads them from the *committed* head (its own read
transaction, or the committing event's): an edit of ``.chronicleignore``
takes effect for the commits after the one that wrote it. The compiled spec is cached by the policy
record's bytes and the file's content id, so an unchanged rule set costs
one policy read and one directory lookup per content commit.

What "ignored" does at commit time is the journal's
(``EventWriter.path_entry``: the new version replaces the previous ones).

Threads: an IgnoreRules object is used by its workspace's writer thread only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import lmdb
import pathspec

from chronicle.errors import ChronicleError
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID
from chronicle.store.gc.policy import DEFAULT_POLICY, Policy
from chronicle.store.meta import schema

if TYPE_CHECKING:
    from chronicle.store.meta.tree import TreeView
    from chronicle.store.store import Store

IGNORE_FILE = b".chronicleignore"
IGNORE_FILE_MAX = 1 << 20           # bytes of .chronicleignore read; the rest is left out


class IgnoreRules:
    """The ignore rules of workspace ``ws_id`` whose committed head tree is
    ``head`` (a :class:`TreeView` at the head) with root inode ``root``."""

    def __init__(self, store: Store, ws_id: int, head: TreeView, root: int):
        self._store = store
        self._ws = ws_id
        self._head = head
        self._root = root
        self._key: tuple | None = None
        self._spec: pathspec.GitIgnoreSpec | None = None

    def spec(self, txn: lmdb.Transaction) -> pathspec.GitIgnoreSpec | None:
        """The compiled rules as ``txn`` sees the head (None: no patterns at
        all). The commit path passes its own write transaction: an event that
        writes an ignored path never also changes the rules (the policy is
        set in its own transaction; ``.chronicleignore`` is never ignored),
        so that is the committed rule set, without a read transaction of its own."""
        store = self._store
        raw = txn.get(schema.ws_key(self._ws), db=store.dbs["policies"])
        found = self._head.lookup(txn, self._root, IGNORE_FILE)
        attrs = self._head.attrs(txn, found[0]) if found is not None else None
        content = attrs.content if attrs is not None and attrs.is_file else None
        key = (None if raw is None else bytes(raw), content)
        if key != self._key:
            policy = DEFAULT_POLICY if raw is None else Policy.decode(raw)
            lines = list(policy.ignore) + self._file_lines(content)
            self._spec = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
            self._key = key
        return self._spec

    def _file_lines(self, content: bytes | None) -> list[str]:
        if not content or content == EMPTY_CONTENT_ID:
            return []
        try:
            data = self._store.content_map(content).read(0, IGNORE_FILE_MAX)
        except ChronicleError:
            return []                   # unreadable: fsck reports it; commits keep their history
        return [os.fsdecode(line) for line in data.splitlines()]

    def ignored(self, txn: lmdb.Transaction, path: bytes) -> bool:
        """True if ``path`` (relative to the root, components joined by ``/``)
        matches the rules. ``.chronicleignore`` itself never does."""
        if path == IGNORE_FILE or not path:
            return False
        spec = self.spec(txn)
        return spec is not None and spec.match_file(os.fsdecode(path))
