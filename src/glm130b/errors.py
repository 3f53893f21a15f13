"""The base of every error a user can cause (bad path, corrupt file, wrong config, long prompt).

The CLI prints these as one line and exits non-zero; anything else is a bug and shows a traceback.
"""


class GLMError(Exception):
    """An error caused by input, with a message that says what to fix."""


class CheckpointError(GLMError, ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into
    (raised by the loader, glm130b.checkpoint, and what it reads with)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' errors can run to many lines)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
