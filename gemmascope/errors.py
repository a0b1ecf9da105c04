"""Errors a user can cause and fix.

The command line prints a `UserError` as one line and exits non-zero; anything else is a
bug and keeps its traceback. Keeping the distinction in one place means every stage
reports bad input the same way.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Bad input (config, path, store, model): printed as one line, exit status 2."""


class ConfigError(UserError):
    """A config file or override names an unknown key, a wrong type or an impossible value."""


class InvalidValue(ValueError):
    """Raised by a config dataclass's validation; the loader adds the file and key path."""

    def __init__(self, key: str, value: object, reason: str):
        super().__init__(reason)
        self.key = key
        self.value = value
        self.reason = reason


# Failures of the machine, not of the code or the input: a full disk, a file-size limit or
# quota, a read-only or forbidden location, a path through a file. Any other OSError is a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                                errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})
# TensorStore (zarr3 arrays, Orbax checkpoints) reports an OS error inside a ValueError's text.
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def environment_failure(err: BaseException) -> str | None:
    """One line naming the file the machine refused to write or read, else None (a bug).

    Looks through the exception's causes, since libraries wrap the OSError they met.
    """
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            return _failure_line(err.filename, err.errno)
        match = _TENSORSTORE_ERRNO.search(str(err))
        if match and int(match.group(1)) in ENVIRONMENT_ERRNOS:
            paths = _QUOTED_PATH.findall(str(err))
            return _failure_line(paths[-1] if paths else None, int(match.group(1)))
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _failure_line(filename: object, code: int) -> str:
    where = filename if filename is not None else "a file"
    return (f"{where}: {os.strerror(code)}; what was committed before is kept: "
            "rerun the same command once this is fixed")
