"""The one exception type that means "the user asked for something we cannot do"."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class UserError(Exception):
    """Bad input: the command layer prints ``error: <message>`` on one line and exits with code 2.

    The message names what is wrong and what to change; no traceback is shown for it.
    """


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


#: Set by the ``tropd`` dispatcher: "1" when the user asked for full tracebacks (HYDRA_FULL_ERROR=1).
TRACE_ENV = "TROPD_FULL_ERROR"


def exit_on_user_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a Hydra task function: a UserError becomes ``error: ...`` on stderr and exit code 2.

    Exiting from inside the job (SystemExit is not an Exception) keeps Hydra from printing its own
    "Error executing job" banner, so bad input costs the user exactly one line.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if os.environ.get(TRACE_ENV) == "1":
                raise
            sys.stderr.write(f"error: {exc}\n")
            sys.stderr.flush()
            sys.exit(2)

    return wrapper
