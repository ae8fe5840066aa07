"""The CPU lab: its rebuild recipe, and the shipped teacher and student (a real mismatch to distil)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

import tropd_cli.commands.common  # noqa: F401  (registers the schemas)
from conftest import greedy_accuracy
from tropd_cli.config import EvalTaskConfig, ModelConfig, TrainConfig
from tropd_cli.evals.engine import load_suites
from tropd_cli.lab import TASK_KWARGS, build
from tropd_cli.models import LAB_DIR, load_model

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CPU = torch.device("cpu")


def test_the_recipe_rebuilds_deterministically(tmp_path):
    first = build("student", tmp_path / "a", steps=3)
    second = build("student", tmp_path / "b", steps=3)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(ModelConfig(name=str(first)), device=CPU, cache_dir=tmp_path, frozen=True)
    assert loaded.model.config.num_hidden_layers == 2


def lab_accuracy(name: str) -> float:
    task = EvalTaskConfig(name="chain_sum", size=100, seed=2024, generator_kwargs=dict(TASK_KWARGS))
    return greedy_accuracy(name, task, max_new_tokens=8, cache_dir=LAB_DIR)


def test_the_shipped_teacher_knows_the_task_and_the_student_does_not():
    teacher, student = lab_accuracy("lab-teacher"), lab_accuracy("lab-student")
    assert teacher >= 0.8, teacher
    assert teacher - student >= 0.3, (teacher, student)


def test_experiment_lab_composes_and_trains(tmp_path):
    from tropd_cli.train.loop import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", ["experiment=lab", "steps=2", f"cache_dir={tmp_path}"]))
    assert isinstance(cfg, TrainConfig)
    assert (cfg.teacher.name, cfg.student.name) == ("lab-teacher", "lab-student") and list(cfg.eval_suite) == ["lab"]
    history = train(cfg, output_dir=tmp_path).history
    assert len(history) == 2 and all(h["rkl_estimate"] == pytest.approx(h["rkl_estimate"]) for h in history)


@pytest.mark.parametrize("experiment", ["lab", "smol_lab"])
def test_training_prompts_never_appear_in_the_eval_suite(experiment, tmp_path):
    """The leak the char lab had (120 of its 126 eval problems were training prompts) is gone by construction."""
    from tropd_cli.data import examples_from_config
    from tropd_cli.train.heldout import heldout_examples

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", [f"experiment={experiment}", f"cache_dir={tmp_path}"]))
    assert isinstance(cfg, TrainConfig)
    train_prompts = {ex.prompt for ex in examples_from_config(cfg.dataset)}
    eval_prompts = {ex.prompt for suite in load_suites(cfg.eval_suite) for task in suite.tasks for ex in task.examples}
    held = {ex.prompt for ex in heldout_examples(cfg, examples_from_config(cfg.dataset))}
    assert len(train_prompts) > 40 and len(eval_prompts) > 20 and held
    assert not train_prompts & eval_prompts
    assert not train_prompts & held
