"""Shared fixtures: tiny in-process configs and models, a shared tiny training run, a ``tropd`` runner."""

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
    EvalSuiteConfig,
    EvalTaskConfig,
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
from tropd_cli.train.loop import TrainResult, train

CPU = torch.device("cpu")


def greedy_accuracy(name: str, task: EvalTaskConfig, *, max_new_tokens: int, cache_dir: Path) -> float:
    """The registry model ``name``'s greedy score on one eval task, all problems in one batch."""
    from tropd_cli.evals.engine import evaluate, load_suites
    from tropd_cli.models import load_model

    loaded = load_model(ModelConfig(name=name), device=CPU, cache_dir=cache_dir, frozen=True)
    suites = load_suites({"s": EvalSuiteConfig(tasks=[task], max_new_tokens=max_new_tokens, batch_size=task.size)})
    with torch.no_grad():
        return evaluate(loaded.model, loaded.tokenizer, suites, seed=0)[0].score


# ---------------------------------------------------------------------------------------------
# Engine: tiny configs and models built in-process


def tiny_config(tmp_path: Path, **sections: Any) -> TrainConfig:
    """A seconds-long TrainConfig on the tiny random Llama: 4-layer teacher, layers [0, 3] as student.

    Keyword arguments replace whole fields (``steps=1``) or, given a dict, update a section's
    fields (``optim={"lr": 1e-3}``).
    """
    cfg = TrainConfig(
        teacher=ModelConfig(name="tiny-random", tiny_layers=4, dtype="float32"),
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, TrainConfig]:
    """Two optimizer steps of the default tiny config (seed 0), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config(out)
    return train(cfg, output_dir=out), cfg


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


@pytest.fixture(scope="session")
def tropd_in(tropd_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``tropd_in(cwd, *args)``: run ``tropd *args`` in ``cwd`` (for module-scoped fixtures)."""
    return lambda cwd, *args: run_tropd(*args, cwd=cwd, env=tropd_env)


@pytest.fixture
def tropd(tropd_in, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``tropd(*args)``: run the command in a subprocess in ``tmp_path``, capture text output."""
    return lambda *args: tropd_in(tmp_path, *args)
