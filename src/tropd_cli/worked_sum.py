"""``worked_sum``: reasoning-gym chain sums answered with worked steps, split into disjoint train and eval sets.

The task of the real-LM lab (``experiment=smol_lab``, :mod:`tropd_cli.smol_lab`). A problem is a chain of
additions and subtractions (``37 + 48 - 19 + 7``); its worked solution takes one line per operation and
ends in a sentence that states the answer::

    37 + 48 = 85
    85 - 19 = 66
    66 + 7 = 73
    The answer is 73.

About 30-40 SmolLM2 tokens (digits are single tokens), so a teacher prefix is a fraction of a response.

**Train and eval are disjoint by construction.** Every expression is assigned to one split by a hash of
its text (:func:`split_of`): ``split=eval`` draws only expressions whose hash lands in the eval share,
``split=train`` only the others. No seed or size can make the two sets share a problem.

It is registered as the reasoning-gym task ``worked_sum`` when :mod:`tropd_cli.data` is imported, so the
training dataset (``dataset.name=worked_sum``) and the eval suites (``benchmark: reasoning_gym``) use
reasoning-gym's own generator plumbing. Its scorer is exact: 1 when the extracted number equals the
result, else 0 (reasoning-gym's chain_sum scorer gives partial credit for near misses).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset

NAME = "worked_sum"
SPLITS = ("train", "eval")


def split_of(expression: str, eval_share: float) -> str:
    """The split an expression belongs to: a pure function of its text (sha256), so splits never overlap."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_share else "train"


def worked_solution(expression: str) -> tuple[str, int]:
    """One line per operation, then ``The answer is N.``; also the result."""
    parts = expression.split(" ")
    value = int(parts[0])
    lines = []
    for op, term in zip(parts[1::2], parts[2::2], strict=True):
        new = value + int(term) if op == "+" else value - int(term)
        lines.append(f"{value} {op} {term} = {new}")
        value = new
    lines.append(f"The answer is {value}.")
    return "\n".join(lines), value


@dataclass
class WorkedSumConfig(ChainSumConfig):
    split: str = "train"  # train | eval
    eval_share: float = 0.2  # share of all expressions that belong to the eval split
    question: str = "Calculate {expression} step by step."

    def validate(self) -> None:
        super().validate()
        assert self.split in SPLITS, f"split must be one of {SPLITS}"
        assert 0.0 < self.eval_share < 1.0, "eval_share must be in (0, 1)"


class WorkedSumDataset(ChainSumDataset):
    """chain_sum problems of one split, with worked solutions in ``metadata['solution']``."""

    config: WorkedSumConfig

    def __getitem__(self, idx: int) -> dict[str, Any]:
        cfg = self.config
        rng = random.Random(f"{self.seed}/{idx}")
        while True:  # rejection sampling into the split: about 1/share draws on average
            num_terms = rng.randint(cfg.min_terms, cfg.max_terms)
            num_digits = rng.randint(cfg.min_digits, cfg.max_digits)
            low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
            expression, result = self._generate_task(rng, num_terms, low, 10**num_digits - 1)
            if split_of(expression, cfg.eval_share) == cfg.split:
                break
        solution, value = worked_solution(expression)
        assert value == result
        return {
            "question": cfg.question.format(expression=expression),
            "answer": str(result),
            "metadata": {
                "source_dataset": NAME,
                "source_index": idx,
                "split": cfg.split,
                "expression": expression,
                "solution": solution,
                "num_terms": num_terms,
                "num_digits": num_digits,
            },
        }

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float:
        """Exact: 1.0 when ``answer`` is the result as an integer (``"+73"``, ``"73.0"``, ``"073"`` count)."""
        if not answer:
            return 0.0
        try:
            value = float(answer.replace(",", "").strip())
        except ValueError:
            return 0.0
        return float(value == int(entry["answer"]))


def register() -> None:
    """Make ``worked_sum`` a reasoning-gym task (idempotent)."""
    from reasoning_gym.factory import DATASETS, register_dataset

    if NAME not in DATASETS:
        register_dataset(NAME, WorkedSumDataset, WorkedSumConfig)
