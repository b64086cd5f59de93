"""Model-based tests of the mount: the same operations on the mount and on ext4.

``FsModel`` is a hypothesis state machine. Each rule runs one file-system
operation twice -- first in a plain directory on ext4 (the model), then in a
fresh directory inside the shared mount -- and requires the same outcome: the
same return value, or the same errno. After every step the invariant compares
the two whole trees: names, types, sizes, permission bits, nlink, uid/gid,
hard-link groups, file contents, symlink targets and ``user.`` xattrs. Inode
numbers and timestamps are not compared.

The focused tests in ``test_fs_posix.py`` cover what a state machine drives
badly: mmap, O_APPEND from two fds, far sparse files, fsync, statfs, absurd
sizes, locks.

``$CHRONICLE_MODEL_EXAMPLES`` overrides the number of examples;
``$CHRONICLE_MODEL_SKIP`` (comma-separated: ``xattr``, ``rename-flags``,
``create-mode``, ``fd-flags``, ``dir-rename``) leaves features out -- only
for narrowing down failures on a stand-in target that lacks them, never for
Chronicle itself. pyfuse3's passthrough example lacks all five: it has no
xattr handlers, rejects rename flags, ignores the mode of create(), shares
one backing fd per inode (opened with the first opener's flags, so a second
open's O_APPEND, O_TRUNC or access mode is lost), and keeps the old paths of
a renamed directory's children.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from fsutil import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    kind_of,
    model_skip,
    outcome,
    payload,
    renameat2,
    short,
    snapshot,
    stat_summary,
    tree_diff,
)
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

NAMES = ["a", "b", "c", "d"]
NEW_NAMES = NAMES + ["e", "f"]  # "populate" never makes e or f: room for new names
RANDOM_PATH = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
OFFSETS = st.one_of(st.integers(0, 5000), st.integers(0, 100_000))
SIZES = st.one_of(st.integers(0, 5000), st.integers(0, 120_000))
READ_SIZES = st.one_of(st.integers(0, 5000), st.integers(0, 150_000))
DATA = st.builds(payload, st.integers(0, 2**32 - 1),
                 st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 33_000)))
FILE_MODES = st.integers(0, 0o777).map(lambda m: m | 0o600)
DIR_MODES = st.integers(0, 0o777).map(lambda m: m | 0o700)
SYMLINK_TARGETS = st.one_of(RANDOM_PATH, st.sampled_from([".", "", "/nonexistent-chronicle-target",
                                                          "x" * 300, "y" * 5000]))
XATTR_NAMES = st.sampled_from(["user.one", "user.two", "user.a-longer.name", "user." + "x" * 300])
XATTR_VALUES = st.one_of(st.just(b""), st.binary(max_size=16),
                         st.builds(payload, st.integers(0, 2**32 - 1), st.integers(0, 200)))
LONG_NAME_LENGTHS = st.sampled_from([256, 300, 1100, 5000])

_example_ids = itertools.count(1)


class FsModel(RuleBasedStateMachine):
    """Random operations on ``<mount>/mnt_base/<example>`` and on ``ref_base/<example>`` (ext4).

    ``mount_handle.get()`` gives the mount, restarted if an earlier example
    crashed its daemon -- so hypothesis can replay and shrink a crash too.
    """

    mount_handle = None
    mnt_base: Path          # relative to the mount's root
    ref_base: Path
    skip: frozenset[str] = frozenset()

    def __init__(self):
        super().__init__()
        tag = f"ex-{next(_example_ids)}"
        self.ref = self.ref_base / tag
        self.mnt = self.mount_handle.get().path / self.mnt_base / tag
        os.mkdir(self.ref)
        os.mkdir(self.mnt)
        self.fds: list[tuple[int, int, str]] = []  # (ext4 fd, mount fd, description)

    # -- running one operation on both sides --

    def both(self, what: str, fn):
        """Run ``fn(root)`` on ext4, then on the mount; the outcomes must be equal."""
        ref = outcome(fn, self.ref)
        mnt = outcome(fn, self.mnt)
        note(f"{what} -> {short(ref)}")
        self.check(what, mnt, ref)
        return ref

    @staticmethod
    def check(what: str, mnt, ref) -> None:
        if mnt == ("err", "ENOTCONN"):
            raise AssertionError(f"{what}: the mount daemon is gone (ENOTCONN); its log is in the report")
        assert mnt == ref, f"{what}: mount gave {short(mnt)}, ext4 gave {short(ref)}"

    def both_fd(self, what: str, index: int, fn):
        """Run ``fn(fd)`` on the index-th pair of open fds."""
        ref_fd, mnt_fd, desc = self.fds[index]
        ref = outcome(fn, ref_fd)
        mnt = outcome(fn, mnt_fd)
        note(f"{what} on fd {desc} -> {short(ref)}")
        self.check(f"{what} on fd {desc}", mnt, ref)
        return ref

    def create_mode(self, mode: int) -> int:
        # A stand-in that ignores the mode of create() gives 0o777 less its umask.
        return 0o777 if "create-mode" in self.skip else mode

    # -- choosing paths (the ext4 side is the model of what exists) --

    def _entries(self) -> dict[str, str]:
        found = {}

        def walk(rel: str) -> None:
            full = os.path.join(self.ref, rel) if rel else str(self.ref)
            for name in os.listdir(full):
                path = f"{rel}/{name}" if rel else name
                kind = kind_of(os.lstat(os.path.join(self.ref, path)).st_mode)
                found[path] = kind
                if kind == "dir":
                    walk(path)

        walk("")
        return found

    def pick(self, data, kinds=("file", "dir", "symlink"), label="path") -> str:
        """Mostly an existing entry of one of ``kinds``; sometimes any path at all."""
        existing = sorted(p for p, k in self._entries().items() if k in kinds)
        if existing and data.draw(st.integers(0, 4), label=f"{label} exists?") > 0:
            return data.draw(st.sampled_from(existing), label=label)
        return data.draw(RANDOM_PATH, label=label)

    def pick_new(self, data, label="new path") -> str:
        """A name in an existing directory (which may itself exist already)."""
        dirs = [""] + sorted(p for p, k in self._entries().items() if k == "dir")
        parent = data.draw(st.sampled_from(dirs), label=f"{label} parent")
        name = data.draw(st.sampled_from(NEW_NAMES), label=f"{label} name")
        return f"{parent}/{name}" if parent else name

    def pick_xattr(self, data) -> tuple[str, str]:
        """Mostly an xattr that exists (on ext4); sometimes any path and name."""
        existing = []
        for path in sorted(self._entries()):
            try:
                names = os.listxattr(os.path.join(self.ref, path), follow_symlinks=False)
            except OSError:
                continue
            existing.extend((path, n) for n in sorted(names) if n.startswith("user."))
        if existing and data.draw(st.integers(0, 3), label="xattr exists?") > 0:
            return data.draw(st.sampled_from(existing), label="path, xattr")
        return self.pick(data), data.draw(XATTR_NAMES, label="xattr")

    # -- a populated start, so that most operations meet something that exists --

    @initialize(sizes=st.lists(st.one_of(st.integers(0, 100), st.integers(0, 70_000)), min_size=4, max_size=4),
                seed=st.integers(0, 2**32 - 1))
    def populate(self, sizes, seed):
        def op(root):
            for d in ("a", "b", "b/c"):
                os.mkdir(os.path.join(root, d))
            for path, size in zip(("c", "a/a", "a/b", "b/c/d"), sizes):
                fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT, self.create_mode(0o644))
                try:
                    os.write(fd, payload(seed, size))
                finally:
                    os.close(fd)
            os.symlink("a", os.path.join(root, "d"))
        self.both(f"populate with file sizes {sizes}", op)

    # -- rules: paths --

    @rule(data=st.data(), excl=st.booleans(), trunc=st.booleans(), mode=FILE_MODES)
    def create(self, data, excl, trunc, mode):
        path = self.pick_new(data) if data.draw(st.booleans(), label="new?") else self.pick(data)
        if "fd-flags" in self.skip and self.fds:
            trunc = False
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        mode = self.create_mode(mode)

        def op(root):
            os.close(os.open(os.path.join(root, path), flags, mode))
        self.both(f"create {path} excl={excl} trunc={trunc} mode={mode:o}", op)

    @rule(data=st.data(), offset=OFFSETS, buf=DATA)
    def write(self, data, offset, buf):
        path = self.pick(data, ("file", "symlink"))

        def op(root):
            fd = os.open(os.path.join(root, path), os.O_WRONLY)
            try:
                return os.pwrite(fd, buf, offset)
            finally:
                os.close(fd)
        self.both(f"write {path} at {offset} ({len(buf)} bytes)", op)

    @rule(data=st.data(), offset=OFFSETS, size=READ_SIZES)
    def read(self, data, offset, size):
        path = self.pick(data)

        def op(root):
            fd = os.open(os.path.join(root, path), os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        self.both(f"read {path} at {offset} ({size} bytes)", op)

    @rule(data=st.data(), size=SIZES)
    def truncate(self, data, size):
        path = self.pick(data, ("file", "symlink"))
        self.both(f"truncate {path} to {size}", lambda root: os.truncate(os.path.join(root, path), size))

    @rule(data=st.data(), flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data, flags):
        if flags and "rename-flags" in self.skip:
            flags = 0
        src = self.pick(data, label="src")
        dst = self.pick(data, label="dst") if data.draw(st.booleans(), label="dst exists?") \
            else self.pick_new(data, label="dst")
        if "dir-rename" in self.skip and os.path.isdir(os.path.join(self.ref, src)) \
                and not os.path.islink(os.path.join(self.ref, src)):
            return

        def op(root):
            if flags:
                renameat2(os.path.join(root, src), os.path.join(root, dst), flags)
            else:
                os.rename(os.path.join(root, src), os.path.join(root, dst))
        self.both(f"rename {src} -> {dst} flags={flags}", op)

    @rule(data=st.data())
    def unlink(self, data):
        path = self.pick(data, ("file", "symlink", "dir"))
        self.both(f"unlink {path}", lambda root: os.unlink(os.path.join(root, path)))

    @rule(data=st.data(), mode=DIR_MODES)
    def mkdir(self, data, mode):
        path = self.pick_new(data)
        self.both(f"mkdir {path} {mode:o}", lambda root: os.mkdir(os.path.join(root, path), mode))

    @rule(data=st.data())
    def rmdir(self, data):
        path = self.pick(data, ("dir", "dir", "file", "symlink"))
        self.both(f"rmdir {path}", lambda root: os.rmdir(os.path.join(root, path)))

    @rule(data=st.data(), follow=st.booleans())
    def link(self, data, follow):
        src = self.pick(data, ("file", "symlink", "dir"), label="src")
        dst = self.pick_new(data, label="dst")
        self.both(f"link {src} -> {dst} follow={follow}",
                  lambda root: os.link(os.path.join(root, src), os.path.join(root, dst),
                                       follow_symlinks=follow))

    @rule(data=st.data(), link_target=SYMLINK_TARGETS)  # `target` is taken by hypothesis
    def symlink(self, data, link_target):
        path = self.pick_new(data)
        self.both(f"symlink {path} -> {short(link_target, 40)}",
                  lambda root: os.symlink(link_target, os.path.join(root, path)))

    @rule(data=st.data())
    def readlink(self, data):
        path = self.pick(data, ("symlink", "symlink", "file"))
        self.both(f"readlink {path}", lambda root: os.readlink(os.path.join(root, path)))

    @rule(data=st.data())
    def chmod(self, data):
        path = self.pick(data)
        is_dir = os.path.isdir(os.path.join(self.ref, path))
        mode = data.draw(DIR_MODES if is_dir else FILE_MODES, label="mode")
        self.both(f"chmod {path} {mode:o}", lambda root: os.chmod(os.path.join(root, path), mode))

    @rule(data=st.data(), follow=st.booleans())
    def stat(self, data, follow):
        path = self.pick(data)
        self.both(f"stat {path} follow={follow}",
                  lambda root: stat_summary(os.stat(os.path.join(root, path), follow_symlinks=follow)))

    @rule(data=st.data())
    def listdir(self, data):
        path = self.pick(data, ("dir", "dir", "file", "symlink"))
        self.both(f"listdir {path}", lambda root: sorted(os.listdir(os.path.join(root, path))))

    @rule(data=st.data(), op=st.sampled_from(["create", "mkdir", "symlink", "rename", "link", "open", "stat"]),
          length=LONG_NAME_LENGTHS)
    def long_name(self, data, op, length):
        parent = data.draw(st.sampled_from([""] + sorted(
            p for p, k in self._entries().items() if k == "dir")), label="parent")
        name = "n" * length
        path = f"{parent}/{name}" if parent else name
        existing = self.pick(data, label="existing")

        def run(root):
            full, other = os.path.join(root, path), os.path.join(root, existing)
            if op == "create":
                os.close(os.open(full, os.O_WRONLY | os.O_CREAT, 0o644))
            elif op == "mkdir":
                os.mkdir(full)
            elif op == "symlink":
                os.symlink("a", full)
            elif op == "rename":
                os.rename(other, full)
            elif op == "link":
                os.link(other, full)
            elif op == "open":
                os.close(os.open(full, os.O_RDONLY))
            else:
                os.stat(full)
        self.both(f"{op} with a {length}-byte name in {parent or '.'} (existing: {existing})", run)

    # -- rules: xattrs --

    @precondition(lambda self: "xattr" not in self.skip)
    @rule(data=st.data(), name=XATTR_NAMES, value=XATTR_VALUES,
          flags=st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]), follow=st.booleans())
    def setxattr(self, data, name, value, flags, follow):
        path = self.pick(data)
        self.both(f"setxattr {path} {short(name, 30)}={short(value, 30)} flags={flags} follow={follow}",
                  lambda root: os.setxattr(os.path.join(root, path), name, value, flags,
                                           follow_symlinks=follow))

    @precondition(lambda self: "xattr" not in self.skip)
    @rule(data=st.data(), follow=st.booleans())
    def getxattr(self, data, follow):
        path, name = self.pick_xattr(data)
        self.both(f"getxattr {path} {short(name, 30)} follow={follow}",
                  lambda root: os.getxattr(os.path.join(root, path), name, follow_symlinks=follow))

    @precondition(lambda self: "xattr" not in self.skip)
    @rule(data=st.data(), follow=st.booleans())
    def listxattr(self, data, follow):
        path = self.pick(data)
        self.both(f"listxattr {path} follow={follow}",
                  lambda root: sorted(n for n in os.listxattr(os.path.join(root, path), follow_symlinks=follow)
                                      if n.startswith("user.")))

    @precondition(lambda self: "xattr" not in self.skip)
    @rule(data=st.data(), follow=st.booleans())
    def removexattr(self, data, follow):
        path, name = self.pick_xattr(data)
        self.both(f"removexattr {path} {short(name, 30)} follow={follow}",
                  lambda root: os.removexattr(os.path.join(root, path), name, follow_symlinks=follow))

    # -- rules: open file descriptors (incl. unlinked open files) --

    def _open_pair(self, what: str, path: str, flags: int, mode: int = 0o644, unlink: bool = False) -> None:
        def op(root):
            fd = os.open(os.path.join(root, path), flags, mode)
            if unlink:
                try:
                    os.unlink(os.path.join(root, path))
                except OSError:
                    os.close(fd)
                    raise
            return fd
        ref = outcome(op, self.ref)
        mnt = outcome(op, self.mnt)
        note(f"{what} -> {ref[0] if ref[0] == 'ok' else ref}")
        if ref[0] == mnt[0] == "ok":
            self.fds.append((ref[1], mnt[1], f"#{len(self.fds)} {what}"))
            return
        for kind, fd in (ref, mnt):
            if kind == "ok":
                os.close(fd)
        self.check(what, mnt, ref)

    @precondition(lambda self: len(self.fds) < 4)
    @rule(data=st.data(), access=st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]),
          append=st.booleans(), creat=st.booleans())
    def open_fd(self, data, access, append, creat):
        path = self.pick_new(data) if creat and data.draw(st.booleans(), label="new?") else self.pick(data)
        if "fd-flags" in self.skip:
            access, append = os.O_RDWR, False
        flags = access | (os.O_APPEND if append else 0) | (os.O_CREAT if creat else 0)
        mode = self.create_mode(0o644)
        self._open_pair(f"open {path} flags={flags:#o}", path, flags, mode)

    @precondition(lambda self: len(self.fds) < 4)
    @rule(data=st.data())
    def open_then_unlink(self, data):
        path = self.pick(data, ("file",))
        self._open_pair(f"open {path} O_RDWR, unlink it", path, os.O_RDWR, unlink=True)

    def _fd_index(self, data) -> int:
        return data.draw(st.integers(0, len(self.fds) - 1), label="fd")

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), offset=OFFSETS, buf=DATA)
    def fd_write(self, data, offset, buf):
        def op(fd):
            os.lseek(fd, offset, os.SEEK_SET)  # O_APPEND still writes at the end
            return os.write(fd, buf), os.lseek(fd, 0, os.SEEK_CUR)
        self.both_fd(f"write at {offset} ({len(buf)} bytes)", self._fd_index(data), op)

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), offset=OFFSETS, size=READ_SIZES)
    def fd_read(self, data, offset, size):
        self.both_fd(f"pread at {offset} ({size} bytes)", self._fd_index(data),
                     lambda fd: os.pread(fd, size, offset))

    @precondition(lambda self: self.fds)
    @rule(data=st.data(), size=SIZES)
    def fd_truncate(self, data, size):
        self.both_fd(f"ftruncate to {size}", self._fd_index(data), lambda fd: os.ftruncate(fd, size))

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def fd_stat(self, data):
        self.both_fd("fstat", self._fd_index(data), lambda fd: stat_summary(os.fstat(fd)))

    @precondition(lambda self: self.fds)
    @rule(data=st.data())
    def fd_close(self, data):
        index = self._fd_index(data)
        self.both_fd("close", index, os.close)
        del self.fds[index]

    # -- the invariant and teardown --

    @invariant()
    def trees_equal(self):
        with_xattrs = "xattr" not in self.skip
        diff = tree_diff(snapshot(self.ref, with_xattrs), snapshot(self.mnt, with_xattrs))
        assert diff is None, f"trees differ after the last step:\n{diff}"

    def teardown(self):
        for ref_fd, mnt_fd, _ in self.fds:
            for fd in (ref_fd, mnt_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds.clear()
        for root in (self.ref, self.mnt):
            _rmtree(root)


def _rmtree(root: Path) -> None:
    """Remove a tree through the file system under test (an error is a test failure)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            path = os.path.join(dirpath, name)
            (os.unlink if os.path.islink(path) else os.rmdir)(path)
    os.rmdir(root)


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("CHRONICLE_MODEL_EXAMPLES") or 100),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


def test_fs_model(session_mount_handle, tmp_path):
    """The mount behaves like ext4 under random operation sequences."""
    mount = session_mount_handle.get()
    machine = type("FsModelRun", (FsModel,), {
        "mount_handle": session_mount_handle,
        "mnt_base": mount.mkdtemp("fs-model-").relative_to(mount.path),
        "ref_base": tmp_path,
        "skip": model_skip(),
    })
    run_state_machine_as_test(machine, settings=MODEL_SETTINGS)
