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
from typing import ClassVar

from chronicle.store.history import queries

# -- nodes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Root:
    """``.chronicle/``."""

    is_dir: ClassVar[bool] = True
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class QueryDir:
    """``query/<path>/`` (``path`` b"" is ``query/``): mirrors a directory's children."""

    path: bytes
    is_dir: ClassVar[bool] = True
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class QueryFile:
    """``query/<path>``: the JSON history of a path that is (or was last) not a directory."""

    path: bytes
    is_dir: ClassVar[bool] = False
    rendered: ClassVar[bool] = True
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class VersionsDir:
    """``versions/<path>/``: the version numbers of ``path`` (a file) and its children (a directory)."""

    path: bytes
    is_dir: ClassVar[bool] = True
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class VersionFile:
    """``versions/<path>/<number>``: the content of one version."""

    path: bytes
    number: int
    is_dir: ClassVar[bool] = False
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class AtDir:
    """``at/``: any point (:mod:`~chronicle.store.history.points`) looks up; lists nothing."""

    is_dir: ClassVar[bool] = True
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class SnapshotsDir:
    """``snapshots/``: one tree per snapshot name."""

    is_dir: ClassVar[bool] = True
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class TreeNode:
    """Inode ``ino`` of the workspace's tree at ``seq`` (read-only; any kind)."""

    seq: int
    ino: int
    is_dir: ClassVar[bool] = False        # it depends on the inode: ask HistoryViews.is_dir
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class LogFile:
    """``log``: JSON Lines, one event per line, oldest first."""

    is_dir: ClassVar[bool] = False
    rendered: ClassVar[bool] = True
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class StatsFile:
    """``stats``: the store's and the workspace's figures (JSON)."""

    is_dir: ClassVar[bool] = False
    rendered: ClassVar[bool] = True
    immutable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CtlFile:
    """``ctl``: the control channel (read-write; served by the adapter)."""

    is_dir: ClassVar[bool] = False
    rendered: ClassVar[bool] = True
    immutable: ClassVar[bool] = False


Node = (Root | QueryDir | QueryFile | VersionsDir | VersionFile | AtDir | SnapshotsDir | TreeNode | LogFile
        | StatsFile | CtlFile | queries.QueryNode)     # blame/, hash/, turns/: chronicle.store.history.queries

ROOT_CHILDREN: dict[bytes, Node] = {
    b"at": AtDir(), b"ctl": CtlFile(), b"log": LogFile(), b"query": QueryDir(b""), b"snapshots": SnapshotsDir(),
    b"stats": StatsFile(), b"versions": VersionsDir(b""), **queries.ROOT_QUERIES,
}
