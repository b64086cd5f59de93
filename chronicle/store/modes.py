"""Who may read a store's files: private by default, or shared with one group.

A store holds the plaintext of every version of every file, so by default
no other local user may read it: directories ``0700``, files ``0600``
(:data:`PRIVATE`). ``chronicle init --shared-group GROUP`` makes a store
shared with the members of GROUP instead: directories ``2770`` (setgid, so
what anyone creates in them belongs to GROUP), files ``0660``, group GROUP;
the choice is recorded in ``store.json`` (``"shared_group"``, ``"gid"``).

Modes are set explicitly after each creation (``os.open``'s and
``mkdir``'s modes are masked by the umask, which would leave a shared
store's files unwritable by the group). :func:`tighten` puts every
directory and file of a store to its modes; opening a store does it, and
warns (a log line) when the store's directories were readable by others —
an old store made before stores were private.

Threads: any; nothing here holds state.
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from chronicle.errors import UsageError

SUBDIRS = ("meta", "packs", "staging", "run")


@dataclass(frozen=True, slots=True)
class StoreModes:
    """``dir_mode``, ``file_mode`` (permission bits, with setgid for a shared
    store's directories) and ``gid`` (the shared group, or None)."""

    dir_mode: int
    file_mode: int
    gid: int | None = None

    @classmethod
    def shared(cls, group: str) -> StoreModes:
        """The modes of a store shared with ``group`` (a name or a numeric
        gid). Raises :class:`UsageError` for a group this system does not know."""
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            raise UsageError(f"no group {group!r} on this system (see getent group)") from None
        return cls(0o2770, 0o660, gid)

    @classmethod
    def of(cls, config: dict) -> StoreModes:
        """The modes ``store.json`` records (:data:`PRIVATE` if it names no group)."""
        gid = config.get("gid")
        return PRIVATE if not isinstance(gid, int) or isinstance(gid, bool) else cls(0o2770, 0o660, gid)

    def record(self) -> dict:
        """The ``store.json`` fields of these modes (none for a private store)."""
        if self.gid is None:
            return {}
        try:
            name = grp.getgrgid(self.gid).gr_name
        except KeyError:
            name = str(self.gid)
        return {"shared_group": name, "gid": self.gid}

    # -- applying --------------------------------------------------------------------------

    def fix_fd(self, fd: int) -> None:
        """Give the file open at ``fd`` (just created by this process) its mode and group."""
        try:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.file_mode)
        except PermissionError:          # a file of another member of the group: it set it
            pass

    def mkdir(self, path: Path) -> None:
        """Make directory ``path`` if missing, with its mode and group."""
        try:
            path.mkdir()
        except FileExistsError:
            return
        self.fix_path(path, True)

    def fix_path(self, path: Path, is_dir: bool) -> None:
        """Give ``path`` (a directory if ``is_dir``) its mode and group (not if another user owns it)."""
        try:
            if self.gid is not None:
                os.chown(path, -1, self.gid, follow_symlinks=False)
            os.chmod(path, self.dir_mode if is_dir else self.file_mode, follow_symlinks=False)
        except PermissionError:
            pass

    def write_file(self, path: Path, data: bytes) -> None:
        """Write ``path`` whole (through a temporary file and a rename), with its mode and group."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
        try:
            self.fix_fd(fd)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)


PRIVATE = StoreModes(0o700, 0o600)


@dataclass
class Tightened:
    """What :func:`tighten` changed: ``open_dirs`` of the store's own
    directories (itself and :data:`SUBDIRS`) that others could read or
    search, and how many directories and files in all got their modes."""

    open_dirs: list[str]
    changed: int

    @property
    def was_open(self) -> bool:
        return bool(self.open_dirs)


def _same_fs(path: Path, dev: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_dev == dev and not os.path.ismount(path)


def tighten(root: Path, modes: StoreModes) -> Tightened:
    """Put every directory and file under store ``root`` (and ``root``) to
    ``modes``: permission bits exactly ``dir_mode``/``file_mode``, group
    ``gid`` for a shared store. Symlinks, what belongs to another user
    (which only its owner may change) and other filesystems mounted below
    ``root`` (workspaces the runtime mounts in ``agents/``) are left as they are. Raises
    ``OSError`` only for ``root`` itself not being readable."""
    open_dirs: list[str] = []
    changed = 0
    own = {root, *(root / sub for sub in SUBDIRS)}
    uid = os.getuid()
    root_dev = os.lstat(root).st_dev
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        # Never cross into another filesystem: a workspace may be mounted inside
        # the store (the runtime's <store>/agents/<id>/workspace), and its files
        # are the user's, with the modes the user gave them.
        dirs[:] = [name for name in dirs if _same_fs(here / name, root_dev)]
        for path, is_dir in [(here, True)] + [(here / name, False) for name in files]:
            try:
                st = os.lstat(path)
            except FileNotFoundError:       # removed meanwhile (a lock, a temporary file)
                continue
            if stat.S_ISLNK(st.st_mode) or (uid != 0 and st.st_uid != uid):
                continue
            want = modes.dir_mode if is_dir else modes.file_mode
            wrong_group = modes.gid is not None and st.st_gid != modes.gid
            if stat.S_IMODE(st.st_mode) == want and not wrong_group:
                continue
            if is_dir and path in own and st.st_mode & 0o007 & ~want:
                open_dirs.append(str(path))
            modes.fix_path(path, is_dir)
            changed += 1
    return Tightened(open_dirs, changed)
