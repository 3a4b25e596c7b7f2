"""What the user is told: the errors the command line turns into one line on stderr (never a
traceback), and warnings, one line each."""

import contextlib
import logging
import sys


class UsageError(ValueError):
    """Bad usage or bad input: a flag out of range, a missing run, a folder with no images, ...
    The command line prints it and exits with status 2. `field` names the Config field (or the
    argument) at fault where there is one, so the command line can name its flag."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class WriteFailed(OSError):
    """A file could not be written (disk full, no permission, a file where a folder should be).
    The message says which file and whether the run can resume; the command line prints it and
    exits with status 1. What was written before stays as it was (writes are atomic)."""


def warn(message):
    """One line on stderr, for what the user should know and training goes on despite."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class OneTracePerObject(logging.Filter):
    """Drops TensorFlow's "excessive retracing" warning. TensorFlow counts traces per Python
    function, and every Keras model's predict step is one function (Keras's one_step_on_data), as
    every sampler's compiled method is one per prior kind: a process that predicts with five
    models (the encoder, the quantizer, the decoder, a reloaded run's...), or samples from a
    two-level run's two priors and a one-level run's, warns although each traced once."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def one_trace_per_object():
    """TensorFlow's retracing warning left out while inside (OneTracePerObject)."""
    quiet, logger = OneTracePerObject(), logging.getLogger("tensorflow")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
