"""Client side of a mount's control file, ``<mountpoint>/.chronicle/ctl`` (SPEC §4).

Protocol: open the file read-write, write one JSON command per line, read
one JSON reply line per command on the same handle: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. Commands::

    {"cmd": "snapshot", "name": N}
    {"cmd": "restore", "path": P, "version": N}
    {"cmd": "restore", "at": POINT}
    {"cmd": "turn-begin", "agent": A, "turn": N, "message_id": M}
    {"cmd": "turn-end"}
    {"cmd": "sync"}
    {"cmd": "receipt", "at": POINT, "verify": bool}

Commands that change a mounted workspace go through here so that the daemon
(the workspace's only writer) applies them and the mount shows them at once.

An error reply becomes a :class:`~chronicle.errors.ChronicleError` with the
daemon's message; if the reply also names the error's class in ``"kind"``
(e.g. ``"NotFound"``), that class is raised, so the CLI exits with its code.
:meth:`ControlChannel.request_quiet` sends a turn command that answers only
when it fails (``"quiet": true``, ``chronicle.fs.ctl``).

Threads: a :class:`ControlChannel` is used by one thread at a time (replies
are matched to commands by order on the handle).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from chronicle import errors
from chronicle.errors import ChronicleError, InvalidArgument, StoreError

CTL_PATH = os.path.join(".chronicle", "ctl")
QUIET_COMMANDS = frozenset({"turn-begin", "turn-end", "step"})     # (chronicle.fs.ctl.QUIET_COMMANDS)
QUIET_LINE = 64 << 10           # a quiet command goes in one write request (FUSE's max_write is larger)
_READ_SIZE = 65536
_MAX_REPLY = 64 << 20


class ControlChannel:
    """An open control handle of one mount; use as a context manager.

    Raises :class:`StoreError` if the mount's control file cannot be opened
    (not a Chronicle mount, or its daemon is gone).
    """

    def __init__(self, mountpoint: os.PathLike | str):
        self.mountpoint = Path(mountpoint)
        path = self.mountpoint / CTL_PATH
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot reach the mount daemon at {self.mountpoint}: "
                             f"{exc.strerror or exc}") from None
        self._pending = b""

    def close(self) -> None:
        """Close the channel; safe to call twice. (On a mount whose daemon
        died, close fails with ENOTCONN but frees the descriptor anyway.)"""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> ControlChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, command: dict) -> dict:
        """Send one command, return the daemon's ``{"ok": true, ...}`` reply.

        Raises a :class:`ChronicleError` (subclass named by the reply's
        ``kind`` if any) with the daemon's message when ``ok`` is false, and
        :class:`StoreError` when the channel fails or the reply is not JSON.
        """
        if self._fd < 0:
            raise StoreError("the control channel is closed")
        line = json.dumps(command, separators=(",", ":")).encode() + b"\n"
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise StoreError(f"the mount daemon at {self.mountpoint} did not answer: "
                             f"{exc.strerror or exc}") from None
        return self.request_reply()

    def request_quiet(self, command: dict) -> bool:
        """Send a turn command (``turn-begin``, ``turn-end``, ``step``) with
        ``"quiet": true``: no reply is read when it succeeds (one FUSE
        request instead of two; ``chronicle.fs.ctl``). Returns True once it
        ran; False (nothing sent) for a line too long to go in one request —
        use :meth:`request`. Raises as :meth:`request` (a failed command's
        reply is read and raised)."""
        if command.get("cmd") not in QUIET_COMMANDS:
            raise InvalidArgument(f"only {', '.join(sorted(QUIET_COMMANDS))} can be sent quiet, "
                                  f"not {command.get('cmd')!r}")
        line = json.dumps({**command, "quiet": True}, separators=(",", ":")).encode() + b"\n"
        if len(line) > QUIET_LINE:
            return False
        if self._fd < 0:
            raise StoreError("the control channel is closed")
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            if exc.errno != errno.EBADMSG:
                raise StoreError(f"the mount daemon at {self.mountpoint} did not answer: "
                                 f"{exc.strerror or exc}") from None
            self.request_reply()                # the command failed: its error reply (raised)
            raise StoreError(f"the mount daemon at {self.mountpoint} failed a command without saying why")
        if written != len(line):
            raise StoreError(f"the mount daemon at {self.mountpoint} took {written} of {len(line)} bytes")
        return True

    def request_reply(self) -> dict:
        """Read the next reply (see :meth:`request` for what it raises)."""
        try:
            raw = self._read_line()
        except OSError as exc:
            raise StoreError(f"the mount daemon at {self.mountpoint} did not answer: "
                             f"{exc.strerror or exc}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise StoreError(f"the mount daemon at {self.mountpoint} sent a reply that is not JSON: "
                             f"{raw[:200]!r}") from None
        if not isinstance(reply, dict):
            raise StoreError(f"the mount daemon at {self.mountpoint} sent an unexpected reply: {raw[:200]!r}")
        if not reply.get("ok"):
            raise _error_from(reply)
        return reply

    def _read_line(self) -> bytes:
        buf = self._pending
        while b"\n" not in buf:
            if len(buf) > _MAX_REPLY:
                raise StoreError(f"the mount daemon at {self.mountpoint} sent an over-long reply")
            data = os.read(self._fd, _READ_SIZE)
            if not data:
                if not buf:
                    raise StoreError(f"the mount daemon at {self.mountpoint} closed the control channel "
                                     "without a reply")
                break
            buf += data
        line, _, self._pending = buf.partition(b"\n")
        return line


def send(mountpoint: os.PathLike | str, command: dict) -> dict:
    """Send one command to the mount at ``mountpoint`` on a fresh handle and
    return its reply (see :meth:`ControlChannel.request` for the errors)."""
    with ControlChannel(mountpoint) as channel:
        return channel.request(command)


def _error_from(reply: dict) -> ChronicleError:
    message = reply.get("error")
    if not isinstance(message, str) or not message.strip():
        message = "the mount daemon refused the command (no reason given)"
    message = " ".join(message.split("\n"))
    kind = reply.get("kind")
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ChronicleError)):
        cls = ChronicleError
    return cls(message)
