"""``tropd train``: compose the config, build hooks, run the engine, report."""

from __future__ import annotations

import json
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tropd_cli.commands.common import CONF_DIR, hydra_output_dir, quiet_libraries, to_object
from tropd_cli.config import TrainConfig, validate_train
from tropd_cli.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    quiet_libraries()
    train_cfg = to_object(cfg, TrainConfig)
    validate_train(train_cfg)
    output_dir = hydra_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {str(k): v for k, v in OmegaConf.to_container(cfg, resolve=True).items()}  # type: ignore[union-attr]
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    from tropd_cli.loggers import build_hooks
    from tropd_cli.trainer import train

    console = Console(stderr=True)
    hooks = build_hooks(
        train_cfg.logger, steps=train_cfg.steps, output_dir=output_dir, run_config=resolved, console=console
    )
    result = train(train_cfg, output_dir=output_dir, hooks=hooks)

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
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"reverse-KL estimate {first:.4f} (first {window} steps) -> {last:.4f} (last {window}); "
        f"checkpoint [green]{result.checkpoint}[/]"
    )
    return summary
