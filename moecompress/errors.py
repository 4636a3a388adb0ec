"""The one exception type that means "the user asked for something wrong" (CLI: exit 2, one line)."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""
