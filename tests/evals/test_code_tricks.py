"""A pass is earned, not exited into: wrong solutions that fake a pass score 0 on HumanEval, MBPP and
LiveCodeBench, and correct ones still score 1 (issue 15, item 1). Each trick below passed under the old
harness, which counted exit status 0 (HumanEval, MBPP) or a pass line the program printed (LiveCodeBench)."""

from __future__ import annotations

import pytest

from test_code_eval import FUNCTIONAL_ROW, MBPP_SETUP_ROW, STDIN_ROW
from tropd_cli.evals.code import (
    check_one,
    harness_program,
    humaneval_problem,
    load_humaneval,
    score_humaneval,
    score_livecodebench,
    score_mbpp,
)
from tropd_cli.evals.sandbox import run_program

# Module-level code after a wrong answer, each a way to end the process "successfully" or to print a pass.
EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "atexit hook": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "lingering thread": "import os, threading, time\nthreading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n",
    "forged verdict": "import os\nos.write(1, b'tropd-verdict: ' + b'0' * 32 + b'\\n')\nos._exit(0)\n",
    "old LCB pass line on fd 3": "import os\nos.write(3, b'lcb-harness: all tests passed\\n')\nos._exit(0)\n",
    "the harness's own run()": "import sys\nsys.modules['__main__'].run()\n",
    "verdict read from stdin": "import sys\nprint('tropd-verdict: ' + sys.stdin.read().strip())\n",
}
ALWAYS_EQUAL = "class AlwaysEqual:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n    def __bool__(self):\n        return True\n"


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


@pytest.mark.parametrize("trick", sorted(EXITS))
def test_humaneval_wrong_answer_cannot_exit_into_a_pass(humaneval, trick):
    first = humaneval[0]  # has_close_elements
    assert score_humaneval([first], ["    return False\n" + EXITS[trick]], timeout_s=5.0) == [0.0]


def test_humaneval_tricks_fail_and_correct_answers_still_pass(humaneval):
    first, truncate = humaneval[0], humaneval[2]  # has_close_elements; truncate_number: abs(candidate(x) - y) < eps
    cases = [
        (first, first.answer, 1.0),
        (first, first.answer + EXITS["sys.exit(0)"], 0.0),  # exiting is a failure even after a right answer's def
        (first, "    return AlwaysEqual()\n\n" + ALWAYS_EQUAL, 0.0),  # not plain data
        (truncate, "    return 0.0\n\nimport builtins\nbuiltins.abs = lambda x: 0\n", 0.0),  # the judge's abs
        (truncate, truncate.answer + "\nimport builtins\nbuiltins.abs = lambda x: 0\n", 1.0),
        (first, "    import gc\n    return any('tropd-verdict' in repr(o) for o in gc.get_objects())\n", 0.0),
        (first, "    return open('/proc/' + str(__import__('os').getppid()) + '/environ').read() != ''\n", 0.0),
    ]
    scores = score_humaneval([ex for ex, _, _ in cases], [text for _, text, _ in cases], workers=2, timeout_s=5.0)
    assert scores == [want for _, _, want in cases]


def test_the_judge_never_runs_the_models_code():
    """A completion that rebinds what the tests use changes only the sample process."""
    problem = {
        "prompt": "def f(x):\n",
        "test": "def check(candidate):\n    assert len(candidate(3)) == 3\n",
        "entry_point": "f",
    }
    rebinding = "    return [0]\n\nimport builtins\nbuiltins.len = lambda x: 3\n"
    assert not check_one(humaneval_problem(problem, rebinding), timeout_s=5.0)
    assert check_one(humaneval_problem(problem, "    return [0, 0, 0]\n"), timeout_s=5.0)


@pytest.mark.parametrize("trick", ["sys.exit(0)", "os._exit(0)", "atexit hook", "forged verdict"])
def test_mbpp_wrong_answer_cannot_exit_into_a_pass(trick):
    wrong = "def scaled_root(n):\n    return 0\n" + EXITS[trick]
    assert score_mbpp([MBPP_SETUP_ROW], [wrong], timeout_s=5.0) == [0.0]


MBPP_PAIR_ROW = {  # MBPP task 601: the tests construct instances of a class the solution defines
    "task_id": 601,
    "text": "Write a function to find the longest chain which can be formed from the given set of pairs.",
    "code": (
        "class Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n"
        "def max_chain_length(arr, n):\n    mcl = [1 for i in range(n)]\n    for i in range(1, n):\n"
        "        for j in range(0, i):\n            if arr[i].a > arr[j].b and mcl[i] < mcl[j] + 1:\n"
        "                mcl[i] = mcl[j] + 1\n    return max(mcl)\n"
    ),
    "test_list": [
        "assert max_chain_length([Pair(5, 24), Pair(15, 25),Pair(27, 40), Pair(50, 60)], 4) == 3",
        "assert max_chain_length([Pair(1, 2), Pair(3, 4),Pair(5, 6), Pair(7, 8)], 4) == 4",
    ],
    "test_setup_code": "",
}


def test_mbpp_objects_and_their_tricks():
    rows = [MBPP_SETUP_ROW] * 4 + [MBPP_PAIR_ROW] * 2
    completions = [
        MBPP_SETUP_ROW["code"],
        ALWAYS_EQUAL + "def scaled_root(n):\n    return AlwaysEqual()\n",
        ALWAYS_EQUAL + "class scaled_root:\n    def __new__(cls, n):\n        return AlwaysEqual()\n",
        "class scaled_root:\n    def __init__(self, n):\n        pass\n    def __eq__(self, other):\n        return True\n",
        MBPP_PAIR_ROW["code"],  # handles to the solution's Pair objects go back as arguments
        MBPP_PAIR_ROW["code"].replace("return max(mcl)", "return Pair(0, 0)"),  # an object is no answer
    ]
    assert score_mbpp(rows, completions, workers=2, timeout_s=5.0) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_livecodebench_tricks_fail_and_correct_answers_still_pass():
    two_sum = (
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n"
    )
    pair_sums = "t = int(input())\nfor _ in range(t):\n    a, b = map(int, input().split())\n    print(a + b)\n"
    cases = [
        (FUNCTIONAL_ROW, two_sum, 1.0),
        (FUNCTIONAL_ROW, "import sys\nsys.modules['__main__'].finish(True, 'lcb-harness: all tests passed')\n", 0.0),
        (FUNCTIONAL_ROW, EXITS["old LCB pass line on fd 3"], 0.0),
        (
            FUNCTIONAL_ROW,
            ALWAYS_EQUAL + "class Solution:\n    def twoSum(self, nums, target):\n        return AlwaysEqual()\n",
            0.0,
        ),  # fmt: skip
        (STDIN_ROW, pair_sums, 1.0),
        (STDIN_ROW, "import sys\nprint(open(sys.argv[0]).read())\n", 0.0),  # the program file holds no tests
        (STDIN_ROW, EXITS["forged verdict"], 0.0),
    ]
    scores = score_livecodebench(
        [row for row, _, _ in cases], [f"```python\n{code}```" for _, code, _ in cases], workers=2, timeout_s=10.0
    )
    assert scores == [want for _, _, want in cases]


def test_a_verdict_without_this_runs_nonce_is_no_pass():
    """The harness on its own, with a nonce the evaluator did not make: it prints that nonce, not the evaluator's."""
    problem = humaneval_problem(
        {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}, "    return 1\n"
    )
    import json

    result = run_program(harness_program(), stdin=json.dumps(problem) + "\n" + "ab" * 16, timeout_s=5.0)
    assert result.passed and result.stdout_tail.splitlines()[-1] == "tropd-verdict: " + "ab" * 16


def test_the_harness_judges_the_same_in_the_sandboxs_guard_mode():
    """Without root or namespaces the sandbox prepends its Python guard to the program (the harness must still
    compile, and its one fork is allowed); correct code passes, wrong and exiting code fails."""
    from tropd_cli.evals.code import lcb_problem
    from tropd_cli.evals.sandbox import Isolation

    guard = Isolation(own_uid=False, namespaces=False)
    problem = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(2) == 4\n", "entry_point": "f"}
    assert check_one(humaneval_problem(problem, "    return x * 2\n"), timeout_s=10.0, isolation=guard)
    assert not check_one(humaneval_problem(problem, "    return 0\n"), timeout_s=10.0, isolation=guard)
    exits = humaneval_problem(problem, "    return 0\n" + EXITS["os._exit(0)"])
    assert not check_one(exits, timeout_s=10.0, isolation=guard)
    stdin = lcb_problem("print(int(input()) * 2)\n", [{"input": "3\n", "output": "6\n"}], None)
    assert check_one(stdin, timeout_s=10.0, isolation=guard)
