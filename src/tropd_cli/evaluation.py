"""Evaluation engine: batched generation on a suite's tasks, answer extraction, scoring."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tropd_cli.config import EvalSuiteConfig, EvalTaskConfig
from tropd_cli.data import Example, format_prompt, load_examples, reasoning_gym_examples
from tropd_cli.rollout import completion_mask, sample, seeded, tokenize_prompts

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, with nested braces."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _clean_number(token: str) -> str:
    token = token.replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", token):
        token = token.split(".")[0]
    return token


def extract_answer(text: str) -> str:
    """The final answer in a completion: ``\\boxed{}``, else the number after the last "answer", else the last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    lowered = text.lower()
    at = lowered.rfind("answer")
    if at >= 0:
        match = _NUMBER.search(text, at)
        if match:
            return _clean_number(match.group())
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else text.strip()


def answers_match(predicted: str, gold: str) -> bool:
    """Exact, then numeric, equality (math-verify based checking for LaTeX answers comes with eval suites)."""
    if predicted.strip() == gold.strip():
        return True
    try:
        return abs(float(_clean_number(predicted)) - float(_clean_number(gold))) < 1e-6
    except ValueError:
        return False


Grader = Callable[[list[str], list[Example]], list[tuple[str, float]]]


@dataclass
class Task:
    """Examples of one benchmark plus ``grade``: completions -> (extracted answer, score) per sample."""

    name: str
    examples: list[Example]
    grade: Grader
    prompts: list[str] | None = None  # what the model is asked, when it differs from ``example.prompt``


def answer_grader(scorer: Callable[[str, Example], float]) -> Grader:
    """Math-style grading: extract the final answer, then score it against the example."""

    def grade(completions: list[str], examples: list[Example]) -> list[tuple[str, float]]:
        out = []
        for text, ex in zip(completions, examples, strict=True):
            answer = extract_answer(text)
            out.append((answer, scorer(answer, ex)))
        return out

    return grade


CODE_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"


def _humaneval_task(cfg: EvalTaskConfig) -> Task:
    from tropd_cli.code_eval import extract_code, load_humaneval, score_humaneval

    examples = load_humaneval(cfg.path)[: cfg.size or None]

    def grade(completions: list[str], exs: list[Example]) -> list[tuple[str, float]]:
        scores = score_humaneval(exs, completions)  # every program in the sandbox, in parallel
        return [(extract_code(text, ex.prompt), s) for text, ex, s in zip(completions, exs, scores, strict=True)]

    prompts = [f"{CODE_INSTRUCTION}```python\n{ex.prompt}```" for ex in examples]
    return Task(cfg.name, examples, grade, prompts)


def load_task(cfg: EvalTaskConfig) -> Task:
    if cfg.source == "humaneval":
        return _humaneval_task(cfg)
    if cfg.source == "reasoning_gym":
        examples, rg_task = reasoning_gym_examples(cfg.name, size=cfg.size, seed=cfg.seed, kwargs=cfg.generator_kwargs)

        def rg_score(answer: str, ex: Example) -> float:
            return float(rg_task.score_answer(answer, ex.metadata))

        return Task(cfg.name, examples, answer_grader(rg_score))
    examples = load_examples(
        source=cfg.source,
        name=cfg.name,
        path=cfg.path,
        split=cfg.split,
        subset=cfg.subset,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        size=cfg.size,
        seed=cfg.seed,
        generator_kwargs=cfg.generator_kwargs,
    )
    return Task(cfg.name, examples, answer_grader(lambda answer, ex: float(answers_match(answer, ex.answer or ""))))


@dataclass
class TaskResult:
    task: str
    accuracy: float
    n: int
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    suite: EvalSuiteConfig,
    *,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[TaskResult]:
    """Generate ``suite.n_samples`` completions per problem (batched, longest prompts first) and score them."""
    device = next(model.parameters()).device
    results = []
    for task in tasks:
        t0 = time.perf_counter()
        asks = task.prompts or [ex.prompt for ex in task.examples]
        prompts = [
            format_prompt(
                tokenizer,
                ask,
                system_prompt=suite.system_prompt,
                suffix=suite.prompt_suffix,
                chat_template=suite.chat_template,
            )
            for ask in asks
        ]
        jobs = [(i, k) for i in range(len(prompts)) for k in range(suite.n_samples)]
        jobs.sort(key=lambda job: -len(prompts[job[0]]))  # similar lengths share a batch: less padding
        completions: dict[tuple[int, int], str] = {}
        samples: list[dict[str, Any]] = []
        for b, start in enumerate(range(0, len(jobs), suite.batch_size)):
            chunk = jobs[start : start + suite.batch_size]
            ids, mask = tokenize_prompts(
                tokenizer, [prompts[i] for i, _ in chunk], max_prompt_tokens=4096, device=device
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
            )
            valid = completion_mask(out, tokenizer.eos_token_id)
            for row, job in enumerate(chunk):
                tokens = out[row][valid[row]]
                completions[job] = str(tokenizer.decode(tokens, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(chunk))
        order = sorted(completions)
        graded = task.grade([completions[job] for job in order], [task.examples[i] for i, _ in order])
        for (i, k), (answer, score) in zip(order, graded, strict=True):
            ex = task.examples[i]
            samples.append(
                {
                    "task": task.name,
                    "problem_id": ex.uid,
                    "sample_idx": k,
                    "prompt": ex.prompt,
                    "completion": completions[(i, k)],
                    "extracted": answer,
                    "gold": ex.answer,
                    "score": score,
                }
            )
        accuracy = sum(float(s["score"]) for s in samples) / max(1, len(samples))
        results.append(TaskResult(task.name, accuracy, len(task.examples), time.perf_counter() - t0, samples))
    return results


@torch.no_grad()
def count_jobs(tasks: list[Task], suite: EvalSuiteConfig) -> int:
    return sum(len(t.examples) for t in tasks) * suite.n_samples
