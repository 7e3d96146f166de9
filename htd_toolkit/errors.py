"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""


class UserError(RuntimeError):
    """Bad input or an unusable environment; the message names the file and the problem."""

    exit_code = 1
