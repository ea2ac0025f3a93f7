"""Errors that are the user's to fix: the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Bad input (a missing file, a wrong argument): its message says what to change."""
