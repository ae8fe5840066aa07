"""Final answers in model completions: extraction, normalisation for voting, and equivalence.

Equivalence of math answers goes through math-verify, whose parser and verifier time out with
``signal.alarm``: that only works in a process's main thread, so every check runs in the main thread
of a worker process (:class:`MathJudge`), with math-verify's own timeouts plus a hard wall limit per
answer after which the worker is killed and the answer scored wrong. Cheap exact and numeric matches
are decided in the calling process first.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from multiprocessing.pool import Pool

from tropd_cli.errors import UserError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "The answer is X", "Final answer: X", "**Answer:** X" (the last one in the text wins).
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(?:\*\*)?\s*(.+)", re.IGNORECASE)
_INLINE_MATH = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_GSM8K_GOLD = re.compile(r"####\s*(.+)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept), or of ``\\boxed 5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    name = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    after = rest[len(name) :]
    if after.startswith(" ") and not after.lstrip().startswith("{"):  # \boxed 5
        match = re.match(r"\s+([^\s$.,]+)", after)
        return match.group(1) if match else None
    i = rest.find("{")
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(rest)):
        if rest[j] == "{":
            depth += 1
        elif rest[j] == "}":
            depth -= 1
            if depth == 0:
                return rest[i + 1 : j].strip()
    return None  # unclosed: the completion was cut inside its answer


def _clean_number(token: str) -> str:
    token = token.replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", token):
        token = token.split(".")[0]
    return token


def _strip_answer(text: str) -> str:
    """The answer part of the text after "answer is": its math if it has some, else up to the sentence end."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    math = _INLINE_MATH.search(line)
    if math:
        return next(g for g in math.groups() if g is not None).strip()
    line = re.split(r"(?<=[^\d])\.(?:\s|$)|\.$", line)[0]  # sentence end, not a decimal point
    return line.strip().strip("*").strip().rstrip(".").strip()


def extract_answer(text: str) -> str:
    """The final answer in a completion, or ``""`` when it gives none.

    In order: the last ``\\boxed{}`` (nested braces kept); the last "answer is / answer:" phrase
    (its inline math if any, else the rest of the sentence); GSM8K's ``#### X``; the last number.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        answer = _strip_answer(phrases[-1].group(1))
        if answer:
            number = _NUMBER.fullmatch(answer.replace(" ", ""))
            return _clean_number(number.group()) if number else answer
    gsm = _GSM8K_GOLD.findall(text)
    if gsm:
        return _clean_number(gsm[-1].strip())
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else ""


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: what follows ``####`` in its worked solution."""
    match = _GSM8K_GOLD.search(solution)
    return _clean_number(match.group(1).strip()) if match else solution.strip()


def extract_choice(text: str, letters: str = "ABCD") -> str:
    """The option letter a multiple-choice completion settles on, or ``""``.

    In order: ``\\boxed{B}``; the last "Answer: B" / "answer is (B)"; the last "(B)"; the last letter
    standing alone. Only letters in ``letters`` count.
    """
    opts = re.escape(letters)
    boxed = last_boxed(text)
    if boxed:
        match = re.fullmatch(rf"\(?\s*(?:\\text\{{)?([{opts}])\}}?\s*\)?", boxed.strip())
        if match:
            return match.group(1)
    for pattern in (
        rf"answer\s*(?:is|:)\s*:?\s*(?:\*\*)?\s*\(?\$?(?:\\text\{{)?([{opts}])\b",
        rf"\(([{opts}])\)",
        rf"(?<![\w\\])([{opts}])(?![\w])",
    ):
        found = re.findall(pattern, text, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if found:
            return found[-1].upper()
    return ""


def normalize_answer(answer: str) -> str:
    """A canonical spelling for majority voting: spacing, ``\\left``/``\\right``, ``\\dfrac``, ``$`` and
    trailing dots removed; plain numbers lose thousands separators and a ``.0`` tail."""
    s = answer.strip().strip("$").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\dfrac", "\\frac")):
        s = s.replace(old, new)
    s = s.replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _NUMBER.fullmatch(s):
        s = _clean_number(s)
    return s


def quick_equal(predicted: str, gold: str) -> bool | None:
    """True/False when plain text or plain numbers settle it; None when math-verify must decide."""
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if not p:
        return False
    if p == g:
        return True
    if _NUMBER.fullmatch(p) and _NUMBER.fullmatch(g) and "/" not in p + g:
        return abs(float(p) - float(g)) <= 1e-6 * max(1.0, abs(float(g)))
    return None


# ---------------------------------------------------------------------------------------------
# math-verify in worker processes


def _verify_in_worker(predicted: str, gold: str, timeout_s: int) -> bool:
    """Runs in a worker's main thread, where math-verify's ``signal.alarm`` timeouts work."""
    from math_verify import parse, verify

    # Gold answers are LaTeX fragments: math-verify wants them inside $...$ to parse them as LaTeX.
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_s)
    pred_parsed = parse(f"${predicted}$", parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def _warm_worker() -> None:
    import math_verify  # noqa: F401  (the first import takes a second; pay it once per worker)


class MathJudge:
    """Equivalence of (predicted, gold) math answers, math-verify in ``workers`` processes.

    ``timeout_s`` bounds math-verify's parse and verify (its own alarms); ``hard_timeout_s`` bounds a
    whole check from the outside: a worker stuck past it (e.g. in native code an alarm cannot
    interrupt) is killed with its pool, the answer counts as wrong, and the rest go on in a new pool.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout_s: int = 5,
        hard_timeout_s: float = 30.0,
        check: Callable[[str, str, int], bool] | None = None,
    ) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:
            raise UserError("math scoring needs math-verify: pip install 'tropd[eval]'") from exc
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self.timeout_s, self.hard_timeout_s = timeout_s, hard_timeout_s
        self._pool: Pool | None = None
        self.timeouts = 0  # checks that hit the hard limit (scored wrong)
        # (predicted, gold, timeout_s) -> bool, run in a worker; picklable by reference (module level).
        self.check = check or _verify_in_worker

    def _get_pool(self) -> Pool:
        if self._pool is None:
            # spawn, not fork: the caller holds torch's threads and maybe a model; a fork would copy them.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_warm_worker)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def equal(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """One verdict per (predicted, gold) pair, in order."""
        verdicts: list[bool | None] = [quick_equal(p, g) for p, g in pairs]
        pending = [i for i, v in enumerate(verdicts) if v is None]
        while pending:
            pool = self._get_pool()
            jobs = {i: pool.apply_async(self.check, (*pairs[i], self.timeout_s)) for i in pending}
            pending = []
            for n, (i, job) in enumerate(jobs.items()):
                try:
                    verdicts[i] = bool(job.get(timeout=self.hard_timeout_s))
                except multiprocessing.TimeoutError:
                    verdicts[i] = False
                    self.timeouts += 1
                    self.close()  # the stuck worker goes with its pool; unfinished checks are resubmitted
                    pending = [j for j in list(jobs)[n + 1 :] if verdicts[j] is None]
                    break
                except Exception:  # math-verify raised on a malformed answer: not equal
                    verdicts[i] = False
        return [bool(v) for v in verdicts]


_JUDGE: MathJudge | None = None


def math_judge() -> MathJudge:
    """The process-wide judge (its workers start on first use and stop at exit)."""
    global _JUDGE
    if _JUDGE is None:
        _JUDGE = MathJudge()
        atexit.register(_JUDGE.close)
    return _JUDGE
