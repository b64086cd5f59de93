"""Helpers shared by the mount tests: renameat2, errno outcomes, payloads,
tree snapshots compared between the mount and a plain ext4 directory."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: os.PathLike, dst: os.PathLike, flags: int) -> None:
    """``renameat2(2)`` (glibc >= 2.28); raises ``OSError`` like ``os.rename``."""
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))


def outcome(fn, *args):
    """``("ok", value)`` or ``("err", "ENOENT")``: comparable across two file systems."""
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", errname(exc))


def short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def payload(seed: int, size: int) -> bytes:
    """Incompressible bytes, cheap to describe in a hypothesis example."""
    return random.Random(seed).randbytes(size)


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return f"other:{stat.S_IFMT(mode):o}"


def stat_summary(st_: os.stat_result) -> dict:
    """What must agree between the mount and ext4 (no inode numbers, no times, no dir sizes)."""
    summary = {"kind": kind_of(st_.st_mode), "mode": stat.S_IMODE(st_.st_mode),
               "nlink": st_.st_nlink, "uid": st_.st_uid, "gid": st_.st_gid}
    if not stat.S_ISDIR(st_.st_mode):
        summary["size"] = st_.st_size
    return summary


def read_xattrs(path: str, follow: bool = False) -> dict | str:
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=follow) if n.startswith("user."))
        return {n: os.getxattr(path, n, follow_symlinks=follow) for n in names}
    except OSError as exc:
        return f"error {errname(exc)}"


def snapshot(root: Path, with_xattrs: bool = True) -> dict:
    """Everything comparable about the tree under ``root``, keyed by relative path."""
    tree: dict[str, dict] = {}
    inodes: dict[int, list[str]] = {}

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else str(root)
        names = sorted(os.listdir(full))
        tree[rel or "."] = {"kind": "dir", "children": names}
        for name in names:
            path = f"{rel}/{name}" if rel else name
            fpath = os.path.join(root, path)
            st_ = os.lstat(fpath)
            entry = stat_summary(st_)
            inodes.setdefault(st_.st_ino, []).append(path)
            if stat.S_ISREG(st_.st_mode):
                with open(fpath, "rb") as f:
                    entry["data"] = f.read()
            elif stat.S_ISLNK(st_.st_mode):
                entry["target"] = os.readlink(fpath)
            if with_xattrs:
                entry["xattrs"] = read_xattrs(fpath)
            tree[path] = entry
            if stat.S_ISDIR(st_.st_mode):
                walk(path)

    walk("")
    # Which names are hard links of one another, without comparing inode numbers.
    tree[".links"] = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return tree


def tree_diff(ref: dict, mnt: dict) -> str | None:
    """A readable description of the first differences, or None if equal."""
    lines = []
    for path in sorted(set(ref) | set(mnt)):
        a, b = ref.get(path), mnt.get(path)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{path}: only on {'mount' if a is None else 'ext4'}")
            continue
        if not isinstance(a, dict):
            lines.append(f"{path}: ext4 {a!r}, mount {b!r}")
            continue
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if x == y:
                continue
            if key == "data" and isinstance(x, bytes) and isinstance(y, bytes):
                first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                lines.append(f"{path}: content differs (ext4 {len(x)} bytes, mount {len(y)} bytes, "
                             f"first difference at offset {first})")
            elif key == "mode":
                lines.append(f"{path}: mode ext4 {x:o}, mount {y:o}" if x is not None and y is not None
                             else f"{path}: mode ext4 {x}, mount {y}")
            else:
                lines.append(f"{path}: {key} ext4 {short(x)}, mount {short(y)}")
    return "\n".join(lines[:20]) or None


def model_skip() -> frozenset[str]:
    known = {"xattr", "rename-flags", "create-mode", "fd-flags", "dir-rename"}
    skip = frozenset(s.strip() for s in os.environ.get("CHRONICLE_MODEL_SKIP", "").split(",") if s.strip())
    unknown = skip - known
    if unknown:
        raise ValueError(f"CHRONICLE_MODEL_SKIP: unknown {sorted(unknown)}; known: {sorted(known)}")
    return skip


# --- strategies --------------------------------------------------------------
