"""Training hooks: a rich progress bar, ``metrics.jsonl``, and wandb (offline when there is no key)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tropd_cli.config import LoggerConfig
from tropd_cli.errors import UserError


class ConfigFile:
    """Writes the run's resolved config when training starts (after the models and data loaded)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def on_start(self, info: dict[str, Any]) -> None:
        try:
            self.path.write_text(self.text)
        except OSError as exc:
            raise UserError(
                f"could not write {self.path}: {exc.strerror or exc} (free disk space or point hydra.run.dir elsewhere)"
            ) from exc

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


class MetricsFile:
    """One JSON object per step, flushed as it is written (nothing lost on interruption).

    The file is opened at the first step line, so a run that fails before its first step (while loading,
    or a resume that does not fit) leaves an existing file alone; it is rewritten from the start: a resumed
    run replays the steps of its checkpoint first, so the file ends up with exactly one line per step.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        try:
            if self._fh is None:
                self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in on_end
            self._fh.write(json.dumps(metrics) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise UserError(
                f"could not write {self.path}: {exc.strerror or exc}; the lines before are kept "
                "(free disk space, then resume)"
            ) from exc

    def on_end(self, summary: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.close()


def heldout_text(metrics: dict[str, float], prefix: str = "heldout/") -> str:
    """The held-out signals of a ``metrics.jsonl`` line (``prefix`` = ``heldout/start/`` for those before training)."""
    return (
        f"reverse KL {metrics[prefix + 'rkl']:.4f}  forward KL {metrics[prefix + 'fkl']:.4f}  "
        f"outliers {100 * metrics[prefix + 'outlier_share']:.1f}%  empty {100 * metrics[prefix + 'empty_rate']:.0f}%  "
        f"length {metrics[prefix + 'response_len']:.1f}"
    )


def closing_lines(summary: dict[str, Any], window: int) -> list[str]:
    """What ``tropd train`` prints at the end: the held-out signals before -> after training first (when the run
    measured them), then the on-policy reverse-KL estimate, labelled as the training signal it is."""
    lines = []
    held = summary.get("heldout")
    if held and "start" in held and "end" in held:
        a, b = held["start"], held["end"]
        lines.append(
            f"held-out ({held['prompts']} prompts, {held['tokens']} teacher tokens): "
            f"reverse KL {a['rkl']:.4f} -> {b['rkl']:.4f}, forward KL {a['fkl']:.4f} -> {b['fkl']:.4f}, "
            f"outlier share {100 * a['outlier_share']:.1f}% -> {100 * b['outlier_share']:.1f}%, "
            f"empty answers {100 * a['empty_rate']:.0f}% -> {100 * b['empty_rate']:.0f}%, "
            f"answer length {a['response_len']:.1f} -> {b['response_len']:.1f} tokens"
        )
    lines.append(
        f"training signal (on-policy reverse-KL estimate): {summary['rkl_first']:.4f} (first {window} steps) -> "
        f"{summary['rkl_last']:.4f} (last {window}); checkpoint [green]{escape(str(summary['checkpoint']))}[/]"
    )
    return lines


class RichProgress:
    """A progress bar with live loss, reverse-KL estimate and trust fraction (and a line per held-out measurement)."""

    def __init__(self, total: int, console: Console, description: str = "train") -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, stats="loading models")

    def on_start(self, info: dict[str, Any]) -> None:
        size = f"{info['teacher_params'] / 1e6:.1f}M" if info["teacher_params"] else "weights not here"
        self.console.print(
            f"teacher [cyan]{escape(info['teacher'])}[/] ({size}) -> "
            f"student [cyan]{escape(info['student'])}[/] ({info['student_params'] / 1e6:.1f}M), "
            f"{info['prompts']} prompts on {info['device']} (loaded in {info['load_seconds']:.1f}s)"
        )
        self.progress.start()
        self.progress.update(self.task, stats="first rollout")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        stats = (
            f"loss {metrics['loss']:+.4f}  rkl {metrics['rkl_estimate']:.4f}  "
            f"trust {metrics['trust_fraction']:.2f}  {metrics['time_step']:.1f}s/step"
        )
        self.progress.update(self.task, advance=1, stats=stats)
        if "heldout/start/rkl" in metrics:
            self.progress.console.print(f"held-out before training: {heldout_text(metrics, 'heldout/start/')}")
        if "heldout/rkl" in metrics:
            self.progress.console.print(f"step {step + 1} held-out: {heldout_text(metrics)}")
        scores = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
        if scores:
            shown = "  ".join(f"{k} {100 * v:.1f}" for k, v in scores.items())
            self.progress.console.print(f"step {step + 1} eval (%): {escape(shown)}")

    def on_end(self, summary: dict[str, Any]) -> None:
        self.progress.stop()


class Wandb:
    """Weights & Biases; offline mode unless an API key is configured, and never an interactive prompt."""

    def __init__(self, cfg: LoggerConfig, output_dir: Path, run_config: dict[str, Any]) -> None:
        import wandb

        mode = cfg.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=mode,  # type: ignore[arg-type]
            dir=str(output_dir),
            config=run_config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def on_start(self, info: dict[str, Any]) -> None:
        self.run.config.update({"run_info": info}, allow_val_change=True)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        start = {k.replace("/start/", "/"): v for k, v in metrics.items() if k.startswith("heldout/start/")}
        if start:  # measured before the first step: logged at step 0, on the same curves as the later ones
            self.run.log(start, step=0)
        self.run.log(
            {
                k if k.startswith(("eval/", "heldout/")) else f"train/{k}": v
                for k, v in metrics.items()
                if not k.startswith("heldout/start/")
            },
            step=step + 1,
        )

    def on_end(self, summary: dict[str, Any]) -> None:
        self.run.finish()


class Hooks:
    """Fans each event out to several hooks."""

    def __init__(self, *hooks: Any) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def on_start(self, info: dict[str, Any]) -> None:
        for h in self.hooks:
            h.on_start(info)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for h in self.hooks:
            h.on_step(step, metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        for h in self.hooks:
            h.on_end(summary)


def build_hooks(
    cfg: LoggerConfig, *, steps: int, output_dir: Path, run_config: dict[str, Any], console: Console
) -> Hooks:
    hooks: list[Any] = [MetricsFile(output_dir / "metrics.jsonl")]
    if cfg.name in ("rich", "wandb"):
        hooks.append(RichProgress(steps, console))
    if cfg.name == "wandb":
        hooks.append(Wandb(cfg, output_dir, run_config))
    return Hooks(*hooks)
