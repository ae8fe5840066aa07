"""The real-LM lab: SmolLM2-135M-Instruct taught worked arithmetic, distilled into a layer-dropped copy of itself.

``experiment=smol_lab`` runs on SmolLM2's real tokenizer (49,152 tokens) and chat template, offline:

- **teacher** ``smol-lab-teacher``: SmolLM2-135M-Instruct (30 layers) with a LoRA adapter trained by
  ``tropd train method=sft`` on worked solutions of :mod:`tropd_cli.worked_sum` problems (train split).
  The adapter ships inside the package (``lab_models/smol/teacher_adapter``, a few MB); the first use
  merges it into the cached SmolLM2 weights (seconds) and caches the result.
- **student**: a layer-dropped copy of that teacher (the compression use case), see ``conf/student/smol_lab.yaml``.
- **task**: worked chain sums, 3-4 terms of 1-2 digits, about 30-40 response tokens. Training prompts come
  from the ``train`` split, every eval suite draws from the ``eval`` split: disjoint by construction.

Rebuild the teacher adapter (deterministic for a given CPU kind; about an hour on 2 cores)::

    python -m tropd_cli.smol_lab          # = tropd train experiment=smol_lab_teacher, then copies the adapter

which is the same run as ``tropd train experiment=smol_lab_teacher`` followed by copying its
``checkpoint/adapter`` to ``src/tropd_cli/lab_models/smol/teacher_adapter``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tropd_cli.config import ModelConfig
from tropd_cli.errors import UserError

SMOL_DIR = Path(__file__).resolve().parent / "lab_models" / "smol"
TEACHER_ADAPTER = SMOL_DIR / "teacher_adapter"
BASE = "smollm2-135m-instruct"


def adapter_digest(path: Path) -> str:
    """A short hash of an adapter's files: the cache key of the merged teacher."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((path / name).read_bytes())
    return h.hexdigest()[:12]


def teacher_dir(cfg: ModelConfig, cache: Path) -> Path:
    """The registry entry ``smol-lab-teacher``: SmolLM2 with the shipped adapter merged, built once and cached."""
    from tropd_cli.models import REGISTRY, load_adapter_into

    if not (TEACHER_ADAPTER / "adapter_model.safetensors").exists():
        raise UserError(
            f"the smol-lab teacher adapter is missing from {TEACHER_ADAPTER}; rebuild it with `python -m tropd_cli.smol_lab`"
        )
    target = cache / f"smol-lab-teacher-{adapter_digest(TEACHER_ADAPTER)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    base = REGISTRY[BASE](ModelConfig(name=BASE), cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    load_adapter_into(model, TEACHER_ADAPTER)
    tmp = Path(tempfile.mkdtemp(prefix=".smol-lab-teacher-", dir=cache))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{BASE} + {TEACHER_ADAPTER.name} ({adapter_digest(TEACHER_ADAPTER)})\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process merged it first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build(out: Path = TEACHER_ADAPTER, overrides: list[str] | None = None) -> Path:
    """Train the teacher adapter (``experiment=smol_lab_teacher``) and copy it to ``out``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tropd_cli.commands.common import CONF_DIR, register_configs
    from tropd_cli.config import TrainConfig, validate_train
    from tropd_cli.trainer import train

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose("train", ["experiment=smol_lab_teacher", "logger=none", *(overrides or [])])
    cfg = OmegaConf.to_object(composed)
    assert isinstance(cfg, TrainConfig)
    validate_train(cfg)
    with tempfile.TemporaryDirectory(prefix="smol-lab-teacher-") as tmp:
        result = train(cfg, output_dir=Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(result.checkpoint / "adapter", out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the smol-lab teacher's LoRA adapter.")
    parser.add_argument(
        "--out", type=Path, default=TEACHER_ADAPTER, help=f"where to write it (default {TEACHER_ADAPTER})"
    )
    parser.add_argument("overrides", nargs="*", help="more tropd train overrides (e.g. steps=5 for a quick check)")
    args = parser.parse_args(argv)
    print(f"teacher adapter: {build(args.out, args.overrides)}")


if __name__ == "__main__":
    main()
