"""Methods: which per-token objective of :mod:`tropd_cli.train.losses` a run optimises.

A method maps one micro-batch's per-token tensors to a per-token loss ``[b, T]``; the trainer
reduces it with one ``masked_mean``. Keyed by ``method.name``; the paper's table rows
(``clip_outlier``, ``tropd_mask``, ...) are config presets of these (``conf/method/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tropd_cli.config import TrainConfig
from tropd_cli.train import losses


@dataclass
class TokenInputs:
    """Per-token tensors of one micro-batch (``[b, T]``; top-k ones ``[b, T, k]``)."""

    logp: Tensor  # log pi_S(x_t), carries grad
    old_logp: Tensor  # detached, rollout-time student log-prob
    teacher_logp: Tensor  # detached
    student_topk_logp: Tensor | None  # full-vocab student log-probs at the teacher's top-k ids (grad)
    teacher_topk_logp: Tensor | None
    teacher_entropy: Tensor  # detached
    student_entropy: Tensor  # detached
    trust_mask: Tensor  # bool
    prefix_mask: Tensor  # bool, teacher-written tokens
    response_mask: Tensor  # bool, every generated token
    keep_mask: Tensor | None = None  # bool, batch-level selection (top student entropy), when asked
    full_vocab_loss: Tensor | None = None  # per-token full-vocabulary loss (GKD), computed chunked

    @property
    def student_mask(self) -> Tensor:
        return self.response_mask & ~self.prefix_mask


@dataclass
class MethodOutput:
    loss: Tensor  # [b, T] per-token loss to minimise
    outlier_loss: Tensor  # [b, T] detached value of the outlier term (for logging)


@dataclass(frozen=True)
class Method:
    fn: Callable[[TokenInputs, TrainConfig, int], MethodOutput]  # (inputs, config, step)
    needs_topk: bool = False  # reads top-k log-probs (the trainer gathers them)
    on_policy: bool = True  # student rollouts (False: SFT on given responses)
    full_vocab: bool = False  # GKD: per-token loss over the whole vocabulary
    keep_fraction: Callable[[TrainConfig, int], float | None] = lambda cfg, step: None  # top-entropy share


def _no_outlier(loss: Tensor) -> MethodOutput:
    return MethodOutput(loss=loss, outlier_loss=torch.zeros_like(loss).detach())


def _with_prefix(x: TokenInputs, cfg: TrainConfig, student_loss: Tensor) -> Tensor:
    """Teacher-prefix tokens (guidance) get ``beta * (teacher_logp - logp)``; the rest ``student_loss``."""
    prefix = cfg.guidance.beta * (x.teacher_logp.detach() - x.logp)
    return torch.where(x.prefix_mask, prefix, student_loss)


def _tropd(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
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
        tail=cfg.outlier.tail,
    )
    outlier = torch.where(x.trust_mask | x.prefix_mask, torch.zeros_like(loss), loss).detach()
    return MethodOutput(loss=loss, outlier_loss=outlier)


def _opd(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    loss = losses.opd_loss(x.logp, x.old_logp, x.teacher_logp, clip_eps=cfg.method.clip_eps)
    return _no_outlier(_with_prefix(x, cfg, loss))


def _constant_advantage(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    loss = losses.constant_advantage_loss(
        x.logp, x.old_logp, cfg.method.constant_advantage, clip_eps=cfg.method.clip_eps
    )
    return _no_outlier(_with_prefix(x, cfg, loss))


def _eopd(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    assert x.student_topk_logp is not None and x.teacher_topk_logp is not None
    loss = losses.eopd_loss(
        x.logp,
        x.old_logp,
        x.teacher_logp,
        x.student_topk_logp,
        x.teacher_topk_logp,
        x.teacher_entropy,
        entropy_threshold=cfg.method.entropy_threshold,
        clip_eps=cfg.method.clip_eps,
        tail=cfg.outlier.tail,
    )
    return _no_outlier(_with_prefix(x, cfg, loss))


def reopold_stage(cfg: TrainConfig, step: int) -> str:
    if not cfg.method.two_stage:
        return "single"
    return "explore" if step < cfg.method.switch_fraction * cfg.steps else "refine"


def _reopold(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    loss = losses.reopold_loss(
        x.logp,
        x.old_logp,
        x.teacher_logp,
        floor=cfg.method.reward_floor,
        stage=reopold_stage(cfg, step),
        keep_mask=x.keep_mask,
        clip_eps=cfg.method.clip_eps,
    )
    return _no_outlier(_with_prefix(x, cfg, loss))


def _entropy_opd(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    assert x.keep_mask is not None
    loss = losses.entropy_opd_loss(
        x.logp, x.old_logp, x.teacher_logp, keep_mask=x.keep_mask, clip_eps=cfg.method.clip_eps
    )
    return _no_outlier(_with_prefix(x, cfg, loss))


def _fkl_topk(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    assert x.student_topk_logp is not None and x.teacher_topk_logp is not None
    loss = losses.topk_forward_kl(
        x.student_topk_logp, x.teacher_topk_logp, renormalize=cfg.outlier.renormalize, tail=cfg.outlier.tail
    )
    return _no_outlier(_with_prefix(x, cfg, loss))


def _jsd_topk(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    assert x.student_topk_logp is not None and x.teacher_topk_logp is not None
    loss = losses.jsd_topk_loss(
        x.logp,
        x.old_logp,
        x.teacher_logp,
        x.student_topk_logp,
        x.teacher_topk_logp,
        beta=cfg.method.jsd_beta,
        clip_eps=cfg.method.clip_eps,
    )
    return _no_outlier(_with_prefix(x, cfg, loss))


def _gkd(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    assert x.full_vocab_loss is not None
    return _no_outlier(_with_prefix(x, cfg, x.full_vocab_loss))


def _sft(x: TokenInputs, cfg: TrainConfig, step: int) -> MethodOutput:
    return _no_outlier(losses.sft_loss(x.logp))


def _reopold_keep(cfg: TrainConfig, step: int) -> float | None:
    return cfg.method.refine_top_fraction if reopold_stage(cfg, step) == "refine" else None


METHODS: dict[str, Method] = {
    "tropd": Method(_tropd, needs_topk=True),
    "opd": Method(_opd),
    "constant_advantage": Method(_constant_advantage),
    "eopd": Method(_eopd, needs_topk=True),
    "reopold": Method(_reopold, keep_fraction=_reopold_keep),
    "entropy_opd": Method(_entropy_opd, keep_fraction=lambda cfg, step: cfg.method.entropy_top_fraction),
    "fkl_topk": Method(_fkl_topk, needs_topk=True),
    "jsd_topk": Method(_jsd_topk, needs_topk=True),
    "gkd": Method(_gkd, full_vocab=True),
    "sft": Method(_sft, on_policy=False),
}


def get_method(cfg: TrainConfig) -> Method:
    method = METHODS[cfg.method.name]
    if cfg.method.name == "tropd" and cfg.outlier.strategy != "fkl":
        return Method(method.fn)  # mask/clip outliers read no top-k
    return method
