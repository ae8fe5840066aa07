"""``tropd ablate ablation=NAME``: train and score every (variant, seed) cell of a grid, then summarise.

The command is a Hydra multirun (``hydra.mode: MULTIRUN`` in ``conf/ablate.yaml``): the sweeper makes
one job per cell from the grid's variants and ``seeds``, so cells run through any Hydra launcher
(sequential by default, ``hydra/launcher=joblib`` in parallel, submitit or ray on a cluster). Each job
composes the train config of its cell, trains, scores the student on the grid's eval suite and writes
``cell.json``; a job whose ``cell.json`` exists is skipped, so a rerun resumes. When the sweep ends,
:class:`AblationSummary` writes ``summary.md``, ``summary.csv`` and the plots into the sweep directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tropd_cli.commands.common import CONF_DIR, hydra_output_dir, quiet_libraries, require, to_object
from tropd_cli.config import AblateConfig, EvalConfig, ModelConfig, TrainConfig, validate_train
from tropd_cli.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="ablate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_cell(cfg)


def cell_overrides(ab: AblateConfig, variant: str) -> list[str]:
    """The ``tropd train`` overrides of a cell: grid base, variant, experiment, extras, seed."""
    experiment = [f"experiment={ab.train_experiment}"] if ab.train_experiment else []
    return [*ab.ablation.base, *ab.ablation.variants[variant], *experiment, *ab.overrides, f"seed={ab.seed}"]


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    quiet_libraries()
    ab = to_object(cfg, AblateConfig)
    grid = ab.ablation
    require(bool(grid.variants), f"ablation {grid.name!r} has no variants; add some under ablation.variants")
    variant = ab.variant
    require(
        variant is not None,
        "tropd ablate runs one job per (variant, seed) cell from hydra.sweeper.params; keep hydra.mode=MULTIRUN",
    )
    assert variant is not None
    require(
        variant in grid.variants,
        f"variant={variant!r} is not in ablation {grid.name!r}; choose one of: {', '.join(grid.variants)}",
    )
    out = hydra_output_dir()
    console = Console(stderr=True)
    done = out / "cell.json"
    if done.exists():
        console.print(f"[dim]{variant} seed {ab.seed}: finished earlier, skipped ({done})[/]")
        return dict(json.loads(done.read_text()))

    from hydra import compose

    overrides = cell_overrides(ab, variant)
    train_cfg = to_object(compose(config_name="train", overrides=overrides), TrainConfig)
    validate_train(train_cfg)
    if ab.threads:
        train_cfg.threads = ab.threads
    # An experiment preset that names its own suite (experiment=lab) knows its task better than the grid.
    eval_suites = train_cfg.eval_suite
    if not eval_suites and grid.eval_suite:
        eval_cfg = to_object(compose(config_name="eval", overrides=[f"eval_suite={grid.eval_suite}"]), EvalConfig)
        eval_suites = eval_cfg.eval_suite

    from tropd_cli.ablation import cell_record
    from tropd_cli.evaluation import load_suites
    from tropd_cli.loggers import build_hooks
    from tropd_cli.models import default_cache_dir, load_model, resolve_device
    from tropd_cli.trainer import eval_metrics, train

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(train_cfg)))
    suites = load_suites(eval_suites)  # eval data is checked before the cell trains
    console.print(f"[bold]{variant}[/] seed {ab.seed}: {' '.join(overrides)}")
    resolved = {str(k): v for k, v in OmegaConf.to_container(OmegaConf.structured(train_cfg)).items()}  # type: ignore[union-attr]
    hooks = build_hooks(train_cfg.logger, steps=train_cfg.steps, output_dir=out, run_config=resolved, console=console)
    result = train(train_cfg, output_dir=out, hooks=hooks)

    scores: dict[str, float] = {}
    if suites:
        device = resolve_device(train_cfg.device)
        student = load_model(
            ModelConfig(name=str(result.checkpoint)), device=device, cache_dir=default_cache_dir(), frozen=True
        )
        scores = eval_metrics(student.model, student.tokenizer, suites, seed=ab.seed)
    cell = {
        **cell_record(variant, ab.seed, result.history, scores),
        "overrides": overrides,
        "checkpoint": str(result.checkpoint),
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=2) + "\n")
    tmp.replace(done)  # atomic: a cell is finished exactly when cell.json exists
    return cell


class AblationSummary(Callback):
    """At the end of the sweep: ``summary.md``, ``summary.csv``, ``curves.png``, ``accuracy.png``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from tropd_cli.ablation import write_summary

        root = Path(config.hydra.sweep.dir)
        variants = list(config.ablation.variants)
        expected = len(variants) * len(config.seeds)
        rows = write_summary(root, title=f"Ablation `{config.ablation.name}`", order=variants, expected=expected)
        console = Console(stderr=True)
        if rows:
            console.print(f"summary: {root / 'summary.md'} ({len(rows)} variants)")
        else:
            console.print(f"no finished cells under {root}")
