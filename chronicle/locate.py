"""Finding the store and workspace behind a path inside a Chronicle mount.

A mount's root answers lookups of ``.chronicle/stats`` (SPEC §4); the mount
daemon writes the absolute ``"store"`` path and the ``"workspace"`` name into
it. :func:`locate` walks up from a path to the nearest mount point
(``os.path.ismount``) and reads that file, so commands run inside a mount (or
given a path inside one) need no ``--store``/``--workspace``.

:func:`select` applies the CLI's rules on top: explicit options first, then
the mount, then the defaults.

Paths are ``str`` here (the CLI's currency) until :func:`select` turns the
workspace-relative path into the store's ``bytes``; relative paths use ``/``.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import UsageError
from chronicle.store.store import check_workspace_name, default_store_path

STATS_FILE = os.path.join(".chronicle", "stats")
_MAX_STATS = 1 << 20


@dataclass(frozen=True)
class Location:
    """Where a path lives: the store, the workspace, and the path relative to
    the workspace root (``""`` for the root itself)."""

    store: Path
    workspace: str
    relpath: str
    mountpoint: Path

    def __iter__(self):
        # Unpacks as the (store_path, workspace, relpath) triple.
        return iter((self.store, self.workspace, self.relpath))


def locate(path: os.PathLike | str) -> Location | None:
    """The Chronicle mount ``path`` is in, or None if it is in none.

    ``path`` need not exist (a deleted file still has a history): the walk
    starts at its nearest existing ancestor. Symlinks are not resolved, so
    a symlink inside a mount names itself. Never raises for a path outside
    a mount; an unreadable or foreign mount point gives None.
    """
    target = os.path.abspath(os.fspath(path))
    probe = target
    while True:
        if os.path.ismount(probe):
            info = _read_stats(probe)
            if info is None:
                return None
            rel = os.path.relpath(target, probe)
            rel = "" if rel == os.curdir else rel.replace(os.sep, "/")
            return Location(Path(info["store"]), info["workspace"], rel, Path(probe))
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def _read_stats(mountpoint: str) -> dict | None:
    """The ``store`` and ``workspace`` keys of the mount's stats file, or None."""
    try:
        with open(os.path.join(mountpoint, STATS_FILE), "rb") as f:
            data = json.loads(f.read(_MAX_STATS))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    store, workspace = data.get("store"), data.get("workspace")
    if not isinstance(store, str) or not isinstance(workspace, str) or not os.path.isabs(store):
        return None
    return {"store": store, "workspace": workspace}


@dataclass
class Target:
    """What a command works on. ``path`` is workspace-relative (``b""``: the
    root; None: no path given). ``workspace_chosen``: named by ``--workspace``
    or by a mount, not taken by default."""

    store: Path
    workspace: str
    path: bytes | None = None
    workspace_chosen: bool = False


def select(store: os.PathLike | None, workspace: str | None, path: str | None = None, *,
           default_workspace: str) -> Target:
    """The store, workspace and workspace-relative path a command means.

    Explicit ``store``/``workspace`` win; otherwise the mount that ``path``
    (or else the current directory) lies in; otherwise the default store
    (``$CHRONICLE_HOME/store``) and ``default_workspace``. Inside a mount,
    ``path`` is relative to the current directory; elsewhere it is relative
    to the workspace root. Raises :class:`UsageError` for a path that leaves
    the workspace (``../x``) or a ``workspace`` that is no valid workspace
    name (``""`` included: it is not taken for "the default").
    """
    if workspace is not None:
        check_workspace_name(workspace)
    try:
        os.getcwd()
        cwd_exists = True
    except FileNotFoundError:
        cwd_exists = False
    if not cwd_exists and (path is None or not os.path.isabs(path)) and store is None:
        raise UsageError("the current directory no longer exists (deleted, or restored away): cd elsewhere")
    loc = locate(path) if path is not None and (cwd_exists or os.path.isabs(path)) else None
    rel = loc.relpath if loc is not None else path
    if loc is None and cwd_exists:
        loc = locate(os.curdir)
    if loc is not None and store is not None and os.path.realpath(store) != os.path.realpath(loc.store):
        loc, rel = None, path           # an explicit other store: PATH is relative to its root
    chosen = store or (loc.store if loc else default_store_path())
    name = workspace if workspace is not None else (loc.workspace if loc else default_workspace)
    return Target(Path(os.path.abspath(chosen)), name, None if rel is None else workspace_path(rel),
                  workspace is not None or loc is not None)


def workspace_path(text: str) -> bytes:
    """``text`` as a normalised workspace-relative path (``b""`` for the root)."""
    norm = posixpath.normpath(text.replace(os.sep, "/")) if text else "."
    norm = norm.lstrip("/") or "."
    if norm == ".." or norm.startswith("../"):
        raise UsageError(f"{text!r} is outside the workspace")
    return b"" if norm == "." else os.fsencode(norm)
