"""The vLLM engines of a run (``rollout.backend=vllm``) and every decision about their memory.

:func:`start_engines` saves the student (and the teacher) once and starts colocated engines from those weights;
:class:`EngineSamplers` is what the training step asks of them (:class:`tropd_cli.rollout.samplers.Samplers`).
The engine itself and the tensor <-> request conversions are in :mod:`tropd_cli.rollout.vllm`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tropd_cli import distributed as D
from tropd_cli.config import TrainConfig, VLLMConfig
from tropd_cli.models import save_checkpoint
from tropd_cli.rollout import vllm


class EngineSamplers:
    """``rollout.backend=vllm``: a colocated engine of the student (and of the teacher, when it writes prefixes
    or scores), started from weights saved once and asleep until used (:class:`tropd_cli.rollout.samplers.Samplers`).

    vLLM maps its memory outside torch's allocator: the blocks torch cached during scoring and backward are
    given back before an engine wakes, and each engine sleeps as soon as its part of the step is done, so that
    the student's engine, the teacher's and the trainer take turns with the memory.
    """

    backend = "vllm"
    hf_student = None

    def __init__(
        self,
        cfg: VLLMConfig,
        student: vllm.VLLMEngine,
        teacher_engine: vllm.VLLMEngine | None,
        teacher_hf: Any,
        device: torch.device,
        engine_dir: Path,
        is_main: bool,
    ) -> None:
        self.cfg, self.student, self.teacher_engine, self.device = cfg, student, teacher_engine, device
        self.engine_dir, self.is_main = engine_dir, is_main
        by_engine = teacher_engine is not None and cfg.teacher_prefixes
        self.teacher = teacher_engine if by_engine else teacher_hf
        self.teacher_backend = "vllm" if by_engine else None
        self.scoring_engine = teacher_engine if teacher_engine is not None and cfg.teacher_scoring else None

    def sync(self, model: torch.nn.Module) -> None:
        # Whole tensors, gathered from the shards under FSDP (collective; the same order on every rank).
        self.student.load_weights((name, D.full_tensor(param.detach())) for name, param in model.named_parameters())

    def free_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def before_rollout(self) -> None:
        self.free_cached_memory()  # the last step's scoring and backward blocks, before the engines wake

    def after_prefixes(self) -> Any:
        """Once the teacher's prefixes are written, before the student's engine wakes: the teacher engine sleeps,
        or (HF teacher) torch's cached KV blocks of the prefixes are given back."""
        if self.teacher_backend == "vllm" and self.cfg.enable_sleep_mode:
            assert self.teacher_engine is not None
            return self.teacher_engine.sleep
        return self.free_cached_memory if self.device.type == "cuda" else None

    def after_rollout(self) -> None:
        if self.cfg.enable_sleep_mode:
            self.student.sleep()  # give its KV cache back before scoring and backward

    def after_teacher_writes(self) -> None:
        """After the teacher engine wrote SFT targets."""
        if self.teacher_backend == "vllm" and self.cfg.enable_sleep_mode:
            assert self.teacher_engine is not None
            self.teacher_engine.sleep()

    def before_teacher_scoring(self) -> None:
        if self.scoring_engine is not None and getattr(self.scoring_engine, "asleep", False):
            self.free_cached_memory()  # before the engine wakes

    def after_teacher_scoring(self) -> None:
        # Only the teacher engine this object started sleeps; a served teacher (teacher.backend=server) is not ours.
        if (
            self.scoring_engine is not None
            and self.scoring_engine is self.teacher_engine
            and self.cfg.enable_sleep_mode
        ):
            self.scoring_engine.sleep()

    def close(self) -> None:
        """Shut the engines down and remove the weights they started from (the end of a run)."""
        for engine in (self.student, self.teacher_engine):
            if engine is not None:
                engine.close()
        if self.is_main:
            shutil.rmtree(self.engine_dir, ignore_errors=True)


def start_engines(
    cfg: TrainConfig,
    student: Any,
    teacher: Any,
    teacher_hf: Any,
    *,
    device: torch.device,
    work_dir: Path | None,
    dist: D.Dist,
) -> EngineSamplers:
    """Save the student (and the teacher, when an engine of it is wanted) once, start the engines from those
    weights, asleep with ``enable_sleep_mode``. ``student``/``teacher``: :class:`tropd_cli.models.LoadedModel`."""
    v = cfg.rollout.vllm
    root = Path(D.broadcast_object(str(work_dir or tempfile.mkdtemp(prefix="tropd-vllm-")), dist))
    common: dict[str, Any] = dict(
        dtype=v.dtype,
        max_model_len=v.max_model_len or cfg.dataset.max_prompt_tokens + cfg.rollout.max_new_tokens,
        seed=cfg.seed,
        enable_sleep_mode=v.enable_sleep_mode,
        tensor_parallel_size=v.tensor_parallel_size,
        max_logprobs=v.max_logprobs,
        enforce_eager=v.enforce_eager,
    )
    writes = cfg.guidance.enabled or (cfg.method.name == "sft" and cfg.method.sft_source == "teacher")
    want_teacher = v.teacher_scoring or (v.teacher_prefixes and writes)
    if dist.is_main:
        save_checkpoint(student.model, student.tokenizer, root / "student")
        if want_teacher:
            save_checkpoint(teacher.model, teacher.tokenizer, root / "teacher")
    D.barrier(dist)
    engine = vllm.VLLMEngine(root / "student", gpu_memory_utilization=v.gpu_memory_utilization, **common)
    if v.enable_sleep_mode:
        engine.sleep()
    teacher_engine = None
    if want_teacher:
        teacher_engine = vllm.VLLMEngine(
            root / "teacher", gpu_memory_utilization=v.teacher_gpu_memory_utilization, **common
        )
        if v.enable_sleep_mode:
            teacher_engine.sleep()
    return EngineSamplers(v, engine, teacher_engine, teacher_hf, device, root, dist.is_main)
