"""``tropd ablate ablation=NAME``: train and score every (variant, seed) cell of a grid, then summarise.

The command is a Hydra multirun (``hydra.mode: MULTIRUN`` in ``conf/ablate.yaml``): the sweeper makes
one job per cell from the grid's variants and ``seeds``, so cells run through any Hydra launcher
(sequential by default, ``hydra/launcher=joblib`` in parallel, submitit or ray on a cluster). Each job
composes the train config of its cell, trains, scores the student on the grid's eval suite and writes
``cell.json``; a job whose ``cell.json`` exists is skipped, so a rerun resumes. The first job also scores
the reference rows once per sweep directory: the teacher and the untrained student of the grid's train
config, on the same suite (``reference/{teacher,student_init}/cell.json``, kept across reruns like cells).
When the sweep ends, :class:`AblationSummary` writes ``summary.md``, ``summary.csv`` and the plots into the
sweep directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tropd_cli.commands.common import CONF_DIR, hydra_output_dir, quiet_libraries, require, to_object
from tropd_cli.config import AblateConfig, EvalConfig, EvalSuiteConfig, ModelConfig, TrainConfig
from tropd_cli.errors import exit_on_user_error
from tropd_cli.validate import validate_train


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="ablate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_cell(cfg)


def cell_overrides(ab: AblateConfig, variant: str | None, seed: int | None = None) -> list[str]:
    """The ``tropd train`` overrides of a cell: grid base, variant, experiment, extras, seed (``ab.seed`` unless
    given). With no variant: what every cell shares, the train config of the reference rows."""
    experiment = [f"experiment={ab.train_experiment}"] if ab.train_experiment else []
    own = ab.ablation.variants[variant] if variant is not None else []
    return [*ab.ablation.base, *own, *experiment, *ab.overrides, f"seed={ab.seed if seed is None else seed}"]


def cell_suites(ab: AblateConfig, train_cfg: TrainConfig) -> dict[str, EvalSuiteConfig]:
    """The suites a cell is scored on: the experiment preset's when it names one (``experiment=lab`` knows its
    task better than the grid), else the grid's ``eval_suite``; none when neither names one."""
    if train_cfg.eval_suite or not ab.ablation.eval_suite:
        return train_cfg.eval_suite
    from hydra import compose

    return to_object(
        compose(config_name="eval", overrides=[f"eval_suite={ab.ablation.eval_suite}"]), EvalConfig
    ).eval_suite


def models_of(train_cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """A cell's ``models``: which teacher and student it started from (see :func:`tropd_cli.ablation.summarize`)."""
    from tropd_cli.ablation import models_record

    return models_record(dataclasses.asdict(train_cfg.teacher), dataclasses.asdict(train_cfg.student))


def sweep_dir() -> Path:
    """The ablation's directory (``hydra.sweep.dir``): the cells', the reference rows' and the summary's."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir)


def score_references(ab: AblateConfig, root: Path, console: Console) -> None:
    """Score the ``teacher`` and ``student_init`` reference rows into ``<root>/reference/<role>/cell.json``, unless
    they are there already or another job of the sweep is scoring them (a lock file).

    Both come from the train config every cell shares (grid base, experiment, overrides; no variant), so a
    layer-dropped student is the one the cells start from; they are loaded and scored as a cell's trained
    student is (``dtype=auto``, frozen; first seed of ``seeds``), on the cells' suite.
    """
    import fcntl

    from tropd_cli.ablation import REFERENCES

    ref_dir = root / "reference"
    if all((ref_dir / role / "cell.json").exists() for role in REFERENCES):
        return
    from hydra import compose

    seed = ab.seeds[0] if ab.seeds else ab.seed
    overrides = cell_overrides(ab, None, seed)
    train_cfg = to_object(compose(config_name="train", overrides=overrides), TrainConfig)
    suites_cfg = cell_suites(ab, train_cfg)
    if not suites_cfg:
        return  # nothing to score the cells on, so nothing to compare them with
    ref_dir.mkdir(parents=True, exist_ok=True)
    with open(ref_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes (or the job dies)
        except BlockingIOError:
            console.print("[dim]reference rows: another job is scoring them[/]")
            return
        todo = [role for role in REFERENCES if not (ref_dir / role / "cell.json").exists()]
        if todo:
            _score_references(ab, train_cfg, suites_cfg, todo, ref_dir, seed, overrides, console)


def _score_references(
    ab: AblateConfig,
    train_cfg: TrainConfig,
    suites_cfg: dict[str, EvalSuiteConfig],
    roles: list[str],
    ref_dir: Path,
    seed: int,
    overrides: list[str],
    console: Console,
) -> None:
    import torch
    from rich.markup import escape

    from tropd_cli.ablation import cell_record
    from tropd_cli.device import resolve_device
    from tropd_cli.evals.engine import load_suites
    from tropd_cli.models import default_cache_dir, load_student, model_label
    from tropd_cli.train.loop import eval_metrics

    if ab.threads:
        torch.set_num_threads(ab.threads)
    suites = load_suites(suites_cfg)
    device = resolve_device(train_cfg.device)
    teacher = dataclasses.replace(train_cfg.teacher, dtype="auto")
    specs = {"teacher": teacher, "student_init": dataclasses.replace(train_cfg.student, dtype="auto")}
    for role in roles:
        spec = specs[role]
        loaded = load_student(
            teacher, spec, device=device, cache_dir=default_cache_dir(train_cfg.cache_dir), frozen=True, key=role
        )
        scores = eval_metrics(loaded.model, loaded.tokenizer, suites, seed=seed)
        del loaded
        cell = {
            **cell_record(role, seed, [], scores),
            "reference": True,
            "model": model_label(spec, teacher),
            "overrides": overrides,
            "models": models_of(train_cfg),
        }
        done = ref_dir / role / "cell.json"
        done.parent.mkdir(parents=True, exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell, indent=2) + "\n")
        tmp.replace(done)
        console.print(
            f"reference [bold]{role}[/] ({escape(cell['model'])}): eval average "
            f"{100 * scores['eval/average']:.1f}% ({scores['time_eval']:.0f} s)"
        )


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
    from tropd_cli.ablation import REFERENCES

    taken = ", ".join(v for v in grid.variants if v in REFERENCES)
    require(not taken, f"ablation {grid.name!r} has a variant named {taken}, as a reference row is; rename it")
    out = hydra_output_dir()
    console = Console(stderr=True)
    done = out / "cell.json"
    if done.exists():
        console.print(f"[dim]{variant} seed {ab.seed}: finished earlier, skipped ({done})[/]")
        score_references(ab, sweep_dir(), console)  # a grid from before reference rows existed gets them now
        return dict(json.loads(done.read_text()))

    from hydra import compose

    overrides = cell_overrides(ab, variant)
    train_cfg = to_object(compose(config_name="train", overrides=overrides), TrainConfig)
    validate_train(train_cfg)
    if ab.threads:
        train_cfg.threads = ab.threads
    if train_cfg.heldout.cache_dir is None:
        # Every cell of the grid measures on the same held-out set, and starts from the same student: written once.
        train_cfg.heldout.cache_dir = str(sweep_dir() / "reference" / "heldout")
    eval_suites = cell_suites(ab, train_cfg)
    score_references(ab, sweep_dir(), console)

    from tropd_cli.ablation import cell_record
    from tropd_cli.device import resolve_device
    from tropd_cli.evals.engine import load_suites
    from tropd_cli.loggers import build_hooks
    from tropd_cli.models import default_cache_dir, load_model
    from tropd_cli.train.loop import eval_metrics, train

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(train_cfg)))
    suites = load_suites(eval_suites)  # eval data is checked before the cell trains
    console.print(f"[bold]{variant}[/] seed {ab.seed}: {' '.join(overrides)}")
    resolved = {str(k): v for k, v in OmegaConf.to_container(OmegaConf.structured(train_cfg)).items()}  # type: ignore[union-attr]
    hooks = build_hooks(train_cfg.logger, steps=train_cfg.steps, output_dir=out, run_config=resolved, console=console)
    started = time.perf_counter()
    result = train(train_cfg, output_dir=out, hooks=hooks)
    trained = time.perf_counter()

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
        "models": models_of(train_cfg),
        # wall clock of this cell: training (with its held-out measurements) and the eval suites
        "seconds": {"train": round(trained - started, 1), "eval": round(time.perf_counter() - trained, 1)},
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=2) + "\n")
    tmp.replace(done)  # atomic: a cell is finished exactly when cell.json exists
    return cell


class AblationSummary(Callback):
    """At the end of the sweep: ``summary.md``, ``summary.csv``, ``curves.png``, ``accuracy.png``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from tropd_cli.ablation import REFERENCES, write_summary

        root = Path(config.hydra.sweep.dir)
        variants = list(config.ablation.variants)
        expected = len(variants) * len(config.seeds)
        rows = write_summary(root, title=f"Ablation `{config.ablation.name}`", order=variants, expected=expected)
        console = Console(stderr=True)
        if rows:
            done = [r for r in rows if r["variant"] not in REFERENCES]
            console.print(
                f"summary: {root / 'summary.md'} ({len(done)} variants, {len(rows) - len(done)} reference rows)"
            )
        else:
            console.print(f"no finished cells under {root}")
