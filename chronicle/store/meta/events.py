"""The ``events`` record: one event's log line, stored compact, rendered as SPEC §4's JSON.

A ``.chronicle/log`` line (``journal``'s module docstring) is a JSON object
``{"seq", "time", "event", "path", <the event's fields>, "turn", "pid"}``,
plus ``"pruned": true`` after ``pid`` once GC pruned its version
(``gc.prune``). Storing it as text cost about 170 bytes an event, most of it
derivable or repeated: the seq is the key, the time a number, the field
names and event kinds a few dozen words, a content hash 64 hex digits.

**Record** (:func:`encode`): the tag byte :data:`PACKED` (``0x01``), then
one MessagePack array (the ``msgpack`` library; https://msgpack.org/ spec)::

    [time µs since the epoch, event, path, turn, pid, fields, tail]

- ``event``: an index into :data:`EVENTS`, or the name itself;
- ``path``: the path text (``os.fsdecode``: undecodable bytes are lone
  surrogates, stored with ``surrogatepass``), or nil;
- ``turn``: nil, ``[agent, turn, message_id]`` for a label of exactly
  those keys in that order (what ``Workspace.turn`` holds), else the map;
- ``fields`` / ``tail``: flat ``[key, value, ...]`` of the fields between
  ``path`` and ``turn`` / after ``pid``; a key is an index into
  :data:`FIELDS` or the name itself; a value that is 64 lowercase hex
  digits (a content hash) is an ext value of type 1 holding its 32 bytes.

The seq is the record's key (``schema.event_key``). :func:`render` gives
back exactly the bytes ``json.dumps`` gave the line (the same dict, the same
order, ``ensure_ascii``), so ``.chronicle/log``, ``query/``, ``chronicle log
--json`` and the UI show what they showed before. A record not starting
with :data:`PACKED` is the line itself as JSON text (a line starts with
``{``): records written before this encoding stay readable, and a line
that does not fit the shape above (never written by ``journal``) is
stored as text.

**Path-entry fragments** (``schema.PathEntry``): a ``paths`` entry's
fragment is the same JSON object as a log line, without its leading ``{``
(and with the path's version number put in front when listed). Stored as
text it cost about 130 bytes; :func:`pack_fragment` stores it as the tag
byte :data:`PACKED` and one MessagePack array::

    [seq, time µs since the epoch, event, path, turn, pid, fields, tail]

laid out as above, where a ``hash`` value equal to the entry's content id
is the ext value of type 2 with no data (the content id is in the entry
already). Given the entry's key (its seq and path), a ``seq`` equal to the
key's is nil and a ``path`` equal to the key's path text (3 characters or more) is the ext value of
type 3 with no data; fragments packed before that hold both, and read as
they did. :func:`render_fragment` gives back the fragment's
bytes exactly; a fragment that does not have the shape (or whose ``time``
is not :func:`iso_time` of a whole microsecond) stays text (it starts with
``"``).

Threads: pure functions; any thread.
"""

from __future__ import annotations

import calendar
import json
import os
import re
from datetime import datetime, timezone

import msgpack

PACKED = 0x01
_HASH_EXT = 1
_CONTENT_EXT = 2          # path-entry fragments: the hash is the entry's content id (no data)
_KEY_PATH_EXT = 3         # path-entry fragments: the path is the entry's own, in its key (no data)
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Appending keeps old records readable; never reorder or remove.
EVENTS = ("create", "write", "truncate", "mkdir", "rmdir", "delete", "rename", "link", "symlink", "mknod",
          "chmod", "chown", "utimens", "setxattr", "removexattr", "restore")
FIELDS = ("version", "size", "hash", "from", "to", "target", "exchange", "restored", "at", "paths", "name",
          "mode", "uid", "gid", "pruned")
_EVENT_NO = {name: i for i, name in enumerate(EVENTS)}
_FIELD_NO = {name: i for i, name in enumerate(FIELDS)}
_LABEL_KEYS = ("agent", "turn", "message_id")
_HEAD_KEYS = ("seq", "time", "event", "path")

_last_second: list = [None, ""]


def iso_time(ns: int) -> str:
    """``2026-11-21T05:11:00.123456Z`` for a time in ns since the epoch."""
    sec, rem = divmod(ns, 1_000_000_000)
    if _last_second[0] != sec:       # formatted once per second, not once per event
        d = datetime.fromtimestamp(sec, timezone.utc)      # (not strftime: its %Y does not pad years before 1000)
        _last_second[:] = [sec, f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}."]
    return _last_second[1] + f"{rem // 1000:06d}Z"


def _pack_value(value):
    if isinstance(value, str) and len(value) == 64 and _HEX64.fullmatch(value):
        return msgpack.ExtType(_HASH_EXT, bytes.fromhex(value))
    return value


def _flat(items) -> list:
    out = []
    for key, value in items:
        out.append(_FIELD_NO.get(key, key))
        out.append(_pack_value(value))
    return out


def _ext(code: int, data: bytes):
    if code != _HASH_EXT:
        raise ValueError(f"unknown ext type {code} in an event record")
    return data.hex()


class _ContentHash:
    """Stands for the content id's hex in an unpacked path-entry fragment."""

    __slots__ = ()


_CONTENT = _ContentHash()
_CONTENT_VALUE = msgpack.ExtType(_CONTENT_EXT, b"")


_KEY_PATH = object()      # stands for the entry's own path in an unpacked fragment
_KEY_PATH_VALUE = msgpack.ExtType(_KEY_PATH_EXT, b"")


def _fragment_ext(code: int, data: bytes):
    if code == _CONTENT_EXT and not data:
        return _CONTENT
    if code == _KEY_PATH_EXT and not data:
        return _KEY_PATH
    return _ext(code, data)


def _packable(value) -> bool:
    """True if ``value`` comes back from MessagePack as the same JSON value
    (no tuples, floats that are not finite, ints past 64 bits, or non-str keys)."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(_packable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _packable(v) for k, v in value.items())
    return False


def _pack_fields(time_ns: int, line: dict, content_hex: str | None = None) -> list | None:
    """``[time µs, event, path, turn, pid, fields, tail]`` of ``line``, or
    None if it does not have the shape the module docstring gives."""
    keys = list(line)
    try:
        turn_at = keys.index("turn")
    except ValueError:
        return None
    if (keys[:4] != list(_HEAD_KEYS) or turn_at < 4 or keys[turn_at + 1:turn_at + 2] != ["pid"]
            or line["time"] != iso_time(time_ns) or time_ns % 1000 or not _packable(line)):
        return None
    turn = line["turn"]
    if isinstance(turn, dict) and tuple(turn) == _LABEL_KEYS:
        turn = [turn["agent"], turn["turn"], turn["message_id"]]
    elif turn is not None and not isinstance(turn, dict):
        return None
    event = line["event"]
    fields = _flat((k, line[k]) for k in keys[4:turn_at])
    tail = _flat((k, line[k]) for k in keys[turn_at + 2:])
    if content_hex is not None:
        for flat in (fields, tail):
            for i in range(0, len(flat), 2):
                if flat[i] == _HASH_NO and isinstance(flat[i + 1], msgpack.ExtType) \
                        and flat[i + 1].data.hex() == content_hex:
                    flat[i + 1] = _CONTENT_VALUE
    return [time_ns // 1000, _EVENT_NO.get(event, event), line["path"], turn, line["pid"], fields, tail]


def encode(time_ns: int, line: dict) -> bytes:
    """The ``events`` value of log line ``line`` (the dict ``json.dumps``
    renders; its ``time`` is ``iso_time(time_ns)``): the packed record, or
    the JSON text when ``line`` does not have the shape the module docstring
    gives."""
    record = _pack_fields(time_ns, line)
    if record is None:
        return json.dumps(line).encode()
    return bytes((PACKED,)) + msgpack.packb(record, unicode_errors="surrogatepass")


_second_of: dict = {}


def _time_ns(text) -> int | None:
    """ns since the epoch of an :func:`iso_time` text, or None if it is not one."""
    if not isinstance(text, str) or len(text) != 27 or text[19] != "." or text[26] != "Z":
        return None
    head = text[:20]
    sec = _second_of.get(head)
    if sec is None:
        try:
            d = datetime.strptime(head[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        except ValueError:
            return None
        if len(_second_of) > 4096:
            _second_of.clear()
        sec = _second_of[head] = calendar.timegm(d.utctimetuple())
    micros = text[20:26]
    if not micros.isdigit() or not micros.isascii():
        return None
    ns = sec * 1_000_000_000 + int(micros) * 1000
    return ns if iso_time(ns) == text else None


def pack_fragment(fragment: bytes, content_id: bytes = b"", seq: int | None = None,
                  path: str | None = None) -> bytes | None:
    """The packed form of a path entry's ``fragment`` (module docstring), its
    ``hash`` cut to a mark where it is ``content_id``'s hex, its ``seq`` left
    out where it is ``seq`` and its ``path`` marked where it is ``path`` (the
    entry key's seq and path text: :func:`render_fragment` needs them back);
    None if the fragment does not have a log line's shape (the caller stores
    its text)."""
    if not fragment.startswith(b'"seq": '):
        return None
    try:
        line = json.loads(b"{" + fragment)
    except ValueError:
        return None
    if not isinstance(line, dict) or type(line.get("seq")) is not int or not 0 <= line["seq"] < 1 << 64:
        return None
    time_ns = _time_ns(line.get("time"))
    if time_ns is None:
        return None
    line_seq = line["seq"]
    record = _pack_fields(time_ns, line, content_id.hex() if len(content_id) == 32 else None)
    if record is None:
        return None
    if _dumps(line)[1:].encode() != fragment:      # (render_fragment gives json.dumps's text: not json.dumps's own)
        return None
    if path is not None and type(record[2]) is str and len(path) >= 3 and record[2] == path:
        record[2] = _KEY_PATH_VALUE         # (3 bytes: a shorter path's own text is no longer)
    return bytes((PACKED,)) + msgpack.packb([None if line_seq == seq else line_seq] + record,
                                            unicode_errors="surrogatepass")


def render_fragment(raw: bytes, content_id: bytes = b"", seq: int | None = None,
                    path: bytes | str | None = None) -> bytes:
    """The fragment text of a packed fragment ``raw`` (:func:`pack_fragment`)
    of an entry whose content id is ``content_id`` and whose key has ``seq``
    and the path ``path`` (bytes, or its text; needed only if the fragment left them out).
    Raises ``ValueError`` if the record is damaged or needs a seq or path not given."""
    try:
        key_seq, key_path = seq, path
        seq, time_us, event, path, turn, pid, fields, tail = msgpack.unpackb(
            memoryview(raw)[1:], unicode_errors="surrogatepass", ext_hook=_fragment_ext, strict_map_key=True)
        if seq is None:
            if key_seq is None:
                raise ValueError("its seq is in the entry's key")
            seq = key_seq
        if path is _KEY_PATH:
            if key_path is None:
                raise ValueError("its path is in the entry's key")
            path = os.fsdecode(key_path)
        parts = ['"seq": ', int.__repr__(seq), ', "time": "', iso_time(time_us * 1000), '", "event": ',
                 _EVENT_TEXT[event] if type(event) is int else _dumps(event), ', "path": ', _value_text(path)]
        hex_text = content_id.hex() if len(content_id) == 32 else None
        _fields_text(fields, parts, hex_text)
        parts.append(', "turn": ')
        parts.append(_turn_text(turn))
        parts.append(', "pid": ')
        parts.append(_value_text(pid))
        _fields_text(tail, parts, hex_text)
        parts.append("}")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged path entry fragment ({type(exc).__name__}: {exc})") from None
    return "".join(parts).encode()


def fragment_facts(raw: bytes) -> tuple[int, int, tuple | None]:
    """``(time ns, size, (agent, turn) or None)`` of a packed fragment ``raw``
    (:func:`pack_fragment`): what GC's plan reads of each of a million path
    entries, from one unpack and no rendering (its ``size`` 0 where it has
    none or it is not an integer: null). Raises ``ValueError`` if the record is damaged."""
    try:
        _seq, time_us, _event, _path, turn, _pid, fields, tail = msgpack.unpackb(
            memoryview(raw)[1:], unicode_errors="surrogatepass", strict_map_key=True)
        size = 0
        for flat in (fields, tail):
            for i in range(0, len(flat), 2):
                if flat[i] == _SIZE_NO or flat[i] == "size":
                    size = flat[i + 1] if type(flat[i + 1]) is int else 0
                    break
            else:
                continue
            break
        if isinstance(turn, list):
            label = (turn[0], turn[1])
        elif isinstance(turn, dict):
            label = (turn.get("agent"), turn.get("turn"))
        else:
            label = None
        return time_us * 1000, size, label
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged path entry fragment ({type(exc).__name__}: {exc})") from None


def _unflat(flat: list, out: dict) -> None:
    for i in range(0, len(flat), 2):
        key = flat[i]
        out[FIELDS[key] if isinstance(key, int) else key] = flat[i + 1]


def decode(seq: int, raw: bytes) -> dict:
    """The log line of event ``seq`` as the dict it was written from.
    Raises ``ValueError`` if the record is damaged."""
    if not raw or raw[0] != PACKED:
        return json.loads(raw)
    try:
        time_us, event, path, turn, pid, fields, tail = msgpack.unpackb(
            memoryview(raw)[1:], unicode_errors="surrogatepass", ext_hook=_ext, strict_map_key=True)
        line = {"seq": seq, "time": iso_time(time_us * 1000), "event": EVENTS[event] if isinstance(event, int)
                else event, "path": path}
        _unflat(fields, line)
        line["turn"] = dict(zip(_LABEL_KEYS, turn)) if isinstance(turn, list) else turn
        line["pid"] = pid
        _unflat(tail, line)
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged event record ({type(exc).__name__}: {exc})") from None
    return line


_dumps = json.dumps
_str_text = json.encoder.encode_basestring_ascii
_EVENT_TEXT = [_dumps(name) for name in EVENTS]
_FIELD_TEXT = [", " + _dumps(name) + ": " for name in FIELDS]
_turn_texts: dict = {}


def _value_text(value) -> str:
    """``json.dumps(value)``, the common cases without its machinery."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is str:
        return _str_text(value)          # what json.dumps runs for a str (ensure_ascii)
    return _dumps(value)


def _fields_text(flat: list, parts: list, content_hex: str | None = None) -> None:
    for i in range(0, len(flat), 2):
        key = flat[i]
        parts.append(_FIELD_TEXT[key] if type(key) is int else ", " + _dumps(key) + ": ")
        value = flat[i + 1]
        if value is _CONTENT:
            if content_hex is None:
                raise ValueError("a content hash mark in an entry without a content id")
            parts.append('"' + content_hex + '"')
        else:
            parts.append(_value_text(value))


def _turn_text(turn) -> str:
    if turn is None:
        return "null"
    if isinstance(turn, list):
        key = tuple(turn)
        text = _turn_texts.get(key)
        if text is None:
            if len(_turn_texts) > 4096:
                _turn_texts.clear()
            text = _turn_texts[key] = _dumps(dict(zip(_LABEL_KEYS, turn)))
        return text
    return _dumps(turn)


def render(seq: int, raw: bytes) -> bytes:
    """The ``.chronicle/log`` line (JSON text, no newline) of event ``seq``
    stored as ``raw``: the text of an old record as it is, a packed one
    rendered — the bytes ``json.dumps`` gives :func:`decode`'s dict, put
    together piece by piece (a log of a million lines is read at once).
    Raises ``ValueError`` if the record is damaged."""
    if raw and raw[0] != PACKED:
        return bytes(raw)
    try:
        time_us, event, path, turn, pid, fields, tail = msgpack.unpackb(
            memoryview(raw)[1:], unicode_errors="surrogatepass", ext_hook=_ext, strict_map_key=True)
        parts = ['{"seq": ', int.__repr__(seq), ', "time": "', iso_time(time_us * 1000), '", "event": ',
                 _EVENT_TEXT[event] if type(event) is int else _dumps(event), ', "path": ', _value_text(path)]
        _fields_text(fields, parts)
        parts.append(', "turn": ')
        parts.append(_turn_text(turn))
        parts.append(', "pid": ')
        parts.append(_value_text(pid))
        _fields_text(tail, parts)
        parts.append("}")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged event record ({type(exc).__name__}: {exc})") from None
    return "".join(parts).encode()


def time_of(seq: int, raw: bytes) -> str:
    """The ``time`` of the event stored as ``raw`` (without rendering the line)."""
    if raw and raw[0] == PACKED:
        return iso_time(_time_us(raw) * 1000)
    return json.loads(raw)["time"]


def mark_pruned(seq: int, raw: bytes, text_mark) -> bytes:
    """The record ``raw`` of a pruned version's event: its ``hash`` field
    dropped and ``"pruned": true`` after ``pid`` (``gc.prune``). A text
    record is marked by ``text_mark`` (``gc.prune.mark_pruned``), a packed
    one in its own form."""
    if not raw or raw[0] != PACKED:
        return text_mark(bytes(raw))
    line = decode(seq, raw)
    line.pop("hash", None)
    line.pop("pruned", None)
    line["pruned"] = True
    return encode(_time_us(raw) * 1000, line)


def mark_pruned_if_at(raw: bytes, path: str) -> bytes | None:
    """:func:`mark_pruned` of a packed record ``raw`` whose ``path`` is
    ``path`` (``os.fsdecode`` text) and which is not marked yet; None if it
    names another path or is marked already. One unpack and one pack, no
    rendering (GC marks millions): the hash extension values stay as they
    are. Raises ``ValueError`` if the record is damaged."""
    try:
        time_us, event, at, turn, pid, fields, tail = msgpack.unpackb(
            memoryview(raw)[1:], unicode_errors="surrogatepass", strict_map_key=True)
        if at != path:
            return None
        keys = tail[0::2]
        for i, key in enumerate(keys):
            if key in (_PRUNED_NO, "pruned") and tail[2 * i + 1] is True:
                return None
        fields = _without(fields, (_HASH_NO, "hash"))
        tail = _without(tail, (_HASH_NO, "hash", _PRUNED_NO, "pruned")) + [_PRUNED_NO, True]
        return bytes((PACKED,)) + msgpack.packb([time_us, event, at, turn, pid, fields, tail],
                                                unicode_errors="surrogatepass")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged event record ({type(exc).__name__}: {exc})") from None


def mark_fragment_pruned(raw: bytes, content_id: bytes) -> bytes | None:
    """The packed fragment ``raw`` (:func:`pack_fragment`) of an entry with
    content id ``content_id`` as ``gc.prune.mark_pruned`` marks its text: the
    first ``hash`` field dropped and ``"pruned": true`` appended, for an entry
    that no longer carries the content id (a hash mark left is written out).
    One unpack and one pack; None where the text edit would not be that (a
    map among the values, or a first ``hash`` that is neither null nor hex
    digits): the caller marks the text. Raises ``ValueError`` if damaged."""
    try:
        seq, time_us, event, path, turn, pid, fields, tail = msgpack.unpackb(
            memoryview(raw)[1:], unicode_errors="surrogatepass", strict_map_key=True)
        if isinstance(turn, dict) or any(isinstance(v, (dict, list)) for v in fields[1::2] + tail[1::2]):
            return None
        for flat in (fields, tail):
            keys = flat[0::2]
            if _HASH_NO in keys or "hash" in keys:
                at = 2 * min(keys.index(k) for k in (_HASH_NO, "hash") if k in keys)
                value = flat[at + 1]
                if not (value is None or isinstance(value, msgpack.ExtType)
                        or isinstance(value, str) and _HEX_DIGITS.fullmatch(value)):
                    return None
                del flat[at:at + 2]
                break
        tail += [_PRUNED_NO, True]
        whole = msgpack.ExtType(_HASH_EXT, bytes(content_id))
        for flat in (fields, tail):
            for i in range(1, len(flat), 2):
                if flat[i] == _CONTENT_VALUE:
                    flat[i] = whole
        return bytes((PACKED,)) + msgpack.packb([seq, time_us, event, path, turn, pid, fields, tail],
                                                unicode_errors="surrogatepass")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged path entry fragment ({type(exc).__name__}: {exc})") from None


def fragment_of_line(seq: int, line: bytes, fragment: bytes) -> bytes | None:
    """The packed fragment (:func:`pack_fragment`'s form, for an entry without
    content) of the fragment text ``fragment``, built from the packed log line
    ``line`` of event ``seq`` (:func:`encode`; a path entry's fragment is the
    line without its ``version``, which the listing puts in front), if it
    renders as ``fragment`` (:func:`render_fragment`); else None. GC marks a
    text path entry pruned with it: one unpack, one pack and one render
    instead of a JSON parse, checks and a render. Raises ``ValueError`` if
    ``line`` is damaged."""
    if line[:1] != bytes((PACKED,)):
        return None
    try:
        time_us, event, path, turn, pid, fields, tail = msgpack.unpackb(
            memoryview(line)[1:], unicode_errors="surrogatepass", strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"damaged event record ({type(exc).__name__}: {exc})") from None
    if fields[:1] == [_VERSION_NO]:
        del fields[:2]
    packed = bytes((PACKED,)) + msgpack.packb([seq, time_us, event, path, turn, pid, fields, tail],
                                              unicode_errors="surrogatepass")
    try:
        return packed if render_fragment(packed) == fragment else None
    except ValueError:                 # (an event this code cannot render: the caller packs the text)
        return None


_HEX_DIGITS = re.compile(r"[0-9a-f]*")


def _without(flat: list, keys: tuple) -> list:
    """A flat ``[key, value, ...]`` list without the pairs whose key is in ``keys``."""
    out = []
    for i in range(0, len(flat), 2):
        if flat[i] not in keys:
            out += flat[i:i + 2]
    return out


_HASH_NO = _FIELD_NO["hash"]
_VERSION_NO = _FIELD_NO["version"]
_PRUNED_NO = _FIELD_NO["pruned"]
_SIZE_NO = _FIELD_NO["size"]


def _time_us(raw: bytes) -> int:
    unpacker = msgpack.Unpacker(unicode_errors="surrogatepass", ext_hook=_ext)
    unpacker.feed(memoryview(raw)[1:])
    unpacker.read_array_header()
    return unpacker.unpack()


def is_pruned(seq: int, raw: bytes) -> bool:
    """True if the event record ``raw`` already carries the pruned mark."""
    if not raw or raw[0] != PACKED:
        return b', "pruned": true}' in raw
    return decode(seq, raw).get("pruned") is True
