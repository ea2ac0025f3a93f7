"""Errors that are the user's to fix: the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Bad input (a missing file, a wrong argument): its message says what to change."""


class ConfigError(UserError, ValueError):
    """An impossible hyper-parameter (a ValueError to Python code, a one-line error to the CLI)."""


class WriteError(UserError):
    """A file could not be written (disk full, read-only, permissions): names the path, the OS's
    reason and what is intact."""
