"""A ``tropd train`` config as a :class:`RunShape`: what ``tropd plan`` plans."""

from __future__ import annotations

from dataclasses import replace

from tropd_cli.config import ModelConfig, TrainConfig
from tropd_cli.planning.memory import RunShape
from tropd_cli.planning.shapes import ModelShape

#: What ``auto`` resolves to on a bf16 GPU (every GPU planning knows).
_AUTO_DTYPE = "bfloat16"


def _dtype(name: str) -> str:
    return _AUTO_DTYPE if name == "auto" else name


def keep_layers(shape: ModelShape, model: ModelConfig) -> ModelShape:
    """``shape`` with only ``model.keep_layers`` (a layer-dropped student), else unchanged."""
    return shape if model.keep_layers is None else replace(shape, layers=len(model.keep_layers))


def run_shape(cfg: TrainConfig, student: ModelShape, teacher: ModelShape, world_size: int = 1) -> RunShape:
    """The run ``cfg`` describes on ``world_size`` GPUs, at a late step (no guidance prefix: ``prefix_tokens=0``;
    step 0's is ``replace(run, prefix_tokens=run.response_tokens)``). Prompts are planned at
    ``dataset.max_prompt_tokens``, their bound; ``auto`` dtypes and precision as on a bf16 GPU."""
    vllm = cfg.rollout.vllm
    return RunShape(
        student=student,
        teacher=teacher,
        world_size=world_size,
        sequences=cfg.rollout.batch_size * cfg.rollout.n_samples_per_prompt,
        prompt_tokens=cfg.dataset.max_prompt_tokens,
        response_tokens=cfg.rollout.max_new_tokens,
        prefix_tokens=0,
        micro_batches=cfg.optim.micro_batches * cfg.method.mini_batches,
        chunk_size=cfg.scoring.chunk_size,
        top_k=cfg.method.top_k,
        gradient_checkpointing=cfg.student.gradient_checkpointing,
        shard_teacher=cfg.distributed.shard_teacher,
        precision="fp32" if cfg.precision == "fp32" else "bf16",
        sampler_dtype=_dtype(cfg.rollout.sampler_dtype),
        teacher_dtype=_dtype(cfg.teacher.dtype),
        backend=cfg.rollout.backend,
        generation_batch_size=cfg.rollout.generation_batch_size,
        guidance=cfg.guidance.enabled,
        vllm_gpu_memory_utilization=vllm.gpu_memory_utilization,
        vllm_teacher_gpu_memory_utilization=vllm.teacher_gpu_memory_utilization,
        vllm_teacher_prefixes=vllm.teacher_prefixes,
        vllm_teacher_scoring=vllm.teacher_scoring,
        vllm_sleep=vllm.enable_sleep_mode,
        served_teacher=cfg.teacher.backend == "server",
    )
