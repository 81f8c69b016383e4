"""The error types bonsai raises for bad arguments and bad files: one base class, standard bases for callers."""

from __future__ import annotations


class BonsaiError(Exception):
    """Base of every error bonsai raises on bad input, bad files or a cancelled render."""


class BonsaiValueError(BonsaiError, ValueError):
    """A bad argument, config value or file content; the message names the argument, field, file or key."""


class BonsaiFileNotFoundError(BonsaiError, FileNotFoundError):
    """A file or folder that is not there; the message names the path and what was expected."""


class Cancelled(BonsaiError):
    """A render stopped by its `cancel` event."""
