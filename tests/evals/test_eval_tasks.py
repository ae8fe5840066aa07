"""Every benchmark loader on small fixture files written here (no hub), and its grader on right and wrong answers."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path
from typing import Any

import pytest

from tropd_cli.config import EvalTaskConfig
from tropd_cli.errors import UserError
from tropd_cli.evals.benchmarks import BENCHMARKS, load_task
from tropd_cli.evals.engine import task_metrics


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def task_from(tmp_path: Path, benchmark: str, rows: list[dict[str, Any]], **kw: Any):
    path = write_jsonl(tmp_path / f"{benchmark}.jsonl", rows)
    return load_task(EvalTaskConfig(name=benchmark, benchmark=benchmark, path=path, **kw), "eval_suite.s.tasks.0")


def scores(task, completions: list[str]) -> list[float]:
    return [g.score for g in task.grade(completions, task.examples[: len(completions)])]


# ---------------------------------------------------------------------------------------------
# Math


def test_gsm8k_takes_the_gold_after_the_four_hashes(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "What is 1,000 + 250?", "answer": "#### 1,250"},
    ]
    task = task_from(tmp_path, "gsm8k", rows)
    assert [ex.answer for ex in task.examples] == ["7", "1250"]
    assert task.kind == "math" and "\\boxed{}" in task.prompts[0] and "Tom has 3 apples" in task.prompts[0]
    assert scores(task, ["So \\boxed{7}.", "The answer is 1,250."]) == [1.0, 1.0]
    assert scores(task, ["\\boxed{8}", "1249"]) == [0.0, 0.0]


@pytest.mark.parametrize("benchmark", ["math500", "aime24", "aime25"])
def test_problem_answer_benchmarks(tmp_path, benchmark):
    rows = [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "answer": "\\frac{3}{4}", "unique_id": "p/1"},
        {"problem": "Find the interval.", "answer": "[0, 1)", "id": 7},
        {"problem": "A third one.", "answer": "12"},
    ]
    task = task_from(tmp_path, benchmark, rows, size=2)
    assert [ex.uid for ex in task.examples] == ["p/1", "7"]  # size keeps the first rows; ids come from the file
    assert scores(task, ["... \\boxed{0.75}", "so $x \\in [0,1)$, i.e. \\boxed{[0,1)}"]) == [1.0, 1.0]
    assert scores(task, ["\\boxed{\\frac{4}{3}}", "\\boxed{[0,1]}"]) == [0.0, 0.0]


def test_amc23_reads_question_fields(tmp_path):
    task = task_from(tmp_path, "amc23", [{"question": "How many?", "answer": 27.0}])
    assert task.examples[0].prompt == "How many?" and task.examples[0].answer == "27.0"
    assert scores(task, ["\\boxed{27}"]) == [1.0]


def test_generic_math_with_named_fields_and_parquet(tmp_path):
    import datasets

    path = tmp_path / "mine.parquet"
    datasets.Dataset.from_list([{"q": "2+2?", "gold": "4"}, {"q": "3*3?", "gold": "9"}]).to_parquet(str(path))
    cfg = EvalTaskConfig(name="mine", benchmark="math", path=str(path), prompt_field="q", answer_field="gold")
    task = load_task(cfg, "eval_suite.s.tasks.0")
    assert [ex.answer for ex in task.examples] == ["4", "9"]
    assert scores(task, ["\\boxed{4}", "\\boxed{10}"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="needs eval_suite.s.tasks.0.path=FILE or eval_suite.s.tasks.0.hub_name"):
        load_task(EvalTaskConfig(name="x", benchmark="math"), "eval_suite.s.tasks.0")


def test_reasoning_gym_uses_its_own_scorer():
    task = load_task(EvalTaskConfig(name="chain_sum", benchmark="reasoning_gym", size=3, seed=1), "t")
    golds = [ex.answer for ex in task.examples]
    assert scores(task, [f"The answer is {g}." for g in golds]) == [1.0, 1.0, 1.0]
    assert scores(task, ["The answer is 100000."]) == [0.0]


# ---------------------------------------------------------------------------------------------
# Multiple choice


def test_gpqa_diamond_shuffles_choices_deterministically(tmp_path):
    rows = [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which is right ({i})?",
            "Correct Answer": "right",
            "Incorrect Answer 1": "wrong1",
            "Incorrect Answer 2": "wrong2",
            "Incorrect Answer 3": "wrong3",
        }
        for i in range(8)
    ]
    task = task_from(tmp_path, "gpqa_diamond", rows)
    again = task_from(tmp_path, "gpqa_diamond", rows)
    letters = [ex.answer for ex in task.examples]
    assert letters == [ex.answer for ex in again.examples]  # same seed, same order
    assert len(set(letters)) > 1  # the right answer is not always A
    for ex, prompt in zip(task.examples, task.prompts, strict=True):
        assert f"{ex.answer}) right" in prompt and "Answer: $LETTER" in prompt
    right = [f"Reasoning...\nAnswer: {ex.answer}" for ex in task.examples]
    wrong = ["Answer: " + ("B" if ex.answer == "A" else "A") for ex in task.examples]
    assert scores(task, right) == [1.0] * 8 and scores(task, wrong) == [0.0] * 8
    other = load_task(
        EvalTaskConfig(name="g", benchmark="gpqa_diamond", path=str(tmp_path / "gpqa_diamond.jsonl"), seed=5), "t"
    )
    assert [ex.answer for ex in other.examples] != letters  # another seed, another order


def test_mmlu_redux_drops_rows_marked_wrong_unless_asked(tmp_path):
    rows = [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "error_type": "ok"},
        {
            "question": "Sky?",
            "choices": ["blue", "red", "green", "black"],
            "answer": 0,
            "error_type": "wrong_groundtruth",
        },
        {"question": "Letter gold?", "choices": ["a", "b", "c", "d"], "answer": "C"},
    ]
    task = task_from(tmp_path, "mmlu_redux", rows)
    assert [ex.answer for ex in task.examples] == ["B", "C"]
    assert scores(task, ["The answer is (B).", "\\boxed{C}"]) == [1.0, 1.0]
    kept = task_from(tmp_path, "mmlu_redux", rows, options={"keep_errors": True})
    assert len(kept.examples) == 3


# ---------------------------------------------------------------------------------------------
# Code


def test_humaneval_grades_canonical_solutions_as_passing_and_junk_as_failing():
    task = load_task(EvalTaskConfig(name="humaneval", benchmark="humaneval", size=3), "t")
    assert len(task.examples) == 3 and "```python" in task.prompts[0]
    good = [f"Here you go:\n```python\n{ex.prompt}{ex.metadata['canonical_solution']}```" for ex in task.examples]
    graded = task.grade([*good, *["    return None\n"] * 3], task.examples + task.examples)
    assert [g.score for g in graded] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert "def " in graded[0].answer  # the extracted code is what ran


def test_mbpp_runs_the_asserts(tmp_path):
    rows = [
        {
            "task_id": 11,
            "text": "Write a function to add two numbers.",
            "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
            "test_setup_code": "",
            "challenge_test_list": [],
        }
    ]
    task = task_from(tmp_path, "mbpp", rows)
    assert "assert add(1, 2) == 3" in task.prompts[0] and task.examples[0].uid == "11"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert [g.score for g in task.grade([good, bad], task.examples * 2)] == [1.0, 0.0]


def lcb_row(**extra: Any) -> dict[str, Any]:
    private = json.dumps([{"input": "10 20\n", "output": "30\n", "testtype": "stdin"}])
    return {
        "question_title": "Sum",
        "question_content": "Read two integers and print their sum.",
        "platform": "atcoder",
        "question_id": "abc001_a",
        "contest_date": "2025-03-01T00:00:00",
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
        "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(private))).decode(),
        "metadata": "{}",
        **extra,
    }


def test_livecodebench_filters_dates_and_runs_every_test(tmp_path):
    rows = [lcb_row(), lcb_row(question_id="old", contest_date="2024-01-01T00:00:00")]
    options = {"start_date": "2025-02-01", "end_date": "2025-05-01"}
    task = task_from(tmp_path, "livecodebench", rows, options=options)
    assert [ex.uid for ex in task.examples] == ["abc001_a"]
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    only_public = "```python\na, b = map(int, input().split())\nprint(3)\n```"  # passes the public test only
    assert [g.score for g in task.grade([good, only_public], task.examples * 2)] == [1.0, 0.0]
    with pytest.raises(UserError, match="no LiveCodeBench problems between"):
        task_from(tmp_path, "livecodebench", rows, options={"start_date": "2030-01-01"})


# ---------------------------------------------------------------------------------------------
# Instruction following


def ifeval_rows() -> list[dict[str, Any]]:
    none_kwargs = {"num_words": None, "relation": None, "keywords": None}  # hub rows fill unused keys with None
    return [
        {
            "key": 1,
            "prompt": "Write a short note about cats, in lowercase and without commas.",
            "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
            "kwargs": [dict(none_kwargs), dict(none_kwargs)],
        },
        {
            "key": 2,
            "prompt": "Mention the word 'moon'.",
            "instruction_id_list": ["keywords:existence"],
            "kwargs": [{**none_kwargs, "keywords": ["moon"]}],
        },
    ]


def test_ifeval_scores_prompt_level_strict_with_extras(tmp_path):
    task = task_from(tmp_path, "ifeval", ifeval_rows())
    assert task.kind == "instructions" and [ex.uid for ex in task.examples] == ["1", "2"]
    graded = task.grade(["cats are soft and they purr.", "The Moon is bright tonight."], task.examples)
    assert [g.score for g in graded] == [1.0, 1.0]
    graded = task.grade(["Cats, dogs, and birds.", "The sun is bright."], task.examples)
    assert [g.score for g in graded] == [0.0, 0.0]
    assert graded[0].extra["instruction_strict"] == 0.0 and graded[0].extra["instruction_strict_total"] == 2.0
    half = task.grade(["cats, dogs and birds are pets.", "the moon."], task.examples)
    assert [g.score for g in half] == [0.0, 1.0]  # lowercase holds, no-comma does not; the moon is there
    samples = [
        {"problem_id": ex.uid, "score": g.score, "extracted": "", "extra": g.extra}
        for ex, g in zip(task.examples, half, strict=True)
    ]
    metrics = task_metrics(samples, kind="instructions", n=1, pass_k=[1])
    # Instruction level pools instructions (2 of 3 followed), as IFEval does; not a mean of per-prompt shares.
    assert metrics["instruction_strict"] == pytest.approx(2 / 3) and metrics["avg@1"] == 0.5
    assert "instruction_strict_total" not in metrics


def test_instructions_without_a_checker_are_refused_or_skipped(tmp_path):
    rows = [*ifeval_rows(), {"key": 3, "prompt": "x", "instruction_id_list": ["made_up:thing"], "kwargs": [{}]}]
    with pytest.raises(UserError, match=r"no checker for instruction\(s\) made_up:thing.*skip_unsupported=true"):
        task_from(tmp_path, "ifbench", rows)
    task = task_from(tmp_path, "ifbench", rows, options={"skip_unsupported": True})
    assert len(task.examples) == 2 and task.skipped == 1
    first = task_from(tmp_path, "ifbench", [rows[2], *rows[:2]], options={"skip_unsupported": True}, size=2)
    assert [ex.uid for ex in first.examples] == ["1", "2"]  # size counts the prompts kept, after skipping


# ---------------------------------------------------------------------------------------------
# Errors


def test_offline_without_a_file_names_the_option_to_pass_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"eval_suite\.paper\.tasks\.3\.path=FILE"):
        load_task(EvalTaskConfig(name="gsm8k", benchmark="gsm8k"), "eval_suite.paper.tasks.3")


def test_file_errors_name_the_file_and_the_fields(tmp_path):
    with pytest.raises(UserError, match=r"set eval_suite\.s\.tasks\.0\.path to an existing"):
        load_task(
            EvalTaskConfig(name="m", benchmark="math500", path=str(tmp_path / "nope.jsonl")), "eval_suite.s.tasks.0"
        )
    with pytest.raises(UserError, match="none of the fields problem, question, prompt; available fields: text, answer"):
        task_from(tmp_path, "math500", [{"text": "hi", "answer": "1"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_task(EvalTaskConfig(name="m", benchmark="math500", path=str(bad)), "t")


def test_every_benchmark_has_a_loader_test():
    tested = {"gsm8k", "math500", "aime24", "aime25", "amc23", "math", "reasoning_gym", "humaneval", "mbpp"}
    tested |= {"livecodebench", "gpqa_diamond", "mmlu_redux", "ifeval", "ifbench"}
    assert set(BENCHMARKS) == tested


def test_hostile_completions_score_zero_and_the_evaluation_goes_on(tmp_path):
    """Model-written code that attacks the evaluator is contained and scored as a failure, next to a passing one."""
    task = load_task(EvalTaskConfig(name="humaneval", benchmark="humaneval", size=1), "t")
    ex = task.examples[0]
    victim = tmp_path / "keep-me.txt"
    victim.write_text("precious")
    marker = tmp_path / "written-by-sample.txt"
    hostile = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)",
        f"open({str(marker)!r}, 'w').write('pwned')",
        f"import os\nos.remove({str(victim)!r})",
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "import os\nwhile True:\n    os.fork()",
    ]
    body = ex.prompt + ex.metadata["canonical_solution"]
    completions = [f"```python\n{code}\n{body}```" for code in hostile] + [f"```python\n{body}```"]
    graded = task.grade(completions, [ex] * len(completions))
    assert [g.score for g in graded] == [0.0] * len(hostile) + [1.0]
    assert victim.read_text() == "precious" and not marker.exists()
