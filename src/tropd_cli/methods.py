"""Methods: which per-token objective of :mod:`tropd_cli.losses` a run optimises.

A method maps the step's per-token tensors to a per-token loss ``[b, T]``; the trainer reduces it
with one ``masked_mean``. Keyed by ``method.name`` in the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tropd_cli import losses
from tropd_cli.config import TrainConfig


@dataclass
class TokenInputs:
    """Per-token tensors of one micro-batch (``[b, T]``; top-k ones ``[b, T, k]``)."""

    logp: Tensor  # log pi_S(x_t), carries grad
    old_logp: Tensor  # detached, rollout-time student log-prob
    teacher_logp: Tensor  # detached
    student_topk_logp: Tensor | None  # full-vocab student log-probs at the teacher's top-k ids (grad)
    teacher_topk_logp: Tensor | None
    trust_mask: Tensor  # bool
    prefix_mask: Tensor  # bool, teacher-written tokens
    response_mask: Tensor  # bool, every generated token

    @property
    def student_mask(self) -> Tensor:
        return self.response_mask & ~self.prefix_mask


@dataclass
class MethodOutput:
    loss: Tensor  # [b, T] per-token loss to minimise
    outlier_loss: Tensor  # [b, T] detached value of the outlier term (for logging)


@dataclass(frozen=True)
class Method:
    fn: Callable[[TokenInputs, TrainConfig], MethodOutput]
    needs_topk: bool  # does it read top-k log-probs (so the trainer gathers them)
    on_policy: bool  # student rollouts (False: SFT on given responses)


def _tropd(x: TokenInputs, cfg: TrainConfig) -> MethodOutput:
    loss = losses.tropd_loss(
        x.logp,
        x.old_logp,
        x.teacher_logp,
        x.student_topk_logp,
        x.teacher_topk_logp,
        trust_mask=x.trust_mask,
        prefix_mask=x.prefix_mask,
        outlier=cfg.outlier.strategy,
        clip_floor=cfg.outlier.clip_floor,
        beta=cfg.guidance.beta,
        renormalize=cfg.outlier.renormalize,
        clip_eps=cfg.method.clip_eps,
    )
    outlier = torch.where(x.trust_mask | x.prefix_mask, torch.zeros_like(loss), loss).detach()
    return MethodOutput(loss=loss, outlier_loss=outlier)


def _opd(x: TokenInputs, cfg: TrainConfig) -> MethodOutput:
    """OPD: ``pg(R)`` on every student token (teacher-prefix tokens, if any, get the beta NLL term)."""
    everything = torch.ones_like(x.trust_mask)
    loss = losses.tropd_loss(
        x.logp,
        x.old_logp,
        x.teacher_logp,
        None,
        None,
        trust_mask=everything,
        prefix_mask=x.prefix_mask,
        outlier="mask",
        beta=cfg.guidance.beta,
        clip_eps=cfg.method.clip_eps,
    )
    return MethodOutput(loss=loss, outlier_loss=torch.zeros_like(loss))


def _sft(x: TokenInputs, cfg: TrainConfig) -> MethodOutput:
    """Token NLL of the given responses (dataset answers or teacher-written)."""
    loss = -x.logp
    return MethodOutput(loss=loss, outlier_loss=torch.zeros_like(loss))


METHODS: dict[str, Method] = {
    "tropd": Method(_tropd, needs_topk=True, on_policy=True),
    "opd": Method(_opd, needs_topk=False, on_policy=True),
    "sft": Method(_sft, needs_topk=False, on_policy=False),
}


def get_method(cfg: TrainConfig) -> Method:
    method = METHODS[cfg.method.name]
    if cfg.method.name == "tropd" and cfg.outlier.strategy != "fkl":
        return Method(method.fn, needs_topk=False, on_policy=True)
    return method
