"""The one table from Chronicle's errors to the errno a FUSE caller sees.

Errnos are those ext4 gives for the same condition. Anything not listed is
an internal error: logged with its traceback and answered with EIO (STYLE:
the daemon keeps serving).
"""

from __future__ import annotations

import errno
import functools
import logging

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
    errors.Busy: errno.EBUSY,
    errors.NoAttribute: pyfuse3.ENOATTR,
    errors.OutOfRange: errno.ERANGE,
    errors.CrossDevice: errno.EXDEV,
    errors.NotSupported: errno.EOPNOTSUPP,
    errors.Corrupt: errno.EIO,
    errors.UsageError: errno.EINVAL,
    errors.StoreLocked: errno.EBUSY,
}


def errno_of(exc: errors.ChronicleError) -> int:
    for cls in type(exc).__mro__:
        code = ERRNO.get(cls)
        if code is not None:
            return code
    return errno.EIO


def fuse_errors(handler):
    """Wrap an async FUSE handler: Chronicle errors become ``FUSEError(errno)``;
    an unexpected exception is logged with its traceback and becomes EIO.
    A full disk (``OSError(ENOSPC)``) is ENOSPC, not an internal error."""

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
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
