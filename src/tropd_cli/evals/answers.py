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
from decimal import Decimal
from fractions import Fraction
from multiprocessing.pool import Pool

from tropd_cli.errors import UserError

# A plain number: thousands separators only in groups of three ("1,000,000"; "2,3" is a list, not 23).
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
# A number that opens the answer text, with its currency sign or percent: "72 clips" -> "72", "$18 dollars".
_LEADING_NUMBER = re.compile(rf"(?:\\?\$\s*)?({_NUMBER.pattern})(\s*\\?%)?(?=\s+[A-Za-z]|$)")
# The end of a sentence: . ! ? ; followed by blank space or the end (a decimal point is followed by a digit).
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)")
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


_SCALE_WORDS = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}


def _leading_number(text: str) -> str | None:
    r"""The number that opens ``text`` when words follow it (units, currency): ``72 clips`` -> ``72``,
    ``$18 dollars`` -> ``18``, ``25% of them`` -> ``25\%``, ``1 million widgets`` -> ``1000000``."""
    lead = _LEADING_NUMBER.match(text)
    if not lead:
        return None
    number = _clean_number(lead.group(1))
    words = text[lead.end() :].split()
    scale = _SCALE_WORDS.get(words[0].lower().strip(".,;")) if words and not lead.group(2) else None
    if scale and "/" not in number:
        value = Decimal(number) * scale
        return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return number + ("\\%" if lead.group(2) else "")


def _first_sentence(line: str) -> str:
    """``line`` up to its first sentence end outside inline math (``$3.5$`` and ``$x. y$`` do not end it)."""
    spans = [m.span() for m in _INLINE_MATH.finditer(line)]
    for end in _SENTENCE_END.finditer(line):
        if not any(a <= end.start() < b for a, b in spans):
            return line[: end.start()]
    return line


def _strip_answer(text: str) -> str:
    """The answer part of the text after "answer is": the first sentence of its line; that sentence's
    inline math if it has some; a number that opens it without the words after it (units, currency)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = _first_sentence(line)
    math = _INLINE_MATH.search(sentence)
    if math:
        return next(g for g in math.groups() if g is not None).strip()
    sentence = sentence.strip().strip("*").strip()
    lead = _leading_number(sentence)
    return lead if lead is not None else sentence


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every closed ``\\boxed{...}`` / ``\\fbox{...}``, in order."""
    spans = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 0
        for j in range(match.end() - 1, len(text)):
            depth += 1 if text[j] == "{" else -1 if text[j] == "}" else 0
            if depth == 0:
                spans.append((match.start(), j + 1, text[match.end() : j].strip()))
                break
    return spans


def _final_boxed(text: str) -> str | None:
    """The last ``\\boxed{}``; boxes joined only by "and" or a comma just before it are one answer
    (``$\\boxed{2}$ and $\\boxed{3}$`` -> ``2, 3``); ``\\boxed 5`` when no braced box exists."""
    spans = _boxed_spans(text)
    last = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if not spans or spans[-1][0] != last:  # no braced box, ``\boxed 5``, or the last box is unclosed (no answer)
        return last_boxed(text)
    parts = [spans[-1][2]]
    for (_, end, content), (start, _, _) in zip(spans[-2::-1], spans[:0:-1], strict=True):
        if not re.fullmatch(r"[\s$]*(?:,|and|,\s*and|&)[\s$]*", text[end:start]):
            break
        parts.insert(0, content)
    return ", ".join(parts)


def extract_answer(text: str) -> str:
    """The final answer in a completion, or ``""`` when it gives none.

    In order: the last ``\\boxed{}`` (nested braces kept; boxes joined by "and" are one list); the last
    "answer is / answer:" phrase (the first sentence after it: its inline math if any, else its text,
    a leading number without the unit words after it); GSM8K's ``#### X``; the last number.
    """
    boxed = _final_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        answer = _strip_answer(phrases[-1].group(1))
        if answer:
            number = _NUMBER.fullmatch(answer)
            return _clean_number(number.group()) if number else answer
    gsm = _GSM8K_GOLD.findall(text)
    if gsm:
        answer = _strip_answer(gsm[-1])
        return _clean_number(answer) if _NUMBER.fullmatch(answer) else answer
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else ""


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: what follows ``####`` in its worked solution."""
    match = _GSM8K_GOLD.search(solution)
    return _clean_number(match.group(1).strip()) if match else solution.strip()


def extract_choice(text: str, letters: str = "ABCD", choices: Sequence[str] = ()) -> str:
    """The option letter a multiple-choice completion settles on, or ``""``; only letters in ``letters``.

    Letters are capitals: ``a`` in "the answer is a direct consequence" is a word, not option A. A
    lower-case letter counts only where it cannot be a word: in parentheses after an answer phrase
    ("the answer is (e)") or alone at the end of an "Answer: c" line.

    In order: the last explicit answer (``\\boxed{B}``, "Answer: B", "Answer: (B)", "**Answer:** B",
    "the correct option is B", "the answer is option B", whichever comes last in the text; a hedge such
    as "Answer: B or C" is no answer); else the last "(B)" or "**B**"; else a reply that is only a letter
    ("B", "(B)", "B) 42", "B. ..."); else, given the options' ``choices``, a final answer that spells out
    exactly one option's text ("Answer: n^2" when B is ``n^2``).
    """
    opts, lower = re.escape(letters), re.escape(letters.lower())
    explicit: list[tuple[int, str]] = []
    for start, _, content in _boxed_spans(text):
        found = re.fullmatch(rf"\(?\s*(?:\\(?:text|textbf|mathrm|mathbf)\{{)?\s*([{opts}])\s*\}}?\s*\)?", content)
        if found:
            explicit.append((start, found.group(1)))
    phrase = (
        r"(?i:answer|(?:correct|right|best)\s+(?:option|choice))\s*(?:\*\*)?\s*"
        r"(?:(?i:is|(?:would|should|must)\s+be)|:|=|-|\u2014)\s*:?\s*(?:\*\*)?\s*(?:(?i:option|choice)\s*)?"
    )
    capital = re.compile(rf"{phrase}[\(\[$]?\s*(?:\\text(?:bf)?\{{)?\s*(?:\*\*)?([{opts}])(?![\w])")
    hedge = re.compile(rf"\s*\)?\s*(?:or|/|and)\s*(?:possibly|maybe|perhaps)?\s*\(?([{opts}])(?![\w])")
    for m in capital.finditer(text):
        explicit.append((m.start(), "" if hedge.match(text, m.end()) else m.group(1)))
    for pattern in (rf"{phrase}\(([{lower}])\)", rf"(?i:answer)\s*:\s*([{lower}])\s*\.?[ \t]*$"):
        explicit += [(m.start(), m.group(1).upper()) for m in re.finditer(pattern, text, flags=re.MULTILINE)]
    if explicit:
        return max(explicit)[1]
    weak = [(m.start(), m.group(1) or m.group(2)) for m in re.finditer(rf"\(([{opts}])\)|\*\*([{opts}])\*\*", text)]
    if weak:
        return max(weak)[1]
    alone = re.fullmatch(
        rf"[\s*(\[]*(?:(?i:option|choice)\s+)?\(?([{opts}])(?:[\s*)\].:]*|[).:]\s.*)", text.strip(), flags=re.DOTALL
    )
    if alone:
        return alone.group(1)
    return _choice_by_text(text, letters, choices)


def _option_key(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("$", "").replace("*", "")).strip().rstrip(".").strip().lower()


def _choice_by_text(text: str, letters: str, choices: Sequence[str]) -> str:
    """The letter of the one option whose text the final answer ("Answer: X", or the whole reply) spells out."""
    if not choices:
        return ""
    phrases = list(_ANSWER_PHRASE.finditer(text))
    said = _first_sentence(phrases[-1].group(1).strip().splitlines()[0]) if phrases else text
    key = _option_key(said)
    matches = [letter for letter, choice in zip(letters, choices, strict=False) if key and _option_key(choice) == key]
    return matches[0] if len(matches) == 1 else ""


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
    """True/False only when certain without math-verify: the same normalised spelling, or two plain decimal
    numbers compared exactly (``0.50`` = ``.5``; ``1000001`` != ``1000000``, no tolerance); an empty
    prediction is wrong. None otherwise: math-verify decides (fractions, lists, LaTeX, units, ...)."""
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if not p:
        return False
    if p == g:
        return True
    if _PLAIN_NUMBER.fullmatch(p) and _PLAIN_NUMBER.fullmatch(g):
        return Decimal(p) == Decimal(g)
    return None


_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")
_COLUMN_VECTOR = re.compile(r"\\begin\{[pb]matrix\}((?:(?!&|\\end).)*)\\end\{[pb]matrix\}", re.DOTALL)
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_RELATION = re.compile(r"(<=|>=|\\leq?|\\geq?|\\lt|\\gt|\\ngtr|<|>|\u2264|\u2265)")
_LESS = {"<": "(", "\\lt": "(", "<=": "[", "\\le": "[", "\\leq": "[", "\u2264": "["}
_GREATER = {">": "(", "\\gt": "(", ">=": "[", "\\ge": "[", "\\geq": "[", "\u2265": "["}
_CLOSE = {"(": ")", "[": "]"}
_VARIABLE = re.compile(r"[a-zA-Z]")
_FLIP = {  # a < x  is  x > a
    "<": ">", ">": "<", "\\lt": "\\gt", "\\gt": "\\lt", "<=": ">=", ">=": "<=", "\\le": "\\ge", "\\ge": "\\le",
    "\\leq": "\\geq", "\\geq": "\\leq", "\u2264": "\u2265", "\u2265": "\u2264",
}  # fmt: skip


def _repeating_to_fraction(match: re.Match[str]) -> str:
    """``0.\\overline{3}`` -> ``\\frac{1}{3}``, ``1.2\\overline{45}`` -> ``\\frac{137}{110}``."""
    sign, whole, fixed, period = match.groups()
    value = Fraction(int(whole or 0)) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    value = -value if sign else value
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}" if value.denominator != 1 else str(value.numerator)


def _one_interval(part: str) -> str | None:
    """``2 \\le x < 5`` -> ``[2,5)``, ``x > 3`` -> ``(3,\\infty)``; None when ``part`` is not one such relation."""
    tokens = [t.strip() for t in _RELATION.split(part.replace(" ", ""))]
    if len(tokens) == 5 and _VARIABLE.fullmatch(tokens[2]) and tokens[0] and tokens[4]:
        a, op1, _, op2, b = tokens
        if op1 in _LESS and op2 in _LESS:
            return f"{_LESS[op1]}{a},{b}{_CLOSE[_LESS[op2]]}"
        if op1 in _GREATER and op2 in _GREATER:
            return f"{_GREATER[op2]}{b},{a}{_CLOSE[_GREATER[op1]]}"
        return None
    if len(tokens) == 3 and tokens[0] and tokens[2]:
        lhs, op, rhs = tokens
        if _VARIABLE.fullmatch(rhs) and not _VARIABLE.fullmatch(lhs):  # 3 < x  ==  x > 3
            lhs, rhs, op = rhs, lhs, _FLIP.get(op, op)
        if not _VARIABLE.fullmatch(lhs):
            return None
        if op in _LESS:
            return f"(-\\infty,{rhs}{_CLOSE[_LESS[op]]}"
        if op in _GREATER:
            return f"{_GREATER[op]}{rhs},\\infty)"
    return None


def _inequality_to_interval(answer: str) -> str | None:
    """A solution set written as inequalities in one variable, as intervals: ``x < -2 \\text{ or } x > 2``
    -> ``(-\\infty,-2)\\cup(2,\\infty)``; None when ``answer`` is not that."""
    if not _RELATION.search(answer):
        return None
    text = re.sub(r"\\text\{\s*or\s*\}|\\quad|\\lor|\\cup", " or ", answer)
    parts = [p for p in re.split(r"\s+or\s+|\s*\bor\b\s*", text) if p.strip()]
    intervals = [_one_interval(p) for p in parts]
    if not intervals or any(i is None for i in intervals):
        return None
    return "\\cup".join(str(i) for i in intervals)


def canonical_math(answer: str) -> str:
    """Spellings math-verify does not read, rewritten as ones it does: repeating decimals as fractions,
    column vectors as tuples, a bare ``pi`` as ``\\pi``, ``6e8`` as ``600000000``, one-variable
    inequalities as intervals."""
    s = answer.strip()
    s = _REPEATING.sub(_repeating_to_fraction, s)
    column = _COLUMN_VECTOR.fullmatch(s.strip("$ "))
    if column:  # a column vector as the tuple of its entries
        s = "(" + ", ".join(e.strip() for e in re.split(r"\\\\", column.group(1)) if e.strip()) + ")"
    s = re.sub(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])", r"\\pi", s)
    if _SCIENTIFIC.fullmatch(s):
        value = Decimal(s)
        s = format(value.normalize(), "f") if value == value.to_integral_value() else format(value, "f")
    interval = _inequality_to_interval(s.strip("$"))
    return interval if interval is not None else s


def candidate_pairs(predicted: str, gold: str) -> list[tuple[str, str]]:
    """The readings under which ``predicted`` may equal ``gold``: both in :func:`canonical_math` form; and
    when only the prediction is a percentage, also the prediction divided by 100 (``25\\%`` = ``0.25``)."""
    p, g = canonical_math(predicted), canonical_math(gold)
    pairs = [(p, g)]
    percent = re.fullmatch(r"\s*\$?(-?\d+(?:\.\d+)?)\s*\\?%\s*\$?\s*", p)
    if percent and "%" not in g:
        pairs.append((str(Decimal(percent.group(1)) / 100), g))
    return pairs


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
        """One verdict per (predicted, gold) pair, in order: equal under any of its :func:`candidate_pairs`
        readings, each settled by :func:`quick_equal` when certain, else by math-verify."""
        verdicts: list[bool | None] = [None] * len(pairs)
        jobs: list[tuple[int, str, str]] = []
        for i, (predicted, gold) in enumerate(pairs):
            readings = candidate_pairs(predicted, gold)
            quick = [quick_equal(p, g) for p, g in readings]
            if any(q is True for q in quick):
                verdicts[i] = True
            elif all(q is False for q in quick):
                verdicts[i] = False
            else:
                jobs += [(i, p, g) for (p, g), q in zip(readings, quick, strict=True) if q is None]
        for (i, _, _), same in zip(jobs, self._verify([(p, g) for _, p, g in jobs]), strict=True):
            verdicts[i] = bool(verdicts[i]) or same
        return [bool(v) for v in verdicts]

    def _verify(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """math-verify's verdict per pair, in the workers (a check past the hard limit is False)."""
        verdicts: list[bool | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))
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
