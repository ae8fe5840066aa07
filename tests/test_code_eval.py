"""HumanEval support: code extraction, pass@k against hand values, problems checked in the sandbox."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from tropd_cli.code_eval import extract_code, humaneval_program, load_humaneval, pass_at_k, score_humaneval
from tropd_cli.errors import UserError

PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def defines_total(prompt: str, code: str) -> int:
    namespace: dict = {}
    exec(prompt + code, namespace)  # trusted, hand-written code
    return namespace["total"]([1, 2, 3])


# ---------------------------------------------------------------------------------------------
# extract_code


def test_extract_code_takes_the_python_fence():
    completion = "Here you go:\n```python\n    return sum(xs)\n```\nThis adds them up."
    assert extract_code(completion, PROMPT) == "    return sum(xs)\n"


def test_extract_code_skips_fences_in_other_languages():
    completion = "```text\nnot code\n```\n```py\n    return sum(xs)\n```"
    assert extract_code(completion, PROMPT) == "    return sum(xs)\n"


def test_extract_code_reads_an_unclosed_fence_to_the_end():
    assert extract_code("```python\n    return sum(xs)\n", PROMPT) == "    return sum(xs)\n"


def test_extract_code_keeps_a_raw_body_up_to_the_stop_sequences():
    completion = "    return sum(xs)\n\n\nif __name__ == '__main__':\n    print(total([1]))\n"
    assert extract_code(completion, PROMPT) == "    return sum(xs)\n\n"
    assert defines_total(PROMPT, extract_code(completion, PROMPT)) == 6


def test_extract_code_uses_a_repeated_definition_standalone():
    completion = "Sure!\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    code = extract_code(completion, PROMPT)
    assert code == "\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n"
    assert defines_total(PROMPT, code) == 6  # the prompt's import stays in scope


def test_extract_code_uses_an_echoed_prompt_standalone():
    completion = PROMPT + "    return sum(xs)\n\n\ndef unrelated():\n    pass\n"
    code = extract_code(completion, PROMPT)
    assert code.startswith("\nfrom typing import List") and "def unrelated" in code
    assert defines_total(PROMPT, code) == 6


def test_extract_code_leaves_canonical_solutions_unchanged(humaneval):
    assert [ex.uid for ex in humaneval if extract_code(ex.answer, ex.prompt) != ex.answer] == []


# ---------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k failures: every k-subset has a pass
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-9)
    assert pass_at_k(10_000, 5_000, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------
# Problems and programs


def test_load_humaneval_bundled(humaneval):
    assert len(humaneval) == 164
    first = humaneval[0]
    assert first.uid == "HumanEval/0" and first.metadata["entry_point"] == "has_close_elements"
    assert first.prompt.startswith("from typing import List") and first.answer == first.metadata["canonical_solution"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_load_humaneval_from_a_file(tmp_path, humaneval, suffix):
    path = tmp_path / f"he{suffix}"
    text = json.dumps(humaneval[0].metadata) + "\n\n"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    (example,) = load_humaneval(str(path))
    assert example.uid == "HumanEval/0" and example.metadata["test"] == humaneval[0].metadata["test"]


def test_load_humaneval_names_missing_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*canonical_solution, test, entry_point"):
        load_humaneval(str(path))
    with pytest.raises(UserError, match="not found"):
        load_humaneval(str(tmp_path / "missing.jsonl"))


def test_humaneval_program_is_prompt_completion_test_check(humaneval):
    problem = humaneval[0].metadata
    program = humaneval_program(problem, "    return False\n")
    assert program.startswith(problem["prompt"] + "    return False\n")
    assert problem["test"] in program and program.rstrip().endswith("check(has_close_elements)")


def test_canonical_solution_passes_and_wrong_completions_fail(humaneval):
    first = humaneval[0]
    standalone = (
        "```python\ndef has_close_elements(numbers, threshold):\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1 :])\n```"
    )
    completions = [first.answer, "    return False\n", standalone, "    while True:\n        pass\n"]
    assert score_humaneval([first] * 4, completions, workers=2, timeout_s=2.0) == [1.0, 0.0, 1.0, 0.0]


def test_score_humaneval_needs_one_completion_per_example(humaneval):
    with pytest.raises(ValueError, match="one completion each"):
        score_humaneval(humaneval[:2], ["    return 1\n"])


@pytest.mark.slow
def test_all_canonical_solutions_pass(humaneval):
    scores = score_humaneval(humaneval, [ex.answer for ex in humaneval])
    assert [ex.uid for ex, score in zip(humaneval, scores, strict=True) if score != 1.0] == []
