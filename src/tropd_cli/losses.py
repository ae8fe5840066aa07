"""Per-token objectives of TrOPD and its baselines (the spec is ``shared/METHOD.md``).

Every function here is pure: it takes per-token tensors ``[B, T]`` (or ``[B, T, k]`` for top-k
quantities) and returns per-token values ``[B, T]`` of a loss that is *minimised*, with no reduction.
One :func:`masked_mean` reduces them, once, in the trainer.

Names are a public contract (other trainers import them):
``k1_reward``, ``trust_region_mask``, ``policy_gradient_loss``, ``topk_forward_kl``, ``tropd_loss``,
``masked_mean``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: REOPOLD's mixture floor log(lambda / (1 - lambda)) with lambda = 0.2.
DEFAULT_CLIP_FLOOR = math.log(0.2 / 0.8)

TRUST_REGION_KINDS = ("bernoulli", "threshold", "none")
OUTLIER_STRATEGIES = ("fkl", "mask", "clip")


def masked_mean(values: Tensor, mask: Tensor, *, total: float | Tensor | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is set.

    ``total`` replaces the local count as the denominator: the trainer passes the token count of the
    whole optimizer step so that micro-batches add up to one global token-mean. Masked-out positions
    never contribute, even if they hold NaN or inf (padding often does).
    """
    mask = mask.bool()
    picked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    denom = mask.sum() if total is None else total
    denom = denom.to(values.dtype).clamp_min(1) if isinstance(denom, Tensor) else max(float(denom), 1.0)
    return picked.sum() / denom


def k1_reward(old_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """K1 reward ``R = sg(teacher_logp - old_logp)``; its negation is the per-token reverse-KL estimate."""
    return (teacher_logp - old_logp).detach()


def trust_region_mask(
    reward: Tensor,
    *,
    tau: float = 0.0,
    kind: str = "bernoulli",
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """Which tokens lie inside the trust region (bool ``[B, T]``).

    - ``bernoulli``: ``M ~ Bernoulli(min(1, exp(R - tau)))``. With tau = 0 this is the speculative
      decoding acceptance test, so ``E[M] = 1 - TV(pi_S, pi_T)`` for tokens sampled from pi_S.
    - ``threshold``: the hard rule ``M = 1[R > tau]``.
    - ``none``: every token is trusted (plain OPD).

    ``uniform`` (same shape as ``reward``, values in [0, 1)) supplies the noise directly; the trainer
    draws it once per rollout batch from a generator keyed by (seed, step) so that micro-batching and
    PPO epochs reuse one mask. Otherwise noise comes from ``generator``.
    """
    if kind == "none":
        return torch.ones_like(reward, dtype=torch.bool)
    if kind == "threshold":
        return reward > tau
    if kind != "bernoulli":
        raise ValueError(f"unknown trust_region kind {kind!r}; choose one of {TRUST_REGION_KINDS}")
    # exp of a clamped log-ratio: never overflows, and -inf / NaN rewards give probability 0.
    accept_prob = torch.exp(torch.clamp(reward.detach() - tau, max=0.0))
    accept_prob = torch.nan_to_num(accept_prob, nan=0.0)
    if uniform is None:
        uniform = torch.rand(reward.shape, generator=generator, device="cpu").to(reward.device)
    return uniform < accept_prob


def policy_gradient_loss(logp: Tensor, old_logp: Tensor, advantage: Tensor, *, clip_eps: float | None = None) -> Tensor:
    """Policy-gradient surrogate ``-A * exp(logp - old_logp)`` (PPO-clipped when ``clip_eps`` is set).

    On the first pass ``logp == old_logp`` so the ratio is 1 and the gradient is ``-A * grad logp``:
    exactly REINFORCE with a per-token advantage.
    """
    advantage = advantage.detach()
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = advantage * ratio
    if clip_eps is None:
        return -unclipped
    clipped = advantage * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(unclipped, clipped)


def topk_forward_kl(student_topk_logp: Tensor, teacher_topk_logp: Tensor, *, renormalize: bool = False) -> Tensor:
    """Top-k forward KL ``sum_k pT * (log pT - log pS)`` over the teacher's top-k ids (``[B, T, k] -> [B, T]``).

    Teacher probabilities are the raw full-vocabulary ones by default (their sum is the teacher's top-k
    mass, below 1); ``renormalize=True`` renormalises them over the k ids (EOPD style). Student
    log-probs are always full-vocabulary. The gradient on the student logits is ``pS * mass - pT`` on
    the top-k ids: bounded by 1 whatever the teacher assigns to the sampled token.
    """
    teacher_topk_logp = teacher_topk_logp.detach()
    if renormalize:
        teacher_topk_logp = torch.log_softmax(teacher_topk_logp, dim=-1)
    teacher_p = torch.exp(teacher_topk_logp)
    terms = teacher_p * (teacher_topk_logp - student_topk_logp)
    # 0 * log 0 = 0: ids the teacher gives no mass contribute nothing (and no NaN).
    terms = torch.where(teacher_p > 0, terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)


def tropd_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    student_topk_logp: Tensor | None,
    teacher_topk_logp: Tensor | None,
    *,
    trust_mask: Tensor,
    prefix_mask: Tensor,
    outlier: str = "fkl",
    clip_floor: float = DEFAULT_CLIP_FLOOR,
    beta: float = 1e-3,
    renormalize: bool = False,
    clip_eps: float | None = None,
) -> Tensor:
    """Per-token TrOPD loss.

    ``loss_t = [prefix] beta * (teacher_logp - logp) + [student] (M * pg(R) + (1 - M) * outlier_t)``

    where ``R = k1_reward(old_logp, teacher_logp)``, ``M = trust_mask`` and ``outlier_t`` is the top-k
    forward KL (``fkl``), 0 (``mask``) or ``pg(max(R, clip_floor))`` (``clip``). Prefix tokens were
    written by the teacher (off-policy guidance); their term's gradient is a beta-weighted NLL.
    Positions outside the response are the caller's to mask in :func:`masked_mean`.
    """
    if outlier not in OUTLIER_STRATEGIES:
        raise ValueError(f"unknown outlier strategy {outlier!r}; choose one of {OUTLIER_STRATEGIES}")
    reward = k1_reward(old_logp, teacher_logp)
    trusted_term = policy_gradient_loss(logp, old_logp, reward, clip_eps=clip_eps)

    if outlier == "fkl":
        if student_topk_logp is None or teacher_topk_logp is None:
            raise ValueError("outlier='fkl' needs student_topk_logp and teacher_topk_logp")
        outlier_term = topk_forward_kl(student_topk_logp, teacher_topk_logp, renormalize=renormalize)
    elif outlier == "clip":
        outlier_term = policy_gradient_loss(logp, old_logp, torch.clamp(reward, min=clip_floor), clip_eps=clip_eps)
    else:
        outlier_term = torch.zeros_like(logp)
    # M * pg(R) + (1 - M) * outlier, as a select: a large value in the unused branch stays out.
    student_term = torch.where(trust_mask.bool(), trusted_term, outlier_term)

    prefix_term = beta * (teacher_logp.detach() - logp)
    return torch.where(prefix_mask.bool(), prefix_term, student_term)
