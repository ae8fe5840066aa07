"""The LiveCodeBench test harness: the program one sandboxed process runs per (problem, completion).

:func:`tropd_cli.evals.code.lcb_program` sends this file's source into the sandbox, followed by one call
``main(CODE, TESTS_JSON, FUNC_NAME, PASS_LINE)`` with the solution and its tests as literals. It runs there
as ``python -I -S``: standard library only, nothing of tropd, and whatever the solution does to the
process. Importing it (tests, lint, type checks) runs nothing.

The checks are LiveCodeBench's (``testing_util``): the solution runs after LiveCodeBench's import preamble;
stdin problems run the code afresh per test as ``__main__`` with fd 0 reading the test input and fd 1
captured, and outputs match line by line, as text or as ``Decimal`` values; functional problems call
``Solution().FUNC_NAME`` (or a module-level ``FUNC_NAME``) with each input line as a JSON value. The
harness prints ``PASS_LINE`` last, on its own saved stdout, only after every test passed.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import os
import posix
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NoReturn

# LiveCodeBench runs every solution after this preamble (testing_util.import_string).
PREAMBLE = """\
from string import *
from re import *
from datetime import *
from collections import *
from heapq import *
from bisect import *
from copy import *
from math import *
from random import *
from statistics import *
from itertools import *
from functools import *
from operator import *
from io import *
from sys import *
from json import *
from builtins import *
from typing import *
import string
import re
import datetime
import collections
import heapq
import bisect
import copy
import math
import random
import statistics
import itertools
import functools
import operator
import io
import sys
import json
sys.setrecursionlimit(50000)
"""


class EarlyExit(BaseException):
    """os._exit called by the solution: the end of its run, not of the harness."""


def early_exit(status: int = 0) -> NoReturn:
    raise EarlyExit(status)


class Harness:
    """The process's real stdout, stderr and ``os._exit``, kept where the solution's redirections do not
    reach, and the capture files of one run."""

    def __init__(self) -> None:
        self.real_exit = os._exit
        self.out_fd = os.dup(1)
        self.err_fd = os.dup(2)
        self.in_path = os.path.abspath("lcb_stdin.txt")
        self.out_path = os.path.abspath("lcb_stdout.txt")
        self.std_streams = (sys.stdin, sys.stdout, sys.__stdin__, sys.__stdout__)

    def finish(self, ok: bool, message: str) -> NoReturn:
        os.write(self.out_fd if ok else self.err_fd, (message + "\n").encode("utf-8", "replace"))
        self.real_exit(0 if ok else 1)  # also ends threads the solution left running

    def run_captured(self, target: Callable[[], Any], stdin_data: str) -> tuple[str | None, str]:
        """target() with fd 0 reading stdin_data and fd 1 going to a file; (error or None, captured stdout)."""
        with open(self.in_path, "wb") as fh:
            fh.write(stdin_data.encode("utf-8"))
        place(os.open(self.in_path, os.O_RDONLY), 0)
        place(os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
        stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (the solution may close it)
        stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdin = stdin
        sys.stdout = stdout
        setattr(sys, "__stdin__", stdin)  # noqa: B010 (a Final name to type checkers)
        setattr(sys, "__stdout__", stdout)  # noqa: B010
        os._exit = posix._exit = early_exit
        threads_before = set(threading.enumerate())
        error = None
        try:
            target()
            # A program's process waits for its non-daemon threads (e.g. main() in a thread for a bigger stack).
            for thread in threading.enumerate():
                if thread not in threads_before and not thread.daemon:
                    thread.join()
        except (SystemExit, EarlyExit):
            pass
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            os._exit = posix._exit = self.real_exit
            for stream in {id(s): s for s in (sys.stdout, sys.__stdout__, stdout)}.values():
                with contextlib.suppress(BaseException):  # the solution may have replaced or closed it
                    stream.flush()  # type: ignore[union-attr]
            os.dup2(self.out_fd, 1)
            sys.stdin, sys.stdout = self.std_streams[:2]
            setattr(sys, "__stdin__", self.std_streams[2])  # noqa: B010
            setattr(sys, "__stdout__", self.std_streams[3])  # noqa: B010
        with open(self.out_path, "rb") as fh:
            return error, fh.read().decode("utf-8", "replace")


def place(fd: int, target: int) -> None:
    """Make ``fd`` the file at ``target`` (0 or 1); a solution may have closed the target, so fd may be it."""
    if fd != target:
        os.dup2(fd, target)
        os.close(fd)


def fresh_globals() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    exec(PREAMBLE, namespace)
    return namespace


def stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(part) for part in line.split()]
    except Exception:
        return None


def same_output(got: str, expected: str) -> bool:
    """LiveCodeBench's stdio check: as many stripped lines, each equal as text or as Decimal values."""
    got_lines, want_lines = stripped_lines(got), stripped_lines(expected)
    if len(got_lines) != len(want_lines):
        return False
    for got_line, want_line in zip(got_lines, want_lines, strict=True):
        if got_line == want_line:
            continue
        got_values, want_values = decimals(got_line), decimals(want_line)
        if got_values is None or want_values is None or got_values != want_values:
            return False
    return True


def short(text: object, limit: int = 200) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def main(code: str, tests_json: str, func_name: str | None, pass_line: str) -> NoReturn:
    """Run ``code`` against every test of ``tests_json``; exit 0 printing ``pass_line`` iff all pass."""
    harness = Harness()
    finish = harness.finish
    tests = json.loads(tests_json)
    try:
        compiled = compile(code, "<solution>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        finish(False, f"compile error: {exc}")
    if func_name is None:
        for i, test in enumerate(tests):
            namespace = fresh_globals()
            error, output = harness.run_captured(functools.partial(exec, compiled, namespace), test["input"])
            if error is not None:
                finish(False, f"test {i}: runtime error: {short(error)}")
            if not same_output(output, test["output"]):
                finish(False, f"test {i}: wrong answer: got {short(output)!r}, expected {short(test['output'])!r}")
        finish(True, pass_line)

    namespace = fresh_globals()
    error, _ = harness.run_captured(lambda: exec(compiled, namespace), "")
    if error is not None:
        finish(False, f"runtime error while defining the solution: {short(error)}")
    solution = namespace.get("Solution")
    method = None
    if isinstance(solution, type):
        holder: list[Any] = []
        error, _ = harness.run_captured(lambda: holder.append(solution()), "")
        if error is not None or not holder:
            finish(False, f"Solution() failed: {short(error)}")
        method = getattr(holder[0], func_name, None)
    if method is None:
        method = namespace.get(func_name)
    if not callable(method):
        finish(False, f"no method or function named {func_name!r}")
    for i, test in enumerate(tests):
        args = [json.loads(line) for line in test["input"].split("\n")]
        expected = json.loads(test["output"])
        result: list[Any] = []
        error, _ = harness.run_captured(lambda: result.append(method(*args)), "")  # noqa: B023 (run at once)
        if error is not None or not result:
            finish(False, f"test {i}: runtime error: {short(error)}")
        got = list(result[0]) if isinstance(result[0], tuple) else result[0]
        if got != expected:
            finish(False, f"test {i}: wrong answer: got {short(got)!r}, expected {short(expected)!r}")
    finish(True, pass_line)
