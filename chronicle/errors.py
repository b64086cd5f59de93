"""Chronicle's one exception hierarchy.

Every error a user can meet is a :class:`ChronicleError`. Its message is written
for that user (the CLI prints it as one line, the ``ctl`` file returns it as
``{"ok": false, "error": ...}``) and its class says what went wrong, so that the
FUSE adapter can map it to an errno in one table (``chronicle.fs.errno_map``)
and the CLI to an exit code (``exit_code`` below, as borg keeps its codes beside
its errors).

The store raises these; it never raises ``OSError`` for a domain condition
(a missing name is :class:`NotFound`, not ``FileNotFoundError``).
"""

from __future__ import annotations


class ChronicleError(Exception):
    """Base of every error Chronicle reports to a user.

    ``str(err)`` is the one-line message. ``exit_code`` is what the CLI exits
    with: 2 for bad input, 1 for a failed operation, 3 for store damage.
    """

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip().splitlines()[0])

    @property
    def message(self) -> str:
        return str(self)


# --- the tree: errors a POSIX filesystem call can give ---------------------


class NotFound(ChronicleError):
    """No such file, directory, version or workspace."""


class Exists(ChronicleError):
    """It already exists."""


class NotEmpty(ChronicleError):
    """The directory is not empty."""


class NotADirectory(ChronicleError):
    """A path component is not a directory."""


class IsADirectory(ChronicleError):
    """It is a directory."""


class InvalidArgument(ChronicleError):
    """Invalid argument."""

    exit_code = 2


class NameTooLong(ChronicleError):
    """File name too long (the limit is 255 bytes)."""


class FileTooLarge(ChronicleError):
    """File too large."""


class NoSpace(ChronicleError):
    """No space left on the device that holds the store."""


class ReadOnly(ChronicleError):
    """This part of the tree is read-only."""


class NotPermitted(ChronicleError):
    """Operation not permitted."""


class PermissionDenied(ChronicleError):
    """Permission denied."""


class Busy(ChronicleError):
    """Resource busy."""


class NoAttribute(ChronicleError):
    """No such extended attribute."""


class Pruned(ChronicleError):
    """This version was pruned by gc: the retention policy no longer keeps its content."""


class OutOfRange(ChronicleError):
    """The value is too large for the buffer or the limit."""


class NotSupported(ChronicleError):
    """Operation not supported."""


class CrossDevice(ChronicleError):
    """The operation would cross from one workspace or view into another."""


# --- the store -------------------------------------------------------------


class StoreError(ChronicleError):
    """The store cannot be used."""


class StoreNotFound(StoreError):
    """No Chronicle store here."""

    exit_code = 2


class Unavailable(StoreError):
    """The store's object storage cannot be reached (it answers errors or nothing, after retries)."""


class StoreLocked(StoreError):
    """The workspace is mounted by another process."""


class Corrupt(StoreError):
    """The store holds damaged data."""

    exit_code = 3


class UsageError(ChronicleError):
    """Bad input from the user (a command, an argument, a ctl line)."""

    exit_code = 2


class StateError(UsageError):
    """The agent state cannot take this value, or stored state cannot be loaded."""


# --- the agent runtime -----------------------------------------------------


class AgentNotFound(NotFound):
    """No such agent in this store."""


class AgentExists(Exists):
    """An agent with this id already exists."""


class AgentLoadError(UsageError):
    """The agent class cannot be loaded (MODULE:CLASS names no BaseAgent subclass)."""


class AgentBusy(Busy):
    """The agent is in use by another runtime process."""


class AgentError(ChronicleError):
    """The agent's worker process failed."""
