"""The real-LM lab: SmolLM2-135M-Instruct taught worked arithmetic, distilled into a layer-dropped copy of itself.

``experiment=smol_lab`` runs on SmolLM2's real tokenizer (49,152 tokens) and chat template, offline:

- **teacher** ``smol-lab-teacher``: SmolLM2-135M-Instruct (30 layers) with a LoRA adapter trained by
  ``tropd train method=sft`` on worked solutions of :mod:`tropd_cli.worked_sum` problems (train split).
- **student** ``smol-lab-student``: that teacher cut to 12 of its 30 layers (the compression use case; the
  cut alone writes no arithmetic), then given a short LoRA SFT on other worked solutions of the train split,
  so that it writes the format but gets most sums wrong: a student that starts clearly below its teacher.
- **task**: worked chain sums, 3-4 terms of 1-2 digits, about 30-40 response tokens. Training prompts come
  from the ``train`` split, every eval suite draws from the ``eval`` split: disjoint by construction.

Both adapters ship inside the package (``lab_models/smol/{teacher,student}_adapter``, bf16, a few MB); the
first use merges them into the cached SmolLM2 weights (seconds) and caches the results. Rebuild them
(deterministic for a given CPU kind; the teacher takes about 30 minutes on 2 cores, the student a few)::

    python -m tropd_cli.smol_lab             # both: tropd train experiment=smol_lab_teacher, then _student
    python -m tropd_cli.smol_lab student     # the student only (from the shipped teacher)

Each is the same run as ``tropd train experiment=smol_lab_<role>`` followed by copying its
``checkpoint/adapter`` (in bf16) to ``src/tropd_cli/lab_models/smol/<role>_adapter``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tropd_cli.config import ModelConfig
from tropd_cli.errors import UserError

SMOL_DIR = Path(__file__).resolve().parent / "lab_models" / "smol"
TEACHER_ADAPTER = SMOL_DIR / "teacher_adapter"
STUDENT_ADAPTER = SMOL_DIR / "student_adapter"
ADAPTERS = {"teacher": TEACHER_ADAPTER, "student": STUDENT_ADAPTER}
BASE = "smollm2-135m-instruct"
#: Beside the student adapter: which layers of the teacher it was trained on.
LAYERS_FILE = "tropd_layers.json"


def adapter_digest(path: Path) -> str:
    """A short hash of an adapter's files: the cache key of the merged model."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((path / name).read_bytes())
    return h.hexdigest()[:12]


def _require(path: Path, role: str) -> None:
    if not (path / "adapter_model.safetensors").exists():
        raise UserError(
            f"the smol-lab {role} adapter is missing from {path}; rebuild it with `python -m tropd_cli.smol_lab {role}`"
        )


def teacher_dir(cfg: ModelConfig, cache: Path) -> Path:
    """The registry entry ``smol-lab-teacher``: SmolLM2 with the shipped adapter merged, built once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tropd_cli.models import REGISTRY, load_adapter_into

    _require(TEACHER_ADAPTER, "teacher")
    target = cache / f"smol-lab-teacher-{adapter_digest(TEACHER_ADAPTER)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    base = REGISTRY[BASE](ModelConfig(name=BASE), cache)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    load_adapter_into(model, TEACHER_ADAPTER)
    _save_atomic(model, AutoTokenizer.from_pretrained(base), target, f"{BASE} + teacher adapter")
    return target


def student_dir(cfg: ModelConfig, cache: Path) -> Path:
    """The registry entry ``smol-lab-student``: the merged teacher cut to the student's layers, with the shipped
    student adapter merged, built once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tropd_cli.models import drop_layers, load_adapter_into

    _require(STUDENT_ADAPTER, "student")
    keep = json.loads((STUDENT_ADAPTER / LAYERS_FILE).read_text())["keep_layers"]
    target = cache / f"smol-lab-student-{adapter_digest(TEACHER_ADAPTER)}-{adapter_digest(STUDENT_ADAPTER)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    teacher = teacher_dir(ModelConfig(name="smol-lab-teacher"), cache)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="float32")
    drop_layers(model, keep)
    load_adapter_into(model, STUDENT_ADAPTER)
    source = f"smol-lab-teacher layers {keep} + student adapter"
    _save_atomic(model, AutoTokenizer.from_pretrained(teacher), target, source)
    return target


def _save_atomic(model: Any, tokenizer: Any, target: Path, source: str) -> None:
    """Save into a temp dir beside ``target``, then one rename: a killed build never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(source + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_bf16(path: Path) -> None:
    """Store an adapter's weights in bf16 (half the size in git; merged into fp32 weights on load)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, str(path))


def build(role: str = "teacher", out: Path | None = None, overrides: list[str] | None = None) -> Path:
    """Train the ``role`` adapter (``experiment=smol_lab_<role>``) and copy it, in bf16, to ``out``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tropd_cli.commands.common import CONF_DIR  # importing it registers the config schemas
    from tropd_cli.config import TrainConfig, validate_train
    from tropd_cli.trainer import train

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
