"""What the web timeline's pages show, read from the store: FUSE-free, never through a mount.

Every function here takes an open :class:`~chronicle.store.store.Store` (or
a :class:`~chronicle.store.history.views.HistoryViews` of one workspace, as
its caller may see it) and returns plain values (dicts, lists, str, bytes)
that the templates render. Files, versions, trees and log events come from
``chronicle.store.history.views`` and ``points``, so the web timeline shows
exactly what ``.chronicle/`` and the CLI show the same user; turn records,
agent records and states from the turn log (``chronicle.store.history.turns``).

Shapes:

- a **fork tree**: a list of roots, each ``{"name", ..., "children": [...]}``;
- a **turn row**: ``{"turn", "owner", "kind", "status", "time", "duration_ms",
  "message", "reply", "usage", "events", "patch_ops", "error"}`` (``owner``:
  the agent whose record it is — a fork's turns before its fork turn are its
  parent's; ``events``: file events in the turn's seq range);
- a **file diff**: ``{"path", "before", "after", "kind", "lines"}`` with
  ``kind`` ``text`` (``lines``: a unified diff, :func:`difflib.unified_diff`),
  ``binary``, ``large`` or ``denied``.

Errors: :class:`NotFound` (no such workspace, agent, turn, path, version or
point), :class:`PermissionDenied` (the caller may not read it),
:class:`InvalidArgument` (a malformed point), as the store raises them.

Threads: plain synchronous functions; each read opens its own LMDB read
transaction (through the views and the turn log), so any thread may call them.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
from collections.abc import Iterable
from typing import Any

from chronicle.errors import IsADirectory, NotADirectory, NotFound, PermissionDenied
from chronicle.store.history import points
from chronicle.store.history.access import Caller
from chronicle.store.history.nodes import TreeNode
from chronicle.store.history.turns import TurnLog
from chronicle.store.history.views import HistoryViews
from chronicle.store.store import Store

PAGE_SIZE = 50              # turns per page of an agent's timeline
DIFF_LIMIT = 1 << 20        # bytes: larger versions are compared, not diffed line by line
DIFFS_PER_TURN = 100        # files diffed on one turn page
LISTING_LIMIT = 2000        # entries shown of one directory in the tree browser
SHORT = 120                 # characters of a message or reply in a turn row


# -- fork trees ---------------------------------------------------------------------------------


def _forest(nodes: list[dict], parent_of) -> list[dict]:
    """Nest ``nodes`` (each gets ``children``) under their parents; a node whose parent is unknown is a root."""
    by_name = {n["name"]: n for n in nodes}
    roots = []
    for node in nodes:
        node["children"] = []
    for node in nodes:
        parent = parent_of(node)
        (by_name[parent]["children"] if parent in by_name and parent != node["name"] else roots).append(node)
    return roots


def workspace_tree(store: Store) -> list[dict]:
    """The store's workspaces as a fork tree: ``{"name", "head_seq", "created",
    "parent", "fork_seq", "mountpoint", "agent", "children"}`` (``agent``:
    the workspace is an agent's)."""
    log = TurnLog(store)
    agents = {a["id"] for a in log.agents()}
    nodes = [{"name": w.name, "head_seq": w.head_seq, "created": w.created, "parent": w.parent,
              "fork_seq": w.fork_seq, "mountpoint": w.mounted["mountpoint"] if w.mounted else None,
              "agent": w.name in agents} for w in store.workspaces()]
    return _forest(sorted(nodes, key=lambda n: n["name"]), lambda n: n["parent"])


def agent_tree(store: Store) -> list[dict]:
    """The store's agents as a fork tree: ``{"name", "status", "last_turn",
    "message_turns", "parent": {"agent", "turn"} | None, "target", "created", "children"}``."""
    nodes = [{"name": a["id"], "status": a.get("status"), "last_turn": a.get("last_turn", 0),
              "message_turns": a.get("message_turns", 0), "parent": a.get("parent"), "target": a.get("target"),
              "created": a.get("created")} for a in TurnLog(store).agents()]
    return _forest(sorted(nodes, key=lambda n: n["name"]), lambda n: (n["parent"] or {}).get("agent"))


# -- an agent's turns ---------------------------------------------------------------------------


def short(value: Any, width: int = SHORT) -> str:
    """``value`` on one line (JSON unless a string), cut to ``width`` characters with an ellipsis."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def lineage_records(log: TurnLog, agent: str, lo: int, hi: int) -> list[tuple[str, dict]]:
    """``(owner, record)`` of the turns ``lo..hi`` along ``agent``'s lineage,
    oldest first, reading only those records (a fork's turns before its
    ``first_turn`` are its parent's). Raises :class:`AgentNotFound`."""
    info = log.get(agent)
    first, parent = info.get("first_turn", 0), info.get("parent")
    out: list[tuple[str, dict]] = []
    if parent and lo < first:
        try:
            out = lineage_records(log, parent["agent"], lo, min(hi, first - 1))
        except NotFound:
            out = []
    if hi >= max(lo, first if parent else 0):
        out.extend((agent, rec) for rec in log.records(agent, max(lo, first if parent else 0), hi))
    return out


def agent_turn(store: Store, agent: str, number: int) -> tuple[dict, str, dict]:
    """``(agent record, owner, turn record)`` of turn ``number`` along the
    agent's lineage. Raises :class:`AgentNotFound`, :class:`NotFound`."""
    log = TurnLog(store)
    info = log.get(agent)
    found = log.lineage_record(agent, number)
    if found is None:
        raise NotFound(f"agent {agent!r} has no turn {number} (its turns are 0 to {info.get('last_turn', 0)})")
    return info, found[0], found[1]


def turn_row(owner: str, rec: dict) -> dict:
    """A turn record as one row of the timeline (module docstring)."""
    begin, end = rec.get("begin_seq"), rec.get("end_seq")
    return {"turn": rec["turn"], "owner": owner, "kind": rec.get("kind"), "status": rec.get("status"),
            "time": rec.get("time"), "duration_ms": rec.get("duration_ms"), "message": short(rec.get("message")),
            "reply": short(rec.get("reply")), "usage": rec.get("usage") or {},
            "events": max(0, end - begin + 1) if begin is not None and end is not None else None,
            "patch_ops": len(rec.get("patch") or []), "error": short(rec.get("error"))}


def turn_page(store: Store, agent: str, page: int = 0, size: int = PAGE_SIZE) -> dict:
    """Page ``page`` (0: the newest) of ``agent``'s turns, newest first:
    ``{"agent": record, "rows": [turn rows], "page", "pages", "total"}``. Reads
    the agent record and at most ``size`` turn records, however long the log.
    Raises :class:`AgentNotFound`."""
    log = TurnLog(store)
    info = log.get(agent)
    last = info.get("last_turn", 0)
    total = last + 1
    pages = max(1, -(-total // size))
    page = min(max(page, 0), pages - 1)
    hi = last - page * size
    lo = max(0, hi - size + 1)
    rows = [turn_row(owner, rec) for owner, rec in reversed(lineage_records(log, agent, lo, hi))]
    return {"agent": info, "rows": rows, "page": page, "pages": pages, "total": total, "size": size}


# -- one turn -----------------------------------------------------------------------------------


def pointer(parts: Iterable[str | int]) -> str:
    """The RFC 6901 JSON Pointer of a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def changed_pointers(patch: list[dict]) -> tuple[set[str], set[str]]:
    """``(before, after)``: the JSON Pointers a JSON Patch (RFC 6902) changes
    in the state before it (replaced, removed, moved away) and after it
    (added, replaced, copied or moved to)."""
    before, after = set(), set()
    for op in patch:
        kind, path = op.get("op"), op.get("path", "")
        if kind in ("replace", "remove"):
            before.add(path)
        if kind in ("add", "replace", "copy", "move"):
            after.add(path)
        if kind == "move" and "from" in op:
            before.add(op["from"])
    return before, after


def resolve_append(path: str, state: Any) -> str:
    """``path`` with a final ``-`` (RFC 6902: append to an array) replaced by
    the index of the array's last element in ``state``; other paths as they are."""
    if not path.endswith("/-"):
        return path
    target = state
    for part in path.split("/")[1:-1]:
        part = part.replace("~1", "/").replace("~0", "~")
        try:
            target = target[int(part)] if isinstance(target, list) else target[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return path
    return path[:-1] + str(len(target) - 1) if isinstance(target, list) and target else path


def json_lines(value: Any, changed: set[str]) -> list[tuple[str, bool]]:
    """``value`` pretty-printed as JSON (two-space indent, keys in their
    order), as ``(line, changed)`` pairs: a line is changed if it belongs to
    a value whose pointer is in ``changed`` (all of a changed object's lines)."""
    out: list[tuple[str, bool]] = []

    def emit(v: Any, parts: list, indent: int, prefix: str, comma: str, inherited: bool) -> None:
        mark = inherited or pointer(parts) in changed
        pad = "  " * indent
        if isinstance(v, dict) and v:
            out.append((f"{pad}{prefix}{{", mark))
            items = list(v.items())
            for i, (k, child) in enumerate(items):
                emit(child, parts + [k], indent + 1, json.dumps(k, ensure_ascii=False) + ": ",
                     "," if i < len(items) - 1 else "", mark)
            out.append((f"{pad}}}{comma}", mark))
        elif isinstance(v, list) and v:
            out.append((f"{pad}{prefix}[", mark))
            for i, child in enumerate(v):
                emit(child, parts + [i], indent + 1, "", "," if i < len(v) - 1 else "", mark)
            out.append((f"{pad}]{comma}", mark))
        else:
            out.append((f"{pad}{prefix}{json.dumps(v, ensure_ascii=False)}{comma}", mark))

    emit(value, [], 0, "", "", False)
    return out


def _turn_events(views: HistoryViews, agent: str, record: dict) -> list[dict]:
    """The log events of a turn the caller may see (as ``TurnLog.turn_events``, through the views' access)."""
    begin, end = record.get("begin_seq"), record.get("end_seq")
    if begin is None or (end is not None and end < begin):
        return []
    out = []
    for line in views.log(begin, end):
        event = json.loads(line)
        label = event.get("turn") or {}
        if label.get("agent") == agent and label.get("turn") == record["turn"]:
            out.append(event)
        elif end is None and out:
            break
    return out


def node_at(views: HistoryViews, seq: int, path: bytes) -> TreeNode:
    """The inode at ``path`` (bytes, b"" the root) in the tree at ``seq``.
    Raises :class:`NotFound`, :class:`PermissionDenied`, :class:`NotADirectory`."""
    node = TreeNode(seq, views.ws.root)
    for name in [p for p in path.split(b"/") if p]:
        node = views.lookup(node, name)
    return node


def content_at(views: HistoryViews, seq: int, path: bytes) -> bytes | None:
    """The content of regular file ``path`` in the tree at ``seq``; None if
    there is none (no such path, or not a regular file). Raises
    :class:`PermissionDenied`; :class:`ValueError` past :data:`DIFF_LIMIT` bytes."""
    try:
        node = node_at(views, seq, path)
        attrs = views.attrs(node)
    except (NotFound, NotADirectory):
        return None
    if not attrs.is_file:
        return None
    if attrs.size > DIFF_LIMIT:
        raise ValueError(f"{attrs.size} bytes")
    content = views.open(node)
    try:
        return content.read(0, attrs.size)
    finally:
        content.close()


def as_text(data: bytes) -> str | None:
    """``data`` as text, or None if it looks binary (a NUL near the start, or not UTF-8)."""
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def file_diff(path: str, old: bytes | None, new: bytes | None, old_name: str, new_name: str) -> dict:
    """A file diff (module docstring) of two contents (None: no file)."""
    a, b = as_text(old or b""), as_text(new or b"")
    out = {"path": path, "before": old_name, "after": new_name}
    if a is None or b is None:
        return {**out, "kind": "binary", "lines": []}
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                 fromfile=old_name if old is not None else "/dev/null",
                                 tofile=new_name if new is not None else "/dev/null")
    text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)
    return {**out, "kind": "text", "lines": text}


def files_under(views: HistoryViews, seq: int, path: bytes, limit: int = 10_000) -> dict[bytes, bytes]:
    """Path → content id of every regular file at or under ``path`` in the
    tree at ``seq`` that the caller may see (at most ``limit``; none if the
    path is not there)."""
    out: dict[bytes, bytes] = {}
    try:
        stack = [(path, node_at(views, seq, path))]
    except (NotFound, NotADirectory, PermissionDenied):
        return out
    while stack and len(out) < limit:
        where, node = stack.pop()
        attrs = views.attrs(node)
        if attrs.is_dir:
            try:
                children = views.listing(node)
            except PermissionDenied:
                continue
            stack.extend((where + b"/" + name if where else name, child) for name, child in children)
        elif attrs.is_file:
            out[where] = attrs.content
    return out


def turn_paths(views: HistoryViews, events: list[dict], before: int, after: int) -> list[bytes]:
    """The files whose content differs between the trees at ``before`` and
    ``after`` among those the events name: a file itself, or every file under
    a directory an event names (a restore of the whole tree names the root)."""
    named: list[bytes] = []
    for ev in events:
        for key in ("from", "path", "to"):
            p = ev.get(key)
            if isinstance(p, str) and os.fsencode(p) not in named:
                named.append(os.fsencode(p))
    out: list[bytes] = []
    for raw in named:
        old, new = files_under(views, before, raw), files_under(views, after, raw)
        for p in sorted(set(old) | set(new)):
            if old.get(p) != new.get(p) and p not in out:
                out.append(p)
    return out


def turn_diffs(views: HistoryViews, record: dict, events: list[dict]) -> list[dict]:
    """A unified diff of every file the turn changed (:func:`turn_paths`):
    its content before the turn (at ``begin_seq - 1``) against its content at
    the turn's end, at most :data:`DIFFS_PER_TURN`."""
    begin = record.get("begin_seq")
    end = record.get("end_seq")
    if begin is None or not events:
        return []
    end = views.ws.head_seq if end is None else end
    out = []
    for raw in turn_paths(views, events, begin - 1, end)[:DIFFS_PER_TURN]:
        p = os.fsdecode(raw)
        try:
            old, new = content_at(views, begin - 1, raw), content_at(views, end, raw)
        except PermissionDenied:
            out.append({"path": p, "kind": "denied", "lines": ""})
            continue
        except ValueError:
            out.append({"path": p, "kind": "large", "lines": ""})
            continue
        out.append(file_diff(p, old, new, f"a/{p}@{begin - 1}", f"b/{p}@{end}"))
    return out


def turn_detail(store: Store, caller: Caller, agent: str, number: int) -> dict:
    """Everything the turn page shows: ``{"agent": record, "owner", "record",
    "before", "after", "before_lines", "after_lines", "changed": [pointers],
    "events", "diffs", "reads", "receipt", "prev", "next"}`` (``before``/
    ``after``: the state before and after the turn; ``reads``/``receipt``:
    what the turn record holds under those names, if anything). Raises
    :class:`AgentNotFound`, :class:`NotFound`."""
    log = TurnLog(store)
    info, owner, record = agent_turn(store, agent, number)
    after = log.state_at(agent, number).state
    before = log.state_at(agent, number - 1).state if number > 0 else None
    patch = record.get("patch") or []
    before_set, after_set = changed_pointers(patch)
    after_set = {resolve_append(p, after) for p in after_set}
    views = HistoryViews(store.open_workspace(owner), caller=caller)
    events = _turn_events(views, owner, record)
    return {"agent": info, "owner": owner, "record": record, "before": before, "after": after,
            "before_lines": json_lines(before, before_set) if before is not None else [],
            "after_lines": json_lines(after, after_set), "changed": sorted(before_set | after_set),
            "events": events, "diffs": turn_diffs(views, record, events),
            "reads": record.get("reads") or record.get("read_set"), "receipt": record.get("receipt"),
            "prev": number - 1 if number > 0 else None,
            "next": number + 1 if number < info.get("last_turn", 0) else None}


# -- files, versions, trees ---------------------------------------------------------------------


def log_events(views: HistoryViews, lo: int, hi: int) -> list[dict]:
    """The log events with ``lo <= seq <= hi`` the caller may see, oldest first."""
    return [json.loads(line) for line in views.log(lo, hi)]


def file_history(views: HistoryViews, path: bytes) -> dict:
    """``{"path", "versions": [query entries, newest first], "content": [numbers with file content]}``.
    Raises :class:`NotFound`, :class:`PermissionDenied`."""
    doc = json.loads(views.query(path))
    try:
        numbers = sorted(views.file_versions(path))
    except (NotFound, IsADirectory):
        numbers = []
    return {"path": doc["path"], "versions": list(reversed(doc["versions"])), "content": numbers,
            "unversioned": doc.get("unversioned", False)}


def version_content(views: HistoryViews, path: bytes, number: int) -> bytes:
    """The content of version ``number`` of ``path`` (at most :data:`DIFF_LIMIT` bytes shown).
    Raises :class:`NotFound`, :class:`PermissionDenied`, :class:`IsADirectory`."""
    _n, version = views.pick_version(views.file_versions(path), path, number)
    content = views.store.content_map(version.entry.content)
    return content.read(0, min(content.size, DIFF_LIMIT))


def version_diff(views: HistoryViews, path: bytes, a: int, b: int) -> dict:
    """A file diff of versions ``a`` and ``b`` of ``path``. Raises as :func:`version_content`."""
    versions = views.file_versions(path)
    _a, va = views.pick_version(versions, path, a)
    _b, vb = views.pick_version(versions, path, b)
    shown = os.fsdecode(path)
    sizes = [views.store.content_map(v.entry.content).size for v in (va, vb)]
    if max(sizes) > DIFF_LIMIT:
        return {"path": shown, "kind": "large", "lines": "", "before": f"@{a}", "after": f"@{b}"}
    old, new = version_content(views, path, a), version_content(views, path, b)
    return file_diff(shown, old, new, f"a/{shown}@{a}", f"b/{shown}@{b}")


def tree_listing(views: HistoryViews, point: str | None, path: bytes) -> dict:
    """The tree browser at ``point`` (a seq, ISO time, snapshot name or
    ``turn:AGENT:N``; None or "" the head): ``{"seq", "point", "path", "kind":
    "dir" | "file" | "other", "entries": [{"name", "path", "kind", "size",
    "mode", "mtime_ns"}], "more", "content"}``. Raises :class:`NotFound`,
    :class:`InvalidArgument`, :class:`PermissionDenied`."""
    ws = views.ws
    seq = points.resolve_point(ws, point) if point else ws.head_seq
    node = node_at(views, seq, path)
    attrs = views.attrs(node)
    out = {"seq": seq, "point": point or "", "path": os.fsdecode(path), "entries": [], "more": 0, "content": None}
    if attrs.is_dir:
        out["kind"] = "dir"
        listing = views.listing(node)
        for name, child in listing[:LISTING_LIMIT]:
            a = views.attrs(child)
            kind = "dir" if a.is_dir else "file" if a.is_file else "link" if stat.S_ISLNK(a.mode) else "other"
            out["entries"].append({"name": os.fsdecode(name), "path": os.fsdecode(path + b"/" + name if path else name),
                                   "kind": kind, "size": a.size, "mode": stat.filemode(a.mode),
                                   "mtime_ns": a.mtime_ns})
        out["more"] = max(0, len(listing) - LISTING_LIMIT)
        out["entries"].sort(key=lambda e: (e["kind"] != "dir", e["name"]))
    elif attrs.is_file:
        out["kind"] = "file"
        content = views.open(node)
        try:
            out["content"] = content.read(0, min(attrs.size, DIFF_LIMIT))
        finally:
            content.close()
        out["size"] = attrs.size
    else:
        out["kind"] = "other"
    return out


def point_choices(views: HistoryViews, limit: int = 200) -> dict:
    """What the tree browser offers to pick: ``{"head", "snapshots": [{"name", "seq", "time"}],
    "turns": [{"point", "end_seq"}] (the newest ``limit`` ended turn labels)}``."""
    ws = views.ws
    labels = [lb for lb in views.store.turns(ws) if lb.get("end_seq") is not None]
    labels.sort(key=lambda lb: lb["end_seq"])
    return {"head": ws.head_seq, "snapshots": points.snapshots(ws),
            "turns": [{"point": f"turn:{lb['agent']}:{lb['turn']}", "end_seq": lb["end_seq"]}
                      for lb in labels[-limit:]]}
