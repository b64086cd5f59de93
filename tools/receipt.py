#!/usr/bin/env python3
"""Recompute a Chronicle receipt root from a plain directory (a checkout of a workspace).

Usage: ``tools/receipt.py DIR [--json]`` prints the lowercase hex tree hash of
DIR, which equals the ``root`` of ``chronicle receipt`` for the tree DIR is a
copy of (``cp -a MOUNT/. DIR``, ``rsync -a``, ``tar``), and, with ``--json``,
``{"root", "files", "dirs", "others", "bytes"}``. Exit 0; 2 with a one-line
error for a DIR that cannot be read.

The construction (README "Receipts", ``chronicle/store/history/receipts.py``):
a directory's hash is ``BLAKE3(b"chronicle-receipt-v1 dir\\n" || entries)``,
its entries sorted by name bytes, each ``u32be(len(name)) || name || kind ||
u32be(mode) || digest``: ``f``, ``st_mode & 0o7777``, the file's dense content
hash for a regular file (Chronicle's tree hash over BLAKE3 chunk ids, holes
read as zeros: what ``chronicle hash --dense FILE`` prints,
``chronicle.store.chunks.tree.hash_file``); ``d``, ``st_mode & 0o7777``, its directory hash for a
directory; ``l``, 0, BLAKE3(target) for a symlink; ``o``, ``st_mode``,
BLAKE3(u64be(st_rdev)) for anything else. The root is DIR's own directory
hash (DIR's mode is not in it). Symlinks are never followed; ``.chronicle``
at the top (a mount's magic directory, which ``readdir`` never lists) is
skipped if present.

Needs the ``blake3`` and ``pyfastcdc`` packages (PyPI) and this repository's
``chronicle`` package (found next to this file if it is not installed).
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys

import blake3

try:
    from chronicle.store.chunks.tree import hash_file
except ImportError:                 # run from a checkout of the repository: use its package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from chronicle.store.chunks.tree import hash_file

DIR_DOMAIN = b"chronicle-receipt-v1 dir\n"


def entry(name: bytes, kind: bytes, mode: int, digest: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + kind + struct.pack(">I", mode) + digest


def file_digest(path: bytes) -> bytes:
    """The content hash Chronicle gives the file's bytes, read densely (``chronicle hash --dense``)."""
    return hash_file(path, dense=True)


def tree(root: bytes) -> dict:
    """``{"root", "files", "dirs", "others", "bytes"}`` of the directory ``root``."""
    counts = {"files": 0, "dirs": 0, "others": 0, "bytes": 0}
    # Iterative post-order walk: (path, sorted names, index, entries so far, mode as an entry).
    stack = [[root, _names(root, top=True), 0, [], 0, b""]]
    while True:
        frame = stack[-1]
        path, names, index, parts, mode, name = frame
        if index == len(names):
            hasher = blake3.blake3(DIR_DOMAIN)
            for part in parts:
                hasher.update(part)
            digest = hasher.digest()
            stack.pop()
            if not stack:
                return {"root": digest.hex(), **counts}
            stack[-1][3].append(entry(name, b"d", mode, digest))
            continue
        frame[2] += 1
        child_name = names[index]
        child = os.path.join(path, child_name)
        st = os.lstat(child)
        if stat.S_ISDIR(st.st_mode):
            counts["dirs"] += 1
            stack.append([child, _names(child), 0, [], st.st_mode & 0o7777, child_name])
        elif stat.S_ISREG(st.st_mode):
            counts["files"] += 1
            counts["bytes"] += st.st_size
            parts.append(entry(child_name, b"f", st.st_mode & 0o7777, file_digest(child)))
        elif stat.S_ISLNK(st.st_mode):
            counts["others"] += 1
            parts.append(entry(child_name, b"l", 0, blake3.blake3(os.readlink(child)).digest()))
        else:
            counts["others"] += 1
            parts.append(entry(child_name, b"o", st.st_mode & 0o177777,
                               blake3.blake3(struct.pack(">Q", st.st_rdev)).digest()))


def _names(path: bytes, top: bool = False) -> list[bytes]:
    names = sorted(e.name for e in os.scandir(path))
    return [n for n in names if n != b".chronicle"] if top else names


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--json"]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        result = tree(os.fsencode(args[0]))
    except OSError as exc:
        print(f"receipt: error: {exc.strerror or exc}: {os.fsdecode(exc.filename or args[0])}", file=sys.stderr)
        return 2
    print(json.dumps(result) if "--json" in argv else result["root"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
