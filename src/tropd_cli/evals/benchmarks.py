"""Benchmarks: where each one's problems come from, what the model is asked, and how an answer is graded.

Every benchmark loads from its usual hub dataset or, with ``path``, from a local file with the same
fields (schemas in docs/evaluation.md). :func:`load_task` turns an :class:`EvalTaskConfig` into a
:class:`Task`; ``BENCHMARKS`` maps each ``benchmark`` name to its builder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tropd_cli.config import EvalTaskConfig
from tropd_cli.data import Example, hub_records, read_records, reasoning_gym_examples
from tropd_cli.errors import UserError
from tropd_cli.evals.answers import extract_answer, extract_choice, gsm8k_gold, math_judge
from tropd_cli.evals.code import (
    called_functions,
    extract_code,
    extract_fenced,
    lcb_func_name,
    lcb_prompt,
    load_humaneval,
    mbpp_prompt,
    score_humaneval,
    score_livecodebench,
    score_mbpp,
)
from tropd_cli.evals.instructions import check_following, unsupported

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the form "
    "'Answer: $LETTER' (without quotes) where LETTER is one of {letters}. Think step by step before answering."
)
LETTERS = "ABCDEFGHIJ"  # option labels of multiple-choice questions, in order
CODE_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"


@dataclass
class Grade:
    """One completion's verdict: the answer extracted from it, its score in [0, 1], extra per-sample metrics."""

    answer: str
    score: float
    extra: dict[str, float] = field(default_factory=dict)


Grader = Callable[[list[str], list[Example]], list[Grade]]
#: The grader's own equality of two extracted answers, for majority voting: one verdict per pair.
SameAnswer = Callable[[Sequence[tuple[str, str]]], list[bool]]


@dataclass
class Task:
    """One benchmark's problems: ``prompts[i]`` is what the model is asked about ``examples[i]``.

    ``kind``: ``math`` and ``choice`` answers are voted on for maj@n; ``code`` and ``instructions`` are not.
    """

    name: str
    kind: str  # math | choice | code | instructions
    examples: list[Example]
    prompts: list[str]
    grade: Grader
    skipped: int = 0  # problems left out because they cannot be graded (reported in the results)
    same_answer: SameAnswer | None = None  # how maj@n groups answers; None: by normalised spelling


@dataclass(frozen=True)
class Source:
    """A benchmark's usual hub dataset."""

    hub_name: str
    subset: str | None
    split: str


def _rows(cfg: EvalTaskConfig, source: Source, where: str, *, cut: bool = True) -> list[dict[str, Any]]:
    """The benchmark's rows: ``cfg.path`` when given, else the hub dataset; the first ``cfg.size`` of them
    (``cut=False``: all of them, for loaders that filter rows first and then keep ``size``)."""
    if cfg.path:
        rows = read_records(cfg.path, cfg.split or "train", option=f"{where}.path")
    else:
        name = cfg.hub_name or source.hub_name
        split, subset = cfg.split or source.split, cfg.subset or source.subset
        rows = hub_records(name, split, subset, local_option=f"{where}.path=FILE")
    if not rows:
        raise UserError(f"{_origin(cfg, source)} has no rows; point {where}.path to a non-empty file")
    return _first(rows, cfg.size) if cut else rows


def _origin(cfg: EvalTaskConfig, source: Source) -> str:
    """Where a task's rows come from, for error messages."""
    return cfg.path or cfg.hub_name or source.hub_name


def _first(items: list[Any], size: int) -> list[Any]:
    return items[:size] if size else items


def _field(row: dict[str, Any], names: tuple[str, ...], origin: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise UserError(f"{origin}: a row has none of the fields {', '.join(names)}; available fields: {', '.join(row)}")


def _uid(row: dict[str, Any], fallback: str) -> str:
    for key in ("id", "unique_id", "problem_id", "task_id", "question_id", "key"):
        if row.get(key) is not None:
            return str(row[key])
    return fallback


# ---------------------------------------------------------------------------------------------
# Math: a question and a gold answer, graded by math-verify


def _math_grader() -> Grader:
    def grade(completions: list[str], examples: list[Example]) -> list[Grade]:
        answers = [extract_answer(text) for text in completions]
        verdicts = math_judge().equal([(a, ex.answer or "") for a, ex in zip(answers, examples, strict=True)])
        return [Grade(a, float(v)) for a, v in zip(answers, verdicts, strict=True)]

    return grade


def _math_task(
    cfg: EvalTaskConfig,
    where: str,
    source: Source,
    prompt_fields: tuple[str, ...] = ("problem", "question", "prompt"),
    answer_fields: tuple[str, ...] = ("answer",),
    gold: Callable[[str], str] = str,
) -> Task:
    rows = _rows(cfg, source, where)
    prompt_fields = (cfg.prompt_field,) if cfg.prompt_field else prompt_fields
    answer_fields = (cfg.answer_field,) if cfg.answer_field else answer_fields
    origin = _origin(cfg, source)
    examples = [
        Example(
            prompt=str(_field(row, prompt_fields, origin)),
            answer=gold(str(_field(row, answer_fields, origin))),
            metadata=row,
            uid=_uid(row, f"{cfg.name}/{i}"),
        )
        for i, row in enumerate(rows)
    ]
    prompts = [f"{ex.prompt}\n\n{MATH_INSTRUCTION}" for ex in examples]
    return Task(cfg.name, "math", examples, prompts, _math_grader(), same_answer=_math_same)


def _math_same(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Majority voting groups math answers by the grading equality (math-verify)."""
    return math_judge().equal(pairs)


def _reasoning_gym_task(cfg: EvalTaskConfig, where: str) -> Task:
    if cfg.size <= 0:
        raise UserError(f"{where}.size must be positive for reasoning-gym (it sets how many problems to generate)")
    examples, rg_task = reasoning_gym_examples(
        cfg.task or cfg.name, size=cfg.size, seed=cfg.seed, kwargs=cfg.generator_kwargs
    )

    from reasoning_gym.utils import extract_answer as rg_extract

    def grade(completions: list[str], exs: list[Example]) -> list[Grade]:
        out = []
        for text, ex in zip(completions, exs, strict=True):
            # reasoning-gym's own extraction (the last <answer>...</answer>), else the usual final answer.
            tagged = rg_extract(text)
            answer = tagged if tagged is not None else extract_answer(text)
            out.append(Grade(answer, float(rg_task.score_answer(answer, ex.metadata))))  # its own scorer
        return out

    return Task(cfg.name, "math", examples, [ex.prompt for ex in examples], grade)


# ---------------------------------------------------------------------------------------------
# Multiple choice


def _choice_prompt(question: str, choices: list[str], letters: str) -> str:
    options = "\n".join(f"{letter}) {choice}" for letter, choice in zip(letters, choices, strict=True))
    return f"{CHOICE_INSTRUCTION.format(letters=letters)}\n\n{question}\n\n{options}"


def _choice_grader() -> Grader:
    def grade(completions: list[str], examples: list[Example]) -> list[Grade]:
        out = []
        for text, ex in zip(completions, examples, strict=True):
            letter = extract_choice(text, ex.metadata["_letters"], ex.metadata["_choices"])
            out.append(Grade(letter, float(letter == ex.answer)))
        return out

    return grade


def _choice_task(cfg: EvalTaskConfig, items: list[tuple[str, list[str], int, dict[str, Any]]]) -> Task:
    """``items``: (question, choices, index of the right one, row) per problem."""
    examples, prompts = [], []
    for i, (question, choices, correct, row) in enumerate(items):
        letters = LETTERS[: len(choices)]
        meta = {**row, "_letters": letters, "_choices": choices}
        examples.append(
            Example(prompt=question, answer=letters[correct], metadata=meta, uid=_uid(row, f"{cfg.name}/{i}"))
        )
        prompts.append(_choice_prompt(question, choices, letters))
    return Task(cfg.name, "choice", examples, prompts, _choice_grader())


def _gpqa_task(cfg: EvalTaskConfig, where: str) -> Task:
    """GPQA rows hold the right answer and three wrong ones; their order is shuffled with ``seed`` per problem."""
    source = Source("Idavidrein/gpqa", "gpqa_diamond", "train")
    rows = _rows(cfg, source, where)
    origin = _origin(cfg, source)
    items = []
    for i, row in enumerate(rows):
        right = str(_field(row, ("Correct Answer",), origin)).strip()
        wrong = [str(_field(row, (f"Incorrect Answer {j}",), origin)).strip() for j in (1, 2, 3)]
        choices = [right, *wrong]
        random.Random(f"{cfg.seed}/{_uid(row, str(i))}").shuffle(choices)
        items.append((str(_field(row, ("Question",), origin)).strip(), choices, choices.index(right), row))
    return _choice_task(cfg, items)


def _mmlu_redux_task(cfg: EvalTaskConfig, where: str) -> Task:
    """MMLU-Redux: rows judged erroneous by its annotators are left out unless ``options.keep_errors``.

    From the hub without ``subset``, every subject config is loaded.
    """
    source = Source("edinburgh-dawg/mmlu-redux-2.0", None, "test")
    if cfg.path or cfg.subset:
        rows = _rows(cfg, source, where, cut=False)
    else:
        import datasets

        name = cfg.hub_name or source.hub_name
        try:
            subjects = datasets.get_dataset_config_names(name)
        except Exception as exc:
            raise UserError(
                f"could not list the subjects of {name!r} ({exc}); offline, pass {where}.path=FILE"
            ) from exc
        rows = []
        for subject in subjects:
            sub = hub_records(name, cfg.split or source.split, subject, local_option=f"{where}.path=FILE")
            rows += [{**row, "subject": subject} for row in sub]
    origin = _origin(cfg, source)
    keep_errors = bool(cfg.options.get("keep_errors", False))
    items = []
    for row in rows:
        if not keep_errors and row.get("error_type") not in (None, "ok"):
            continue
        choices = [str(c) for c in _field(row, ("choices",), origin)]
        answer = _field(row, ("answer",), origin)
        index = (
            LETTERS.index(answer.strip().upper()) if isinstance(answer, str) and not answer.isdigit() else int(answer)
        )
        items.append((str(_field(row, ("question",), origin)), choices, index, row))
    if not items:
        raise UserError(f"{origin}: no usable MMLU-Redux rows (all were marked erroneous); see options.keep_errors")
    return _choice_task(cfg, _first(items, cfg.size))


# ---------------------------------------------------------------------------------------------
# Code, graded in the sandbox


def _humaneval_task(cfg: EvalTaskConfig, where: str) -> Task:

    examples = load_humaneval(cfg.path)
    examples = examples[: cfg.size] if cfg.size else examples

    def grade(completions: list[str], exs: list[Example]) -> list[Grade]:
        scores = score_humaneval(exs, completions)  # every program in the sandbox, in parallel
        return [Grade(extract_code(text, ex.prompt), s) for text, ex, s in zip(completions, exs, scores, strict=True)]

    prompts = [f"{CODE_INSTRUCTION}```python\n{ex.prompt}```" for ex in examples]
    return Task(cfg.name, "code", examples, prompts, grade)


def _mbpp_task(cfg: EvalTaskConfig, where: str) -> Task:

    rows = _rows(cfg, Source("google-research-datasets/mbpp", "full", "test"), where)
    examples = [
        Example(prompt=mbpp_prompt(row), answer=row.get("code"), metadata=row, uid=_uid(row, f"mbpp/{i}"))
        for i, row in enumerate(rows)
    ]

    def grade(completions: list[str], exs: list[Example]) -> list[Grade]:
        scores = score_mbpp([ex.metadata for ex in exs], completions)
        return [
            Grade(extract_fenced(text, called_functions(ex.metadata["test_list"])), s)
            for text, ex, s in zip(completions, exs, scores, strict=True)
        ]

    return Task(cfg.name, "code", examples, [ex.prompt for ex in examples], grade)


def _livecodebench_task(cfg: EvalTaskConfig, where: str) -> Task:
    """LiveCodeBench problems released in [options.start_date, options.end_date) (ISO dates, both optional)."""

    source = Source("livecodebench/code_generation_lite", "release_v6", "test")
    rows = _rows(cfg, source, where, cut=False)
    origin = _origin(cfg, source)
    start, end = cfg.options.get("start_date"), cfg.options.get("end_date")
    rows = [
        row
        for row in rows
        if (start is None or str(row.get("contest_date", "")) >= str(start))
        and (end is None or str(row.get("contest_date", "")) < str(end))
    ]
    if not rows:
        raise UserError(f"{where}: no LiveCodeBench problems between {start} and {end}; widen {where}.options dates")
    rows = _first(rows, cfg.size)
    examples = [Example(prompt=lcb_prompt(row), metadata=row, uid=_uid(row, f"lcb/{i}")) for i, row in enumerate(rows)]

    def grade(completions: list[str], exs: list[Example]) -> list[Grade]:
        try:
            scores = score_livecodebench([ex.metadata for ex in exs], completions)
        except ValueError as exc:  # a row whose test cases do not decode: the data file is broken
            raise UserError(f"{origin}: {exc}; fix or remove that problem") from exc
        return [
            Grade(extract_fenced(text, [name] if (name := lcb_func_name(ex.metadata)) else []), s)
            for text, ex, s in zip(completions, exs, scores, strict=True)
        ]

    return Task(cfg.name, "code", examples, [ex.prompt for ex in examples], grade)


# ---------------------------------------------------------------------------------------------
# Instruction following


def _instructions_task(cfg: EvalTaskConfig, where: str, source: Source) -> Task:
    """IFEval/IFBench: score = prompt-level strict accuracy; loose and instruction-level ones are extras.

    Prompts with an instruction this project cannot check are refused, or with
    ``options.skip_unsupported: true`` left out (and counted in the results as ``skipped``).
    """

    rows = _rows(cfg, source, where, cut=False)
    origin = _origin(cfg, source)
    examples = []
    for i, row in enumerate(rows):
        ids = [str(x) for x in _field(row, ("instruction_id_list",), origin)]
        kwargs = row.get("kwargs") or [{}] * len(ids)
        if isinstance(kwargs, str):
            kwargs = json.loads(kwargs)
        missing = unsupported(ids)
        if missing and not cfg.options.get("skip_unsupported", False):
            raise UserError(
                f"{origin}: no checker for instruction(s) {', '.join(missing)}; "
                f"set {where}.options.skip_unsupported=true to leave those prompts out"
            )
        if missing:
            continue
        row = {**row, "instruction_id_list": ids, "kwargs": kwargs}
        examples.append(
            Example(prompt=str(_field(row, ("prompt",), origin)), metadata=row, uid=_uid(row, f"{cfg.name}/{i}"))
        )
    if not examples:
        raise UserError(f"{origin}: every prompt has an instruction without a checker; nothing to score")
    skipped = len(rows) - len(examples)
    examples = _first(examples, cfg.size)

    def grade(completions: list[str], exs: list[Example]) -> list[Grade]:
        out = []
        for text, ex in zip(completions, exs, strict=True):
            strict, loose = check_following(text, ex.metadata["instruction_id_list"], ex.metadata["kwargs"], ex.prompt)
            # IFEval's instruction-level accuracy pools every instruction of the task: sums over the
            # samples divided by the summed ``_total`` (see evaluation.task_metrics).
            extra = {
                "prompt_loose": float(all(loose)),
                "instruction_strict": float(sum(strict)),
                "instruction_loose": float(sum(loose)),
                "instruction_strict_total": float(len(strict)),
                "instruction_loose_total": float(len(loose)),
            }
            out.append(Grade("", float(all(strict)), extra))
        return out

    return Task(cfg.name, "instructions", examples, [ex.prompt for ex in examples], grade, skipped)


BENCHMARKS: dict[str, Callable[[EvalTaskConfig, str], Task]] = {
    "gsm8k": lambda c, w: _math_task(
        c, w, Source("openai/gsm8k", "main", "test"), ("question",), ("answer",), gold=gsm8k_gold
    ),
    "math500": lambda c, w: _math_task(c, w, Source("HuggingFaceH4/MATH-500", None, "test")),
    "aime24": lambda c, w: _math_task(c, w, Source("HuggingFaceH4/aime_2024", None, "train")),
    "aime25": lambda c, w: _math_task(c, w, Source("math-ai/aime25", None, "test")),
    "amc23": lambda c, w: _math_task(c, w, Source("math-ai/amc23", None, "test")),
    "math": lambda c, w: _math_task(c, w, Source(c.hub_name or "", c.subset, c.split or "test")),
    "reasoning_gym": _reasoning_gym_task,
    "humaneval": _humaneval_task,
    "mbpp": _mbpp_task,
    "livecodebench": _livecodebench_task,
    "gpqa_diamond": _gpqa_task,
    "mmlu_redux": _mmlu_redux_task,
    "ifeval": lambda c, w: _instructions_task(c, w, Source("google/IFEval", None, "train")),
    "ifbench": lambda c, w: _instructions_task(c, w, Source("allenai/IFBench_test", None, "train")),
}


def load_task(cfg: EvalTaskConfig, where: str = "task") -> Task:
    """The :class:`Task` a task config names; ``where`` is its config key (e.g. ``eval_suite.math.tasks.0``),
    used in error messages."""
    if cfg.benchmark not in BENCHMARKS:
        raise UserError(f"{where}.benchmark={cfg.benchmark!r} is not an option; choose one of: {', '.join(BENCHMARKS)}")
    if cfg.benchmark == "math" and not (cfg.path or cfg.hub_name):
        raise UserError(f"{where}: benchmark=math needs {where}.path=FILE or {where}.hub_name=DATASET")
    return BENCHMARKS[cfg.benchmark](cfg, where)
