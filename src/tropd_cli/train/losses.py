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

#: Stand-in for -inf log-probs (padding, masked vocab): finite, so no gradient becomes 0 * inf = NaN.
LOGP_FLOOR = -1e4


def _finite(logp: Tensor) -> Tensor:
    """Log-probs with -inf/NaN replaced by finite values; non-finite entries get zero gradient."""
    return torch.nan_to_num(logp, nan=0.0, posinf=0.0, neginf=LOGP_FLOOR)


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
    return (_finite(teacher_logp) - _finite(old_logp)).detach()


def trust_region_mask(
    reward: Tensor,
    *,
    tau: float = 0.0,
    kind: str = "bernoulli",
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Which tokens lie inside the trust region (bool ``[B, T]``); never a token outside ``valid``.

    - ``bernoulli``: ``M ~ Bernoulli(min(1, exp(R - tau)))``. With tau = 0 this is the speculative
      decoding acceptance test, so ``E[M] = 1 - TV(pi_S, pi_T)`` for tokens sampled from pi_S.
    - ``threshold``: the hard rule ``M = 1[R > tau]``.
    - ``none``: every token is trusted (plain OPD).

    ``uniform`` (same shape as ``reward``, values in [0, 1)) supplies the noise directly; the trainer
    draws it once per rollout batch from a generator keyed by (seed, step) so that micro-batching and
    PPO epochs reuse one mask. Otherwise noise comes from ``generator``. ``valid`` (bool, the
    student's own tokens) excludes padding, prompt and prefix positions, whatever their reward.
    """
    if kind == "none":
        trusted = torch.ones_like(reward, dtype=torch.bool)
    elif kind == "threshold":
        trusted = reward > tau
    elif kind == "bernoulli":
        # exp of a clamped log-ratio: never overflows, and -inf / NaN rewards give probability 0.
        accept_prob = torch.exp(torch.clamp(reward.detach() - tau, max=0.0))
        accept_prob = torch.nan_to_num(accept_prob, nan=0.0)
        if uniform is None:
            uniform = torch.rand(reward.shape, generator=generator, device="cpu").to(reward.device)
        trusted = uniform < accept_prob
    else:
        raise ValueError(f"unknown trust_region kind {kind!r}; choose one of {TRUST_REGION_KINDS}")
    return trusted if valid is None else trusted & valid


def outlier_probability(reward: Tensor, *, tau: float = 0.0, kind: str = "bernoulli") -> Tensor:
    """Probability that :func:`trust_region_mask` leaves a token out (``M = 0``) given its reward ``R``.

    ``bernoulli``: ``1 - min(1, exp(R - tau))``; ``threshold``: ``1[R <= tau]``; ``none``: 0. Its mean
    over tokens is the expected share of outlier tokens, without sampling the mask (the held-out
    ``heldout/outlier_share``). A non-finite reward counts as an outlier, as in the mask.
    """
    if kind == "none":
        return torch.zeros_like(reward, dtype=torch.float32)
    if kind == "threshold":
        return (~(reward > tau)).float()
    if kind == "bernoulli":
        accept_prob = torch.nan_to_num(torch.exp(torch.clamp(reward.detach() - tau, max=0.0)), nan=0.0)
        return (1.0 - accept_prob).float()
    raise ValueError(f"unknown trust_region kind {kind!r}; choose one of {TRUST_REGION_KINDS}")


def policy_gradient_loss(logp: Tensor, old_logp: Tensor, advantage: Tensor, *, clip_eps: float | None = None) -> Tensor:
    """Policy-gradient surrogate ``-A * exp(logp - old_logp)`` (PPO-clipped when ``clip_eps`` is set).

    On the first pass ``logp == old_logp`` so the ratio is 1 and the gradient is ``-A * grad logp``:
    exactly REINFORCE with a per-token advantage.
    """
    advantage = torch.nan_to_num(advantage.detach(), nan=0.0, posinf=0.0, neginf=LOGP_FLOOR)
    ratio = torch.exp(_finite(logp) - _finite(old_logp.detach()))
    unclipped = advantage * ratio
    if clip_eps is None:
        return -unclipped
    clipped = advantage * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(unclipped, clipped)


def topk_forward_kl(
    student_topk_logp: Tensor, teacher_topk_logp: Tensor, *, renormalize: bool = False, tail: bool = False
) -> Tensor:
    """Top-k forward KL ``sum_k pT * (log pT - log pS)`` over the teacher's top-k ids (``[B, T, k] -> [B, T]``).

    Teacher probabilities are the raw full-vocabulary ones by default (their sum is the teacher's top-k
    mass, below 1); ``renormalize=True`` renormalises them over the k ids (EOPD style). Student
    log-probs are always full-vocabulary. The gradient on the student logits is ``pS * mass - pT`` on
    the top-k ids: bounded by 1 whatever the teacher assigns to the sampled token.

    ``tail=True`` (beyond the paper; verl's tail class): the mass the top-k leaves out is one more outcome on
    both sides, ``+ pT_tail * (log pT_tail - log pS_tail)`` with ``p_tail = 1 - sum_k p``, on the raw teacher
    probabilities (``renormalize`` is then ignored): the KL between the two (k + 1)-outcome distributions, which
    with ``k = V - 1`` is the full-vocabulary forward KL. It also pulls the student's tail toward the teacher's,
    which the top-k terms alone never do.
    """
    teacher_topk_logp = _finite(teacher_topk_logp.detach())
    student_topk_logp = _finite(student_topk_logp)
    if renormalize and not tail:
        teacher_topk_logp = torch.log_softmax(teacher_topk_logp, dim=-1)
    teacher_p = torch.exp(teacher_topk_logp)
    terms = teacher_p * (teacher_topk_logp - student_topk_logp)
    # 0 * log 0 = 0: ids the teacher gives no mass contribute nothing (and no NaN).
    terms = torch.where(teacher_p > 0, terms, torch.zeros_like(terms))
    kl = terms.sum(dim=-1)
    if not tail:
        return kl
    teacher_tail = torch.clamp(1.0 - teacher_p.sum(dim=-1), min=0.0)
    tiny = torch.finfo(student_topk_logp.dtype).tiny
    # log(1 - sum_k pS) as log(-expm1(logsumexp)): exact where the student's top-k mass is near 0 or near 1.
    student_tail_log = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(student_topk_logp, dim=-1)), min=tiny))
    teacher_tail_log = torch.log(torch.clamp(teacher_tail, min=tiny))
    tail_term = teacher_tail * (teacher_tail_log - student_tail_log)
    return kl + torch.where(teacher_tail > 0, tail_term, torch.zeros_like(tail_term))


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
    tail: bool = False,
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
        outlier_term = topk_forward_kl(student_topk_logp, teacher_topk_logp, renormalize=renormalize, tail=tail)
    elif outlier == "clip":
        outlier_term = policy_gradient_loss(logp, old_logp, torch.clamp(reward, min=clip_floor), clip_eps=clip_eps)
    else:
        outlier_term = torch.zeros_like(logp)
    # M * pg(R) + (1 - M) * outlier, as a select: a large value in the unused branch stays out.
    student_term = torch.where(trust_mask.bool(), trusted_term, outlier_term)

    prefix_term = beta * (_finite(teacher_logp.detach()) - _finite(logp))
    return torch.where(prefix_mask.bool(), prefix_term, student_term)


# ---------------------------------------------------------------------------------------------
# Baselines (METHOD.md, "Other baselines"). Same conventions: per-token, minimised, no reduction.


def opd_loss(logp: Tensor, old_logp: Tensor, teacher_logp: Tensor, *, clip_eps: float | None = None) -> Tensor:
    """OPD (K1): ``pg(R)`` on every token."""
    return policy_gradient_loss(logp, old_logp, k1_reward(old_logp, teacher_logp), clip_eps=clip_eps)


def constant_advantage_loss(
    logp: Tensor, old_logp: Tensor, advantage: float = -1.0, *, clip_eps: float | None = None
) -> Tensor:
    """Control: ``pg(c)`` with one constant advantage ``c`` on every sampled token (no teacher signal at all).

    With ``c < 0`` it lowers the probability of whatever the student sampled (an entropy push). A distillation
    gain that this control matches is not evidence that the teacher's log-ratio taught anything.
    """
    return policy_gradient_loss(logp, old_logp, torch.full_like(logp, advantage), clip_eps=clip_eps)


def eopd_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    student_topk_logp: Tensor,
    teacher_topk_logp: Tensor,
    teacher_entropy: Tensor,
    *,
    entropy_threshold: float = 0.8,
    clip_eps: float | None = None,
    tail: bool = False,
) -> Tensor:
    """EOPD: OPD everywhere plus, where the **teacher's** entropy exceeds the threshold (nats), the
    top-k forward KL with teacher probabilities renormalised over the top-k (``tail=True``: raw probabilities
    and the tail class instead, see :func:`topk_forward_kl`)."""
    gate = (teacher_entropy.detach() > entropy_threshold).to(logp.dtype)
    fkl = topk_forward_kl(student_topk_logp, teacher_topk_logp, renormalize=True, tail=tail)
    return opd_loss(logp, old_logp, teacher_logp, clip_eps=clip_eps) + gate * fkl


def reopold_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    *,
    floor: float = DEFAULT_CLIP_FLOOR,
    stage: str = "single",
    keep_mask: Tensor | None = None,
    clip_eps: float | None = None,
) -> Tensor:
    """REOPOLD with reward floor ``c``.

    - ``single``: ``pg(max(R, c))`` on every token (= TrOPD's Clip Outlier row).
    - ``explore``: ``pg(R)`` only on tokens with ``R >= c`` (the others are dropped).
    - ``refine``: ``pg(max(R, c))`` only where ``keep_mask`` is set: the trainer passes the top-beta
      share of tokens by **student** entropy.
    """
    reward = k1_reward(old_logp, teacher_logp)
    if stage == "explore":
        keep = reward >= floor
        return torch.where(keep, policy_gradient_loss(logp, old_logp, reward, clip_eps=clip_eps), 0.0)
    clipped = policy_gradient_loss(logp, old_logp, torch.clamp(reward, min=floor), clip_eps=clip_eps)
    if stage == "single":
        return clipped
    if stage != "refine":
        raise ValueError(f"unknown REOPOLD stage {stage!r}; choose single, explore or refine")
    if keep_mask is None:
        raise ValueError("stage='refine' needs keep_mask (the top share of tokens by student entropy)")
    return torch.where(keep_mask.bool(), clipped, 0.0)


def entropy_opd_loss(
    logp: Tensor, old_logp: Tensor, teacher_logp: Tensor, *, keep_mask: Tensor, clip_eps: float | None = None
) -> Tensor:
    """Entropy OPD: ``pg(R)`` only on ``keep_mask`` (the trainer keeps the top 20% by student entropy)."""
    return torch.where(keep_mask.bool(), opd_loss(logp, old_logp, teacher_logp, clip_eps=clip_eps), 0.0)


def top_fraction_mask(scores: Tensor, valid: Tensor, fraction: float, pool: Tensor | None = None) -> Tensor:
    """Bool mask of the ``fraction`` highest ``scores`` among ``valid`` positions (at least one when any).

    ``pool``: the values the fraction is taken of, when they are more than ``scores[valid]`` (every rank's
    valid scores under multi-process training: one threshold for the whole step).
    """
    valid = valid.bool()
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # compare in the dtype we rank in
    pool = scores[valid] if pool is None else pool.to(scores.dtype)
    n_valid = pool.numel()
    if n_valid == 0 or fraction <= 0:
        return torch.zeros_like(valid)
    n_keep = max(1, min(n_valid, round(fraction * n_valid)))
    threshold = torch.topk(pool, n_keep).values[-1]
    return valid & (scores >= threshold)


def jsd_topk_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    student_topk_logp: Tensor,
    teacher_topk_logp: Tensor,
    *,
    beta: float = 0.5,
    clip_eps: float | None = None,
) -> Tensor:
    """Top-k JSD with mixture ``pM = beta * pT + (1 - beta) * pS``.

    ``beta * sum_k pT * log(pT / pM)`` over the teacher's top-k ids (gradient through pS inside pM)
    ``+ (1 - beta) * pg(-sg(log pS(x) - log pM(x)))`` at the sampled token x. Both terms vanish at
    beta = 0 (pM = pS) and beta = 1 (pM = pT).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    teacher_topk_logp = _finite(teacher_topk_logp.detach())
    student_topk_logp = _finite(student_topk_logp)
    teacher_logp = _finite(teacher_logp)
    old_logp = _finite(old_logp)
    teacher_p = teacher_topk_logp.exp()
    forward = torch.zeros_like(logp)
    reverse = torch.zeros_like(logp)
    if beta > 0:
        mix_topk = torch.logaddexp(
            teacher_topk_logp + math.log(beta),
            student_topk_logp + (math.log1p(-beta) if beta < 1 else -math.inf),
        )
        terms = torch.where(teacher_p > 0, teacher_p * (teacher_topk_logp - mix_topk), 0.0)
        forward = beta * terms.sum(-1)
    if beta < 1:
        old = old_logp.detach()
        mix_x = torch.logaddexp(
            teacher_logp.detach() + (math.log(beta) if beta > 0 else -math.inf), old + math.log1p(-beta)
        )
        advantage = -(old - mix_x)
        reverse = (1.0 - beta) * policy_gradient_loss(logp, old_logp, advantage, clip_eps=clip_eps)
    return forward + reverse


def sft_loss(logp: Tensor) -> Tensor:
    """Token negative log-likelihood of given responses."""
    return -_finite(logp)


def generalized_jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, *, beta: float = 0.5) -> Tensor:
    """Full-vocabulary generalized JSD as in TRL's GKDTrainer (``[..., V] -> [...]``).

    ``beta * KL(pT || pM) + (1 - beta) * KL(pS || pM)`` with ``pM = beta * pT + (1 - beta) * pS``
    (TRL's weighting); ``beta = 0`` is the forward KL(pT || pS), ``beta = 1`` the reverse KL(pS || pT).
    Callers pass chunks of positions (see ``scoring.generalized_jsd_chunked``), never a whole batch.
    """
    teacher_logprobs = _finite(teacher_logprobs.detach())
    student_logprobs = _finite(student_logprobs)
    if beta == 0.0:
        return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
    if beta == 1.0:
        return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)
    mix = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta))
    kl_teacher = (teacher_logprobs.exp() * (teacher_logprobs - mix)).sum(-1)
    kl_student = (student_logprobs.exp() * (student_logprobs - mix)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


IS_CORRECTIONS = ("none", "tis", "mis")


def importance_weights(
    trainer_logp: Tensor, sampler_logp: Tensor, valid: Tensor, *, mode: str = "tis", cap: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Per-token weights that correct for sampling from another module than the one trained (``rollout.is_correction``).

    ``w = exp(trainer_logp - sampler_logp)``, the ratio ``pi_trainer(y) / pi_sampler(y)`` of the sampled token
    (detached: a weight, never a gradient path). ``tis`` (truncated importance sampling, TRL/verl):
    ``min(w, cap)``; ``mis`` (masked, as NeMo-RL's ICE-POP upper bound): ``w`` where ``w <= cap``, else 0;
    ``none``: 1. Tokens outside ``valid`` (teacher prefixes, padding) weigh 1. Returns the weights and the
    mask of tokens whose ratio was above the cap (truncated or masked).

    With ``sampler_logp == trainer_logp`` every weight is exactly 1 and the loss is the uncorrected one.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown is_correction {mode!r}; choose one of {IS_CORRECTIONS}")
    log_ratio = (_finite(trainer_logp.detach()) - _finite(sampler_logp.detach())).float()
    ratio = torch.exp(log_ratio.clamp(max=80.0))  # exp(80) is finite in fp32; any ratio that large is capped
    above = valid & (ratio > cap)
    if mode == "none":
        weights = torch.ones_like(ratio)
    elif mode == "tis":
        weights = torch.clamp(ratio, max=cap)
    else:
        weights = torch.where(ratio > cap, 0.0, ratio)
    return torch.where(valid, weights, 1.0), above


def sampler_kl(trainer_logp: Tensor, sampler_logp: Tensor) -> Tensor:
    """Per-token estimate of ``KL(pi_sampler || pi_trainer)`` on tokens drawn from the sampler: k3 =
    ``r - 1 - log r`` with ``r = pi_trainer / pi_sampler`` (unbiased, never negative)."""
    log_ratio = (_finite(trainer_logp.detach()) - _finite(sampler_logp.detach())).float().clamp(max=80.0)
    return torch.expm1(log_ratio) - log_ratio
