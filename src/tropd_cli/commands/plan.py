"""``tropd plan``: the per-GPU memory plan and step-time estimate of a ``tropd train`` config, without a GPU.

    tropd plan experiment=paper/ds_r1_1p5b_from_skywork_math7b world_size=8 gpu=h100
    tropd plan rollout.batch_size=64 optim.micro_batches=4 gpu=h200

Any ``tropd train`` override composes the run (the train config is the one ``tropd train`` would run);
three keys are the plan's own: ``gpu`` (h100 | h200), ``world_size`` (GPUs, one rank each; default 1)
and ``usable`` (the share of GPU memory a plan may fill, default 0.9). Model shapes come from the
paper's and tropd's known models, a registry entry, a local directory's ``config.json`` or the hub
cache, never from loading weights. ``tropd_cli.planning`` documents what each component counts.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from tropd_cli.commands.common import CONF_DIR, to_object
from tropd_cli.config import ModelConfig, TrainConfig
from tropd_cli.errors import UserError, exit_on_user_error, first_line
from tropd_cli.planning import (
    GPU,
    H100,
    H200,
    GiB,
    MemoryPlan,
    ModelShape,
    RunShape,
    estimate_run_seconds,
    estimate_step,
    plan_memory,
)
from tropd_cli.planning.from_config import keep_layers, run_shape
from tropd_cli.planning.presets import KNOWN_CONFIGS, SMOLLM2_135M

GPUS = {"h100": H100, "h200": H200}
#: Registry entries with a known shape (the SmolLM2 pair: a merged LoRA adapter keeps the base's shape).
REGISTRY_CONFIGS = {"smollm2-135m-instruct": SMOLLM2_135M, "smol-lab-teacher": SMOLLM2_135M}
PLAN_KEYS = ("gpu", "world_size", "usable")


@dataclass(frozen=True)
class PlanOptions:
    gpu: GPU = H200
    world_size: int = 1
    usable: float = 0.9

    @classmethod
    def parse(cls, args: list[str]) -> PlanOptions:
        """``gpu=``, ``world_size=``, ``usable=`` from the command line; a bad value is a one-line error."""
        values = dict(arg.split("=", 1) for arg in args)
        options = cls()
        if "gpu" in values:
            name = values["gpu"].lower()
            if name not in GPUS:
                raise UserError(f"gpu={values['gpu']!r}: planning knows {', '.join(GPUS)}")
            options = replace(options, gpu=GPUS[name])
        if "world_size" in values:
            size = _number(values["world_size"], int, "world_size")
            if size < 1:
                raise UserError(f"world_size={size}: one or more GPUs")
            options = replace(options, world_size=size)
        if "usable" in values:
            usable = _number(values["usable"], float, "usable")
            if not 0 < usable <= 1:
                raise UserError(f"usable={usable}: a share of the GPU's memory in (0, 1]")
            options = replace(options, usable=usable)
        return options


def _number(text: str, kind: type, key: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{key}={text!r} is not a number") from None


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the plan's own ``key=value`` args, everything else for the train config)."""
    own = [a for a in args if a.split("=", 1)[0] in PLAN_KEYS and "=" in a]
    return own, [a for a in args if a not in own]


def main() -> None:
    own, rest = split_args(sys.argv[1:])
    options = PlanOptions.parse(own)
    # The plan writes nothing: no run directory, no .hydra/, no log file.
    sys.argv = [sys.argv[0], *rest, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
    @exit_on_user_error
    def app(cfg: DictConfig) -> None:
        run(cfg, options)

    app()


def model_config(model: ModelConfig, role: str, cache_dir: Path) -> dict[str, Any]:
    """``config.json`` of ``model`` as a dict, without loading weights."""
    name = model.name
    if not name:
        raise UserError(f"{role}.name is not set; name the {role} (a hub id, a directory or a registry entry)")
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name]
    if name in REGISTRY_CONFIGS:
        return REGISTRY_CONFIGS[name]
    from tropd_cli import models

    if name in models.BUILDERS:
        built, _ = models.BUILDERS[name](model)
        return dict(built.config.to_dict())
    if name in models.REGISTRY:
        return _read_config(models.REGISTRY[name](model, cache_dir))
    if os.path.isdir(os.path.expanduser(name)):
        return _read_config(Path(os.path.expanduser(name)))
    models.require_hub_or_cache(name, model.revision)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise UserError(f"could not read the config of {role} {name!r}: {first_line(exc)}") from exc
    return dict(config.to_dict())


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} is not a Hugging Face model directory (no config.json)")
    return dict(json.loads(path.read_text()))


def model_shapes(cfg: TrainConfig, cache_dir: Path) -> tuple[ModelShape, ModelShape]:
    """(student, teacher) shapes; a ``from_teacher`` student is the teacher's, both after ``keep_layers``."""

    def shape(model: ModelConfig, role: str) -> ModelShape:
        try:
            return ModelShape.from_config(model_config(model, role, cache_dir))
        except ValueError as exc:
            raise UserError(f"{role} {model.name!r}: {exc}") from exc

    if cfg.teacher.backend == "server" and not cfg.teacher.name:  # served elsewhere: its shape only sizes the top-k
        student = keep_layers(shape(cfg.student, "student"), cfg.student)
        return student, student
    teacher = shape(cfg.teacher, "teacher")
    base = teacher if cfg.student.from_teacher else shape(cfg.student, "student")
    return keep_layers(base, cfg.student), keep_layers(teacher, cfg.teacher)


def run(cfg: DictConfig, options: PlanOptions) -> tuple[MemoryPlan, MemoryPlan]:
    train_cfg = to_object(cfg, TrainConfig)
    from tropd_cli.models import default_cache_dir

    if train_cfg.rollout.batch_size % options.world_size:
        raise UserError(
            f"rollout.batch_size={train_cfg.rollout.batch_size} prompts do not split evenly over "
            f"world_size={options.world_size} GPUs"
        )
    student, teacher = model_shapes(train_cfg, default_cache_dir(train_cfg.cache_dir))
    late = replace(
        run_shape(train_cfg, student, teacher, options.world_size),
        vllm_multiprocessing=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1",
    )
    first = replace(late, prefix_tokens=late.response_tokens) if late.guidance else late
    plans = plan_memory(first, options.gpu), plan_memory(late, options.gpu)
    print_plan(train_cfg, plans, options)
    return plans


def print_plan(cfg: TrainConfig, plans: tuple[MemoryPlan, MemoryPlan], options: PlanOptions) -> None:
    console = Console()
    first, late = plans
    run: RunShape = late.run
    gpu = options.gpu
    console.print(
        f"[bold]tropd plan[/]: student {cfg.student.name or cfg.teacher.name} <- teacher {cfg.teacher.name}, "
        f"{run.world_size} x {gpu.name}, {run.sequences} sequences per step "
        f"({run.sequences_per_rank} per GPU) of up to {run.prompt_tokens} + {run.response_tokens} tokens, "
        f"{run.micro_batches} micro-batch(es), rollout.backend={run.backend}"
    )
    table = Table(title="per-GPU memory (GiB)", title_justify="left")
    table.add_column("component", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("step 0", justify="right", no_wrap=True)
    table.add_column("late step", justify="right", no_wrap=True)
    table.add_column("what")
    names = list(dict.fromkeys((c.name, c.phase) for c in first.components + late.components))
    for name, phase in names:
        at = [sum(c.bytes for c in p.components if c.name == name and c.phase == phase) for p in plans]
        note = next(c.note for c in first.components + late.components if c.name == name and c.phase == phase)
        table.add_row(name, phase, *(f"{b / GiB:.2f}" for b in at), note)
    for label, value in (
        ("persistent", lambda p: p.persistent),
        ("peak (persistent + largest phase)", lambda p: p.peak),
        ("startup", lambda p: p.startup),
        ("host RAM per rank", lambda p: p.host),
    ):
        table.add_row(f"[bold]{label}[/]", "", *(f"[bold]{value(p) / GiB:.2f}[/]" for p in plans), "")
    console.print(table)
    console.print(f"largest phase: step 0 {first.peak_phase}, late step {late.peak_phase}")
    if cfg.student.lora.r > 0:
        console.print(
            "[yellow]student.lora: the plan counts full fine-tuning (gradients and AdamW states of every weight)[/]"
        )
    problems = sorted(set(first.problems(gpu, options.usable) + late.problems(gpu, options.usable)))
    limit = options.usable * gpu.memory_bytes / GiB
    if problems:
        console.print(f"[red]does not fit[/] {gpu.name} (within {limit:.1f} GiB): " + "; ".join(problems))
    else:
        console.print(f"[green]fits[/] {gpu.name}: peak {max(first.peak, late.peak) / GiB:.1f} of {limit:.1f} GiB")
    step0, step_late = estimate_step(first.run, gpu), estimate_step(run, gpu)
    total = estimate_run_seconds(run, gpu, steps=cfg.steps)
    console.print(
        f"step time estimate (FLOPs at 35% of peak, decode at 70% of HBM bandwidth): step 0 {step0.total_s:.0f} s, "
        f"late step {step_late.total_s:.0f} s (decode {step_late.decode_s:.0f}, teacher {step_late.teacher_s:.0f}, "
        f"student {step_late.student_s:.0f}); {cfg.steps} steps about {total / 3600:.1f} h"
    )
