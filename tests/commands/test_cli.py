"""The ``tropd`` command in a subprocess: dispatch, train (single run, outlier groups, -m sweeps), eval, errors.

Every run uses the tiny random models (``experiment=tiny``, ``eval_suite=tiny``) in a temporary working
directory, with wandb disabled and the hub offline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

METRIC_KEYS = {
    "rkl_estimate",
    "trust_fraction",
    "grad_norm",
    "student_entropy",
    "teacher_entropy",
    "prefix_len",
    "response_len",
    "lr",
    "outlier_loss",
    "teacher_topk_mass",
}


def only_run_dir(root: Path) -> Path:
    """The single ``<date>/<time>`` run directory Hydra made under ``root``."""
    runs = sorted(p for p in root.glob("*/*") if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory: pytest.TempPathFactory, tropd_in):
    """``tropd train experiment=tiny`` once; returns (process, working dir, run dir)."""
    cwd = tmp_path_factory.mktemp("cli-train")
    proc = tropd_in(cwd, "train", "experiment=tiny")
    assert_ok(proc)
    return proc, cwd, only_run_dir(cwd / "outputs" / "train")


# ---------------------------------------------------------------------------------------------
# Dispatcher


def test_version(tropd):
    from tropd_cli import __version__

    proc = tropd("--version")
    assert_ok(proc)
    assert proc.stdout.strip() == f"tropd {__version__}"


def test_help_lists_the_commands(tropd):
    proc = tropd("--help")
    assert_ok(proc)
    for command in ("train", "eval", "ablate"):
        assert f"\n  {command} " in proc.stdout


def test_command_help_shows_config_groups(tropd):
    proc = tropd("train", "--help")
    assert_ok(proc)
    for group in ("teacher", "student", "method", "experiment"):
        assert group in proc.stdout


def test_unknown_command_exits_2(tropd):
    proc = tropd("nosuchcommand")
    assert_one_line_error(proc, "nosuchcommand")


def test_ablate_with_an_unknown_variant_is_a_one_line_error(tropd):
    proc = tropd("ablate", "ablation=tiny", "seeds=[0]", "hydra.sweeper.params.variant=nope")
    assert_one_line_error(proc, "variant='nope' is not in ablation 'tiny'", "opd, tropd")


# ---------------------------------------------------------------------------------------------
# train


def test_train_tiny_writes_checkpoint_metrics_and_config(tiny_train):
    _, _, run_dir = tiny_train
    config = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # experiment=tiny runs two steps
    for step, line in enumerate(lines, start=1):
        metrics = json.loads(line)
        assert metrics.keys() >= METRIC_KEYS, METRIC_KEYS - metrics.keys()
        assert metrics["step"] == step

    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.teacher.name == "tiny-random" and saved.steps == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and Path(summary["checkpoint"]) == run_dir / "checkpoint"


def test_train_logs_held_out_signals_before_and_after_and_leads_with_them(tiny_train):
    proc, _, run_dir = tiny_train
    names = ("rkl", "fkl", "outlier_share", "empty_rate", "response_len")
    first, last = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert {f"heldout/start/{n}" for n in names} <= first.keys()  # before the first step
    assert {f"heldout/{n}" for n in names} <= last.keys()  # after the last
    held = json.loads((run_dir / "summary.json").read_text())["heldout"]
    assert held["prompts"] == 32 and held["tokens"] > 0
    assert held["start"] == {n: first[f"heldout/start/{n}"] for n in names}
    assert held["end"] == {n: last[f"heldout/{n}"] for n in names}
    closing = " ".join(proc.stderr.split())  # rich wraps long lines at the console width
    assert "held-out (32 prompts" in closing and "training signal (on-policy reverse-KL estimate)" in closing
    assert closing.index("held-out (32 prompts") < closing.index("training signal")


@pytest.mark.parametrize("strategy", ["fkl", "mask", "clip"])
def test_train_with_each_outlier_strategy(tropd, tmp_path, strategy):
    proc = tropd("train", "experiment=tiny", f"+outlier={strategy}")
    assert_ok(proc)
    run_dir = only_run_dir(tmp_path / "outputs" / "train")
    assert OmegaConf.load(run_dir / "config.yaml").outlier.strategy == strategy
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    if strategy == "mask":
        assert all(m["outlier_loss"] == 0.0 for m in metrics)  # masked outliers contribute nothing


def test_multirun_sweep_makes_one_run_per_value(tropd, tmp_path):
    proc = tropd("train", "-m", "experiment=tiny", "trust_region.tau=-1,0")
    assert_ok(proc)
    sweep = only_run_dir(tmp_path / "multirun" / "train")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    taus = []
    for job in jobs:
        assert (job / "checkpoint" / "config.json").is_file()
        assert len((job / "metrics.jsonl").read_text().splitlines()) == 2
        taus.append(OmegaConf.load(job / "config.yaml").trust_region.tau)
    assert sorted(taus) == [-1.0, 0.0]
    assert not (tmp_path / "outputs").exists()
    assert "heldout/rkl" in (sweep / "summary.md").read_text()  # the held-out signals after the last step


def test_cfg_job_prints_the_config_and_runs_nothing(tropd, tmp_path):
    proc = tropd("train", "experiment=tiny", "trust_region.tau=0.5", "--cfg", "job")
    assert_ok(proc)
    printed = OmegaConf.create(proc.stdout)
    assert printed.teacher.name == "tiny-random"
    assert printed.trust_region.tau == 0.5
    assert printed.student.keep_layers == [0, 3]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_a_checkpoint_prints_a_table_and_writes_results(tropd, tmp_path, tiny_train):
    checkpoint = tiny_train[2] / "checkpoint"
    proc = tropd("eval", f"models=[{checkpoint}]", "eval_suite=tiny")
    assert_ok(proc)
    assert "chain_sum" in proc.stdout and "average" in proc.stdout

    run_dir = only_run_dir(tmp_path / "outputs" / "eval")
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["suites"]) == ["tiny"] and results["columns"] == ["chain_sum"]
    assert results["models"] == {str(checkpoint): str(checkpoint.resolve())}
    assert {"tropd", "torch", "transformers", "math-verify"} <= set(results["versions"])
    settings = results["suites"]["tiny"]
    assert settings["temperature"] == 0.0 and settings["n_samples"] == 1 and settings["max_new_tokens"] == 8
    scores = results["scores"][str(checkpoint)]
    assert 0.0 <= scores["chain_sum"] <= 1.0 and scores["average"] == scores["chain_sum"]
    assert results["metrics"][str(checkpoint)]["chain_sum"]["avg@1"] == scores["chain_sum"]

    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == settings["tasks"]["chain_sum"]["problems"] == 6
    fields = {"model", "suite", "task", "problem_id", "sample_idx", "prompt", "completion", "extracted", "score"}
    assert all(fields <= set(g) and g["model"] == str(checkpoint) for g in generations)

    # Re-scoring the generations file loads no model and gives the same scores.
    again = tropd("eval", f"generations={run_dir / 'generations.jsonl'}", "models=[/no/model/needed]")
    assert_ok(again)
    rescored = max((tmp_path / "outputs" / "eval").glob("*/*/results.json"), key=lambda p: p.stat().st_mtime_ns)
    assert rescored.parent != run_dir
    assert json.loads(rescored.read_text())["metrics"] == results["metrics"]


def test_eval_latest_finds_the_newest_train_run(tiny_train, tropd_in):
    _, cwd, run_dir = tiny_train
    proc = tropd_in(cwd, "eval", "eval_suite=tiny", "models=[latest]")
    assert_ok(proc)
    results = json.loads((only_run_dir(cwd / "outputs" / "eval") / "results.json").read_text())
    assert [(cwd / m).resolve() for m in results["models"]] == [(run_dir / "checkpoint").resolve()]


def test_eval_latest_picks_the_most_recently_written_run(tropd, tmp_path, tiny_train):
    """Of two finished runs, ``latest`` is the one written last (by time, not by directory name)."""
    source = tiny_train[2] / "checkpoint"
    older = tmp_path / "outputs" / "train" / "2030-01-01" / "00-00-00" / "checkpoint"
    newer = tmp_path / "outputs" / "train" / "2020-01-01" / "00-00-00" / "checkpoint"
    for target, mtime in ((older, 1_600_000_000), (newer, 1_700_000_000)):
        shutil.copytree(source, target)
        os.utime(target, (mtime, mtime))
    proc = tropd("eval", "eval_suite=tiny", "models=[latest]")
    assert_ok(proc)
    results = json.loads((only_run_dir(tmp_path / "outputs" / "eval") / "results.json").read_text())
    assert [(tmp_path / m).resolve() for m in results["models"]] == [newer.resolve()]


def test_eval_latest_without_runs_is_a_user_error(tropd):
    assert_one_line_error(tropd("eval", "eval_suite=tiny", "models=[latest]"), "no finished `tropd train` run")


def test_eval_scores_the_teacher_the_untrained_student_and_the_trained_one(tiny_train, tropd_in):
    """``models=[teacher,student_init,latest]`` with the train preset's two models: three labelled rows."""
    _, cwd, run_dir = tiny_train
    proc = tropd_in(cwd, "eval", "experiment=tiny", "eval_suite=tiny", "models=[teacher,student_init,latest]")
    assert_ok(proc)
    results = max((cwd / "outputs" / "eval").glob("*/*/results.json"), key=lambda p: p.stat().st_mtime_ns)
    report = json.loads(results.read_text())
    labels = list(report["scores"])
    assert labels[:2] == ["tiny-random", "tiny-random[layers 0,3]"] and len(labels) == 3
    assert (cwd / labels[2]).resolve() == (run_dir / "checkpoint").resolve()
    assert "tiny-random[layers 0,3]" in proc.stdout  # in the table as written, not read as rich markup
    student = report["model_specs"]["tiny-random[layers 0,3]"]
    assert student["from_teacher"] and student["keep_layers"] == [0, 3] and student["teacher"]["name"] == "tiny-random"
    assert report["config"]["train_experiment"] == "tiny" and report["config"]["student"]["keep_layers"] == [0, 3]


def test_eval_takes_model_specs_and_an_experiments_suite(tropd, tmp_path):
    """A mapping entry is a layer-dropped model; ``experiment=lab`` brings its teacher, student and suite."""
    proc = tropd(
        "eval",
        "experiment=lab",
        "models=[teacher,student_init,{name:lab-teacher,keep_layers:[0,3]},{from_teacher:true,keep_layers:[0,3],label:cut}]",
    )
    assert_ok(proc)
    report = json.loads((only_run_dir(tmp_path / "outputs" / "eval") / "results.json").read_text())
    assert list(report["suites"]) == ["lab"]  # the preset's suite, not the eval default (math)
    scores = {label: row["average"] for label, row in report["scores"].items()}
    assert list(scores) == ["lab-teacher", "lab-student", "lab-teacher[layers 0,3]", "cut"]
    assert scores["lab-teacher"] > scores["lab-student"]  # the lab's teacher knows its task
    assert scores["lab-teacher[layers 0,3]"] == scores["cut"]  # the same model, named two ways
    assert report["models"]["cut"] == "lab-teacher"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ("train", "experiment=tiny", "student.name=tiny-random"),
            ("student.name=tiny-random conflicts with student.from_teacher=true", "student=hub"),
        ),
        (("eval", "eval_suite=tiny", "models=[{name:x,from_teacher:true}]"), ("models.0.name=x conflicts",)),
        (("eval", "eval_suite=tiny", "models=[{name:x,keep_layer:[0]}]"), ("models.0 has unknown key(s) keep_layer",)),
        (("eval", "eval_suite=tiny", "models=[student_init,smollm2-135m-instruct]"), ("more than once",)),
        (("eval", "eval_suite=tiny", "experiment=nope", "models=[teacher]"), ("experiment=nope",)),
    ],
    ids=[
        "train-name-and-from-teacher",
        "eval-name-and-from-teacher",
        "eval-unknown-key",
        "eval-twice",
        "eval-bad-preset",
    ],
)
def test_contradictory_model_specs_are_one_line_errors(tropd, args, needles):
    assert_one_line_error(tropd(*args), *needles)


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, no traceback


def test_missing_model_exits_2_with_one_line(tropd, tmp_path):
    proc = tropd("train", "experiment=tiny", "teacher.name=/no/such/model")
    assert_one_line_error(proc, "/no/such/model")


@pytest.mark.parametrize(
    ("override", "needle"),
    [("foo=1", "foo"), ("optim.lr=abc", "optim.lr")],
    ids=["unknown-key", "wrong-type"],
)
def test_bad_overrides_exit_2_with_one_line(tropd, tmp_path, override, needle):
    proc = tropd("train", "experiment=tiny", override)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "outputs").exists()  # rejected before any work started


def test_an_output_dir_that_cannot_be_created_is_a_one_line_error(tropd, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = tropd("train", "experiment=tiny", f"hydra.run.dir={tmp_path / 'a-file' / 'run'}")
    assert_one_line_error(proc, "Not a directory", "a-file", "hydra.run.dir")


def test_a_hub_model_that_is_not_cached_offline_is_a_one_line_error(tropd):
    proc = tropd("train", "experiment=tiny", "teacher=hub", "teacher.name=nobody/not-a-cached-model")
    assert_one_line_error(proc, "nobody/not-a-cached-model", "not in the local Hugging Face cache")


def test_an_eval_suite_without_tasks_is_a_one_line_error(tropd):
    proc = tropd("eval", "models=[tiny-random]", "eval_suite=tiny", "eval_suite.tiny.tasks=[]")
    assert_one_line_error(proc, "eval_suite.tiny has no tasks")


def test_bad_input_leaves_an_existing_run_directory_alone(tropd, tmp_path):
    run_dir = tmp_path / "runs" / "exp1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "config.yaml").write_text("steps: 99\n")
    proc = tropd("train", "experiment=tiny", "teacher.name=/no/such/model", f"hydra.run.dir={run_dir}")
    assert_one_line_error(proc, "/no/such/model")
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run_dir / "config.yaml").read_text() == "steps: 99\n"


def test_library_chatter_stays_out_of_the_output():
    """A first run that plots builds matplotlib's font cache and logs it at INFO (issue 15, item 11)."""
    import logging

    from tropd_cli.commands.common import quiet_libraries

    logging.getLogger().setLevel(logging.INFO)  # as Hydra's job logging sets it
    quiet_libraries()
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() >= logging.ERROR
