"""fsck's checks of the metadata that names things: inode records, directory
entries (head and history, through fork layers), directory loops, path
entries and the event log (see ``fsck`` for the vocabulary and the rest).

A mixin of ``fsck._Checker``: it uses the checker's snapshot transaction,
its maps of contents and chunks, and ``problem()`` to report.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict

import lmdb

from chronicle.errors import Corrupt
from chronicle.store import model
from chronicle.store.chunks.ids import EMPTY_CONTENT_ID, PRUNED_ID, to_hex
from chronicle.store.fsck.report import _NAMED_IN_DETAILS, _NAMED_IN_MESSAGE, INFO, WARNING, _name_files, _short
from chronicle.store.history.paths import History
from chronicle.store.meta import events, schema
from chronicle.store.meta.journal import path_text
from chronicle.store.meta.schema import P_CONTENT, SEQ_MAX, PathEntry
from chronicle.store.meta.tree import TreeView
from chronicle.store.model import Attrs, is_run, run_versions


class TreeChecks:
    """Inode, directory, path-entry and event checks (mixed into the checker)."""

    def _check_inodes(self) -> None:
        self.progress.start("inodes", self._entries("inodes"))
        has_content = self.content_refcounts.keys() | self.bad_contents
        for n, (key, value) in enumerate(self.items("inodes"), 1):
            self.progress.update(n)
            if len(key) != 20:
                self.problem("inode-corrupt", f"the inode table has a damaged key {bytes(key).hex()}")
                continue
            ws, ino, inv = struct.unpack(">IQQ", key)
            seq = SEQ_MAX - inv
            if ws not in self.workspaces:
                self.orphans[("inodes", ws)] += 1
            k = (ws, ino)
            if k not in self.inode_min_seq or seq < self.inode_min_seq[k]:
                self.inode_min_seq[k] = seq
            try:
                attrs = Attrs.decode(value)
                if is_run(value):
                    run_versions(value, seq)     # every version of a run record reads
            except Corrupt:
                self.problem("inode-corrupt", f"workspace {self.ws_name(ws)!r}: the record of inode {ino} "
                             f"at seq {seq} is damaged", workspace=self.ws_name(ws), ino=ino, seq=seq)
                continue
            if attrs.content == PRUNED_ID:
                continue                 # a version gc pruned: no reference (gc.prune)
            if attrs.content:
                self.content_uses[attrs.content] += 1
                if attrs.content not in has_content:
                    self.missing_contents[attrs.content].append((ws, ino, seq))
            elif attrs.is_file:
                self.problem("inode-corrupt", f"workspace {self.ws_name(ws)!r}: regular file inode {ino} at "
                             f"seq {seq} has no content", WARNING, workspace=self.ws_name(ws), ino=ino, seq=seq)
        self.report.inodes = self._entries("inodes")
        self.progress.finish()

    def _check_content_refcounts(self) -> None:
        if EMPTY_CONTENT_ID not in self.content_refcounts and EMPTY_CONTENT_ID not in self.bad_contents:
            uses = self.content_uses.get(EMPTY_CONTENT_ID, 0)
            p = self.problem("content-missing", "the record of the empty content is missing", content=to_hex(
                EMPTY_CONTENT_ID))
            self.empty_missing = True
            record = schema.empty_record()          # the empty content is never freed: refcount stays 0
            self.other_fixes.append((p, self._fix_put("contents", EMPTY_CONTENT_ID, record.encode(EMPTY_CONTENT_ID))))
        unused = 0
        for content_id, stored in self.content_refcounts.items():
            uses = self.content_uses.get(content_id, 0)
            if content_id == EMPTY_CONTENT_ID:
                uses = 0                          # not counted (journal.put_attrs)
            if uses == 0 and content_id != EMPTY_CONTENT_ID:
                unused += 1
            if stored != uses:
                p = self.problem("content-refcount", f"content {_short(content_id)} has refcount {stored} but "
                                 f"{uses} inode record(s) use it", content=to_hex(content_id), stored=stored,
                                 counted=uses)
                raw = bytes(self.txn.get(content_id, db=self.dbs["contents"]))
                self.content_fixes[content_id] = (raw, uses, p)
        if unused:
            self.problem("content-unused", f"{unused} content(s) are used by no inode record; GC will free "
                         "them", INFO, contents=unused)

    # -- 5. directory entries and path entries ---------------------------------------

    def _has_inode(self, ws: int, ino: int) -> bool:
        layers = self.layers.get(ws)
        if layers is None:
            return True             # records of an unknown workspace are reported as orphans
        for i, layer in enumerate(layers):
            first = self.inode_min_seq.get((layer.ws, ino))
            if first is not None and (i == 0 or first <= layer.bound):
                return True
        return False

    def _check_tree(self) -> None:
        total = self._entries("dirents") + self._entries("dirent_hist") + self._entries("paths")
        self.progress.start("tree", total)
        n = 0
        for db in ("dirents", "dirent_hist"):
            for key, value in self.items(db):
                n += 1
                self.progress.update(n)
                self._check_dirent(db, bytes(key), bytes(value))
        for ws, rec in self.workspaces.items():
            if not self._has_inode(ws, rec.root):
                self.problem("dangling-dirent", f"workspace {rec.name!r}: its root directory (inode {rec.root}) "
                             "has no record", workspace=rec.name, ino=rec.root)
        has_content = self.content_refcounts.keys() | self.bad_contents
        lost_contents = {c for users in self.lost_users.values() for c in users}
        lost_contents |= {c for users in self.lost_node_users.values() for c in users}
        self.recorded_contents: set[tuple[int, int, bytes]] = set()    # (ws, ino, content) of path entries
        self.entry_contents: dict[tuple[int, int, int], bytes] = {}     # (ws, ino, seq) -> content of path entries
        for key, value in self.items("paths"):
            n += 1
            self.progress.update(n)
            self.report.path_entries += 1
            if len(key) < 13:
                self.problem("path-entry-corrupt", f"the path history has a damaged key {bytes(key).hex()}")
                continue
            ws = schema.U32.unpack(key[:4])[0]
            if ws not in self.workspaces:
                self.orphans[("paths", ws)] += 1
            path, seq = schema.path_key_ident(key), schema.path_key_seq(key)
            try:
                entry = PathEntry.decode(value, key)
                if schema.ident_is_long(path):
                    if schema.path_ident(entry.path) != path:
                        raise ValueError("the entry's path does not match its key")
                    path = entry.path
            except (struct.error, ValueError):
                self.problem("path-entry-corrupt", f"workspace {self.ws_name(ws)!r}: the history entry of "
                             f"{path_text(path)!r} at seq {seq} is damaged", workspace=self.ws_name(ws),
                             path=path_text(path), seq=seq)
                continue
            if not entry.flags & P_CONTENT:
                continue
            self.recorded_contents.add((ws, entry.ino, entry.content))
            self.entry_contents[(ws, entry.ino, seq)] = entry.content
            if entry.content not in has_content:
                self.missing_content_paths[entry.content].append((ws, path, seq))
            if entry.content in lost_contents:
                self.affected_paths[entry.content].append((ws, path, seq))
        self.progress.finish()
        self._report_missing_contents()
        self._check_loops()

    def _check_loops(self) -> None:
        """Walk each workspace's head tree: a directory reached twice means
        a loop (``find``, restores and views would never finish); a file
        whose current content no path entry of its inode records is a
        version lost from the history (:meth:`_check_head_recorded`)."""
        self.progress.start("tree-walk", len(self.workspaces))
        for n, (ws, rec) in enumerate(self.workspaces.items(), 1):
            view = TreeView(self.dbs, self.chains[ws], rec.root, env=self.store.env)
            seen = {rec.root: b""}
            stack = [(rec.root, b"")]
            loops = []
            files: dict[int, bytes] = {}
            while stack and len(loops) < _NAMED_IN_MESSAGE:
                dir_ino, dir_path = stack.pop()
                try:
                    children = view.entries(self.txn, dir_ino)
                except (Corrupt, struct.error, lmdb.Error):
                    continue            # damaged entries are reported by the table scan
                for name, child, kind in children:
                    path = dir_path + b"/" + name if dir_path else name
                    if kind == model.KIND_FILE:
                        files.setdefault(child, path)
                    if kind != model.KIND_DIR:
                        continue
                    if child in seen:
                        loops.append((path, seen[child], child))
                        continue
                    seen[child] = path
                    stack.append((child, path))
            for parent in sorted(self.live_dirs.get(ws, set()) - seen.keys())[:_NAMED_IN_MESSAGE]:
                self.problem("tree-unreachable", f"workspace {rec.name!r}: directory inode {parent} has entries "
                             "but cannot be reached from the root (a directory moved into itself?)", WARNING,
                             workspace=rec.name, ino=parent)
            for path, first, child in loops:
                self.problem("tree-loop", f"workspace {rec.name!r}: directory inode {child} is reached both at "
                             f"{path_text(first) or '/'!r} and at {path_text(path)!r}: the tree has a loop",
                             workspace=rec.name, ino=child, paths=[path_text(first), path_text(path)])
            self._check_head_recorded(ws, rec.name, view, files)
            self.progress.update(n)
        self.progress.finish()

    def _check_head_recorded(self, ws: int, name: str, view: TreeView, files: dict[int, bytes]) -> None:
        """Every regular file of the head tree (``files``: inode → a path of
        it) has its current content recorded by a path entry of that inode
        in the workspace's layers: else a commit reached the tree but not the
        history (``versions/`` and ``query/`` cannot show it)."""
        layers = [layer.ws for layer in self.layers.get(ws, [])] or [ws]
        lost = []
        for ino, path in files.items():
            try:
                attrs = view.attrs(self.txn, ino)
            except (Corrupt, struct.error, lmdb.Error):
                continue                # damaged records are reported by the table scans
            if attrs is None or not attrs.is_file or not attrs.content or attrs.content == EMPTY_CONTENT_ID:
                continue
            if not any((layer, ino, attrs.content) in self.recorded_contents for layer in layers):
                lost.append((path, ino, attrs.content))
        for path, ino, content in sorted(lost)[:_NAMED_IN_DETAILS]:
            self.problem("history-missing", f"workspace {name!r}: the current content of {path_text(path)!r} "
                         f"(inode {ino}, content {_short(content)}) is in no path history: that version is "
                         "missing from versions/ and query/", workspace=name, path=path_text(path), ino=ino,
                         content=to_hex(content))
        if len(lost) > _NAMED_IN_DETAILS:
            self.problem("history-missing", f"workspace {name!r}: {len(lost) - _NAMED_IN_DETAILS} more file(s) "
                         "have a current content in no path history", workspace=name,
                         count=len(lost) - _NAMED_IN_DETAILS)

    def _check_dirent(self, db: str, key: bytes, value: bytes) -> None:
        if len(key) < 13:
            self.problem("dirent-corrupt", f"the {db} table has a damaged key {key.hex()}")
            return
        ws, parent = struct.unpack(">IQ", key[:12])
        if db == "dirents":
            name, seq = key[12:], None
        else:
            name, seq = schema.split_dirent_hist_key(key)
        if ws not in self.workspaces:
            if seq is not None:
                self.report.dirents += 1
            self.orphans[(db, ws)] += 1
            return
        if not value:
            if seq is not None:
                self.report.dirents += 1
            return              # whiteout / removal
        if seq is None:
            self.live_dirs[ws].add(parent)
        try:
            if seq is None:
                entries = [(None, schema.decode_dirent(value))]
            else:
                entries = schema.hist_run_versions(value, seq)     # one, or every version of a run
        except struct.error:
            if seq is not None:
                self.report.dirents += 1
            self.problem("dirent-corrupt", f"workspace {self.ws_name(ws)!r}: the entry {path_text(name)!r} of "
                         f"directory inode {parent} is damaged", workspace=self.ws_name(ws))
            return
        if seq is not None:
            self.report.dirents += len(entries)
        for at_seq, entry in entries:
            if entry is None:
                continue
            ino = entry[0]
            at = "" if at_seq is None else f" (seq {at_seq})"
            table = "the current tree" if at_seq is None else "the tree history"
            for what, target in (("directory", parent), ("inode", ino)):
                if not self._has_inode(ws, target):
                    self.problem("dangling-dirent", f"workspace {self.ws_name(ws)!r}: in {table}, the entry "
                                 f"{path_text(name)!r}{at} of directory inode {parent} names {what} {target}, which "
                                 "has no record", workspace=self.ws_name(ws), parent=parent, name=path_text(name),
                                 ino=ino, seq=at_seq)
                    return

    def _report_missing_contents(self) -> None:
        has_content = self.content_refcounts.keys()
        for content_id in self.missing_contents.keys() | self.missing_content_paths.keys():
            if content_id == EMPTY_CONTENT_ID and self.empty_missing:
                continue            # reported (and repairable) on its own
            inodes = self.missing_contents.get(content_id, [])
            paths = self.missing_content_paths.get(content_id, [])
            files = self._file_versions(paths)
            where = _name_files(files) or ", ".join(
                f"{self.ws_name(ws)}: inode {ino} at seq {seq}" for ws, ino, seq in inodes[:_NAMED_IN_MESSAGE])
            p = self.problem("content-missing", f"content {_short(content_id)} is missing, so this data is lost: "
                             f"{where}", content=to_hex(content_id), files=files[:_NAMED_IN_DETAILS],
                             inodes=[{"workspace": self.ws_name(ws), "ino": ino, "seq": seq}
                                     for ws, ino, seq in inodes[:_NAMED_IN_DETAILS]])
            for ws, ino, seq in inodes:
                recorded = self.entry_contents.get((ws, ino, seq))
                if recorded and recorded != content_id and recorded in has_content:
                    # a damaged content id in an inode record: the path entry of the same event holds the true one
                    self.other_fixes.append((p, self._fix_inode_content(ws, ino, seq, content_id, recorded)))

    def _fix_inode_content(self, ws: int, ino: int, seq: int, wrong: bytes, right: bytes):
        """A repair: inode ``ino``'s record at ``seq`` names content ``right``
        (its path entry's) instead of ``wrong`` (missing), with one more
        reference on ``right`` — if the record still names ``wrong``."""
        def fix(txn) -> bool:
            key = schema.inode_key(ws, ino, seq)
            raw = txn.get(key, db=self.dbs["inodes"])
            content = txn.get(right, db=self.dbs["contents"])
            if raw is None or content is None:
                return False
            attrs = Attrs.decode(raw)
            if attrs.content != wrong:
                return False
            size = schema.content_header(bytes(content), right)[0]
            txn.put(key, attrs.replace(content=right, size=size).encode(), db=self.dbs["inodes"])
            if right != EMPTY_CONTENT_ID:
                refcount = schema.content_header(bytes(content), right)[1]
                txn.put(right, schema.content_with_refcount(bytes(content), refcount + 1), db=self.dbs["contents"])
            return True
        return fix

    def _file_versions(self, paths: list[tuple[int, bytes, int]]) -> list[dict]:
        """``[{"workspace", "path", "version", "seq"}]`` of path entries
        (``version`` None where the history cannot say)."""
        out = []
        histories: dict[int, History] = {}
        versions: dict[tuple[int, bytes], dict[int, int]] = {}
        named: set[tuple[int, bytes, int | None]] = set()
        for ws, path, seq in sorted(set(paths))[:_NAMED_IN_DETAILS]:
            number = None
            if ws in self.chains:
                key = (ws, path)
                if key not in versions:
                    history = histories.setdefault(ws, History(self.dbs, self.chains[ws]))
                    try:
                        versions[key] = {v.seq: v.version for v in history.versions(self.txn, path)}
                    except Exception:   # a damaged history must not stop the check
                        versions[key] = {}
                number = versions[key].get(seq)
            if number is not None and (ws, path, number) in named:
                continue            # a rename or restore entry that kept the version
            named.add((ws, path, number))
            out.append({"workspace": self.ws_name(ws), "path": path_text(path), "version": number, "seq": seq})
        return out

    # -- 6. events and snapshots -----------------------------------------------------

    def _check_events(self) -> None:
        self.progress.start("events", self._entries("events"))
        expected: dict[int, int] = {ws: (rec.fork_seq or 0) + 1 for ws, rec in self.workspaces.items()}
        gaps: dict[int, list[tuple[int, int]]] = defaultdict(list)
        stray: dict[int, list[int]] = defaultdict(list)
        for n, (key, value) in enumerate(self.items("events"), 1):
            self.progress.update(n)
            self.report.events += 1
            if len(key) != 12:
                self.problem("event-corrupt", f"the event log has a damaged key {bytes(key).hex()}")
                continue
            ws, seq = struct.unpack(">IQ", key)
            if ws not in self.workspaces:
                self.orphans[("events", ws)] += 1
                continue
            low, head = (self.workspaces[ws].fork_seq or 0) + 1, self.heads.get(ws, 0)
            if seq < low or seq > head:
                stray[ws].append(seq)
                continue
            if seq > expected[ws]:
                gaps[ws].append((expected[ws], seq - 1))
            expected[ws] = seq + 1
            try:
                line = events.decode(seq, value)      # a packed record or an old JSON line (meta.events)
                ok = isinstance(line, dict) and line.get("seq") == seq
                if ok and line.get("event") == "dropped" and isinstance(line.get("through"), int):
                    expected[ws] = max(expected[ws], line["through"] + 1)   # gc.unversioned's summary line
            except ValueError:
                ok = False
            if not ok:
                self.problem("event-corrupt", f"workspace {self.ws_name(ws)!r}: the log line of seq {seq} is "
                             "damaged", workspace=self.ws_name(ws), seq=seq)
        for ws, nxt in expected.items():
            if nxt <= self.heads.get(ws, 0):
                gaps[ws].append((nxt, self.heads[ws]))
        for ws, ranges in gaps.items():
            text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:10])
            self.problem("event-missing", f"workspace {self.ws_name(ws)!r}: the log has no line for seq {text}",
                         workspace=self.ws_name(ws), seqs=[list(r) for r in ranges])
        for ws, seqs in stray.items():
            self.problem("event-stray", f"workspace {self.ws_name(ws)!r}: {len(seqs)} log line(s) lie outside "
                         f"its seq range (e.g. seq {seqs[0]})", WARNING, workspace=self.ws_name(ws),
                         seqs=seqs[:_NAMED_IN_DETAILS])
        self.progress.finish()

        for key, value in self.items("snapshots"):
            ws = schema.U32.unpack(key[:4])[0]
            name = bytes(key[4:]).decode(errors="replace")
            if ws not in self.workspaces:
                self.orphans[("snapshots", ws)] += 1
                continue
            try:
                seq = json.loads(value)["seq"]
            except (ValueError, KeyError, TypeError):
                self.problem("snapshot-corrupt", f"workspace {self.ws_name(ws)!r}: snapshot {name!r} is damaged",
                             WARNING, workspace=self.ws_name(ws), snapshot=name)
                continue
            if not isinstance(seq, int) or seq < 0 or seq > self.heads.get(ws, 0):
                self.problem("snapshot-corrupt", f"workspace {self.ws_name(ws)!r}: snapshot {name!r} names seq "
                             f"{seq}, which the workspace does not have", WARNING, workspace=self.ws_name(ws),
                             snapshot=name)

    # -- 7. whole-file hashes ----------------------------------------------------------
