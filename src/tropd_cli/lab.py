"""The CPU lab: a tiny teacher that has learned a task and a weaker, smaller student, for ablations in minutes.

Both are character-level Llamas (:func:`tropd_cli.models.char_tokenizer`) trained with ``method=sft``
on reasoning-gym ``chain_sum`` sums of two one-digit numbers: the teacher (4 layers, width 128) long
enough to be accurate, the student (2 layers, width 128) for a few steps on other prompts, so it
starts far from the teacher. They ship inside the package (``tropd_cli/lab_models``, about 3 MB) as
the registry models ``lab-teacher`` and ``lab-student``; ``experiment=lab`` distils one into the other.

Rebuild them (deterministic for a given CPU kind; a few minutes on 2 cores)::

    python -m tropd_cli.lab                       # writes src/tropd_cli/lab_models/{teacher,student}
    python -m tropd_cli.lab --out DIR --steps 5   # a quick check of the recipe elsewhere
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tropd_cli.config import (
    DatasetConfig,
    GuidanceConfig,
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TrainConfig,
    TrustRegionConfig,
)
from tropd_cli.models import LAB_DIR
from tropd_cli.train.loop import train

#: The task: chain_sum with two one-digit terms ("... 4 + 9 =" -> "13").
TASK_KWARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


@dataclass(frozen=True)
class Recipe:
    layers: int
    hidden: int
    init_seed: int
    steps: int
    data_seed: int  # reasoning-gym seed of the SFT prompts (the student sees other prompts than the teacher)
    data_size: int


RECIPES = {
    "teacher": Recipe(layers=4, hidden=128, init_seed=1, steps=1000, data_seed=1234, data_size=2000),
    "student": Recipe(layers=2, hidden=128, init_seed=2, steps=150, data_seed=99, data_size=500),
}


def sft_config(recipe: Recipe, *, steps: int | None = None, cache_dir: str | None = None) -> TrainConfig:
    """``tropd train method=sft`` on the lab task, training a fresh tiny Llama of the recipe's shape."""
    model = ModelConfig(
        name="tiny-random",
        tiny_layers=recipe.layers,
        tiny_hidden=recipe.hidden,
        tiny_seed=recipe.init_seed,
        dtype="float32",
    )
    return TrainConfig(
        teacher=ModelConfig(name="tiny-random", tiny_layers=1, tiny_hidden=32, dtype="float32"),  # unused by SFT
        student=model,
        dataset=DatasetConfig(size=recipe.data_size, seed=recipe.data_seed, generator_kwargs=dict(TASK_KWARGS)),
        method=MethodConfig(name="sft", sft_source="dataset"),
        trust_region=TrustRegionConfig(kind="none"),
        guidance=GuidanceConfig(enabled=False),
        rollout=RolloutConfig(batch_size=32, max_new_tokens=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=50),  # 3e-3 trains faster at first, then wanders
        logger=LoggerConfig(name="none"),
        steps=steps or recipe.steps,
        seed=0,
        device="cpu",
        cache_dir=cache_dir,
    )


def build(role: str, out_dir: Path, *, steps: int | None = None) -> Path:
    """Train the ``role`` model (``teacher`` or ``student``) from scratch and save it as ``out_dir/role``."""
    target = out_dir / role
    with tempfile.TemporaryDirectory(prefix=f"lab-{role}-") as tmp:
        result = train(sft_config(RECIPES[role], steps=steps, cache_dir=tmp), output_dir=Path(tmp))
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(result.checkpoint, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the CPU lab's teacher and student.")
    parser.add_argument("--out", type=Path, default=LAB_DIR, help=f"where to write them (default {LAB_DIR})")
    parser.add_argument("--steps", type=int, default=None, help="SFT steps for both (default: each recipe's)")
    parser.add_argument("--only", choices=sorted(RECIPES), default=None, help="build one of them")
    args = parser.parse_args(argv)
    for role in [args.only] if args.only else list(RECIPES):
        print(f"{role}: {build(role, args.out, steps=args.steps)}")


if __name__ == "__main__":
    main()
