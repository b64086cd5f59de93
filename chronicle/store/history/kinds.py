"""What kind of ``.chronicle/`` node a node class is (see ``nodes``).

Each node class derives from one of these, which fixes three class-level
facts the FUSE adapter needs: ``is_dir``; ``rendered`` — content made at open
whose size is unknown before (``direct_io``); ``immutable`` — never changes
once it exists, so the kernel may keep its attributes and pages.

Threads: plain classes; any thread.
"""

from __future__ import annotations

from typing import ClassVar


class FileNode:
    """A file whose content may change (``ctl``, ``stats``): neither rendered nor immutable."""

    __slots__ = ()
    is_dir: ClassVar[bool] = False
    rendered: ClassVar[bool] = False
    immutable: ClassVar[bool] = False


class DirNode(FileNode):
    """A directory."""

    __slots__ = ()
    is_dir: ClassVar[bool] = True


class RenderedNode(FileNode):
    """A file rendered when it is opened (JSON, JSON Lines)."""

    __slots__ = ()
    rendered: ClassVar[bool] = True


class StoredNode(FileNode):
    """A file whose content is a stored version: immutable."""

    __slots__ = ()
    immutable: ClassVar[bool] = True
