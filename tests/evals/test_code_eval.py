"""Code benchmarks: HumanEval code extraction and pass@k against hand values; HumanEval, MBPP and
LiveCodeBench problems checked in the real sandbox; LiveCodeBench test decoding refusing hostile pickles."""

from __future__ import annotations

import base64
import gzip
import json
import math
import os
import pickle
import shlex
import time
import zlib
from pathlib import Path

import pytest

from tropd_cli.errors import UserError
from tropd_cli.evals.code import (
    extract_code,
    extract_fenced,
    harness_program,
    harness_stdin,
    humaneval_problem,
    lcb_func_name,
    lcb_problem,
    lcb_prompt,
    lcb_tests,
    lcb_timeout,
    load_humaneval,
    mbpp_problem,
    mbpp_prompt,
    pass_at_k,
    score_humaneval,
    score_livecodebench,
    score_mbpp,
)

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


def test_humaneval_problem_is_prompt_completion_test_and_entry_point(humaneval):
    problem = humaneval[0].metadata
    checked = humaneval_problem(problem, "    return False\n")
    assert checked["kind"] == "humaneval" and checked["completion"] == "    return False\n"
    assert (checked["prompt"], checked["test"], checked["entry_point"]) == (
        problem["prompt"],
        problem["test"],
        "has_close_elements",
    )


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


# ---------------------------------------------------------------------------------------------
# MBPP

MBPP_ROW = {
    "task_id": 2,
    "text": "Write a function to find the similar elements from the given two tuple lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == {4, 5}",
        "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == {3, 4}",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}
# The solution relies on the setup code for ``math`` and ``SCALE``.
MBPP_SETUP_ROW = {
    "task_id": 900,
    "text": "Write a function to scale the square root of n.",
    "code": "def scaled_root(n):\n    return SCALE * math.isqrt(n)\n",
    "test_list": ["assert scaled_root(16) == 40", "assert scaled_root(1) == 10"],
    "test_setup_code": "import math\nSCALE = 10",
    "challenge_test_list": [],
}
MBPP_SANITIZED_ROW = {
    "task_id": 901,
    "prompt": "Write a function to return the greatest common divisor of two integers.",
    "code": "def my_gcd(a, b):\n    return gcd(a, b)\n",
    "test_imports": ["from math import gcd"],
    "test_list": ["assert my_gcd(12, 18) == 6"],
}


def test_mbpp_prompt_states_the_task_and_its_tests():
    prompt = mbpp_prompt(MBPP_ROW)
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to find")
    assert "Your code should pass these tests:\n\n" + "\n".join(MBPP_ROW["test_list"]) in prompt
    assert "```python" in prompt
    assert "greatest common divisor" in mbpp_prompt(MBPP_SANITIZED_ROW)  # the sanitized config's ``prompt`` field


def test_mbpp_problem_is_setup_then_extracted_code_then_asserts():
    fenced = "Here it is:\n```python\ndef scaled_root(n):\n    return 0\n```\nDone."
    checked = mbpp_problem(MBPP_SETUP_ROW, fenced)
    assert "SCALE = 10" in checked["setup"] and checked["code"].startswith("def scaled_root")
    assert "Here it is" not in checked["code"] and "Done." not in checked["code"]
    assert checked["tests"].startswith("assert scaled_root(16)") and checked["calls"] == ["scaled_root"]
    assert extract_fenced("def f():\n    return 1\n") == "def f():\n    return 1\n"  # unfenced: the raw text


def test_score_mbpp_runs_the_asserts():
    rows = [MBPP_ROW, MBPP_ROW, MBPP_ROW, MBPP_SETUP_ROW, {**MBPP_SETUP_ROW, "test_setup_code": ""}, MBPP_SANITIZED_ROW]
    completions = [
        MBPP_ROW["code"],
        "def similar_elements(a, b):\n    return tuple(a)\n",
        f"Sure:\n```python\n{MBPP_ROW['code']}```\nIt intersects the sets.",
        MBPP_SETUP_ROW["code"],
        MBPP_SETUP_ROW["code"],  # without the setup code: NameError
        MBPP_SANITIZED_ROW["code"],
    ]
    assert score_mbpp(rows, completions, workers=2, timeout_s=5.0) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_score_mbpp_needs_one_completion_per_row():
    with pytest.raises(ValueError, match="one completion each"):
        score_mbpp([MBPP_ROW], [])


# ---------------------------------------------------------------------------------------------
# LiveCodeBench


def encode_private(tests: list[dict]) -> str:
    """Private tests the way code_generation_lite stores them: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("utf-8")


def stdin_test(pairs: list[tuple[int, int]]) -> dict:
    text = f"{len(pairs)}\n" + "".join(f"{a} {b}\n" for a, b in pairs)
    return {"input": text, "output": "".join(f"{a + b}\n" for a, b in pairs), "testtype": "stdin"}


STDIN_ROW = {
    "question_title": "Pair sums",
    "question_content": "Read T, then T lines of two integers; print each pair's sum on its own line.",
    "platform": "atcoder",
    "question_id": "abc000_a",
    "contest_id": "abc000",
    "contest_date": "2024-08-01T00:00:00",
    "starter_code": "",
    "difficulty": "easy",
    "public_test_cases": json.dumps([stdin_test([(1, 2), (3, 4)])]),
    "private_test_cases": encode_private([stdin_test([(10, -3)]), stdin_test([(0, 0), (5, 5), (-7, 7)])]),
    "metadata": "{}",
}


def functional_test(nums: list[int], target: int, answer: list[int]) -> dict:
    return {"input": f"{json.dumps(nums)}\n{target}", "output": json.dumps(answer), "testtype": "functional"}


FUNCTIONAL_ROW = {
    "question_title": "Two sum",
    "question_content": "Return the indices of the two numbers that add up to target.",
    "platform": "leetcode",
    "question_id": "1",
    "contest_id": "weekly-contest-1",
    "contest_date": "2024-08-01T00:00:00",
    "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
    "difficulty": "easy",
    "public_test_cases": json.dumps([functional_test([2, 7, 11, 15], 9, [0, 1])]),
    # Some releases store the private tests as plain JSON.
    "private_test_cases": json.dumps([functional_test([3, 2, 4], 6, [1, 2]), functional_test([3, 3], 6, [0, 1])]),
    "metadata": json.dumps({"func_name": "twoSum"}),
}

STDIN_INPUT = """```python
def main():
    t = int(input())
    for _ in range(t):
        a, b = map(int, input().split())
        print(a + b)

# A separate thread for a bigger stack, as competitive programmers do: the harness waits for it.
import threading
threading.Thread(target=main).start()
```"""
STDIN_READ = """```python
data = sys.stdin.read().split()  # sys comes from LiveCodeBench's import preamble
t = int(data[0])
sys.stdout.write("\\n".join(str(int(data[1 + 2 * i]) + int(data[2 + 2 * i])) for i in range(t)) + "\\n")
sys.exit(0)
```"""
# Prints "3.0  " for 3: LiveCodeBench compares lines after stripping, and numbers as Decimals.
STDIN_OPEN0 = """```python
import os
values = open(0).read().split()
for i in range(int(values[0])):
    print(f"{int(values[1 + 2 * i]) + int(values[2 + 2 * i]):.1f}  ")
os._exit(0)
```"""
STDIN_WRONG = (
    "```python\nfor line in open(0).read().splitlines()[1:]:\n    a, b = map(int, line.split())\n    print(a - b)\n```"
)
STDIN_EARLY_EXIT = "```python\nimport os\nos._exit(0)  # must not end the harness as a pass\n```"
STDIN_LOOP = "```python\nwhile True:\n    pass\n```"
TWO_SUM = """```python
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return (seen[target - x], i)  # a tuple counts as a list
            seen[x] = i
```"""
TWO_SUM_WRONG = TWO_SUM.replace("return (seen[target - x], i)", "return [i, seen[target - x]]")


def test_lcb_tests_decode_public_then_private():
    tests = lcb_tests(STDIN_ROW)
    assert [t["output"] for t in tests] == ["3\n7\n", "7\n", "0\n10\n0\n"]
    assert {t["testtype"] for t in tests} == {"stdin"}
    functional = lcb_tests(FUNCTIONAL_ROW)  # plain-JSON private tests
    assert [t["output"] for t in functional] == ["[0, 1]", "[1, 2]", "[0, 1]"]
    assert lcb_func_name(FUNCTIONAL_ROW) == "twoSum" and lcb_func_name(STDIN_ROW) is None


def test_lcb_tests_refuse_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    row = {**STDIN_ROW, "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()}
    with pytest.raises(ValueError, match=r"refusing to load (posix|os)\.system"):
        lcb_tests(row)
    with pytest.raises(ValueError, match="not a plain string"):
        score_livecodebench([row], ["print(1)"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        ("definitely not base64!", "neither JSON nor base64"),
        (base64.b64encode(b"not zlib").decode(), "neither JSON nor base64"),
        (base64.b64encode(zlib.compress(b"not a pickle")).decode(), "not a plain string"),
        (base64.b64encode(zlib.compress(pickle.dumps(123))).decode(), "unpickles to int"),
        (base64.b64encode(zlib.compress(pickle.dumps("{not json"))).decode(), "malformed JSON"),
        (encode_private([{"input": "1"}]), r"private_test_cases\[0\] is not a test"),
        (json.dumps({"input": "1", "output": "2"}), "must decode to a list"),
    ],
)
def test_lcb_tests_reject_malformed_payloads(payload, message):
    with pytest.raises(ValueError, match=message):
        lcb_tests({**STDIN_ROW, "private_test_cases": payload})


def test_lcb_prompt_follows_the_official_template():
    stdin_prompt = lcb_prompt(STDIN_ROW)
    assert stdin_prompt.startswith("You are an expert Python programmer.")
    assert f"### Question:\n{STDIN_ROW['question_content']}\n\n" in stdin_prompt
    assert "Read the inputs from stdin" in stdin_prompt and "```python\n# YOUR CODE HERE\n```" in stdin_prompt
    functional_prompt = lcb_prompt(FUNCTIONAL_ROW)
    assert "use the following starter code" in functional_prompt
    assert f"```python\n{FUNCTIONAL_ROW['starter_code']}\n```" in functional_prompt
    assert functional_prompt.endswith("### Answer: (use the provided format with backticks)\n\n")


def test_the_program_holds_no_test_data_and_stdin_carries_nonce_then_problem():
    code = "print('secret-code-marker')\n"
    tests = [{"input": "1 2\n", "output": "secret-expected-marker"}]
    problem = lcb_problem(code, tests, None)
    program = harness_program()
    assert "secret-code-marker" not in program and "secret-expected-marker" not in program
    nonce, stdin = harness_stdin(problem)
    payload, _, last = stdin.rpartition("\n")
    assert last == nonce and len(nonce) == 32 and json.loads(payload) == problem
    assert harness_stdin(problem)[0] != nonce  # a fresh secret per run
    with pytest.raises(ValueError, match="at least one test"):
        lcb_problem(code, [], None)


def test_lcb_timeout_grows_with_the_tests_up_to_a_cap():
    assert lcb_timeout(0) == 6.0 and lcb_timeout(3) == 9.0 and lcb_timeout(500) == 60.0


def test_score_livecodebench_runs_every_test_in_the_sandbox():
    stdin = [STDIN_INPUT, STDIN_READ, STDIN_OPEN0, STDIN_WRONG, STDIN_EARLY_EXIT, STDIN_LOOP]
    functional = [TWO_SUM, TWO_SUM_WRONG]
    start = time.monotonic()
    scores = score_livecodebench(
        [STDIN_ROW] * len(stdin) + [FUNCTIONAL_ROW] * len(functional), stdin + functional, workers=2, timeout_s=3.0
    )
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert time.monotonic() - start < 15.0  # the infinite loop is stopped at its limit


def test_score_livecodebench_needs_one_completion_per_row():
    with pytest.raises(ValueError, match="one completion each"):
        score_livecodebench([STDIN_ROW], ["print(1)", "print(2)"])


def test_the_harness_is_a_module_whose_source_is_the_program():
    """The harness is linted, type-checked and importable; the program is its source plus one call."""
    from tropd_cli.evals import code_harness

    program = harness_program()
    source = Path(code_harness.__file__).read_text(encoding="utf-8")
    assert program.startswith(source) and program.rstrip().endswith("run()")
    compile(program, "<harness>", "exec")


def test_the_harness_compares_outputs_as_livecodebench_does():
    from tropd_cli.evals.code_harness import same_output

    assert same_output("1 2\n3\n", "1 2\n3")  # trailing newline and spaces do not matter
    assert same_output("0.50 1\n", "0.5 1.0")  # equal as Decimal values
    assert not same_output("1\n2\n", "1\n")  # line counts differ
    assert not same_output("1 2", "1 3")
    assert not same_output("abc", "abd")
