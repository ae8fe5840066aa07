"""Unit tests for the per-token objectives in ``tropd_cli.train.losses`` and the guidance prefix cap.

Expected values are written by hand from the formulas in ``shared/METHOD.md``; gradients are checked
with ``torch.autograd.gradcheck`` in float64 and against their closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from tropd_cli.train.losses import (
    DEFAULT_CLIP_FLOOR,
    k1_reward,
    masked_mean,
    policy_gradient_loss,
    topk_forward_kl,
    tropd_loss,
    trust_region_mask,
)

F64 = torch.float64
LN2, LN4 = math.log(2.0), math.log(4.0)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def leaf(values) -> torch.Tensor:
    return t64(values).requires_grad_(True)


# --------------------------------------------------------------------------------------------------
# masked_mean


def test_masked_mean_hand_value():
    values = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert masked_mean(values, mask).item() == pytest.approx((1.0 + 3.0 + 6.0) / 3)


def test_masked_mean_total_divides_by_given_count():
    values = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    assert masked_mean(values, mask, total=8).item() == pytest.approx(10.0 / 8)
    assert masked_mean(values, mask, total=torch.tensor(20)).item() == pytest.approx(10.0 / 20)
    # Two micro-batches with a global count add up to the token-mean of the whole step.
    first = masked_mean(values[:1], mask[:1], total=mask.sum())
    second = masked_mean(values[1:], mask[1:], total=mask.sum())
    assert (first + second).item() == pytest.approx(masked_mean(values, mask).item())


def test_masked_mean_ignores_nan_and_inf_in_masked_out_positions():
    values = leaf([[1.0, float("nan"), 3.0], [float("inf"), -float("inf"), 5.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = masked_mean(values, mask)
    assert out.item() == pytest.approx(3.0)
    out.backward()
    assert torch.isfinite(values.grad).all()
    torch.testing.assert_close(values.grad, mask.to(F64) / 3)


def test_masked_mean_empty_mask_is_zero_not_nan():
    values = leaf([[float("nan"), 2.0]])
    mask = torch.zeros(1, 2, dtype=torch.bool)
    out = masked_mean(values, mask)
    assert out.item() == 0.0
    assert masked_mean(values, mask, total=0).item() == 0.0
    assert masked_mean(values, mask, total=torch.tensor(0)).item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_masked_mean_gradcheck():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, dtype=F64, generator=gen, requires_grad=True)
    mask = torch.rand(3, 5, generator=gen) < 0.6
    assert torch.autograd.gradcheck(lambda v: masked_mean(v, mask), (values,))
    assert torch.autograd.gradcheck(lambda v: masked_mean(v, mask, total=11), (values,))


# --------------------------------------------------------------------------------------------------
# k1_reward and policy_gradient_loss


def test_k1_reward_is_detached_log_ratio():
    old_logp = leaf([-1.0, -2.0])
    teacher_logp = leaf([-0.5, -4.0])
    reward = k1_reward(old_logp, teacher_logp)
    assert torch.equal(reward, t64([0.5, -2.0]))
    assert not reward.requires_grad


# ratios [1.5, 0.5, 0.5, 1.5, 1.1] against advantages [2, 2, -2, -2, 2].
PG_RATIO = [1.5, 0.5, 0.5, 1.5, 1.1]
PG_ADV = [2.0, 2.0, -2.0, -2.0, 2.0]
PG_OLD = [-1.0, -2.0, -0.5, -3.0, -1.5]


def _pg_inputs():
    old_logp = t64(PG_OLD)
    logp = (old_logp + torch.log(t64(PG_RATIO))).detach().requires_grad_(True)
    return logp, old_logp, t64(PG_ADV)


def test_policy_gradient_loss_unclipped_hand_values():
    logp, old_logp, adv = _pg_inputs()
    loss = policy_gradient_loss(logp, old_logp, adv)
    # -A * ratio
    torch.testing.assert_close(loss, t64([-3.0, -1.0, 1.0, 3.0, -2.2]))
    loss.sum().backward()
    # d(-A * exp(logp - old)) / dlogp = -A * ratio
    torch.testing.assert_close(logp.grad, t64([-3.0, -1.0, 1.0, 3.0, -2.2]))


def test_policy_gradient_loss_ppo_clip_both_sides():
    logp, old_logp, adv = _pg_inputs()
    loss = policy_gradient_loss(logp, old_logp, adv, clip_eps=0.2)
    # A>0, r=1.5: -min(3.0, 2*1.2)      = -2.4  (clipped above)
    # A>0, r=0.5: -min(1.0, 2*0.8)      = -1.0  (no clip below for a positive advantage)
    # A<0, r=0.5: -min(-1.0, -2*0.8)    =  1.6  (clipped below)
    # A<0, r=1.5: -min(-3.0, -2*1.2)    =  3.0  (no clip above for a negative advantage)
    # A>0, r=1.1: inside the region     = -2.2
    torch.testing.assert_close(loss, t64([-2.4, -1.0, 1.6, 3.0, -2.2]))
    loss.sum().backward()
    # Clipped entries carry no gradient; the others keep -A * ratio.
    torch.testing.assert_close(logp.grad, t64([0.0, -1.0, 0.0, 3.0, -2.2]))


def test_policy_gradient_loss_does_not_differentiate_advantage_or_old_logp():
    old_logp = leaf([-1.0, -2.0])
    adv = leaf([0.5, -1.0])
    logp = leaf([-1.2, -1.9])
    policy_gradient_loss(logp, old_logp, adv).sum().backward()
    assert old_logp.grad is None and adv.grad is None
    assert logp.grad is not None


def test_policy_gradient_loss_gradcheck():
    gen = torch.Generator().manual_seed(1)
    old_logp = -torch.rand(2, 6, dtype=F64, generator=gen) * 3
    adv = torch.randn(2, 6, dtype=F64, generator=gen)
    # log-ratios in +-0.15 or beyond +-0.25 so no finite-difference step straddles a clip kink at +-0.2.
    delta = torch.tensor([[0.1, -0.1, 0.4, -0.5, 0.0, 0.05], [-0.4, 0.5, 0.12, -0.08, 0.3, -0.3]], dtype=F64)
    logp = (old_logp + delta).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: policy_gradient_loss(lp, old_logp, adv), (logp,))
    assert torch.autograd.gradcheck(lambda lp: policy_gradient_loss(lp, old_logp, adv, clip_eps=0.2), (logp,))


def test_policy_gradient_at_ratio_one_is_reinforce():
    """At ratio 1 the gradient of pg(A) on the student logits is -A * d logp(x)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, dtype=F64, generator=gen, requires_grad=True)
    tokens = torch.tensor([[1], [4], [6]])
    adv = t64([0.7, -1.3, 2.0])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)
    policy_gradient_loss(logp, logp.detach(), adv).sum().backward()
    onehot = torch.nn.functional.one_hot(tokens.squeeze(-1), 7).to(F64)
    probs = torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, -adv[:, None] * (onehot - probs))


# --------------------------------------------------------------------------------------------------
# topk_forward_kl

TEACHER_TOPK_P = [0.5, 0.2, 0.1]  # top-k mass 0.8
STUDENT_TOPK_P = [0.25, 0.25, 0.25]
# sum pT log(pT / pS) = 0.5 ln 2 + 0.2 ln 0.8 + 0.1 ln 0.4 ~= 0.210316
FKL_RAW = 0.5 * LN2 + 0.2 * math.log(0.8) + 0.1 * math.log(0.4)
# renormalised pT = [0.625, 0.25, 0.125]: 0.625 ln 2.5 + 0.25 ln 1 + 0.125 ln 0.5 ~= 0.486039
FKL_RENORM = 0.625 * math.log(2.5) + 0.125 * math.log(0.5)


def test_topk_forward_kl_hand_values_raw_and_renormalized():
    teacher = torch.log(t64([TEACHER_TOPK_P]))
    student = torch.log(t64([STUDENT_TOPK_P])).requires_grad_(True)
    raw = topk_forward_kl(student, teacher)
    assert raw.shape == (1,)
    assert raw.item() == pytest.approx(FKL_RAW, abs=1e-12)
    assert math.isclose(FKL_RAW, 0.210316, abs_tol=1e-6)
    renorm = topk_forward_kl(student, teacher, renormalize=True)
    assert renorm.item() == pytest.approx(FKL_RENORM, abs=1e-12)
    assert math.isclose(FKL_RENORM, 0.486039, abs_tol=1e-6)
    # d/d log pS = -pT (raw or renormalised).
    (grad,) = torch.autograd.grad(raw.sum(), student)
    torch.testing.assert_close(grad, -t64([TEACHER_TOPK_P]))
    (grad,) = torch.autograd.grad(renorm.sum(), student)
    torch.testing.assert_close(grad, -t64([[0.625, 0.25, 0.125]]))


def test_topk_forward_kl_zero_teacher_prob_contributes_nothing():
    teacher = t64([[math.log(0.6), math.log(0.4), -math.inf]])
    student = torch.log(t64([[0.5, 0.25, 0.25]])).requires_grad_(True)
    out = topk_forward_kl(student, teacher)
    assert out.item() == pytest.approx(0.6 * math.log(1.2) + 0.4 * math.log(1.6), abs=1e-12)
    out.backward()
    torch.testing.assert_close(student.grad, t64([[-0.6, -0.4, 0.0]]))


def test_topk_forward_kl_shape_and_teacher_detached():
    teacher = torch.log_softmax(torch.randn(2, 3, 8, dtype=F64), -1)[..., :4].requires_grad_(True)
    student = torch.log_softmax(torch.randn(2, 3, 8, dtype=F64), -1)[..., :4]
    out = topk_forward_kl(student, teacher)
    assert out.shape == (2, 3)
    assert not out.requires_grad


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_forward_kl_gradcheck_through_log_softmax(renormalize):
    gen = torch.Generator().manual_seed(3)
    vocab, k = 9, 4
    logits = torch.randn(2, 3, vocab, dtype=F64, generator=gen, requires_grad=True)
    teacher_full = torch.log_softmax(torch.randn(2, 3, vocab, dtype=F64, generator=gen) * 2, -1)
    teacher_topk_logp, ids = teacher_full.topk(k, dim=-1)

    def fkl(z):
        student_topk_logp = torch.log_softmax(z, -1).gather(-1, ids)
        return topk_forward_kl(student_topk_logp, teacher_topk_logp, renormalize=renormalize)

    assert torch.autograd.gradcheck(fkl, (logits,))


# --------------------------------------------------------------------------------------------------
# FKL gradient is bounded where the K1 coefficient is not


def test_fkl_gradient_bounded_as_teacher_prob_of_sampled_token_vanishes():
    gen = torch.Generator().manual_seed(4)
    vocab, k, sampled = 12, 4, 0
    logits = torch.randn(vocab, dtype=F64, generator=gen)
    rest = torch.softmax(torch.randn(vocab - 1, dtype=F64, generator=gen) * 2, -1)
    old_logp = torch.log_softmax(logits, -1)[sampled]
    rewards = []
    for teacher_logp_sampled in [-1.0, -5.0, -10.0, -20.0, -30.0]:
        p_sampled = math.exp(teacher_logp_sampled)
        teacher_p = torch.cat([t64([p_sampled]), (1 - p_sampled) * rest])
        teacher_logp = torch.log(teacher_p)
        teacher_topk_logp, ids = teacher_logp.topk(k)
        z = logits.clone().requires_grad_(True)
        student_topk_logp = torch.log_softmax(z, -1).gather(-1, ids)
        topk_forward_kl(student_topk_logp[None], teacher_topk_logp[None]).sum().backward()
        assert z.grad.abs().max().item() <= 1.0
        # Closed form: pS * mass - pT on the top-k ids, pS * mass elsewhere.
        student_p = torch.softmax(logits, -1)
        mass = teacher_topk_logp.exp().sum()
        expected = student_p * mass
        expected[ids] -= teacher_topk_logp.exp()
        torch.testing.assert_close(z.grad, expected)
        rewards.append(k1_reward(old_logp, teacher_logp[sampled]).item())
        # The K1 pg gradient on the same logits scales with |R|.
        z_pg = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(z_pg, -1)[sampled]
        policy_gradient_loss(logp, logp.detach(), torch.tensor(rewards[-1], dtype=F64)).backward()
        pg_max = z_pg.grad.abs().max().item()
        assert pg_max == pytest.approx(abs(rewards[-1]) * (1 - student_p[sampled].item()), rel=1e-9)
    # R falls without bound (by exactly the drop in teacher log-prob) while the FKL gradient stayed <= 1.
    torch.testing.assert_close(t64(rewards[1:]) - t64(rewards[:-1]), t64([-4.0, -5.0, -10.0, -10.0]))
    assert rewards[-1] < -20.0


# --------------------------------------------------------------------------------------------------
# trust_region_mask


def test_trust_region_mask_matches_one_minus_tv():
    gen = torch.Generator().manual_seed(5)
    vocab, n = 20, 200_000
    student_p = torch.softmax(torch.randn(vocab, dtype=F64, generator=gen) * 1.5, -1)
    teacher_p = torch.softmax(torch.randn(vocab, dtype=F64, generator=gen) * 1.5, -1)
    tokens = torch.multinomial(student_p, n, replacement=True, generator=gen)
    reward = torch.log(teacher_p)[tokens] - torch.log(student_p)[tokens]
    trust = trust_region_mask(reward, tau=0.0, kind="bernoulli", generator=gen)
    assert trust.dtype == torch.bool and trust.shape == (n,)
    tv = 0.5 * (student_p - teacher_p).abs().sum().item()
    assert 0.15 < tv < 0.85  # a non-trivial pair of distributions
    assert trust.double().mean().item() == pytest.approx(1 - tv, abs=0.01)
    # With an offset tau, E[M] = sum_x min(pS(x), pT(x) exp(-tau)).
    tau = 0.5
    trust = trust_region_mask(reward, tau=tau, kind="bernoulli", generator=gen)
    expected = torch.minimum(student_p, teacher_p * math.exp(-tau)).sum().item()
    assert trust.double().mean().item() == pytest.approx(expected, abs=0.01)


def test_identical_teacher_and_student_trust_everything_and_zero_gradient():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 11, dtype=F64, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5, 1), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)
    teacher_logp = logp.detach().clone()
    reward = k1_reward(logp.detach(), teacher_logp)
    assert torch.equal(reward, torch.zeros_like(reward))
    trust = trust_region_mask(reward, tau=0.0, generator=gen)
    assert trust.all()
    loss = tropd_loss(
        logp,
        logp.detach(),
        teacher_logp,
        None,
        None,
        trust_mask=trust,
        prefix_mask=torch.zeros_like(trust),
        outlier="mask",
    )
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    masked_mean(loss, torch.ones_like(trust)).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_trust_region_mask_threshold_and_none():
    reward = t64([[-2.0, -0.5, 0.0, 0.3, 1.0]])
    assert torch.equal(trust_region_mask(reward, kind="threshold"), reward > 0)
    assert torch.equal(
        trust_region_mask(reward, tau=-1.0, kind="threshold"), torch.tensor([[False, True, True, True, True]])
    )
    assert torch.equal(trust_region_mask(reward, tau=0.3, kind="threshold"), torch.tensor([[False] * 4 + [True]]))
    none = trust_region_mask(reward, kind="none")
    assert none.dtype == torch.bool and none.shape == reward.shape and none.all()


def test_trust_region_mask_unknown_kind_raises():
    with pytest.raises(ValueError, match="trust_region kind"):
        trust_region_mask(torch.zeros(3), kind="soft")


def test_trust_region_mask_same_seed_same_mask():
    reward = torch.full((4, 500), math.log(0.5), dtype=F64)
    first = trust_region_mask(reward, generator=torch.Generator().manual_seed(123))
    second = trust_region_mask(reward, generator=torch.Generator().manual_seed(123))
    other = trust_region_mask(reward, generator=torch.Generator().manual_seed(124))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert 0.4 < first.double().mean().item() < 0.6


def test_trust_region_mask_uniform_argument():
    # accept prob = min(1, exp(R - tau)) = [1, 0.5, 0.5, 0.25, 1, 0]
    reward = t64([[0.0, math.log(0.5), math.log(0.5), math.log(0.25), 2.0, -math.inf]])
    uniform = t64([[0.999, 0.49, 0.51, 0.2, 0.0, 0.0]])
    expected = torch.tensor([[True, True, False, True, True, False]])
    # The explicit noise decides; the generator is not consulted.
    for seed in (0, 1):
        got = trust_region_mask(reward, uniform=uniform, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, expected)
    # tau shifts the acceptance probability: exp(R - log 2) = [0.5, 0.25, 0.25, 0.125, e^2/2 -> 1, 0].
    got = trust_region_mask(reward, tau=LN2, uniform=uniform)
    assert torch.equal(got, torch.tensor([[False, False, False, False, True, False]]))
    # The threshold rule ignores the noise.
    assert torch.equal(trust_region_mask(reward, kind="threshold", uniform=uniform), reward > 0)


def test_trust_region_mask_nonfinite_reward_is_untrusted():
    reward = t64([-math.inf, math.nan, -math.inf, math.nan])
    uniform = torch.zeros(4, dtype=F64)  # the most accepting noise there is
    assert not trust_region_mask(reward, uniform=uniform).any()
    assert not trust_region_mask(reward, generator=torch.Generator().manual_seed(0)).any()
    assert not trust_region_mask(reward, kind="threshold").any()
    # +inf reward is always trusted and never overflows.
    assert trust_region_mask(t64([math.inf]), uniform=t64([0.999])).all()


# --------------------------------------------------------------------------------------------------
# tropd_loss

BETA = 0.1
# positions: 0 prefix, 1 trusted student token, 2 untrusted student token, 3 padding (zeros, as to_grid)
OLD = [-2.5, -1.0, -1.0, 0.0]
RATIO = [1.0, 1.1, 0.9, 1.0]
TEACHER = [-0.5, -0.6, -4.0, 0.0]
LOGP_PREFIX = -2.0
RESPONSE = [[True, True, True, False]]
PREFIX = [[True, False, False, False]]
TRUST = [[False, True, False, False]]


def _tropd_inputs():
    old_logp = t64([OLD])
    logp = old_logp + torch.log(t64([RATIO]))
    logp[0, 0] = LOGP_PREFIX
    logp = logp.detach().requires_grad_(True)
    teacher_logp = t64([TEACHER])
    teacher_topk = torch.log(
        t64(
            [
                [
                    [0.9, 0.05, 0.01],  # prefix: the outlier would be large here, it must not be used
                    [0.9, 0.05, 0.01],  # trusted: likewise
                    TEACHER_TOPK_P,
                    [1.0, 1.0, 1.0],  # padding zeros
                ]
            ]
        )
    )
    student_topk = torch.log(t64([[[1e-6, 0.3, 0.3], [1e-6, 0.3, 0.3], STUDENT_TOPK_P, [1.0, 1.0, 1.0]]]))
    student_topk = student_topk.requires_grad_(True)
    return logp, old_logp, teacher_logp, student_topk, teacher_topk


PREFIX_VALUE = BETA * (-0.5 - LOGP_PREFIX)  # 0.1 * 1.5 = 0.15
TRUSTED_VALUE = -(-0.6 - -1.0) * 1.1  # -R * ratio = -0.4 * 1.1 = -0.44
EXPECTED_TROPD = {
    "fkl": [PREFIX_VALUE, TRUSTED_VALUE, FKL_RAW, 0.0],
    "mask": [PREFIX_VALUE, TRUSTED_VALUE, 0.0, 0.0],
    # R = -3 < floor = ln 0.25: -max(R, floor) * ratio = 0.9 * ln 4 ~= 1.247665
    "clip": [PREFIX_VALUE, TRUSTED_VALUE, 0.9 * LN4, 0.0],
}
# d loss / d logp: -beta on the prefix, -R * ratio on pg terms, 0 for fkl / mask outliers.
EXPECTED_TROPD_GRAD = {
    "fkl": [-BETA, TRUSTED_VALUE, 0.0, 0.0],
    "mask": [-BETA, TRUSTED_VALUE, 0.0, 0.0],
    "clip": [-BETA, TRUSTED_VALUE, 0.9 * LN4, 0.0],
}


@pytest.mark.parametrize("outlier", ["fkl", "mask", "clip"])
def test_tropd_loss_hand_values_per_position(outlier):
    logp, old_logp, teacher_logp, student_topk, teacher_topk = _tropd_inputs()
    assert math.isclose(DEFAULT_CLIP_FLOOR, -LN4)
    loss = tropd_loss(
        logp,
        old_logp,
        teacher_logp,
        student_topk,
        teacher_topk,
        trust_mask=torch.tensor(TRUST),
        prefix_mask=torch.tensor(PREFIX),
        outlier=outlier,
        beta=BETA,
    )
    assert loss.shape == (1, 4)
    torch.testing.assert_close(loss, t64([EXPECTED_TROPD[outlier]]))
    response = torch.tensor(RESPONSE)
    mean = masked_mean(loss, response)
    assert mean.item() == pytest.approx(sum(EXPECTED_TROPD[outlier][:3]) / 3)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t64([EXPECTED_TROPD_GRAD[outlier]]))
    if outlier == "fkl":
        expected_topk_grad = torch.zeros(1, 4, 3, dtype=F64)
        expected_topk_grad[0, 2] = -t64(TEACHER_TOPK_P)
        expected_topk_grad[0, 3] = -1.0  # the padding position's outlier; masked_mean drops it
        torch.testing.assert_close(student_topk.grad, expected_topk_grad)
    else:
        assert student_topk.grad is None


def test_tropd_loss_fkl_renormalize_and_ppo_clip_pass_through():
    logp, old_logp, teacher_logp, student_topk, teacher_topk = _tropd_inputs()
    kwargs = dict(trust_mask=torch.tensor(TRUST), prefix_mask=torch.tensor(PREFIX), beta=BETA)
    loss = tropd_loss(logp, old_logp, teacher_logp, student_topk, teacher_topk, renormalize=True, **kwargs)
    assert loss[0, 2].item() == pytest.approx(FKL_RENORM, abs=1e-12)
    # clip_eps=0.05 clips the trusted ratio 1.1 to 1.05 (A > 0) and the clip outlier's 0.9 to 0.95 (A < 0:
    # -min(A * 0.9, A * 0.95) = -A * 0.95 with A = ln 0.25).
    loss = tropd_loss(logp, old_logp, teacher_logp, None, None, outlier="clip", clip_eps=0.05, **kwargs)
    torch.testing.assert_close(loss, t64([[PREFIX_VALUE, -0.4 * 1.05, 0.95 * LN4, 0.0]]))


def test_tropd_loss_argument_errors():
    logp, old_logp, teacher_logp, _, _ = _tropd_inputs()
    kwargs = dict(trust_mask=torch.tensor(TRUST), prefix_mask=torch.tensor(PREFIX))
    with pytest.raises(ValueError, match="outlier strategy"):
        tropd_loss(logp, old_logp, teacher_logp, None, None, outlier="drop", **kwargs)
    with pytest.raises(ValueError, match="student_topk_logp"):
        tropd_loss(logp, old_logp, teacher_logp, None, None, outlier="fkl", **kwargs)


def test_tropd_prefix_gradient_is_beta_weighted_nll():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 6, dtype=F64, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 3, 1), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)
    teacher_logp = torch.log_softmax(torch.randn(2, 3, 6, dtype=F64, generator=gen), -1).gather(-1, tokens)
    teacher_logp = teacher_logp.squeeze(-1)
    beta = 1e-3
    ones = torch.ones(2, 3, dtype=torch.bool)
    loss = tropd_loss(
        logp, logp.detach(), teacher_logp, None, None, trust_mask=ones, prefix_mask=ones, outlier="mask", beta=beta
    )
    torch.testing.assert_close(loss, beta * (teacher_logp - logp.detach()))
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (nll_grad,) = torch.autograd.grad(-logp.sum(), logits)
    torch.testing.assert_close(grad, beta * nll_grad)
    onehot = torch.nn.functional.one_hot(tokens.squeeze(-1), 6).to(F64)
    torch.testing.assert_close(grad, -beta * (onehot - torch.softmax(logits.detach(), -1)))


@pytest.mark.parametrize("outlier", ["fkl", "mask", "clip"])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_tropd_loss_gradcheck(outlier, clip_eps):
    gen = torch.Generator().manual_seed(8)
    vocab, k = 7, 3
    old_logp = -torch.rand(2, 4, dtype=F64, generator=gen) * 3
    delta = torch.tensor([[0.1, -0.4, 0.05, 0.3], [-0.1, 0.5, -0.3, 0.12]], dtype=F64)  # away from +-0.2
    logp = (old_logp + delta).requires_grad_(True)
    teacher_logp = -torch.rand(2, 4, dtype=F64, generator=gen) * 5
    teacher_topk_logp, ids = torch.log_softmax(torch.randn(2, 4, vocab, dtype=F64, generator=gen), -1).topk(k)
    logits = torch.randn(2, 4, vocab, dtype=F64, generator=gen, requires_grad=True)
    trust = torch.tensor([[True, False, True, False], [False, True, False, False]])
    prefix = torch.tensor([[True, False, False, False], [True, True, False, False]])

    def loss(lp, z):
        student_topk_logp = torch.log_softmax(z, -1).gather(-1, ids)
        return tropd_loss(
            lp,
            old_logp,
            teacher_logp,
            student_topk_logp,
            teacher_topk_logp,
            trust_mask=trust,
            prefix_mask=prefix,
            outlier=outlier,
            beta=0.3,
            clip_eps=clip_eps,
        )

    assert torch.autograd.gradcheck(loss, (logp, logits))


# --------------------------------------------------------------------------------------------------
# prefix_cap (guidance schedule)


def test_prefix_cap_cosine_schedule():
    from tropd_cli.rollout.sampling import prefix_cap

    for length, steps in [(8192, 200), (101, 10), (64, 7)]:
        caps = [prefix_cap(s, steps, length) for s in range(steps + 1)]
        assert all(isinstance(c, int) for c in caps)
        assert caps[0] == length
        assert caps[-1] == 0
        assert all(a >= b for a, b in zip(caps, caps[1:], strict=False))
    assert prefix_cap(100, 200, 8192) == 4096
    assert prefix_cap(5, 10, 101) == 50  # int(50.5)
    assert prefix_cap(50, 200, 8192) == 6992  # int(4096 * (1 + cos(pi / 4))) = int(6992.31)


def test_prefix_cap_constant_and_unknown_schedule():
    from tropd_cli.rollout.sampling import prefix_cap

    assert [prefix_cap(s, 10, 300, "constant") for s in (0, 5, 10)] == [300, 300, 300]
    with pytest.raises(ValueError, match="guidance schedule"):
        prefix_cap(0, 10, 300, "linear")
