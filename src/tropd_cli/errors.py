"""The one exception type that means "the user asked for something we cannot do"."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the command layer prints ``error: <message>`` on one line and exits with code 2.

    The message names what is wrong and what to change; no traceback is shown for it.
    """
