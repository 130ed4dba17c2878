"""Errors that reach the user as one readable line."""


class EchoFlowError(ValueError):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints ``str(error)`` as one line and exits non-zero; library callers may catch it.
    Messages name the file (or config key) and the problem, e.g. ``"data/a.avi: truncated video"``.
    """
