"""Errors that end a stage with a one-line message instead of a traceback."""


class StageError(RuntimeError):
    """A stage cannot go on (too few valid subjects, missing input...); the message says why."""


class InvalidInput(ValueError):
    """One input item is unusable; the message is the quarantine reason."""
