"""The nodes of the ``.chronicle/`` tree (SPEC §4), as typed values.

A **node** is one entry of the tree: one frozen dataclass per kind, naming
what it shows (a path, a version number, a seq and inode of a past tree).
Its class says what it is: ``is_dir`` (a directory), ``rendered`` (content
made when it is opened, size unknown before: ``direct_io``), ``immutable``
(never changes once it exists, so the kernel may cache it long). The views
(:mod:`chronicle.store.history.views`) compute lookups, listings,
attributes and content for them; the FUSE adapter numbers them.

Threads: nodes are immutable values; any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from chronicle.store.history import queries
from chronicle.store.history.kinds import DirNode, RenderedNode, StoredNode

# -- nodes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Root(DirNode):
    """``.chronicle/``."""


@dataclass(frozen=True, slots=True)
class QueryDir(DirNode):
    """``query/<path>/`` (``path`` b"" is ``query/``): mirrors a directory's children."""

    path: bytes


@dataclass(frozen=True, slots=True)
class QueryFile(RenderedNode):
    """``query/<path>``: the JSON history of a path that is (or was last) not a directory."""

    path: bytes


@dataclass(frozen=True, slots=True)
class VersionsDir(DirNode):
    """``versions/<path>/``: the version numbers of ``path`` (a file) and its children (a directory)."""

    path: bytes


@dataclass(frozen=True, slots=True)
class VersionFile(StoredNode):
    """``versions/<path>/<number>``: the content of one version."""

    path: bytes
    number: int


@dataclass(frozen=True, slots=True)
class AtDir(DirNode):
    """``at/``: any point (:mod:`~chronicle.store.history.points`) looks up; lists nothing."""


@dataclass(frozen=True, slots=True)
class SnapshotsDir(DirNode):
    """``snapshots/``: one tree per snapshot name."""


@dataclass(frozen=True, slots=True)
class TreeNode(StoredNode):
    """Inode ``ino`` of the workspace's tree at ``seq`` (read-only; any kind:
    ``is_dir`` depends on the inode, so ask ``HistoryViews.is_dir``)."""

    seq: int
    ino: int


@dataclass(frozen=True, slots=True)
class LogFile(RenderedNode):
    """``log``: JSON Lines, one event per line, oldest first."""


@dataclass(frozen=True, slots=True)
class StatsFile(RenderedNode):
    """``stats``: the store's and the workspace's figures (JSON)."""


@dataclass(frozen=True, slots=True)
class CtlFile(RenderedNode):
    """``ctl``: the control channel (read-write; served by the adapter)."""


Node = (Root | QueryDir | QueryFile | VersionsDir | VersionFile | AtDir | SnapshotsDir | TreeNode | LogFile
        | StatsFile | CtlFile | queries.QueryNode)     # blame/, hash/, turns/: chronicle.store.history.queries

ROOT_CHILDREN: dict[bytes, Node] = {
    b"at": AtDir(), b"ctl": CtlFile(), b"log": LogFile(), b"query": QueryDir(b""), b"snapshots": SnapshotsDir(),
    b"stats": StatsFile(), b"versions": VersionsDir(b""), **queries.ROOT_QUERIES,
}
