"""The one table from Chronicle's errors to the errno a FUSE caller sees.

:data:`ERRNO` maps each ``chronicle.errors`` class to the errno ext4 gives
for the same condition (errno(3); the per-call lists in open(2), rename(2),
getxattr(2), ...). A subclass takes its nearest listed base's errno.
:func:`fuse_errors` applies it to every FUSE request handler: pyfuse3
handlers may raise only ``FUSEError`` (pyfuse3's ``Operations`` docs), so
anything not listed is an internal error — logged with its traceback and
answered with EIO, and the daemon keeps serving (STYLE).

Threads: the table is constant; the wrapper runs on the handler's (trio) thread.
"""

from __future__ import annotations

import errno
import functools
import logging
import os

import lmdb
import pyfuse3

from chronicle import errors

log = logging.getLogger("chronicle.fs")

ERRNO = {
    errors.NotFound: errno.ENOENT,
    errors.Exists: errno.EEXIST,
    errors.NotEmpty: errno.ENOTEMPTY,
    errors.NotADirectory: errno.ENOTDIR,
    errors.IsADirectory: errno.EISDIR,
    errors.InvalidArgument: errno.EINVAL,
    errors.NameTooLong: errno.ENAMETOOLONG,
    errors.FileTooLarge: errno.EFBIG,
    errors.NoSpace: errno.ENOSPC,
    errors.ReadOnly: errno.EROFS,
    errors.NotPermitted: errno.EPERM,
    errors.PermissionDenied: errno.EACCES,
    errors.Busy: errno.EBUSY,
    errors.NoAttribute: pyfuse3.ENOATTR,
    errors.OutOfRange: errno.ERANGE,
    errors.Pruned: errno.ENODATA,
    errors.CrossDevice: errno.EXDEV,
    errors.NotSupported: errno.EOPNOTSUPP,
    errors.Corrupt: errno.EIO,
    errors.UsageError: errno.EINVAL,
    errors.StoreLocked: errno.EBUSY,
}


def errno_of(exc: errors.ChronicleError) -> int:
    """The errno for ``exc``: that of its class or nearest base class in
    :data:`ERRNO`, else EIO."""
    for cls in type(exc).__mro__:
        code = ERRNO.get(cls)
        if code is not None:
            return code
    return errno.EIO


def lmdb_no_space(exc: lmdb.Error) -> int:
    """ENOSPC or EDQUOT if ``exc`` is LMDB's report of a full disk or quota
    (``mdb_strerror`` text, e.g. ``mdb_txn_commit: No space left on device``;
    ``MDB_MAP_FULL`` is not: the map, not the disk), else 0."""
    text = str(exc)
    if os.strerror(errno.ENOSPC) in text:
        return errno.ENOSPC
    if os.strerror(errno.EDQUOT) in text:
        return errno.EDQUOT
    return 0


# LMDB's reports of a damaged page (or of a transaction such a report marked bad)
_LMDB_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.InvalidError)


# ``async () -> bool``: free what the retention policy allows (the daemon's
# GC, ``chronicle.fs.daemon``); True if it gave disk space back. None: no reclaim.
_reclaim: list = [None]


def set_reclaim(reclaim) -> None:
    """Register the coroutine function :func:`fuse_errors` awaits before it
    answers ENOSPC (None: answer at once)."""
    _reclaim[0] = reclaim


def _is_no_space(exc: BaseException) -> bool:
    """True for a full disk or quota (the errors :func:`fuse_errors` answers ENOSPC/EDQUOT)."""
    if isinstance(exc, errors.NoSpace):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, lmdb.Error) and bool(lmdb_no_space(exc))


def fuse_errors(handler):
    """Wrap an async FUSE handler: Chronicle errors become ``FUSEError(errno)``
    (:func:`errno_of`); ``Corrupt`` is logged (damage the user must hear of)
    and answered EIO; an ``OSError`` of a full disk or quota (ENOSPC,
    EDQUOT) or of a too-large file (EFBIG) keeps its errno, and so does an
    ``lmdb.Error`` of a full disk (its text names ENOSPC or EDQUOT: py-lmdb
    gives no errno attribute); LMDB's report of a damaged page is logged in
    one line and answered EIO, as ``Corrupt``; any other
    exception is logged with its traceback and becomes EIO. A
    ``FUSEError`` passes through as it is.

    A full disk (NoSpace, ENOSPC, EDQUOT) is answered only after the
    registered reclaim (:func:`set_reclaim`, the daemon's GC) freed what the
    retention policy allows: if it gave space back, the request is tried
    once more, and what that gives is the answer."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except Exception as exc:              # noqa: BLE001 - every error gets its errno (_answer)
            reclaim = _reclaim[0]
            if reclaim is None or not _is_no_space(exc):
                _answer(handler.__name__, exc)
        try:
            freed = await reclaim()
        except Exception:                     # noqa: BLE001 - the request still gets its ENOSPC
            log.exception("reclaiming space for %s failed", handler.__name__)
            freed = False
        if not freed:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        try:
            return await handler(*args, **kwargs)
        except Exception as exc:              # noqa: BLE001
            _answer(handler.__name__, exc)

    return wrapper


def _answer(name: str, exc: Exception):
    """Raise the ``FUSEError`` that answers ``exc`` (see :func:`fuse_errors`)."""
    if isinstance(exc, pyfuse3.FUSEError):
        raise exc
    if isinstance(exc, errors.Corrupt):
        log.error("%s: %s", name, exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    if isinstance(exc, errors.ChronicleError):
        raise pyfuse3.FUSEError(errno_of(exc)) from None
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise pyfuse3.FUSEError(exc.errno) from None
        log.error("internal error in %s", name, exc_info=exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    if isinstance(exc, lmdb.Error):
        code = lmdb_no_space(exc)
        if code:
            raise pyfuse3.FUSEError(code) from None
        if isinstance(exc, _LMDB_DAMAGE):           # a damaged metadata page: damage, like Corrupt
            log.error("%s: the store's metadata is damaged (%s: %s); run chronicle fsck",
                      name, type(exc).__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
    log.error("internal error in %s", name, exc_info=exc)
    raise pyfuse3.FUSEError(errno.EIO) from None
