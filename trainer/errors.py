"""The one exception family shown to users as a single line (no traceback).

Anything raised as a :class:`UserError` is a problem with the user's input or files and
its message says what is wrong and, where it can, how to fix it. Other exceptions are bugs.
"""


class UserError(Exception):
    """Bad input, missing or unusable files: reported as ``error: <message>``."""
