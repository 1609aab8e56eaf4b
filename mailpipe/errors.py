"""Errors shared by every layer."""


class UserError(Exception):
    """An error caused by input or environment that the user can fix; the CLI prints it in one line."""
