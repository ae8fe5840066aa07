"""Reasoning blocks: what is graded (closed, unclosed, absent, opened by the template), the truncated count,
raw and graded text in the samples, re-scoring, and every grader kind behind a ``<think>`` block.

Source of truth for each verdict: written by hand; the think-block convention is DeepSeek-R1's and Qwen3's
(``<think>...</think>`` then the answer; their templates split the answer off at the last ``</think>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tropd_cli.config import EvalSuiteConfig, EvalTaskConfig
from tropd_cli.errors import UserError
from tropd_cli.evals.benchmarks import load_task
from tropd_cli.evals.code import pick_block
from tropd_cli.evals.engine import Reasoning, SuiteTasks, rescore, score_samples
from tropd_cli.evals.reasoning import DEFAULT_TAGS, graded_text, opened_by_prompt, tags_for, template_tags
from tropd_cli.validate import validate_suites

THINK = DEFAULT_TAGS

# Qwen3's chat template splits an assistant message at '</think>' (an excerpt of its logic, as a string).
QWEN3_LIKE = "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
# DeepSeek-R1's newer template ends the generation prompt inside an opened block.
R1_PROMPT = "<｜User｜>What is 2+2?<｜Assistant｜><think>\n"


@pytest.mark.parametrize(
    ("completion", "opened", "graded"),
    [
        ("<think>2+2 is 4</think>\n\nThe answer is 4.", False, "The answer is 4."),  # closed: after it
        ("<think>maybe 5... no, 4</think>The answer is 4.", False, "The answer is 4."),
        ("The answer is 4.", False, "The answer is 4."),  # absent: all of it
        ("<think>2+2 is... let me count: 1, 2, 3", False, None),  # unclosed: cut inside its reasoning
        ("2+2 is 4</think>\n\nThe answer is 4.", True, "The answer is 4."),  # the template opened it
        ("2+2 is... let me count", True, None),  # opened by the template, never closed
        ("<think>a</think> draft <think>b</think>\nfinal", False, "final"),  # the last closed block
        ("<think>a</think>\nanswer 4 <think>more thinking", False, None),  # a new block left open
        ("<think>all reasoning</think>", False, ""),  # closed, nothing after it: an empty answer
    ],
)
def test_graded_text(completion, opened, graded):
    assert graded_text(completion, THINK, opened=opened) == graded


def test_tags_come_from_the_template_and_the_suite():
    assert template_tags(QWEN3_LIKE) == [("<think>", "</think>")]
    assert template_tags("{{ '<|begin_of_thought|>' }} ... {{ '<|end_of_thought|>' }}") == [
        ("<|begin_of_thought|>", "<|end_of_thought|>")
    ]
    assert template_tags(None) == [] and template_tags("{{ messages }}") == []
    tags = tags_for("... <|end_of_thought|> ...", [["<scratch>", "</scratch>"]])
    assert tags == (
        ("<think>", "</think>"),
        ("<|begin_of_thought|>", "<|end_of_thought|>"),
        ("<scratch>", "</scratch>"),
    )
    assert graded_text("<scratch>x</scratch> 7", tags) == "7"
    assert opened_by_prompt(R1_PROMPT, THINK) and not opened_by_prompt("<｜Assistant｜>", THINK)


def test_a_bad_mode_or_tag_pair_is_refused():
    task = EvalTaskConfig(name="chain_sum", benchmark="reasoning_gym", size=2)
    with pytest.raises(UserError, match=r"eval_suite.s.reasoning='hide' is not an option; choose one of: strip, keep"):
        validate_suites({"s": EvalSuiteConfig(tasks=[task], reasoning="hide")})
    with pytest.raises(UserError, match=r"eval_suite.s.reasoning_tags.0=\['<t>'\] must be a pair"):
        validate_suites({"s": EvalSuiteConfig(tasks=[task], reasoning_tags=[["<t>"]])})


def _math_task(tmp_path: Path) -> Any:
    rows = [{"id": "p1", "problem": "2+2?", "answer": "4"}, {"id": "p2", "problem": "3+3?", "answer": "6"}]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_task(EvalTaskConfig(name="m", benchmark="math", path=str(path)), "t")


def test_strip_grades_the_answer_counts_truncations_and_keeps_the_raw_text(tmp_path):
    task = _math_task(tmp_path)
    suite = EvalSuiteConfig(tasks=[], n_samples=2)
    completions = {
        (0, 0): "<think>Is it 5? No: \\boxed{5} was a slip; 4.</think>\n\nThe answer is \\boxed{4}.",
        (0, 1): "<think>2+2, counting: \\boxed{4} probably, but let me",  # cut by max_new_tokens
        (1, 0): "<think>\\boxed{6}</think>\nThe answer is 7.",  # right inside the reasoning, wrong answer
        (1, 1): "The answer is 6.",  # no reasoning block
    }
    result = score_samples(task, "s", suite, completions)
    assert [s["score"] for s in result.samples] == [1.0, 0.0, 0.0, 1.0]
    assert result.metrics["truncated_reasoning"] == 1.0 and result.metrics["avg@2"] == 0.5
    first, cut = result.samples[0], result.samples[1]
    assert first["completion"] == completions[(0, 0)] and first["graded"] == "The answer is \\boxed{4}."
    assert cut["graded"] is None and cut["extracted"] == ""
    kept = score_samples(task, "s", EvalSuiteConfig(tasks=[], n_samples=2, reasoning="keep"), completions)
    # keep: the raw text is graded, so the boxes inside the reasoning count: (0, 1) and (1, 0) now score 1
    assert [s["score"] for s in kept.samples] == [1.0, 1.0, 1.0, 1.0]
    assert "truncated_reasoning" not in kept.metrics


def test_a_block_opened_by_the_template_is_read_and_rescored_alike(tmp_path):
    task = _math_task(tmp_path)
    suite = EvalSuiteConfig(tasks=[], n_samples=1)
    completions = {(0, 0): "4 surely</think>\n\n\\boxed{4}", (1, 0): "3+3 is 6, so \\boxed{6} but wait"}
    reasoning = Reasoning("strip", THINK, frozenset({0, 1}))
    result = score_samples(task, "s", suite, completions, reasoning)
    assert [s["score"] for s in result.samples] == [1.0, 0.0] and result.metrics["truncated_reasoning"] == 1.0
    assert all(s["reasoning_opened"] for s in result.samples)
    lines = [{"model": "m", **s} for s in result.samples]  # generations.jsonl keeps the flag: re-scoring agrees
    again = rescore(lines, [SuiteTasks("s", suite, [task])])["m"][0]
    assert [s["score"] for s in again.samples] == [1.0, 0.0] and again.metrics == result.metrics


def _ifeval_task(tmp_path: Path) -> Any:
    rows = [
        {
            "key": 1,
            "prompt": "Write about cats in lowercase without commas.",
            "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
            "kwargs": [{}, {}],
        },
        {
            "key": 2,
            "prompt": "Wrap your whole reply in double quotes.",
            "instruction_id_list": ["startend:quotation"],
            "kwargs": [{}],
        },
    ]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_task(EvalTaskConfig(name="ifeval", benchmark="ifeval", path=str(path)), "t")


def test_instruction_following_sees_only_the_answer(tmp_path):
    """The reasoning (capitals, commas, no quotes) would break every instruction; the answer follows them all."""
    task = _ifeval_task(tmp_path)
    think = "<think>\nOkay, The User wants cats, lowercase, no commas. Let me draft.\n</think>\n\n"
    answers = ["cats are soft and they purr.", '"Here you are."']
    completions = {(i, 0): think + a for i, a in enumerate(answers)}
    stripped = score_samples(task, "s", EvalSuiteConfig(tasks=[]), completions)
    plain = score_samples(task, "s", EvalSuiteConfig(tasks=[]), {(i, 0): a for i, a in enumerate(answers)})
    assert [s["score"] for s in stripped.samples] == [s["score"] for s in plain.samples] == [1.0, 1.0]
    assert stripped.metrics == {**plain.metrics, "truncated_reasoning": 0.0}
    kept = score_samples(task, "s", EvalSuiteConfig(tasks=[], reasoning="keep"), completions)
    assert [s["score"] for s in kept.samples] == [0.0, 0.0]
    cut = score_samples(task, "s", EvalSuiteConfig(tasks=[]), {(0, 0): "<think>cats are soft", (1, 0): answers[1]})
    # an unclosed block follows nothing, although its empty answer has no comma: instruction level counts 0 of 2
    assert cut.samples[0]["score"] == 0.0 and cut.samples[0]["extra"]["instruction_strict"] == 0.0
    assert cut.samples[0]["extra"]["instruction_strict_total"] == 2.0


def test_code_is_taken_from_the_answer_not_the_draft_in_the_reasoning():
    from tropd_cli.evals.code import load_humaneval

    task = load_task(EvalTaskConfig(name="humaneval", benchmark="humaneval", size=1), "t")
    ex = load_humaneval(None)[0]
    body = ex.metadata["canonical_solution"]
    right = f"```python\n{ex.prompt}{body}```"
    draft = f"```python\n{ex.prompt}    return None\n```"
    completion = f"<think>First try:\n{draft}\nThat is wrong.</think>\n\n{right}"
    graded = score_samples(task, "s", EvalSuiteConfig(tasks=[]), {(0, 0): completion})
    assert graded.samples[0]["score"] == 1.0
    # the block that defines the entry point wins over a later usage example (lighteval takes the last block)
    usage = f"{right}\nUsage:\n```python\nprint({ex.metadata['entry_point']}([1.0, 2.0], 0.5))\n```"
    assert score_samples(task, "s", EvalSuiteConfig(tasks=[]), {(0, 0): usage}).samples[0]["score"] == 1.0
    # with no block defining it, the last block is graded
    assert pick_block("```python\nx = 1\n```\n```python\nx = 2\n```", ["f"]) == "x = 2\n"


def test_reasoning_gym_reads_answer_tags():
    task = load_task(EvalTaskConfig(name="chain_sum", benchmark="reasoning_gym", size=2, seed=1), "t")
    gold = task.examples[0].answer
    graded = task.grade([f"The sum: 1 + 2 + 99 ... so <answer>{gold}</answer> (I checked 1000)."], task.examples[:1])
    assert graded[0].answer == gold and graded[0].score == 1.0
    # without tags, the usual final answer
    assert task.grade([f"The answer is {gold}."], task.examples[:1])[0].score == 1.0


def test_suite_configs_take_tag_pairs_from_yaml():
    raw = OmegaConf.create("reasoning: keep\nreasoning_tags: [['<scratch>', '</scratch>']]\ntasks: []")
    suite = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalSuiteConfig), raw))
    assert suite.reasoning == "keep" and suite.reasoning_tags == [["<scratch>", "</scratch>"]]
