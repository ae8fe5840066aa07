"""``tropd plan``: a train config's per-GPU memory plan and step-time estimate, printed without a GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from test_cli import assert_ok, assert_one_line_error
from tropd_cli import planning
from tropd_cli.commands.plan import PlanOptions, model_shapes, split_args
from tropd_cli.config import TrainConfig
from tropd_cli.errors import UserError
from tropd_cli.planning.from_config import run_shape

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
R1 = "paper/ds_r1_1p5b_from_skywork_math7b"


def train_config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", list(overrides)))
    assert isinstance(cfg, TrainConfig)
    return cfg


def test_the_paper_preset_plans_as_the_scaling_doc_does(tmp_path):
    """The R1 <- Skywork preset, read from its config, is the run docs/scaling.md plans (preset_run)."""
    cfg = train_config(f"experiment={R1}")
    student, teacher = model_shapes(cfg, tmp_path)
    assert run_shape(cfg, student, teacher, world_size=8) == planning.preset_run("r1-1.5b<-skywork-7b")


def test_tropd_plan_prints_the_peak_of_step_0_and_whether_it_fits(tropd):
    proc = tropd("plan", f"experiment={R1}", "world_size=8", "gpu=h100")
    assert_ok(proc)
    run = planning.preset_run("r1-1.5b<-skywork-7b")
    peak = planning.plan_memory(replace(run, prefix_tokens=run.response_tokens), planning.H100).peak
    out = " ".join(proc.stdout.split())
    assert f"fits H100 SXM 80GB: peak {peak / planning.GiB:.1f} of 71.7 GiB" in out
    assert "largest phase: step 0 prefixes" in out and "200 steps about" in out


def test_a_plan_that_does_not_fit_says_why(tropd):
    proc = tropd("plan", f"experiment={R1}", "world_size=1", "rollout.batch_size=128", "gpu=h100")
    assert_ok(proc)
    assert "does not fit H100 SXM 80GB" in " ".join(proc.stdout.split())


def test_the_default_run_plans_from_registry_shapes(tropd, tmp_path):
    proc = tropd("plan")
    assert_ok(proc)
    out = " ".join(proc.stdout.split())
    assert "student smollm2-135m-instruct <- teacher smol-lab-teacher" in out and "fits H200" in out
    assert not (tmp_path / "outputs").exists()  # the plan writes no run directory


def test_model_shapes_from_a_builder_a_directory_and_a_layer_drop(tmp_path):
    tiny = train_config("experiment=tiny")
    student, teacher = model_shapes(tiny, tmp_path)
    assert (teacher.layers, teacher.hidden) == (tiny.teacher.tiny_layers, tiny.teacher.tiny_hidden)
    assert student.hidden == tiny.student.tiny_hidden
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(planning.QWEN3_1_7B))
    cfg = train_config(f"teacher.name={model_dir}", "student.from_teacher=true", "student.keep_layers=[0,1,27]")
    student, teacher = model_shapes(cfg, tmp_path)
    assert teacher == planning.ModelShape.from_config(planning.QWEN3_1_7B)
    assert student == replace(teacher, layers=3)


def test_plan_options_and_their_one_line_errors(tropd):
    own, rest = split_args(["gpu=h100", "world_size=8", "rollout.batch_size=64", "usable=0.8"])
    assert own == ["gpu=h100", "world_size=8", "usable=0.8"] and rest == ["rollout.batch_size=64"]
    assert PlanOptions.parse(own) == PlanOptions(planning.H100, 8, 0.8)
    for bad in (["gpu=tpu"], ["world_size=0"], ["world_size=two"], ["usable=1.5"]):
        with pytest.raises(UserError):
            PlanOptions.parse(bad)
    assert_one_line_error(tropd("plan", "gpu=tpu"), "gpu='tpu'", "h100, h200")
    assert_one_line_error(tropd("plan", "world_size=3"), "rollout.batch_size=8", "world_size=3")
    assert_one_line_error(tropd("plan", "experiment=paper/qwen3_1p7b_from_nemotron4b"), "teacher.name is not set")
    assert_one_line_error(tropd("plan", "teacher.name=./no/such/dir"), "no/such/dir")
