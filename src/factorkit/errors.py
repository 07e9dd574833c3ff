"""Errors a user can cause.

Every one of them carries a single sentence that names the problem and the
fix; the command line prints that sentence and exits with status 2.
"""


class FactorkitError(ValueError):
    """A problem with the user's input (path, ratio, data, model), not a bug."""


class NonFiniteLossError(FactorkitError):
    """The model produced a NaN or infinite loss (or gradient) while being evaluated or trained."""


class PeerFailed(RuntimeError):
    """Another process of a torchrun job failed in a step every process runs; its error is in the message.
    Not the user's input (the command line exits with status 1): the failing process reports its own error."""
