"""Who writes a run's text: the student's rollouts, and the teacher's (guidance prefixes, SFT targets).

:class:`Samplers` is what the training step asks of them; :func:`tropd_cli.train.setup.build_run` picks
:class:`HFSamplers` (``rollout.backend=loop|generate``) or :class:`tropd_cli.rollout.engines.EngineSamplers`
(``rollout.backend=vllm``, where every decision about waking, sleeping and freeing memory lives). The step
calls the hooks in this order: ``sync`` -> ``before_rollout`` -> rollout (``after_prefixes`` between the
teacher's prefixes and the student's continuations) -> ``after_rollout`` -> teacher scoring ->
``after_teacher_scoring``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from tropd_cli import distributed as D
from tropd_cli.device import resolve_dtype


class Samplers(Protocol):
    backend: str  # how the student samples: loop | generate | vllm
    student: Any  # what rollouts are sampled from: an HF module or a vLLM engine
    teacher: Any  # what writes teacher text: an HF module (or ForwardAdapter) or a vLLM engine
    teacher_backend: str | None  # None: the teacher writes with ``backend`` (HF), or ``vllm``
    scoring_engine: Any  # a vLLM engine that scores the teacher's log-probs, or None (the HF teacher scores)

    @property
    def hf_student(self) -> PreTrainedModel | None:
        """The student's HF sampling copy, synced (held-out signals, eval_every measure it); None for an engine."""

    def sync(self, model: nn.Module) -> None:
        """Copy the trained student's weights into the sampler (gathered from shards under FSDP: collective)."""

    def before_rollout(self) -> None: ...
    def after_prefixes(self) -> Callable[[], Any] | None: ...
    def after_rollout(self) -> None: ...
    def after_teacher_writes(self) -> None: ...
    def before_teacher_scoring(self) -> None: ...
    def after_teacher_scoring(self) -> None: ...
    def free_cached_memory(self) -> None: ...
    def close(self) -> None: ...


def sampling_copy(model: PreTrainedModel, dtype_name: str, device: torch.device, *, sharded: bool) -> PreTrainedModel:
    """The model rollouts are sampled from: the student itself, or a low-precision copy of it.

    A bf16 copy samples faster; it is re-synced from the fp32 student before every rollout, and the trainer
    still scores ``old_logp`` with the fp32 student. A student about to be sharded always gets a whole copy.
    """
    dtype = resolve_dtype(dtype_name, device, frozen=True)
    if dtype == next(model.parameters()).dtype and not sharded:
        return model
    sampler = copy.deepcopy(model).to(dtype)  # type: ignore[arg-type]
    sampler.requires_grad_(False)
    return sampler.eval()


class HFSamplers:
    """``rollout.backend=loop|generate``: the student's sampling copy (or the student itself) and the teacher."""

    scoring_engine: Any = None
    teacher_backend: str | None = None

    def __init__(self, backend: str, student: PreTrainedModel, teacher: Any) -> None:
        self.backend, self.student, self.teacher = backend, student, teacher

    @property
    def hf_student(self) -> PreTrainedModel:
        return self.student

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        if self.student is not model:
            # Under FSDP each parameter is gathered from its shards (a collective, same order on every rank).
            for dst, src in zip(self.student.parameters(), model.parameters(), strict=True):
                dst.copy_(D.full_tensor(src.detach()))

    def before_rollout(self) -> None:
        pass

    def after_prefixes(self) -> None:
        return None

    def after_rollout(self) -> None:
        pass

    def after_teacher_writes(self) -> None:
        pass

    def before_teacher_scoring(self) -> None:
        pass

    def after_teacher_scoring(self) -> None:
        pass

    def free_cached_memory(self) -> None:
        pass

    def close(self) -> None:
        pass
