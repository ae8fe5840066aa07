"""The eval engine: stop strings, metrics by hand, generation on a tiny model, re-scoring, eval during training."""

from __future__ import annotations

import math

import pytest
import torch

from tropd_cli.config import EvalSuiteConfig, EvalTaskConfig, ModelConfig
from tropd_cli.evals.engine import (
    apply_stop,
    evaluate,
    find_stop,
    load_suites,
    rescore,
    task_metrics,
)
from tropd_cli.models import tiny_random
from tropd_cli.train.loop import train

# ---------------------------------------------------------------------------------------------
# Stop strings


def test_stop_strings_cut_at_the_first_one_outside_an_answer():
    assert apply_stop("The sum is 7.\n\nNext question: 2+2", ["\n\n"]) == "The sum is 7."
    assert apply_stop("no stop here", ["\n\n", "Question:"]) == "no stop here"
    assert apply_stop("a Question: b", ["\n\n", "Question:"]) == "a "
    assert find_stop("abc", []) is None


def test_stop_strings_never_cut_inside_a_boxed_answer_or_a_code_fence():
    boxed = "so \\boxed{\\begin{pmatrix}1\n\n2\\end{pmatrix}}\n\nThen"
    assert apply_stop(boxed, ["\n\n"]) == "so \\boxed{\\begin{pmatrix}1\n\n2\\end{pmatrix}}"
    code = "```python\ndef f():\n\n    return 1\n```\n\nDone"
    assert apply_stop(code, ["\n\n"]) == "```python\ndef f():\n\n    return 1\n```"
    nested = "\\boxed{\\frac{1}{2}\n\n} after"  # the stop sits inside the box (nested braces closed before it)
    assert apply_stop(nested, ["\n\n"]) == nested


# ---------------------------------------------------------------------------------------------
# Metrics


def sample(pid: str, score: float, extracted: str = "", **extra: float) -> dict:
    return {"problem_id": pid, "score": score, "extracted": extracted, **({"extra": extra} if extra else {})}


def test_avg_pass_and_maj_by_hand():
    samples = [
        sample("a", 1, "7"),
        sample("a", 0, "8"),
        sample("a", 1, "7.0"),
        sample("a", 1, "7"),
        sample("b", 0, "3"),
        sample("b", 0, "4"),
        sample("b", 0, "3"),
        sample("b", 0, ""),
    ]
    m = task_metrics(samples, kind="math", n=4, pass_k=[1, 2, 4])
    assert m["avg@4"] == pytest.approx(3 / 8)
    assert m["pass@1"] == pytest.approx((3 / 4 + 0) / 2)  # pass@1 equals the mean accuracy
    # a: 3 of 4 right, pass@2 = 1 - C(1,2)/C(4,2) = 1; b: none right.
    assert m["pass@2"] == pytest.approx(0.5) and m["pass@4"] == pytest.approx(0.5)
    assert m["maj@4"] == pytest.approx(0.5)  # a votes "7" (7.0 normalises to 7), b votes "3" (wrong)


def test_majority_vote_groups_answers_by_the_grading_equality():
    from tropd_cli.evals.answers import math_judge
    from tropd_cli.evals.engine import vote

    answers = ["3", "0.5", "\\frac{1}{2}", "3", "1/2", ""]
    assert vote(answers) == 0  # by spelling: "3" twice beats each spelling of one half
    assert vote(answers, math_judge().equal) == 1  # by value: one half three times
    assert vote(["", " "]) is None


def test_pass_at_k_is_the_unbiased_estimator():
    samples = [sample("p", s) for s in (1, 0, 0, 0, 1)]  # n = 5, c = 2
    m = task_metrics(samples, kind="code", n=5, pass_k=[1, 3])
    assert m["pass@1"] == pytest.approx(2 / 5)
    assert m["pass@3"] == pytest.approx(1 - math.comb(3, 3) / math.comb(5, 3))
    assert "maj@5" not in m  # no vote for code


def test_maj_ties_go_to_the_earliest_answer_and_extras_are_averaged():
    samples = [sample("q", 0, "B", strict=0.0), sample("q", 1, "A", strict=1.0)]
    m = task_metrics(samples, kind="choice", n=2, pass_k=[1])
    assert m["maj@2"] == 0.0  # B and A tie; B came first
    assert m["strict"] == 0.5
    partial = task_metrics([sample("r", 0.5)], kind="math", n=1, pass_k=[1])
    assert partial["avg@1"] == 0.5 and partial["pass@1"] == 0.0  # partial credit is not a pass


# ---------------------------------------------------------------------------------------------
# Generation on a tiny random model


@pytest.fixture(scope="module")
def tiny_model():
    model, tokenizer = tiny_random(ModelConfig(name="tiny-random", tiny_layers=2))
    tokenizer.padding_side = "left"
    return model, tokenizer


def mixed_suites(**sampling) -> dict[str, EvalSuiteConfig]:
    math = EvalSuiteConfig(
        tasks=[EvalTaskConfig(name="chain_sum", benchmark="reasoning_gym", size=3, generator_kwargs={"min_terms": 2})],
        max_new_tokens=10,
        batch_size=4,
        **sampling,
    )
    code = EvalSuiteConfig(tasks=[EvalTaskConfig(name="humaneval", benchmark="humaneval", size=2)], max_new_tokens=6)
    return {"math": math, "code": code}


def test_evaluate_runs_every_suite_and_is_seeded(tiny_model):
    model, tokenizer = tiny_model
    suites = load_suites(mixed_suites(temperature=1.0, n_samples=3, pass_k=[1, 3]))
    with torch.no_grad():
        results = evaluate(model, tokenizer, suites, seed=0)
        again = evaluate(model, tokenizer, suites, seed=0)
    assert [(r.suite, r.task) for r in results] == [("math", "chain_sum"), ("code", "humaneval")]
    assert [len(r.samples) for r in results] == [9, 2] and [r.n_problems for r in results] == [3, 2]
    assert set(results[0].metrics) == {"avg@3", "pass@1", "pass@3", "maj@3", "truncated_reasoning"}
    # a random model writes no working code (and no reasoning block)
    assert results[1].metrics == {"avg@1": 0.0, "pass@1": 0.0, "truncated_reasoning": 0.0}
    assert [s["completion"] for s in results[0].samples] == [s["completion"] for s in again[0].samples]
    assert len({s["completion"] for s in results[0].samples}) > 1  # sampling, not greedy
    assert {s["sample_idx"] for s in results[0].samples} == {0, 1, 2}


def test_stop_strings_end_generation_early(tiny_model):
    model, tokenizer = tiny_model
    suites = load_suites({"math": mixed_suites(temperature=1.0, n_samples=4)["math"]})
    with torch.no_grad():
        free = evaluate(model, tokenizer, suites, seed=1)[0].samples
    # Stop at a character the free-running completions use, then no completion contains it.
    stop = next(ch for ch in "".join(s["completion"] for s in free) if ch.strip())
    suites[0].config.stop = [stop]
    with torch.no_grad():
        stopped = evaluate(model, tokenizer, suites, seed=1)[0].samples
    assert all(stop not in s["completion"] for s in stopped)
    assert sum(len(s["completion"]) for s in stopped) < sum(len(s["completion"]) for s in free)


def test_rescoring_gives_the_same_scores(tiny_model):
    model, tokenizer = tiny_model
    suites = load_suites(mixed_suites(temperature=1.0, n_samples=2))
    with torch.no_grad():
        results = evaluate(model, tokenizer, suites, seed=3)
    lines = [{"model": "m", **s} for r in results for s in r.samples]
    again = rescore(lines, load_suites(mixed_suites(temperature=1.0, n_samples=2)))["m"]
    assert [r.metrics for r in again] == [r.metrics for r in results]
    assert [s["score"] for r in again for s in r.samples] == [s["score"] for r in results for s in r.samples]


def test_rescoring_refuses_lines_from_another_suite():
    from tropd_cli.errors import UserError

    suites = load_suites({"math": mixed_suites()["math"]})
    line = {"suite": "code", "task": "humaneval", "problem_id": "HumanEval/0", "completion": "x"}
    with pytest.raises(UserError, match="suite 'code' task 'humaneval' is not in the eval suites"):
        rescore([line], suites)


def test_train_evaluates_the_student_every_n_steps(make_config, tmp_path):
    suite = EvalSuiteConfig(
        tasks=[EvalTaskConfig(name="chain_sum", benchmark="reasoning_gym", size=2)], max_new_tokens=4
    )
    cfg = make_config(steps=3, eval_every=2)
    cfg.eval_suite = {"tiny": suite}
    history = train(cfg, output_dir=tmp_path).history
    evaluated = ["eval/tiny/chain_sum" in h for h in history]
    assert evaluated == [False, True, True]  # every 2 steps, and after the last
    assert all(0.0 <= history[i]["eval/average"] <= 1.0 for i in (1, 2))


def test_pass_at_k_needs_k_samples_per_problem():
    from tropd_cli.errors import UserError

    with pytest.raises(UserError, match="problem p has 1 samples, fewer than pass@2 needs"):
        task_metrics([sample("p", 1.0)], kind="math", n=2, pass_k=[2])


# ---------------------------------------------------------------------------------------------
# Any model spec the CLI can build (tropd eval's models entries)


def test_a_layer_dropped_spec_scores_as_the_same_model_saved_and_loaded_by_path(tmp_path):
    """``{name: lab-teacher, keep_layers: [0, 3]}`` and a copy of the teacher cut the same way are the model that
    ``drop_layers`` + ``save_pretrained`` writes: same completions, same scores (and not a trivial 0)."""
    from tropd_cli.models import drop_layers, load_model, load_student

    cpu = torch.device("cpu")
    teacher = ModelConfig(name="lab-teacher", dtype="float32")
    saved = load_model(teacher, device=cpu, cache_dir=tmp_path, frozen=True)
    drop_layers(saved.model, [0, 3])
    saved.model.save_pretrained(tmp_path / "dropped")
    saved.tokenizer.save_pretrained(tmp_path / "dropped")
    by_path = load_model(
        ModelConfig(name=str(tmp_path / "dropped"), dtype="float32"), device=cpu, cache_dir=tmp_path, frozen=True
    )
    by_name = load_student(
        teacher,
        ModelConfig(name="lab-teacher", keep_layers=[0, 3], dtype="float32"),
        device=cpu,
        cache_dir=tmp_path,
        frozen=True,
    )
    copy = ModelConfig(from_teacher=True, keep_layers=[0, 3], dtype="float32")
    by_copy = load_student(teacher, copy, device=cpu, cache_dir=tmp_path, frozen=True)
    suite = EvalSuiteConfig(
        tasks=[
            EvalTaskConfig(
                name="chain_sum",
                size=40,
                generator_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
            )
        ],
        max_new_tokens=8,
        batch_size=40,
    )
    suites = load_suites({"lab": suite})
    runs = [evaluate(m.model, m.tokenizer, suites, seed=0)[0] for m in (by_path, by_name, by_copy)]
    for loaded in (by_name, by_copy):  # frozen: eval mode, no gradients
        assert loaded.model.config.num_hidden_layers == 2 and not loaded.model.training
        assert not any(p.requires_grad for p in loaded.model.parameters())
    assert by_copy.source == "lab-teacher[layers 0,3]"
    completions = [[s["completion"] for s in r.samples] for r in runs]
    assert completions[0] == completions[1] == completions[2]
    assert runs[0].score == runs[1].score == runs[2].score > 0
