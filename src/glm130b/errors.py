"""The base of every error a user can cause (bad path, corrupt file, wrong config, long prompt).

The CLI prints these as one line and exits non-zero; anything else is a bug and shows a traceback.
"""


class GLMError(Exception):
    """An error caused by input, with a message that says what to fix."""
