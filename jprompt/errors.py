"""The exceptions for bad input a user can fix: a config field, a flag, a file.

Their message is one line naming the problem and the fix; ``python -m jprompt.main`` prints it
alone, without a traceback. Every other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input that the message says how to fix."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the run needs is not there (or cannot be reached); the message says how to get it."""
