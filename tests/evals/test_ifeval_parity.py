"""IFEval parity with Google's reference on Google's published GPT-4 responses, plain and behind a reasoning block.

Fixture ``tests/data/ifeval/gpt4_google_verdicts.jsonl.gz`` (see its README): the 541 IFEval prompts with their
instruction ids and kwargs, GPT-4's responses as Google published them, and the per-instruction strict and
loose verdicts of Google's own ``instruction_following_eval`` code run on them. Source of truth: that code.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tropd_cli.config import EvalSuiteConfig, EvalTaskConfig
from tropd_cli.evals.benchmarks import load_task
from tropd_cli.evals.engine import score_samples
from tropd_cli.evals.instructions import check_following

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "ifeval" / "gpt4_google_verdicts.jsonl.gz"
# A reasoning block of the kind that broke every instruction when graded as the answer: commas, capitals,
# asterisks, quotes, placeholders, a postscript marker and a repeat of the prompt.
THINK = (
    '<think>\nOkay, The User asks: {prompt}\nPlan: Title, *Highlights*, [placeholders], "quotes", '
    "P.S. at the end, CAPITAL WORDS, commas, bullet points:\n* one\n* two\nLet me write it.\n</think>\n\n"
)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_the_fixture_is_whole(rows):
    assert len(rows) == 541 and sum(len(r["instruction_id_list"]) for r in rows) == 834
    assert sum(all(r["google_strict"]) for r in rows) == 417  # Google's code: prompt-level strict 77.1%


def test_checkers_agree_with_google_on_every_instruction(rows):
    # Two prompts ask for the letter '#' or '!': Google's checker then picks a random letter, so its verdict
    # there changes from run to run and is not a reference.
    random_letter = {r["key"] for r in rows if "random letter" in r.get("note", "")}
    assert random_letter == {1122, 1129}
    for r in rows:
        if r["key"] in random_letter:
            continue
        strict, loose = check_following(r["response"], r["instruction_id_list"], r["kwargs"], r["prompt"])
        assert strict == r["google_strict"], (r["key"], r["instruction_id_list"])
        assert loose == r["google_loose"], (r["key"], r["instruction_id_list"])


@pytest.fixture(scope="module")
def ifeval_task(rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("ifeval") / "ifeval.jsonl"
    fields = ("key", "prompt", "instruction_id_list", "kwargs")
    path.write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in rows), encoding="utf-8")
    return load_task(EvalTaskConfig(name="ifeval", benchmark="ifeval", path=str(path)), "t")


def test_a_reasoning_block_in_front_changes_no_verdict(rows, ifeval_task):
    """Issue 13's case: with a <think> block before each response, strict accuracy fell from 77.2% to 42.8%."""
    completions = {(i, 0): THINK.format(prompt=r["prompt"]) + r["response"] for i, r in enumerate(rows)}
    stripped = score_samples(ifeval_task, "ifeval", EvalSuiteConfig(tasks=[]), completions)
    verdicts = [s["score"] == 1.0 for s in stripped.samples]
    agree = sum(v == all(r["google_strict"]) for v, r in zip(verdicts, rows, strict=True)) / len(rows)
    assert agree == 1.0  # the issue asks for at least 99%
    assert stripped.metrics["avg@1"] == pytest.approx(417 / 541)
    assert stripped.metrics["instruction_strict"] == pytest.approx(sum(sum(r["google_strict"]) for r in rows) / 834)
    assert stripped.metrics["truncated_reasoning"] == 0.0
    kept = score_samples(ifeval_task, "ifeval", EvalSuiteConfig(tasks=[], reasoning="keep"), completions)
    assert kept.metrics["avg@1"] < 0.6  # graded as the answer, the reasoning breaks many instructions
