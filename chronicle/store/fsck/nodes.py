"""fsck's checks of the extent trees of format-4 contents (``content_nodes``;
see ``chronicle.store.chunks.tree`` and ``chronicle.store.meta.nodes``).

Every node reachable from a content record is checked once: it exists, it
decodes, its height is the one its parent says, and its key is the hash of
its entries. The holders of each node (tree roots and inner nodes) and of
each chunk (flat records and leaves) are counted as they are met, so the
refcount checks compare with exactly what the stored trees hold. A content
whose tree reaches a missing or damaged node is damaged: reported with the
file versions that have it (``content-node``).

A mixin of ``fsck._Checker``: it uses the checker's snapshot transaction,
its maps of contents and chunks, and ``problem()`` to report.
"""

from __future__ import annotations

from chronicle.errors import Corrupt
from chronicle.store.chunks import tree as chunk_tree
from chronicle.store.chunks.ids import HOLE_ID, to_hex
from chronicle.store.fsck.report import _NAMED_IN_DETAILS, _NAMED_IN_MESSAGE, ERROR, WARNING, _name_files, _short
from chronicle.store.meta import schema
from chronicle.store.meta.schema import ContentRecord


class NodeChecks:
    """Extent-node checks (mixed into the checker)."""

    def _tree_extents(self, content_id: bytes, rec: ContentRecord) -> list[tuple[bytes, int]] | None:
        """The extents of a tree content, each node checked once (its hash,
        height, children): None, with the content reported damaged, if a node
        is missing or damaged. Counts the holders of nodes and chunks."""
        out: list[tuple[bytes, int]] = []
        stack = [(rec.height, [e[0] for e in reversed(rec.root)])]
        while stack:
            height, todo = stack[-1]
            if not todo:
                stack.pop()
                continue
            key = todo.pop()
            node = self._node(key, height)
            if node is None:
                self.bad_contents.add(content_id)
                self.lost_node_users[key].append(content_id)      # reported with its files (_report_lost_nodes)
                return None
            if height == 1:
                out.extend((e[0], e[1]) for e in node)
            else:
                stack.append((height - 1, [e[0] for e in reversed(node)]))
        return out

    def _node(self, key: bytes, height: int) -> list | None:
        """A node's entries, verified once (``chunks.tree``); None if missing or damaged."""
        if key in self.nodes_seen:
            return self.nodes_seen[key]
        raw = self.txn.get(key, db=self.dbs["content_nodes"])
        entries = None
        if raw is not None:
            try:
                _rc, got_height, entries = schema.decode_node(bytes(raw))
            except Corrupt:
                entries = None
            if entries is not None and (got_height != height or chunk_tree.node_hash(
                    height, chunk_tree.encode_entries(height - 1, entries)) != key):
                entries = None
        self.nodes_seen[key] = entries
        if entries is not None:
            held = {e[0] for e in entries}
            if height == 1:
                for chunk_id in held - {HOLE_ID}:
                    self.chunk_uses[chunk_id] += 1
            else:
                for child in held:
                    self.node_uses[child] += 1
        return entries

    def _check_node_refcounts(self) -> None:
        """Every stored node's refcount is its number of holders; a node nothing holds is reported."""
        for key, raw in self.items("content_nodes"):
            key = bytes(key)
            try:
                refcount = schema.node_refcount(bytes(raw))
            except Corrupt:
                continue
            uses = self.node_uses.get(key, 0)
            if uses != refcount:
                self.problem("node-refcount", f"extent node {_short(key)} has refcount {refcount} but "
                             f"{uses} holder(s)", WARNING if uses < refcount else ERROR, node=to_hex(key))


    def _report_lost_nodes(self) -> None:
        for key, users in sorted(self.lost_node_users.items()):
            files = self._file_versions([p for c in users for p in self.affected_paths.get(c, [])])
            named = _name_files(files) or "content(s) " + ", ".join(_short(c) for c in users[:_NAMED_IN_MESSAGE])
            how = "is damaged" if self.txn.get(key, db=self.dbs["content_nodes"]) is not None else "is missing"
            self.problem("content-node", f"extent node {_short(key)} {how}; {named} cannot be read",
                         node=to_hex(key), contents=[to_hex(c) for c in users[:_NAMED_IN_DETAILS]], files=files)
