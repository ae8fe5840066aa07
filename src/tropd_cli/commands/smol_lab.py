"""``python -m tropd_cli.smol_lab [teacher|student]``: rebuild the smol lab's LoRA adapters (see
:mod:`tropd_cli.smol_lab`): ``tropd train experiment=smol_lab_<role>``, then its adapter, in bf16, into the package."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tropd_cli.commands.common import CONF_DIR  # importing it registers the config schemas
from tropd_cli.config import TrainConfig
from tropd_cli.models import ADAPTERS, LAYERS_FILE, SMOL_DIR
from tropd_cli.train.loop import train
from tropd_cli.validate import validate_train


def to_bf16(path: Path) -> None:
    """Store an adapter's weights in bf16 (half the size in git; merged into fp32 weights on load)."""
    weights = load_file(str(path))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, str(path))


def build(role: str = "teacher", out: Path | None = None, overrides: list[str] | None = None) -> Path:
    """Train the ``role`` adapter (``experiment=smol_lab_<role>``) and copy it, in bf16, to ``out``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose("train", [f"experiment=smol_lab_{role}", "logger=none", *(overrides or [])])
    cfg = OmegaConf.to_object(composed)
    assert isinstance(cfg, TrainConfig)
    validate_train(cfg)
    out = out or ADAPTERS[role]
    with tempfile.TemporaryDirectory(prefix=f"smol-lab-{role}-") as tmp:
        result = train(cfg, output_dir=Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(result.checkpoint / "adapter", out)
    to_bf16(out / "adapter_model.safetensors")
    if role == "student":
        (out / LAYERS_FILE).write_text(json.dumps({"keep_layers": list(cfg.student.keep_layers or [])}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the smol-lab teacher's and student's LoRA adapters.")
    parser.add_argument("role", nargs="?", choices=["all", "teacher", "student"], default="all")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write it (default {SMOL_DIR}/ROLE_adapter)")
    parser.add_argument("overrides", nargs="*", help="more tropd train overrides (e.g. steps=5 for a quick check)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --out
    for role in ["teacher", "student"] if args.role == "all" else [args.role]:
        print(f"{role} adapter: {build(role, args.out, args.overrides)}")


if __name__ == "__main__":
    main()
