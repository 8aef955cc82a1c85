"""One kind of error for bad user input: printed as one line, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user (config, data, token, address...).

    The message is a single line that says what is wrong, where, and what is allowed.
    The CLI prints it as ``xrayfed: error: <message>`` and exits with status 2.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
