"""The query nodes of the ``.chronicle/`` tree: ``blame/``, ``hash/``, ``turns/`` (SPEC §4).

The views (:mod:`chronicle.store.history.views`) dispatch these node kinds
here; the answers come from :mod:`~chronicle.store.history.blame` and
:mod:`~chronicle.store.history.search`, which the CLI reads too.

=================================  ================================================
node                               what
=================================  ================================================
:class:`BlameDir`                  ``blame/<dir>/``: mirrors a directory, as ``query/``
:class:`BlameFile`                 ``blame/<path>``: JSON Lines, one record per line of the latest version
:class:`HashDir`                   ``hash/``: any hash (prefix) looks up; lists nothing
:class:`HashFile`                  ``hash/<hex>``: JSON, the versions with that content
:class:`TurnsDir`                  ``turns/``: one directory per agent with turns here
:class:`TurnsAgentDir`             ``turns/<agent>/``: its turn numbers
:class:`TurnFile`                  ``turns/<agent>/<n>``: JSON, what the turn wrote
=================================  ================================================

All files are ``rendered`` (st_size 0, read to EOF; content fixed at open).
Errors at lookup: a hash that is not 8-64 hex digits or a prefix several
hashes share is :class:`InvalidArgument` (EINVAL: the name is wrong, not
missing), an unknown one :class:`NotFound` (ENOENT), as are unknown agents,
turns and paths.

Threads: as the views.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chronicle.errors import NotADirectory, NotFound
from chronicle.store.history import blame, points, search
from chronicle.store.history.kinds import DirNode, RenderedNode

if TYPE_CHECKING:
    import lmdb

    from chronicle.store.history.views import HistoryViews


@dataclass(frozen=True, slots=True)
class BlameDir(DirNode):
    """``blame/<path>/`` (``path`` b"" is ``blame/``)."""

    path: bytes


@dataclass(frozen=True, slots=True)
class BlameFile(RenderedNode):
    """``blame/<path>``: the blame of the latest version of a file."""

    path: bytes


@dataclass(frozen=True, slots=True)
class HashDir(DirNode):
    """``hash/``."""


@dataclass(frozen=True, slots=True)
class HashFile(RenderedNode):
    """``hash/<name>``: ``name`` as looked up (a whole hash or a unique prefix)."""

    name: str


@dataclass(frozen=True, slots=True)
class TurnsDir(DirNode):
    """``turns/``."""


@dataclass(frozen=True, slots=True)
class TurnsAgentDir(DirNode):
    """``turns/<agent>/``."""

    agent: str


@dataclass(frozen=True, slots=True)
class TurnFile(RenderedNode):
    """``turns/<agent>/<n>``."""

    agent: str
    turn: int


QueryNode = BlameDir | BlameFile | HashDir | HashFile | TurnsDir | TurnsAgentDir | TurnFile
QUERY_DIRS = (BlameDir, HashDir, TurnsDir, TurnsAgentDir)
QUERY_FILES = (BlameFile, HashFile, TurnFile)
ROOT_QUERIES: dict[bytes, QueryNode] = {b"blame": BlameDir(b""), b"hash": HashDir(), b"turns": TurnsDir()}


def _blame_node(child) -> QueryNode:
    """The blame node of a ``query/`` node (a directory or a file)."""
    return BlameDir(child.path) if child.is_dir else BlameFile(child.path)


def lookup(views: HistoryViews, txn: lmdb.Transaction, node: QueryNode, name: bytes) -> QueryNode:
    """The child ``name`` of a query directory node. Raises :class:`NotFound`,
    :class:`InvalidArgument` (a bad or ambiguous hash), :class:`NotADirectory`."""
    if isinstance(node, BlameDir):
        return _blame_node(views.query_child(txn, node.path, name))
    text = os.fsdecode(name)
    if isinstance(node, HashDir):
        search.hash_lookup(views, text)          # raises if it names no single hash
        return HashFile(text)
    if isinstance(node, TurnsDir):
        if text not in search.turn_agents(views):
            raise NotFound(f"no turns of agent {text!r} here")
        return TurnsAgentDir(text)
    if isinstance(node, TurnsAgentDir):
        number = points.parse_number(text)
        if number is None or number not in search.turn_agents(views).get(node.agent, ()):
            raise NotFound(f"no turn {text!r} of agent {node.agent!r} here")
        return TurnFile(node.agent, number)
    raise NotADirectory()


def listing(views: HistoryViews, txn: lmdb.Transaction, node: QueryNode) -> list[tuple[bytes, QueryNode]]:
    """``(name, node)`` of the children of a query directory node, in ``ls`` order."""
    if isinstance(node, BlameDir):
        return [(name, _blame_node(child)) for name, child in views.query_listing(txn, node.path)]
    if isinstance(node, HashDir):
        return []
    if isinstance(node, TurnsDir):
        return [(os.fsencode(agent), TurnsAgentDir(agent)) for agent in search.turn_agents(views)]
    if isinstance(node, TurnsAgentDir):
        return [(str(n).encode(), TurnFile(node.agent, n)) for n in search.turn_agents(views).get(node.agent, ())]
    raise NotADirectory()


def render(views: HistoryViews, node: QueryNode) -> bytes:
    """The content of a query file node (module docstring). Raises as the query."""
    if isinstance(node, BlameFile):
        return blame.blame(views, node.path).json_lines()
    if isinstance(node, HashFile):
        return (json.dumps(search.hash_lookup(views, node.name), indent=2) + "\n").encode()
    if isinstance(node, TurnFile):
        return (json.dumps(search.turn_changes(views, node.agent, node.turn), indent=2) + "\n").encode()
    raise NotFound(f"{type(node).__name__} has no content")
