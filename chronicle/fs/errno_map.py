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


def fuse_errors(handler):
    """Wrap an async FUSE handler: Chronicle errors become ``FUSEError(errno)``
    (:func:`errno_of`); ``Corrupt`` is logged (damage the user must hear of)
    and answered EIO; an ``OSError`` of a full disk or quota (ENOSPC,
    EDQUOT) or of a too-large file (EFBIG) keeps its errno, and so does an
    ``lmdb.Error`` of a full disk (its text names ENOSPC or EDQUOT: py-lmdb
    gives no errno attribute); any other
    exception is logged with its traceback and becomes EIO. A
    ``FUSEError`` passes through as it is."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except errors.Corrupt as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except errors.ChronicleError as exc:
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise pyfuse3.FUSEError(exc.errno) from None
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except lmdb.Error as exc:
            code = lmdb_no_space(exc)
            if code:
                raise pyfuse3.FUSEError(code) from None
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
