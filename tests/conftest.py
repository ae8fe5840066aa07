"""Shared fixtures: tiny in-process configs and models, the repo's config dir, a ``tropd`` runner."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tropd_cli.config import (
    DatasetConfig,
    GuidanceConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    ScoringConfig,
    TrainConfig,
)
from tropd_cli.data import Example, load_examples
from tropd_cli.models import LoadedModel, load_pair

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Engine: tiny configs and models built in-process


def tiny_config(tmp_path: Path, **sections: Any) -> TrainConfig:
    """A seconds-long TrainConfig on the tiny random Llama: 4-layer teacher, layers [0, 3] as student.

    Keyword arguments replace whole fields (``steps=1``) or, given a dict, update a section's
    fields (``optim={"lr": 1e-3}``).
    """
    cfg = TrainConfig(
        teacher=ModelConfig(name="tiny-random", tiny_layers=4),
        student=ModelConfig(from_teacher=True, keep_layers=[0, 3]),
        dataset=DatasetConfig(
            size=8,
            generator_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        ),
        rollout=RolloutConfig(batch_size=2, max_new_tokens=8),
        optim=OptimConfig(lr=1e-3),
        guidance=GuidanceConfig(enabled=True),
        logger=LoggerConfig(name="none"),
        scoring=ScoringConfig(chunk_size=16),
        steps=2,
        seed=0,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path),
    )
    for name, value in sections.items():
        if isinstance(value, dict):
            value = dataclasses.replace(getattr(cfg, name), **value)
        setattr(cfg, name, value)
    return cfg


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., TrainConfig]:
    """``make_config(**sections)``: see :func:`tiny_config`."""
    return lambda **sections: tiny_config(tmp_path, **sections)


def load_tiny_pair(cfg: TrainConfig) -> tuple[LoadedModel, LoadedModel]:
    """A fresh (teacher, student) pair as ``train`` would load it, on the CPU."""
    return load_pair(cfg.teacher, cfg.student, device=CPU, cache_dir=Path(cfg.cache_dir or "."))


@pytest.fixture
def load_models() -> Callable[[TrainConfig], tuple[LoadedModel, LoadedModel]]:
    return load_tiny_pair


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    return CONF_DIR


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of one two-step tiny run (seed 0), shared by the tests that only read it."""
    from tropd_cli.trainer import train

    out = tmp_path_factory.mktemp("tiny-run")
    return train(tiny_config(out), output_dir=out).checkpoint


@pytest.fixture(scope="session")
def tiny_examples() -> list[Example]:
    """Eight short chain_sum prompts (reasoning-gym generates them offline)."""
    return load_examples(
        source="reasoning_gym",
        name="chain_sum",
        path=None,
        split="train",
        prompt_field="prompt",
        answer_field="answer",
        size=8,
        seed=1234,
        generator_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    )


# ---------------------------------------------------------------------------------------------
# Command line


def tropd_command() -> list[str]:
    """The console script next to this interpreter, else ``python -m tropd_cli``."""
    script = Path(sys.executable).parent / "tropd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tropd_cli"]


@pytest.fixture(scope="session")
def tropd_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HYDRA_FULL_ERROR", None)  # the dispatcher's one-line errors are part of what we test
    return env


def run_tropd(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tropd_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def tropd(tropd_env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``tropd(*args, cwd=tmp_path)``: run the command in a subprocess, capture text output."""

    def call(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_tropd(*args, cwd=cwd or tmp_path, env=tropd_env)

    return call
