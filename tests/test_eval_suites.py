"""Eval suites end to end on a tiny model: math (reasoning-gym) and code (HumanEval in the sandbox)."""

from __future__ import annotations

import torch

from tropd_cli.config import EvalSuiteConfig, EvalTaskConfig, ModelConfig
from tropd_cli.evaluation import evaluate, load_task
from tropd_cli.models import tiny_random


def test_humaneval_task_grades_canonical_solutions_as_passing_and_junk_as_failing():
    task = load_task(EvalTaskConfig(name="humaneval", source="humaneval", size=3))
    assert len(task.examples) == 3 and task.prompts and "```python" in task.prompts[0]
    good = [f"Here you go:\n```python\n{ex.prompt}{ex.metadata['canonical_solution']}```" for ex in task.examples]
    bad = ["    return None\n"] * 3
    graded = task.grade(good + bad, task.examples + task.examples)
    assert [score for _, score in graded] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert "def " in graded[0][0]  # the extracted code is what ran


def test_evaluate_runs_a_code_and_a_math_task_on_a_tiny_model():
    model, tokenizer = tiny_random(ModelConfig(name="tiny-random", tiny_layers=2))
    tokenizer.padding_side = "left"
    suite = EvalSuiteConfig(name="mixed", max_new_tokens=6, batch_size=4)
    tasks = [
        load_task(EvalTaskConfig(name="humaneval", source="humaneval", size=2)),
        load_task(EvalTaskConfig(name="chain_sum", source="reasoning_gym", size=3, generator_kwargs={"min_terms": 2})),
    ]
    with torch.no_grad():
        results = evaluate(model, tokenizer, tasks, suite, seed=0)
    assert [r.task for r in results] == ["humaneval", "chain_sum"]
    assert [len(r.samples) for r in results] == [2, 3]
    for r in results:
        assert 0.0 <= r.accuracy <= 1.0
        assert all({"problem_id", "completion", "extracted", "score"} <= set(s) for s in r.samples)
    assert results[0].accuracy == 0.0  # a random model writes no working code
