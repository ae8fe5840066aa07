"""``tropd train``: compose the config, build hooks, run the engine, report."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tropd_cli.commands.common import CONF_DIR, hydra_output_dir, quiet_libraries, to_object
from tropd_cli.config import TrainConfig
from tropd_cli.errors import exit_on_user_error
from tropd_cli.validate import validate_train


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


@contextlib.contextmanager
def stop_on_signals(stop: Any, console: Console) -> Iterator[list[int]]:
    """SIGTERM or a first Ctrl-C asks the loop to finish its step, save a resumable checkpoint and stop
    (cluster preemption, SLURM requeue); a second Ctrl-C stops at once. Yields the signals received.

    In a submitit job SIGUSR2 (its time-limit / preemption signal) does the same; the caller then hands the
    signal to submitit's own handler (restored on exit), which requeues the job."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        stop.requested = True
        console.print(
            f"[yellow]{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(Ctrl-C again to quit at once)[/]"
        )

    signals = [signal.SIGTERM, signal.SIGINT]
    if os.environ.get("SUBMITIT_EXECUTOR") and hasattr(signal, "SIGUSR2"):
        signals.append(signal.SIGUSR2)  # submitit's timeout/preemption signal: save first, then let it requeue
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread (some launchers): no handlers, the run is not interruptible
        yield received
        return
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(cfg: DictConfig) -> dict[str, Any]:
    quiet_libraries()
    train_cfg = to_object(cfg, TrainConfig)
    validate_train(train_cfg)

    from tropd_cli import distributed as D

    # Under torchrun / accelerate launch: join the process group; rank 0's run directory is everyone's.
    info, device = D.init_from_env(train_cfg.device, train_cfg.distributed.timeout_minutes)
    own_dir = hydra_output_dir()
    try:
        output_dir = Path(D.broadcast_object(str(own_dir), info))
        if not info.is_main:
            with contextlib.suppress(OSError):
                own_dir.rmdir()  # the empty scratch directory the dispatcher gave this rank's Hydra
        return _run(cfg, train_cfg, output_dir, info, device)
    finally:
        D.shutdown(info)


def _run(cfg: DictConfig, train_cfg: TrainConfig, output_dir: Path, info: Any, device: Any) -> dict[str, Any]:
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {str(k): v for k, v in OmegaConf.to_container(cfg, resolve=True).items()}  # type: ignore[union-attr]

    from tropd_cli.loggers import ConfigFile, Hooks, build_hooks
    from tropd_cli.train.loop import StopRequest, train

    console = Console(stderr=True, quiet=not info.is_main)  # one rank talks
    # Files of the run are written once the models and data have loaded (the hooks' on_start), so bad
    # input never overwrites the config or metrics of an existing run directory (e.g. one being resumed).
    hooks = (
        Hooks(
            ConfigFile(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True)),
            build_hooks(
                train_cfg.logger, steps=train_cfg.steps, output_dir=output_dir, run_config=resolved, console=console
            ),
        )
        if info.is_main
        else None
    )
    stop = StopRequest()
    with stop_on_signals(stop, console) as received:
        result = train(train_cfg, output_dir=output_dir, hooks=hooks, stop=stop, dist=info, device=device)
    if result.already_finished:
        console.print(
            f"this run already finished: [green]{result.checkpoint}[/] (resume=auto found no step to continue); "
            "nothing trained or written. Train more in another hydra.run.dir, from student.name=<that checkpoint>"
        )
        return {"checkpoint": str(result.checkpoint), "already_finished": True}
    if result.interrupted:
        console.print(
            f"stopped after step {len(result.history)} of {train_cfg.steps}; resumable checkpoint "
            f"[green]{result.checkpoint}[/]; continue with the same command and resume={output_dir}"
        )
        usr2 = getattr(signal, "SIGUSR2", None)
        if received and received[0] == usr2:
            requeue = signal.getsignal(usr2)  # submitit's handler, restored by stop_on_signals
            if callable(requeue):
                requeue(usr2, None)  # requeues the job (resume=auto continues from the checkpoint) and exits
        sys.exit(128 + (received[0] if received else signal.SIGTERM))  # the shell's code for that signal

    history = result.history
    window = max(1, min(3, len(history) // 3))
    first = sum(h["rkl_estimate"] for h in history[:window]) / window
    last = sum(h["rkl_estimate"] for h in history[-window:]) / window
    summary = {
        "checkpoint": str(result.checkpoint),
        "steps": len(history),
        "rkl_first": first,
        "rkl_last": last,
        "seconds": sum(h["time_step"] for h in history),
    }
    held = heldout_summary(history)
    if held:
        summary["heldout"] = held
    if info.enabled:
        summary["world_size"] = info.world_size
    if info.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from tropd_cli.loggers import closing_lines

    for line in closing_lines(summary, window):
        console.print(line)
    return summary


def heldout_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s ``heldout``: prompts, teacher tokens, and the signals ``start`` (before the first step)
    and ``end`` (the last measurement, after the last step); empty when the run measured none."""
    from tropd_cli.train.heldout import METRICS

    end = next((h for h in reversed(history) if "heldout/rkl" in h), None)
    if end is None:
        return {}
    out: dict[str, Any] = {"prompts": int(end["heldout/prompts"]), "tokens": int(end["heldout/tokens"])}
    if history and "heldout/start/rkl" in history[0]:
        out["start"] = {name: history[0][f"heldout/start/{name}"] for name in METRICS}
    out["end"] = {name: end[f"heldout/{name}"] for name in METRICS}
    return out


class SweepSummary(Callback):
    """After ``tropd train -m ...``: ``summary.md``/``summary.csv`` (and curves) in the sweep directory, one
    row per combination of swept values, with mean +- std over seeds when ``seed`` is swept too: final
    training metrics, the last eval scores and the held-out signals after the last step (``heldout/*``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from tropd_cli.ablation import cell_record, write_summary

        root = Path(config.hydra.sweep.dir)
        cells = []
        for job in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            metrics_file, overrides_file = job / "metrics.jsonl", job / ".hydra" / "overrides.yaml"
            if not ((job / "summary.json").exists() and metrics_file.exists() and overrides_file.exists()):
                continue  # a job that failed or was interrupted
            overrides = [str(o) for o in OmegaConf.load(overrides_file)]  # type: ignore[union-attr]
            history = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            seed = int(OmegaConf.load(job / ".hydra" / "config.yaml").seed)  # type: ignore[union-attr]
            scores: dict[str, float] = next((h for h in reversed(history) if "eval/average" in h), {})  # last eval
            swept = [o for o in overrides if not o.startswith("seed=")]
            cell = cell_record(" ".join(swept) or "(defaults)", seed, history, scores)
            held = heldout_summary(history).get("end", {})  # the held-out signals after the last step
            cell["metrics"].update({f"heldout/{name}": value for name, value in held.items()})
            cells.append(cell)
        if not cells:
            return
        order = list(dict.fromkeys(c["variant"] for c in cells))
        write_summary(root, title="Sweep summary", order=order, cells=cells)
        Console(stderr=True).print(f"summary: {root / 'summary.md'}")
