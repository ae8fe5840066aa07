"""Evaluation engine: batched generation for a suite's tasks, stop strings, grading and metrics.

Engine code (no Hydra, no printing). :func:`evaluate` generates and grades; :func:`score_samples`
grades existing completions (``tropd eval generations=PATH``); :func:`task_metrics` turns graded
samples into avg@n, pass@k and maj@n.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tropd_cli.batch import completion_mask
from tropd_cli.config import EvalSuiteConfig
from tropd_cli.data import format_prompt
from tropd_cli.errors import UserError
from tropd_cli.evals.answers import normalize_answer
from tropd_cli.evals.benchmarks import Grade, SameAnswer, Task, load_task
from tropd_cli.evals.code import pass_at_k
from tropd_cli.evals.reasoning import DEFAULT_TAGS, graded_text, opened_by_prompt, tags_for
from tropd_cli.rng import seeded
from tropd_cli.rollout.sampling import sample, tokenize_prompts

#: A sample counts as correct for pass@k when its score reaches this (scores are 0/1 but for
#: reasoning-gym scorers that give partial credit; those count in avg@n, not in pass@k).
CORRECT = 1.0 - 1e-9


# ---------------------------------------------------------------------------------------------
# Stop strings


def _answer_is_open(text: str) -> bool:
    """Inside an unclosed ``\\boxed{`` or an unclosed ``` fence at the end of ``text``."""
    if text.count("```") % 2 == 1:
        return True
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return False
    depth = 0
    for ch in text[text.index("{", start) :]:
        depth += 1 if ch == "{" else -1 if ch == "}" else 0
    return depth > 0


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where ``text`` is cut: the first stop string that does not sit inside an open ``\\boxed{}`` or code
    fence (a stop string there is part of the answer), or None."""
    if not stops:
        return None
    pattern = re.compile("|".join(re.escape(s) for s in sorted(stops, key=len, reverse=True) if s))
    for match in pattern.finditer(text):
        if not _answer_is_open(text[: match.start()]):
            return match.start()
    return None


def apply_stop(text: str, stops: Sequence[str]) -> str:
    cut = find_stop(text, stops)
    return text if cut is None else text[:cut]


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclass
class TaskResult:
    """One (model, suite, task): its metrics and every graded sample (a generations.jsonl line each)."""

    suite: str
    task: str
    metrics: dict[str, float]
    n_problems: int
    skipped: int = 0
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The headline number: the mean score over problems and samples (avg@n)."""
        return self.metrics[next(k for k in self.metrics if k.startswith("avg@"))]


def vote(answers: Sequence[str], same: SameAnswer | None = None) -> int | None:
    """Index (in ``answers``) of the majority answer's first occurrence, or None when all are empty.

    Answers are grouped first by their normalised spelling, then those groups by ``same`` (the grader's
    own equality, e.g. math-verify: ``0.5`` and ``\\frac{1}{2}`` are one vote); ties go to the group that
    appears first."""
    groups: list[list[int]] = []  # indices into answers; each group's first member is its representative
    by_spelling: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = normalize_answer(str(answer))
        if not key:
            continue
        if key in by_spelling:
            groups[by_spelling[key]].append(i)
            continue
        match = None
        if same is not None and groups:
            verdicts = same([(str(answer), str(answers[g[0]])) for g in groups])
            match = next((n for n, v in enumerate(verdicts) if v), None)
        if match is None:
            groups.append([i])
            match = len(groups) - 1
        else:
            groups[match].append(i)
        by_spelling[key] = match
    if not groups:
        return None
    top = max(len(g) for g in groups)
    return next(g[0] for g in groups if len(g) == top)


def task_metrics(
    samples: Sequence[dict[str, Any]],
    *,
    kind: str,
    n: int,
    pass_k: Sequence[int],
    same: SameAnswer | None = None,
) -> dict[str, float]:
    """avg@n, pass@k for each k, maj@n (math and multiple choice, n > 1) and every extra metric.

    An extra ``X`` is the mean over samples, unless an extra ``X_total`` exists: then ``X`` is pooled,
    sum of ``X`` over sum of ``X_total`` (IFEval's instruction-level accuracy counts instructions).

    ``samples``: dicts with ``problem_id``, ``score``, ``extracted`` (and any extras under ``extra``).
    avg@n is the mean score over all samples of all problems (the paper's "average of n"); pass@k is
    the unbiased estimator of Chen et al. (2021) from each problem's n samples; maj@n scores the most
    frequent extracted answer per problem (:func:`vote`, grouped by ``same``, the grader's equality).
    """
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_problem[str(s["problem_id"])].append(s)
    if not by_problem:
        return {f"avg@{n}": 0.0}
    out = {f"avg@{n}": sum(float(s["score"]) for s in samples) / len(samples)}
    for k in pass_k:
        short = next((pid for pid, group in by_problem.items() if len(group) < k), None)
        if short is not None:
            raise UserError(
                f"problem {short} has {len(by_problem[short])} samples, fewer than pass@{k} needs; "
                f"lower pass_k or generate more samples (n_samples)"
            )
        out[f"pass@{k}"] = sum(
            pass_at_k(len(group), sum(float(s["score"]) >= CORRECT for s in group), k) for group in by_problem.values()
        ) / len(by_problem)
    if kind in ("math", "choice") and n > 1:
        total = 0.0
        for group in by_problem.values():
            winner = vote([str(s["extracted"]) for s in group], same)
            if winner is not None:
                total += float(group[winner]["score"])
        out[f"maj@{n}"] = total / len(by_problem)
    extras: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for key, value in (s.get("extra") or {}).items():
            extras[key].append(float(value))
    for key, values in extras.items():
        if key.endswith("_total"):
            continue
        totals = extras.get(f"{key}_total")  # a pooled ratio: sum of counts over sum of totals
        out[key] = sum(values) / sum(totals) if totals else sum(values) / len(values)
    return out


# ---------------------------------------------------------------------------------------------
# Generation and grading


@dataclass
class SuiteTasks:
    """A suite's settings with its loaded tasks."""

    name: str
    config: EvalSuiteConfig
    tasks: list[Task]


def load_suites(suites: dict[str, EvalSuiteConfig]) -> list[SuiteTasks]:
    """Load every task of every suite (data files, hub sets, generators) once, before any model runs."""
    return [
        SuiteTasks(name, suite, [load_task(t, f"eval_suite.{name}.tasks.{i}") for i, t in enumerate(suite.tasks)])
        for name, suite in suites.items()
    ]


def count_jobs(suites: Sequence[SuiteTasks]) -> int:
    """Completions to generate for one model: problems x n_samples over every suite."""
    return sum(len(t.examples) * s.config.n_samples for s in suites for t in s.tasks)


@dataclass(frozen=True)
class Reasoning:
    """How a task's completions are read: ``mode`` strip|keep, the tag pairs, and which problems' prompts
    opened a block (their completions start inside it)."""

    mode: str = "strip"
    tags: tuple[tuple[str, str], ...] = DEFAULT_TAGS
    opened: frozenset[int] = frozenset()  # problem indices

    def graded(self, completion: str, problem: int) -> str | None:
        """The text to grade, or None when a reasoning block was left open (no answer given)."""
        if self.mode == "keep":
            return completion
        return graded_text(completion, self.tags, opened=problem in self.opened)


def score_samples(
    task: Task,
    suite_name: str,
    suite: EvalSuiteConfig,
    completions: dict[tuple[int, int], str],
    reasoning: Reasoning | None = None,
) -> TaskResult:
    """Grade ``completions[(problem index, sample index)]`` and compute the task's metrics.

    With ``reasoning`` (default: ``suite.reasoning`` with the default tags) only the text after a closed
    reasoning block is graded; a completion whose block never closes scores 0 and is counted in the
    ``truncated_reasoning`` metric. Each sample keeps the raw ``completion`` and the ``graded`` text.
    """
    t0 = time.perf_counter()
    reasoning = reasoning or Reasoning(suite.reasoning, tags_for(None, suite.reasoning_tags))
    order = sorted(completions)
    graded = [reasoning.graded(completions[job], job[0]) for job in order]
    grades = task.grade([g or "" for g in graded], [task.examples[i] for i, _ in order])
    samples = []
    truncated = 0
    for (i, k), text, grade in zip(order, graded, grades, strict=True):
        ex = task.examples[i]
        if text is None:  # unclosed reasoning: no answer, whatever the grader made of ""
            truncated += 1
            extra = {key: (v if key.endswith("_total") else 0.0) for key, v in grade.extra.items()}
            grade = Grade("", 0.0, extra)
        sample: dict[str, Any] = {
            "suite": suite_name,
            "task": task.name,
            "problem_id": ex.uid,
            "sample_idx": k,
            "prompt": task.prompts[i],
            "completion": completions[(i, k)],
            "graded": text,
            "extracted": grade.answer,
            "gold": ex.answer,
            "score": grade.score,
            **({"extra": grade.extra} if grade.extra else {}),
        }
        if i in reasoning.opened:
            sample["reasoning_opened"] = True
        if reasoning.tags != DEFAULT_TAGS:
            sample["reasoning_tags"] = [list(pair) for pair in reasoning.tags]
        samples.append(sample)
    metrics = task_metrics(samples, kind=task.kind, n=suite.n_samples, pass_k=suite.pass_k, same=task.same_answer)
    if reasoning.mode == "strip":
        metrics["truncated_reasoning"] = float(truncated)
    n_problems = len({i for i, _ in order})
    return TaskResult(suite_name, task.name, metrics, n_problems, task.skipped, time.perf_counter() - t0, samples)


def _stop_checker(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> Callable[[Tensor], Tensor] | None:
    if not stops:
        return None

    def check(tokens: Tensor) -> Tensor:
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return torch.tensor([find_stop(text, stops) is not None for text in texts])

    return check


def format_prompts(tokenizer: PreTrainedTokenizerBase, task: Task, suite: EvalSuiteConfig) -> list[str]:
    """What the model is given for each problem: the task's prompt in the suite's chat template."""
    return [
        format_prompt(
            tokenizer,
            ask,
            system_prompt=suite.system_prompt,
            suffix=suite.prompt_suffix,
            chat_template=suite.chat_template,
        )
        for ask in task.prompts
    ]


def reasoning_for(tokenizer: PreTrainedTokenizerBase, suite: EvalSuiteConfig, prompts: Sequence[str]) -> Reasoning:
    """The suite's reasoning handling for this model: ``<think>`` plus the tags its chat template declares
    and ``suite.reasoning_tags``; the problems whose formatted prompt (``prompts``, from
    :func:`format_prompts`) opens a block."""
    template = getattr(tokenizer, "chat_template", None) if suite.chat_template else None
    tags = tags_for(template if isinstance(template, str) else None, suite.reasoning_tags)
    opened = frozenset(i for i, p in enumerate(prompts) if opened_by_prompt(p, tags))
    return Reasoning(suite.reasoning, tags, opened)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    suite: EvalSuiteConfig,
    *,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
    prompts: Sequence[str] | None = None,
) -> dict[tuple[int, int], str]:
    """``suite.n_samples`` completions per problem, keyed by (problem index, sample index); ``prompts``:
    the task's :func:`format_prompts`, when the caller has them already.

    Jobs are sorted by prompt length (longest first), so a batch holds similar lengths and little
    padding; batch ``b`` samples with ``seeded(seed, b)``. Completions end at EOS, at
    ``max_new_tokens`` or at a stop string (:func:`find_stop`).
    """
    device = next(model.parameters()).device
    prompts = format_prompts(tokenizer, task, suite) if prompts is None else prompts
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    jobs = sorted(((i, k) for i in range(len(prompts)) for k in range(suite.n_samples)), key=lambda j: -lengths[j[0]])
    stop_check = _stop_checker(tokenizer, suite.stop)
    completions: dict[tuple[int, int], str] = {}
    for b, start in enumerate(range(0, len(jobs), suite.batch_size)):
        chunk = jobs[start : start + suite.batch_size]
        ids, mask = tokenize_prompts(
            tokenizer, [prompts[i] for i, _ in chunk], max_prompt_tokens=suite.max_prompt_tokens, device=device
        )
        out = sample(
            model,
            ids,
            mask,
            max_new_tokens=suite.max_new_tokens,
            temperature=suite.temperature,
            top_p=suite.top_p,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            seed=seeded(seed, b),
            stop_check=stop_check,
        )
        valid = completion_mask(out, tokenizer.eos_token_id)
        for row, job in enumerate(chunk):
            text = str(tokenizer.decode(out[row][valid[row]], skip_special_tokens=True))
            completions[job] = apply_stop(text, suite.stop)
        if on_batch is not None:
            on_batch(len(chunk))
    return completions


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suites: Sequence[SuiteTasks],
    *,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[TaskResult]:
    """Generate for and grade every task of every suite; one :class:`TaskResult` per task, in order."""
    results = []
    for suite in suites:
        for task in suite.tasks:
            t0 = time.perf_counter()
            prompts = format_prompts(tokenizer, task, suite.config)
            completions = generate(model, tokenizer, task, suite.config, seed=seed, on_batch=on_batch, prompts=prompts)
            reasoning = reasoning_for(tokenizer, suite.config, prompts)
            result = score_samples(task, suite.name, suite.config, completions, reasoning)
            result.seconds = time.perf_counter() - t0
            results.append(result)
    return results


def rescore(lines: Sequence[dict[str, Any]], suites: Sequence[SuiteTasks]) -> dict[str, list[TaskResult]]:
    """Grade the completions of a generations.jsonl again, per model: ``{model: [TaskResult, ...]}``.

    Each line's ``suite``, ``task`` and ``problem_id`` must name a problem of ``suites``; its raw
    ``completion`` is graded again, read with the reasoning tags and opened block the line records.
    """
    index = {(s.name, t.name): (s, t, {ex.uid: i for i, ex in enumerate(t.examples)}) for s in suites for t in s.tasks}
    grouped: dict[str, dict[tuple[str, str], dict[tuple[int, int], str]]] = defaultdict(lambda: defaultdict(dict))
    opened: dict[str, dict[tuple[str, str], set[int]]] = defaultdict(lambda: defaultdict(set))
    tags: dict[str, dict[tuple[str, str], tuple[tuple[str, str], ...]]] = defaultdict(dict)
    for n, line in enumerate(lines, start=1):
        key = (str(line.get("suite")), str(line.get("task")))
        if key not in index:
            raise UserError(
                f"generations line {n}: suite {key[0]!r} task {key[1]!r} is not in the eval suites "
                f"({', '.join(f'{a}/{b}' for a, b in index)}); pass the suite it was made with (eval_suite=...)"
            )
        uids = index[key][2]
        if str(line.get("problem_id")) not in uids:
            raise UserError(f"generations line {n}: problem {line.get('problem_id')!r} is not in task {key[1]!r}")
        job = (uids[str(line["problem_id"])], int(line.get("sample_idx", 0)))
        model = str(line.get("model", ""))
        grouped[model][key][job] = str(line["completion"])
        if line.get("reasoning_opened"):
            opened[model][key].add(job[0])
        if line.get("reasoning_tags"):
            tags[model][key] = tuple((str(a), str(b)) for a, b in line["reasoning_tags"])
    out: dict[str, list[TaskResult]] = {}
    for model, per_task in grouped.items():
        out[model] = []
        for key, completions in per_task.items():
            suite, task, _ = index[key]
            pairs = tags[model].get(key) or tags_for(None, suite.config.reasoning_tags)
            reasoning = Reasoning(suite.config.reasoning, pairs, frozenset(opened[model][key]))
            out[model].append(score_samples(task, suite.name, suite.config, completions, reasoning))
    return out
