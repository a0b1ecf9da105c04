"""Errors a user can cause and fix.

The command line prints a `UserError` as one line and exits non-zero; anything else is a
bug and keeps its traceback. Keeping the distinction in one place means every stage
reports bad input the same way.
"""

from __future__ import annotations


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
