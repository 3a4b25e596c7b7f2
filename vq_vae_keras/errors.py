"""The one error type that the command line turns into a one-line message and exit status 2."""


class UsageError(ValueError):
    """Bad usage or bad input: a flag out of range, a missing run, a folder with no images, ..."""
