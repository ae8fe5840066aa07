"""Grader parity with hand labels: every labelled completion of ``tests/data/graders/`` re-scored the way
``tropd eval generations=FILE eval_suite=grader_parity`` does, against its hand-written verdict.

Each case names its source of truth (``source``: the reference convention, e.g. math-verify's semantics,
the GSM8K ``####`` convention, simple-evals' answer line, or ``hand`` for a careful human reading) and why
(``why``). ``hand_*`` sets were used while fixing the graders; ``fresh*`` sets were written afterwards by
someone who had not seen the graders (benchmarks/grader_agreement.py tells which rules came after which set). The known disagreements are listed so
that any change in a verdict, for better or worse, shows up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tropd_cli.config import EvalSuiteConfig
from tropd_cli.evals.engine import load_suites, rescore

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "graders"
SUITE = ROOT / "conf" / "eval_suite" / "grader_parity.yaml"

#: task -> (labelled file, least agreement the issue asks for, ids where tropd and the label differ)
EXPECTED = {
    "hand_math": ("math_labels.jsonl", 0.98, {"m199", "m279"}),
    "fresh_math": ("math_fresh.jsonl", 0.98, set()),
    "fresh2_math": ("math_fresh2.jsonl", 0.98, set()),
    "hand_choice": ("choice_labels.jsonl", 0.97, set()),
    "fresh_choice": ("choice_fresh.jsonl", 0.97, set()),
    # "I'll go with B."; "the answer is the Fourth Amendment" (option text after an article); "D or A" after "D"
    "fresh2_choice": ("choice_fresh2.jsonl", 0.97, {"h017", "h045", "h047"}),
}


def _cases(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def graded(monkeypatch_module) -> dict[str, dict[str, float]]:
    monkeypatch_module.chdir(ROOT)  # the suite's paths are relative to the repository root
    raw = OmegaConf.load(SUITE)
    suites = {
        name: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalSuiteConfig), raw[name])) for name in raw
    }
    loaded = load_suites(suites)
    suite_of = {t.name: s.name for s in loaded for t in s.tasks}
    lines = [
        {"model": "hand", "suite": suite_of[task], "task": task, "problem_id": c["id"], "completion": c["completion"]}
        for task, (name, _, _) in EXPECTED.items()
        for c in _cases(name)
    ]
    results = rescore(lines, loaded)["hand"]
    return {r.task: {s["problem_id"]: s["score"] for s in r.samples} for r in results}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_case_names_its_source_of_truth():
    for name, _, _ in EXPECTED.values():
        cases = _cases(name)
        assert len(cases) >= 80 and len({c["id"] for c in cases}) == len(cases)
        assert all(c["source"].strip() and c["why"].strip() and isinstance(c["label"], bool) for c in cases), name
        assert 0.3 < sum(c["label"] for c in cases) / len(cases) < 0.7, name  # both verdicts well represented


@pytest.mark.parametrize("task", list(EXPECTED))
def test_agreement_with_hand_labels(graded, task):
    name, least, known = EXPECTED[task]
    cases = _cases(name)
    differ = {c["id"] for c in cases if (graded[task][c["id"]] >= 1.0) != c["label"]}
    assert differ == known, f"{task}: verdicts changed; now differs on {sorted(differ)}, known {sorted(known)}"
    assert 1 - len(differ) / len(cases) >= least
