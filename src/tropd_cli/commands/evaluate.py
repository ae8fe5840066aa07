"""``tropd eval``: score one or more models on an eval suite; a rich table plus results files."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tropd_cli import __version__
from tropd_cli.commands.common import CONF_DIR, hydra_output_dir, quiet_libraries, require, to_object
from tropd_cli.config import EvalConfig, ModelConfig
from tropd_cli.errors import UserError, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


def latest_run(runs_dir: str) -> Path:
    """The checkpoint dir of the newest finished ``tropd train`` run under ``runs_dir``."""
    root = Path(runs_dir)
    candidates = (
        sorted((p.parent for p in root.glob("**/checkpoint/config.json")), key=lambda p: p.stat().st_mtime)
        if root.exists()
        else []
    )
    if not candidates:
        raise UserError(
            f"models contains 'latest' but no finished `tropd train` run is under {runs_dir}/; "
            "run `tropd train` first or pass models=[PATH,...]"
        )
    return candidates[-1]


def run(cfg: DictConfig) -> dict:
    quiet_libraries()
    eval_cfg = to_object(cfg, EvalConfig)
    require(bool(eval_cfg.models), "models is empty; pass models=[PATH_OR_NAME,...]")
    require(bool(eval_cfg.eval_suite.tasks), f"eval_suite {eval_cfg.eval_suite.name!r} has no tasks")
    require(eval_cfg.eval_suite.n_samples > 0, "eval_suite.n_samples must be positive")
    require(eval_cfg.eval_suite.max_new_tokens > 0, "eval_suite.max_new_tokens must be positive")
    output_dir = hydra_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)

    import torch

    from tropd_cli.evaluation import count_jobs, evaluate, load_task
    from tropd_cli.models import default_cache_dir, load_model, resolve_device

    if eval_cfg.threads:
        torch.set_num_threads(eval_cfg.threads)
    device = resolve_device(eval_cfg.device)
    suite = eval_cfg.eval_suite
    names = [str(latest_run(eval_cfg.runs_dir)) if m == "latest" else m for m in eval_cfg.models]
    tasks = [load_task(t) for t in suite.tasks]
    console = Console(stderr=True)
    results: dict[str, dict[str, float]] = {}
    with (
        open(output_dir / "generations.jsonl", "w", encoding="utf-8") as gen_file,
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        for name in names:
            loaded = load_model(
                ModelConfig(name=name, dtype=eval_cfg.dtype),
                device=device,
                cache_dir=default_cache_dir(eval_cfg.cache_dir),
                frozen=True,
            )
            bar = progress.add_task(f"eval {Path(name).name if '/' in name else name}", total=count_jobs(tasks, suite))
            per_task = evaluate(
                loaded.model,
                loaded.tokenizer,
                tasks,
                suite,
                seed=eval_cfg.seed,
                on_batch=partial(progress.advance, bar),
            )
            results[name] = {r.task: r.accuracy for r in per_task}
            results[name]["average"] = sum(r.accuracy for r in per_task) / len(per_task)
            for r in per_task:
                for s in r.samples:
                    gen_file.write(json.dumps({"model": name, "suite": suite.name, **s}) + "\n")
            del loaded

    report = {
        "suite": suite.name,
        "settings": {
            "temperature": suite.temperature,
            "top_p": suite.top_p,
            "max_new_tokens": suite.max_new_tokens,
            "n_samples": suite.n_samples,
            "chat_template": suite.chat_template,
            "tasks": {t.name: len(t.examples) for t in tasks},
        },
        "models": names,
        "scores": results,
        "tropd_version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")

    table = Table(
        title=f"accuracy on {suite.name} ({'greedy' if suite.temperature == 0 else f'T={suite.temperature}'}, "
        f"avg@{suite.n_samples})"
    )
    table.add_column("model")
    columns = [t.name for t in tasks] + ["average"]
    for column in columns:
        table.add_column(column, justify="right")
    for name in names:
        table.add_row(name, *(f"{100 * results[name][c]:.1f}" for c in columns))
    Console().print(table)
    console.print(f"results: {output_dir / 'results.json'}")
    return report
