"""Every method of ``shared/METHOD.md`` ("Other baselines" included): hand values, gradient checks,
invariants, the chunked GKD scorer against its naive reference, padding robustness, and one trainer
step per method name and per ``conf/method`` preset on the tiny models.

Hand values are worked out from METHOD.md on probabilities that are powers of two or small fractions
and written as ``math.log`` expressions; gradients are checked with ``torch.autograd.gradcheck`` in
float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

import tropd_cli.commands.common as common  # registers the structured-config schemas
from tropd_cli.config import TrainConfig
from tropd_cli.train import losses
from tropd_cli.train import step as step_module
from tropd_cli.train.losses import (
    DEFAULT_CLIP_FLOOR,
    entropy_opd_loss,
    eopd_loss,
    generalized_jsd,
    jsd_topk_loss,
    masked_mean,
    opd_loss,
    reopold_loss,
    sft_loss,
    top_fraction_mask,
    topk_forward_kl,
    tropd_loss,
    trust_region_mask,
)
from tropd_cli.train.methods import METHODS, TokenInputs, reopold_stage
from tropd_cli.train.scoring import generalized_jsd_chunked, to_grid
from tropd_cli.train.setup import Run, build_run
from tropd_cli.train.step import train_step
from tropd_cli.validate import validate_train

F64 = torch.float64
LN2 = math.log(2.0)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tiny models run ~50x faster on one intra-op thread than on two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t64(values) -> Tensor:
    return torch.tensor(values, dtype=F64)


def leaf(values) -> Tensor:
    return t64(values).requires_grad_(True)


def grad_of(value: Tensor, wrt: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(value.sum(), wrt, retain_graph=True)
    return grad


def topk_logp(logits: Tensor, ids: Tensor) -> Tensor:
    """Full-vocabulary student log-probs at the teacher's top-k ids (what the trainer gathers)."""
    return torch.log_softmax(logits, -1).gather(-1, ids)


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values


def test_opd_hand_values_and_ppo_clip():
    # pi_S(x) = 1/2, 1/4 and pi_T(x) = 1/4, 1/2: R = -ln 2, +ln 2, and pg(R) = -R at ratio 1.
    old = t64([math.log(0.5), math.log(0.25)])
    teacher = t64([math.log(0.25), math.log(0.5)])
    logp = old.clone().requires_grad_(True)
    loss = opd_loss(logp, old, teacher)
    torch.testing.assert_close(loss, t64([LN2, -LN2]))
    torch.testing.assert_close(grad_of(loss, logp), t64([LN2, -LN2]))  # REINFORCE: -R * grad logp

    # Ratio 1.5 (outside 1 +- 0.2): for A = +ln2 the clipped branch (1.2 A) wins and is flat; for
    # A = -ln2 the unclipped one (-1.5 ln2) wins and keeps its gradient -A * ratio.
    logp = (old + math.log(1.5)).requires_grad_(True)
    loss = opd_loss(logp, old, teacher, clip_eps=0.2)
    torch.testing.assert_close(loss, t64([1.5 * LN2, -1.2 * LN2]))
    torch.testing.assert_close(grad_of(loss, logp), t64([1.5 * LN2, 0.0]))


def test_eopd_hand_values_gate_on_teacher_entropy_and_renormalised_fkl():
    # Three tokens, pi_S(x) = 1/2 and pi_T(x) = 1/4 everywhere, so the OPD part is ln 2 each.
    old = t64([math.log(0.5)] * 3)
    teacher = t64([math.log(0.25)] * 3)
    logp = old.clone().requires_grad_(True)
    # Teacher top-2 probs 0.3, 0.1 (mass 0.4) renormalise to 3/4, 1/4; the student has 1/2, 1/4 there.
    teacher_topk = t64([[math.log(0.3), math.log(0.1)]] * 3)
    student_topk = t64([[math.log(0.5), math.log(0.25)]] * 3).requires_grad_(True)
    teacher_entropy = t64([1.0, 0.8, 0.5])  # above, at and below the 0.8-nat threshold
    loss = eopd_loss(logp, old, teacher, student_topk, teacher_topk, teacher_entropy)
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.25)
    torch.testing.assert_close(loss, t64([LN2 + fkl, LN2, LN2]))
    # Raw teacher probs would give 0.3 ln(0.3/0.5) + 0.1 ln(0.1/0.25): not what EOPD asks for.
    assert not math.isclose(fkl, 0.3 * math.log(0.3 / 0.5) + 0.1 * math.log(0.1 / 0.25))
    # d/d log pS_k of -sum q_k log pS_k is -q_k, only where the gate is open.
    torch.testing.assert_close(grad_of(loss, student_topk), t64([[-0.75, -0.25], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(grad_of(loss, logp), t64([LN2] * 3))

    # A lower threshold opens the gate on the second token too.
    loss = eopd_loss(logp, old, teacher, student_topk, teacher_topk, teacher_entropy, entropy_threshold=0.6)
    torch.testing.assert_close(loss, t64([LN2 + fkl, LN2 + fkl, LN2]))


def test_eopd_fkl_gradient_on_logits_is_student_minus_renormalised_teacher():
    logits = leaf([0.3, -0.2, 1.1, 0.0])
    ids = torch.tensor([0, 1])
    teacher_topk = t64([math.log(0.3), math.log(0.1)])
    zero = t64([0.0])
    loss = eopd_loss(zero, zero, zero, topk_logp(logits, ids)[None], teacher_topk[None], t64([2.0]))
    expected = torch.softmax(logits.detach(), -1) - t64([0.75, 0.25, 0.0, 0.0])
    torch.testing.assert_close(grad_of(loss, logits), expected)


# R = [-3 ln2, -ln2, +ln2, ln 0.2] with pi_S(x) = 1/2; the floor c = ln(1/4) = -2 ln2.
REOPOLD_TEACHER = [math.log(1 / 16), math.log(1 / 4), math.log(1.0), math.log(0.1)]


@pytest.mark.parametrize(
    ("stage", "keep", "expected"),
    [
        ("single", None, [2 * LN2, LN2, -LN2, 2 * LN2]),  # pg(max(R, c)) everywhere
        ("explore", None, [0.0, LN2, -LN2, 0.0]),  # pg(R) where R >= c, the rest dropped
        ("refine", [True, True, False, False], [2 * LN2, LN2, 0.0, 0.0]),  # pg(max(R, c)) on keep_mask
        ("refine", [True, False, False, True], [2 * LN2, 0.0, 0.0, 2 * LN2]),
    ],
)
def test_reopold_hand_values_per_stage(stage, keep, expected):
    assert math.isclose(DEFAULT_CLIP_FLOOR, -2 * LN2)
    old = t64([math.log(0.5)] * 4)
    logp = old.clone().requires_grad_(True)
    keep_mask = None if keep is None else torch.tensor(keep)
    loss = reopold_loss(logp, old, t64(REOPOLD_TEACHER), stage=stage, keep_mask=keep_mask)
    torch.testing.assert_close(loss, t64(expected))
    torch.testing.assert_close(grad_of(loss, logp), t64(expected))  # -A at ratio 1, 0 where dropped


def test_reopold_floor_is_a_parameter_and_explore_keeps_the_boundary():
    old = t64([math.log(0.5)] * 4)
    loss = reopold_loss(old, old, t64(REOPOLD_TEACHER), floor=-LN2)
    torch.testing.assert_close(loss, t64([LN2, LN2, -LN2, LN2]))
    # R == c exactly (old_logp = 0 keeps the subtraction exact): kept, since the drop rule is R < c.
    zero = t64([0.0])
    loss = reopold_loss(zero, zero, t64([DEFAULT_CLIP_FLOOR]), stage="explore")
    torch.testing.assert_close(loss, t64([-DEFAULT_CLIP_FLOOR]))


def test_reopold_argument_errors():
    x = t64([0.0])
    with pytest.raises(ValueError, match="keep_mask"):
        reopold_loss(x, x, x, stage="refine")
    with pytest.raises(ValueError, match="stage"):
        reopold_loss(x, x, x, stage="polish")


def test_entropy_opd_hand_values():
    old = t64([math.log(0.5)] * 4)
    logp = old.clone().requires_grad_(True)
    keep = torch.tensor([False, True, True, False])
    loss = entropy_opd_loss(logp, old, t64(REOPOLD_TEACHER), keep_mask=keep)
    # pg(R) without any floor on the kept tokens: R = -ln2 and +ln2 there.
    torch.testing.assert_close(loss, t64([0.0, LN2, -LN2, 0.0]))
    torch.testing.assert_close(grad_of(loss, logp), t64([0.0, LN2, -LN2, 0.0]))


def test_top_fraction_mask_hand_selection():
    # fp32, as the trainer's entropy grid (fp64 scores: see the xfail test below).
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 5.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # 7 valid, half of them rounds to 4: 0.9, 0.8, 0.7, 0.5. The padded 5.0 is never picked.
    expected = torch.tensor([[False, True, True, True], [False, False, True, False]])
    assert torch.equal(top_fraction_mask(scores, valid, 0.5), expected)
    # 20% of 7 rounds to 1; a tiny share still keeps one token; 1.0 keeps every valid one.
    assert torch.equal(top_fraction_mask(scores, valid, 0.2), torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]]).bool())
    assert int(top_fraction_mask(scores, valid, 1e-6).sum()) == 1
    assert torch.equal(top_fraction_mask(scores, valid, 1.0), valid.bool())


def test_top_fraction_mask_float64_scores_keep_the_lowest_selected_token():
    scores = t64([[0.1, 0.9, 0.5, 0.7]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(top_fraction_mask(scores, valid, 1.0), valid)


def test_top_fraction_mask_ties_fraction_zero_and_empty_valid():
    scores = t64([[1.0, 1.0, 1.0, 1.0, 0.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    # Two of five are asked for, but four tie at the threshold: ties are kept together, so the
    # choice never depends on position order.
    assert torch.equal(top_fraction_mask(scores, valid, 0.4), torch.tensor([[True, True, True, True, False]]))
    assert not top_fraction_mask(scores, valid, 0.0).any()
    assert not top_fraction_mask(scores, torch.zeros_like(valid), 0.5).any()
    assert top_fraction_mask(scores, valid, 0.0).dtype == torch.bool


def test_jsd_topk_hand_values_forward_and_reverse_terms():
    # Top-2 ids: pT = 1/2, 1/4 and pS = 1/4, 1/4, so pM = 3/8, 1/4 at beta = 1/2.
    teacher_topk = t64([[math.log(0.5), math.log(0.25)]])
    student_topk = t64([[math.log(0.25), math.log(0.25)]]).requires_grad_(True)
    # Sampled token: pT(x) = 1/2, pS(x) = 1/4, pM(x) = 3/8; reverse advantage -(ln pS - ln pM) = ln 1.5.
    old = t64([math.log(0.25)])
    logp = old.clone().requires_grad_(True)
    teacher = t64([math.log(0.5)])
    loss = jsd_topk_loss(logp, old, teacher, student_topk, teacher_topk, beta=0.5)
    forward = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.25))
    reverse = 0.5 * -math.log(1.5)
    torch.testing.assert_close(loss, t64([forward + reverse]))
    torch.testing.assert_close(grad_of(loss, logp), t64([-0.5 * math.log(1.5)]))
    # d/d log pS_k = -beta * pT_k * (1 - beta) * pS_k / pM_k = -1/12, -1/16.
    torch.testing.assert_close(grad_of(loss, student_topk), t64([[-1 / 12, -1 / 16]]))


def test_jsd_topk_rejects_beta_outside_unit_interval():
    x = t64([0.0])
    with pytest.raises(ValueError, match="beta"):
        jsd_topk_loss(x, x, x, x[None], x[None], beta=1.5)


# pT and pS over a 3-token vocabulary.
P_T = [0.5, 0.25, 0.25]
P_S = [0.125, 0.375, 0.5]


@pytest.mark.parametrize(
    ("beta", "expected"),
    [
        # beta = 0: forward KL(pT || pS).
        (0.0, 0.5 * math.log(0.5 / 0.125) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.5)),
        # beta = 1: reverse KL(pS || pT).
        (1.0, 0.125 * math.log(0.125 / 0.5) + 0.375 * math.log(0.375 / 0.25) + 0.5 * math.log(0.5 / 0.25)),
        # beta = 1/2: pM = 5/16, 5/16, 3/8; (KL(pT || pM) + KL(pS || pM)) / 2.
        (
            0.5,
            0.5 * (0.5 * math.log(0.5 / 0.3125) + 0.25 * math.log(0.25 / 0.3125) + 0.25 * math.log(0.25 / 0.375))
            + 0.5 * (0.125 * math.log(0.125 / 0.3125) + 0.375 * math.log(0.375 / 0.3125) + 0.5 * math.log(0.5 / 0.375)),
        ),
    ],
    ids=["forward-kl", "reverse-kl", "half"],
)
def test_generalized_jsd_hand_values(beta, expected):
    loss = generalized_jsd(t64(P_S).log(), t64(P_T).log(), beta=beta)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_generalized_jsd_limits_are_the_two_kls_and_teacher_is_detached():
    gen = torch.Generator().manual_seed(0)
    student = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=F64), -1)
    teacher = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=F64), -1).requires_grad_(True)
    forward = (teacher.exp() * (teacher - student)).sum(-1)
    reverse = (student.exp() * (student - teacher)).sum(-1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), forward.detach())
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), reverse.detach())
    assert not generalized_jsd(student, teacher, beta=0.5).requires_grad


def test_sft_is_token_nll():
    logp = leaf([math.log(0.5), math.log(0.25)])
    loss = sft_loss(logp)
    torch.testing.assert_close(loss, t64([LN2, 2 * LN2]))
    torch.testing.assert_close(grad_of(loss, logp), t64([-1.0, -1.0]))


# ---------------------------------------------------------------------------------------------
# 2. Gradient checks (float64) with respect to logp and the student logits

B, T, V, K = 2, 3, 7, 3


def random_case(seed: int = 0, k: int = K):
    """Student logits (leaf), sampled logp (leaf), rollout/teacher log-probs and teacher top-k."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=F64)
    sampled = torch.randint(0, V, (B, T, 1), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, sampled).squeeze(-1)
    # log-ratios away from the PPO clip kinks ln 0.8 and ln 1.2: both regimes, no tie.
    offsets = t64([[-0.5, -0.05, 0.4], [0.05, 0.6, -0.3]])
    old = logp - offsets
    teacher_logits = torch.randn(B, T, V, generator=gen, dtype=F64)
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    teacher = teacher_logprobs.gather(-1, sampled).squeeze(-1)
    teacher_topk, ids = teacher_logprobs.topk(k, dim=-1)
    teacher_entropy = t64([[1.2, 0.3, 0.9], [0.1, 2.0, 0.5]])
    return logits.requires_grad_(True), logp.requires_grad_(True), old, teacher, teacher_topk, ids, teacher_entropy


KEEP = torch.tensor([[True, False, True], [False, True, True]])

# Each method as f(logp, student_logits) -> per-token loss, given the fixed rollout/teacher tensors.
LossFn = Callable[..., Tensor]
LOSSES: dict[str, LossFn] = {
    "opd": lambda lp, stk, o, t, ttk, te: opd_loss(lp, o, t),
    "opd-clip": lambda lp, stk, o, t, ttk, te: opd_loss(lp, o, t, clip_eps=0.2),
    "eopd": lambda lp, stk, o, t, ttk, te: eopd_loss(lp, o, t, stk, ttk, te),
    "eopd-clip": lambda lp, stk, o, t, ttk, te: eopd_loss(lp, o, t, stk, ttk, te, clip_eps=0.2),
    "reopold-single": lambda lp, stk, o, t, ttk, te: reopold_loss(lp, o, t),
    "reopold-explore": lambda lp, stk, o, t, ttk, te: reopold_loss(lp, o, t, stage="explore", floor=-0.5),
    "reopold-refine": lambda lp, stk, o, t, ttk, te: reopold_loss(lp, o, t, stage="refine", keep_mask=KEEP),
    "entropy-opd": lambda lp, stk, o, t, ttk, te: entropy_opd_loss(lp, o, t, keep_mask=KEEP),
    "jsd-topk": lambda lp, stk, o, t, ttk, te: jsd_topk_loss(lp, o, t, stk, ttk, beta=0.5),
    "jsd-topk-0.3-clip": lambda lp, stk, o, t, ttk, te: jsd_topk_loss(lp, o, t, stk, ttk, beta=0.3, clip_eps=0.2),
    "sft": lambda lp, stk, o, t, ttk, te: sft_loss(lp),
    "fkl-topk": lambda lp, stk, o, t, ttk, te: topk_forward_kl(stk, ttk),
    **{
        f"tropd-{outlier}": (
            lambda lp, stk, o, t, ttk, te, outlier=outlier: tropd_loss(
                lp, o, t, stk, ttk, trust_mask=KEEP, prefix_mask=torch.zeros_like(KEEP), outlier=outlier
            )
        )
        for outlier in ("fkl", "mask", "clip")
    },
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck_wrt_logp_and_student_logits(name):
    logits, logp, old, teacher, teacher_topk, ids, teacher_entropy = random_case()
    fn = LOSSES[name]

    def f(logp: Tensor, logits: Tensor) -> Tensor:
        return fn(logp, topk_logp(logits, ids), old, teacher, teacher_topk, teacher_entropy)

    assert torch.autograd.gradcheck(f, (logp, logits))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_gradcheck_wrt_student_logits(beta):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=gen, dtype=F64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(4, V, generator=gen, dtype=F64), -1)
    assert torch.autograd.gradcheck(lambda z: generalized_jsd(torch.log_softmax(z, -1), teacher, beta=beta), (logits,))


@pytest.mark.parametrize("chunk_size", [1, 3, 100], ids=["chunk1", "chunk3", "chunk>N"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_chunked_gradcheck_wrt_hidden_and_weight(chunk_size, temperature):
    gen = torch.Generator().manual_seed(2)
    n, h, v = 5, 3, 6
    hidden = torch.randn(n, h, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=F64, requires_grad=True)
    t_hidden = torch.randn(n, h, generator=gen, dtype=F64)
    t_weight = torch.randn(v, h, generator=gen, dtype=F64)

    def f(hidden: Tensor, weight: Tensor) -> Tensor:
        return generalized_jsd_chunked(
            hidden, weight, t_hidden, t_weight, beta=0.5, chunk_size=chunk_size, temperature=temperature
        )

    assert torch.autograd.gradcheck(f, (hidden, weight))


# ---------------------------------------------------------------------------------------------
# 3. Invariants


def identical_case(k: int, seed: int = 3):
    """Teacher == student: teacher_logp == old_logp == logp, teacher top-k == the student's own."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=F64, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1)
    sampled = torch.randint(0, V, (B, T, 1), generator=gen)
    logp = logprobs.gather(-1, sampled).squeeze(-1)
    teacher_topk, ids = logprobs.detach().topk(k, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    return logits, logp, logp.detach(), logp.detach().clone(), logprobs.gather(-1, ids), teacher_topk, entropy


UNTRUSTED_HALF = torch.tensor([[True, False, True], [False, False, True]])
K1_LOSSES: dict[str, LossFn] = {
    "opd": lambda lp, stk, o, t, ttk, te: opd_loss(lp, o, t),
    "opd-clip": lambda lp, stk, o, t, ttk, te: opd_loss(lp, o, t, clip_eps=0.2),
    "reopold-single": lambda lp, stk, o, t, ttk, te: reopold_loss(lp, o, t),
    "reopold-explore": lambda lp, stk, o, t, ttk, te: reopold_loss(lp, o, t, stage="explore"),
    "reopold-refine": lambda lp, stk, o, t, ttk, te: reopold_loss(lp, o, t, stage="refine", keep_mask=KEEP),
    "entropy-opd": lambda lp, stk, o, t, ttk, te: entropy_opd_loss(lp, o, t, keep_mask=KEEP),
    # EOPD's OPD part: the gate shut everywhere.
    "eopd-opd-part": lambda lp, stk, o, t, ttk, te: eopd_loss(lp, o, t, stk, ttk, te, entropy_threshold=1e9),
    # The trust mask the Bernoulli rule gives at R = 0 (everything trusted), and a forced half mask.
    **{
        f"tropd-{outlier}-{which}": (
            lambda lp, stk, o, t, ttk, te, outlier=outlier, which=which: tropd_loss(
                lp,
                o,
                t,
                stk,
                ttk,
                trust_mask=trust_region_mask(losses.k1_reward(o, t)) if which == "bernoulli" else UNTRUSTED_HALF,
                prefix_mask=torch.zeros_like(UNTRUSTED_HALF),
                outlier=outlier,
            )
        )
        for outlier in ("fkl", "mask", "clip")
        for which in ("bernoulli", "half")
        if not (outlier == "fkl" and which == "half")  # the FKL outlier is zero-gradient only at k = V
    },
}


@pytest.mark.parametrize("name", sorted(K1_LOSSES))
def test_identical_teacher_and_student_give_zero_gradient_for_every_k1_method(name):
    logits, logp, old, teacher, student_topk, teacher_topk, entropy = identical_case(k=K)
    loss = K1_LOSSES[name](logp, student_topk, old, teacher, teacher_topk, entropy)
    torch.testing.assert_close(loss.detach(), torch.zeros_like(loss), atol=1e-12, rtol=0)
    assert torch.equal(grad_of(loss, logits), torch.zeros_like(logits))


def test_identical_models_are_all_trusted_by_the_bernoulli_rule():
    _, logp, old, teacher, *_ = identical_case(k=K)
    assert trust_region_mask(losses.k1_reward(old, teacher)).all()


def test_fkl_terms_are_zero_gradient_at_identity_only_with_the_whole_vocabulary():
    """The top-k FKL (raw or renormalised, as in EOPD) pulls mass onto the top-k unless k = V."""
    logits, logp, old, teacher, student_topk, teacher_topk, entropy = identical_case(k=V)
    gate_open = torch.zeros_like(entropy)  # every teacher entropy exceeds the threshold 0 - 1
    eopd = eopd_loss(logp, old, teacher, student_topk, teacher_topk, gate_open, entropy_threshold=-1.0)
    tropd = tropd_loss(
        logp,
        old,
        teacher,
        student_topk,
        teacher_topk,
        trust_mask=UNTRUSTED_HALF,
        prefix_mask=torch.zeros_like(UNTRUSTED_HALF),
        outlier="fkl",
    )
    for loss in (eopd, tropd):
        torch.testing.assert_close(loss.detach(), torch.zeros_like(loss), atol=1e-12, rtol=0)
        torch.testing.assert_close(grad_of(loss, logits), torch.zeros_like(logits), atol=1e-12, rtol=0)

    logits, logp, old, teacher, student_topk, teacher_topk, entropy = identical_case(k=K)
    eopd = eopd_loss(logp, old, teacher, student_topk, teacher_topk, gate_open, entropy_threshold=-1.0)
    assert grad_of(eopd, logits).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_jsd_topk_is_zero_with_zero_gradient_for_identical_distributions(beta):
    logits, logp, old, teacher, student_topk, teacher_topk, _ = identical_case(k=V)
    loss = jsd_topk_loss(logp, old, teacher, student_topk, teacher_topk, beta=beta)
    torch.testing.assert_close(loss.detach(), torch.zeros_like(loss), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_of(loss, logits), torch.zeros_like(logits), atol=1e-12, rtol=0)
    # With k < V the value is still zero (pM = pT on the top-k ids).
    logits, logp, old, teacher, student_topk, teacher_topk, _ = identical_case(k=K)
    loss = jsd_topk_loss(logp, old, teacher, student_topk, teacher_topk, beta=beta)
    torch.testing.assert_close(loss.detach(), torch.zeros_like(loss), atol=1e-12, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_is_zero_with_zero_gradient_for_identical_distributions(beta):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, V, generator=gen, dtype=F64, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1)
    loss = generalized_jsd(logprobs, logprobs.detach(), beta=beta)
    torch.testing.assert_close(loss.detach(), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_of(loss, logits), torch.zeros_like(logits), atol=1e-12, rtol=0)

    hidden = torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(V, 4, generator=gen, dtype=F64, requires_grad=True)
    loss = generalized_jsd_chunked(hidden, weight, hidden.detach(), weight.detach(), beta=beta, chunk_size=2)
    torch.testing.assert_close(loss.detach(), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    loss.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.zeros_like(hidden), atol=1e-12, rtol=0)
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight), atol=1e-12, rtol=0)


def token_inputs(teacher_entropy: Tensor, student_entropy: Tensor) -> TokenInputs:
    logits, logp, old, teacher, teacher_topk, ids, _ = random_case(seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    return TokenInputs(
        logp=logp,
        old_logp=old,
        teacher_logp=teacher,
        student_topk_logp=topk_logp(logits, ids),
        teacher_topk_logp=teacher_topk,
        teacher_entropy=teacher_entropy,
        student_entropy=student_entropy,
        trust_mask=mask,
        prefix_mask=torch.zeros_like(mask),
        response_mask=mask,
    )


def test_eopd_gate_reads_teacher_entropy_not_student_entropy():
    cfg = TrainConfig()
    cfg.method.name = "eopd"
    assert cfg.method.entropy_threshold == 0.8
    low, high = torch.full((B, T), 0.7, dtype=F64), torch.full((B, T), 0.9, dtype=F64)
    fn = METHODS["eopd"].fn
    x = token_inputs(teacher_entropy=low, student_entropy=low)
    opd = opd_loss(x.logp, x.old_logp, x.teacher_logp)
    assert x.student_topk_logp is not None and x.teacher_topk_logp is not None
    fkl = topk_forward_kl(x.student_topk_logp, x.teacher_topk_logp, renormalize=True)
    assert (fkl > 0).all()

    # Teacher below 0.8: plain OPD, whichever side of 0.8 the student's entropy is on.
    torch.testing.assert_close(fn(x, cfg, 0).loss, opd)
    torch.testing.assert_close(fn(dataclasses.replace(x, student_entropy=high), cfg, 0).loss, opd)
    # Teacher above 0.8: the renormalised top-k FKL switches on, again whatever the student's entropy.
    for student_entropy in (low, high):
        y = dataclasses.replace(x, teacher_entropy=high, student_entropy=student_entropy)
        torch.testing.assert_close(fn(y, cfg, 0).loss, opd + fkl)
    # Mixed: the gate is per token.
    mixed = torch.where(torch.tensor([[True, False, True], [False, False, True]]), high, low)
    y = dataclasses.replace(x, teacher_entropy=mixed, student_entropy=high - mixed + low)
    torch.testing.assert_close(fn(y, cfg, 0).loss, opd + (mixed > 0.8) * fkl)


def test_reopold_stages_and_keep_fraction_follow_the_config():
    cfg = TrainConfig(steps=10)
    cfg.method.name = "reopold"
    keep = METHODS["reopold"].keep_fraction
    assert [reopold_stage(cfg, s) for s in (0, 9)] == ["single", "single"]
    assert keep(cfg, 9) is None
    cfg.method.two_stage = True
    assert [reopold_stage(cfg, s) for s in range(10)] == ["explore"] * 5 + ["refine"] * 5
    assert [keep(cfg, s) for s in (0, 4, 5, 9)] == [None, None, 0.5, 0.5]
    cfg.method.refine_top_fraction = 0.3
    assert keep(cfg, 7) == 0.3
    assert METHODS["entropy_opd"].keep_fraction(cfg, 0) == cfg.method.entropy_top_fraction == 0.2
    for name in ("tropd", "opd", "eopd", "fkl_topk", "jsd_topk", "gkd", "sft"):
        assert METHODS[name].keep_fraction(cfg, 7) is None, name


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_topk_vanishes_at_both_beta_limits(beta):
    logits, logp, old, teacher, teacher_topk, ids, _ = random_case(seed=6)
    loss = jsd_topk_loss(logp, old, teacher, topk_logp(logits, ids), teacher_topk, beta=beta)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    g_logp, g_logits = torch.autograd.grad(loss.sum(), (logp, logits), allow_unused=True)
    for g in (g_logp, g_logits):
        assert g is None or torch.equal(g, torch.zeros_like(g))


def test_jsd_topk_small_beta_over_beta_is_the_topk_forward_kl():
    """As beta -> 0, forward/beta -> sum_k pT log(pT/pS); the reverse term contributes, per token,
    (1 - pT(x)/pS(x)) * ratio (zero in expectation over x ~ pS, and exactly zero when pT(x) = pS(x))."""
    logits, logp, old, teacher, teacher_topk, ids, _ = random_case(seed=7)
    student_topk = topk_logp(logits, ids)
    fkl = topk_forward_kl(student_topk, teacher_topk)
    beta = 1e-6
    on_sampled = jsd_topk_loss(logp, old, old, student_topk, teacher_topk, beta=beta) / beta
    torch.testing.assert_close(on_sampled, fkl, rtol=1e-4, atol=1e-5)

    ratio = torch.exp(logp - old)
    full = jsd_topk_loss(logp, old, teacher, student_topk, teacher_topk, beta=beta) / beta
    torch.testing.assert_close(full, fkl + (1 - torch.exp(teacher - old)) * ratio, rtol=1e-4, atol=1e-5)


def test_jsd_topk_beta_near_one_is_opd_plus_topk_mass_gap():
    """With gamma = 1 - beta -> 0: loss/gamma -> pg(R) + sum_k (pT_k - pS_k)."""
    logits, logp, old, teacher, teacher_topk, ids, _ = random_case(seed=8)
    student_topk = topk_logp(logits, ids)
    gamma = 1e-6
    scaled = jsd_topk_loss(logp, old, teacher, student_topk, teacher_topk, beta=1 - gamma) / gamma
    expected = opd_loss(logp, old, teacher) + (teacher_topk.exp() - student_topk.exp()).sum(-1)
    torch.testing.assert_close(scaled, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("teacher_logp_x", [-1.0, -10.0, -100.0, -1e4])
def test_fkl_outlier_gradient_bounded_while_k1_coefficient_grows(teacher_logp_x):
    """pi_T(x) -> 0: the K1 term's coefficient -R grows without bound; the FKL outlier's gradient on
    the logits does not move, and no entry exceeds 1."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 1, V, generator=gen, dtype=F64, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1)
    x = V - 1  # the sampled token, outside the teacher's top-3 ids 0..2
    logp = logprobs[..., x]
    old = logp.detach()
    ids = torch.tensor([[[0, 1, 2]]])
    teacher_topk = t64([[[math.log(0.5), math.log(0.2), math.log(0.1)]]])
    teacher = t64([[teacher_logp_x]])
    untrusted = torch.zeros(1, 1, dtype=torch.bool)

    outlier = tropd_loss(
        logp, old, teacher, logprobs.gather(-1, ids), teacher_topk, trust_mask=untrusted, prefix_mask=untrusted
    )
    g_fkl = grad_of(outlier, logits)
    p_s = torch.softmax(logits.detach(), -1)
    # Closed form: pS * mass - pT on the top-k ids, pS * mass elsewhere (mass = 0.8).
    expected = p_s * 0.8 - torch.nn.functional.pad(teacher_topk.exp(), (0, V - 3))
    torch.testing.assert_close(g_fkl, expected)
    assert g_fkl.abs().max() <= 1.0

    k1 = opd_loss(logp, old, teacher)
    g_k1 = grad_of(k1, logits)
    reward = teacher_logp_x - float(old)
    # -R * (onehot(x) - pS): the sampled-token entry is -R * (1 - pS(x)), linear in |R|.
    assert float(g_k1[..., x]) == pytest.approx(-reward * (1 - float(p_s[..., x])), rel=1e-12)
    if teacher_logp_x <= -100:
        assert g_k1.abs().max() > 10 * g_fkl.abs().max()


def test_fkl_outlier_gradient_finite_when_teacher_gives_sampled_token_zero_probability():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 1, V, generator=gen, dtype=F64, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs[..., V - 1]
    ids = torch.tensor([[[0, 1, 2]]])
    teacher_topk = t64([[[math.log(0.5), math.log(0.2), math.log(0.1)]]])
    untrusted = torch.zeros(1, 1, dtype=torch.bool)
    loss = tropd_loss(
        logp,
        logp.detach(),
        t64([[-math.inf]]),
        logprobs.gather(-1, ids),
        teacher_topk,
        trust_mask=untrusted,
        prefix_mask=untrusted,
    )
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad_of(loss, logits)).all()


# ---------------------------------------------------------------------------------------------
# 4. Chunked GKD against the naive full log-softmax


def naive_gjsd(hidden, weight, t_hidden, t_weight, *, beta: float, temperature: float) -> Tensor:
    student = torch.log_softmax(hidden @ weight.t() / temperature, -1)
    teacher = torch.log_softmax(t_hidden @ t_weight.t() / temperature, -1)
    return generalized_jsd(student, teacher, beta=beta)


def gkd_inputs(dtype: torch.dtype, n: int = 37, h: int = 16, v: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)  # noqa: E731
    return draw(n, h), draw(v, h, scale=2 / h**0.5), draw(n, h), draw(v, h, scale=2 / h**0.5)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Normwise max relative error: max |a - e| / max |e|."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual - expected).abs().max() / scale).item()


GKD_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize(("beta", "temperature"), [(0.5, 1.0), (0.5, 0.7), (0.0, 0.7), (1.0, 1.3), (0.2, 1.0)])
def test_generalized_jsd_chunked_matches_naive(dtype, chunk_size, beta, temperature):
    hidden, weight, t_hidden, t_weight = gkd_inputs(dtype)  # N = 37: a ragged last chunk
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = generalized_jsd_chunked(h1, w1, t_hidden, t_weight, beta=beta, chunk_size=chunk_size, temperature=temperature)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = naive_gjsd(h2, w2, t_hidden, t_weight, beta=beta, temperature=temperature)

    assert out.shape == (37,) and out.dtype == dtype
    tol = GKD_TOL[dtype]
    assert rel_err(out, ref) < tol
    (upstream * out).sum().backward()
    (upstream * ref).sum().backward()
    assert h1.grad.dtype == dtype and w1.grad.dtype == dtype
    assert rel_err(h1.grad, h2.grad) < tol
    assert rel_err(w1.grad, w2.grad) < tol


def test_generalized_jsd_chunked_on_padded_rows_matches_naive_on_the_grid():
    """The trainer flattens response positions; garbage in padded positions never reaches the loss."""
    gen = torch.Generator().manual_seed(3)
    rows, length, h, v = 3, 9, 8, 20
    lengths = [9, 4, 0]
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    s_grid = torch.randn(rows, length, h, generator=gen, dtype=F64)
    t_grid = torch.randn(rows, length, h, generator=gen, dtype=F64)
    s_grid[~mask] = math.nan
    t_grid[~mask] = -math.inf
    s_grid.requires_grad_(True)
    weight = torch.randn(v, h, generator=gen, dtype=F64, requires_grad=True)
    t_weight = torch.randn(v, h, generator=gen, dtype=F64)

    per_token = to_grid(generalized_jsd_chunked(s_grid[mask], weight, t_grid[mask], t_weight, chunk_size=4), mask)
    loss = masked_mean(per_token, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_grid.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.equal(s_grid.grad[~mask], torch.zeros_like(s_grid.grad[~mask]))

    ref = naive_gjsd(s_grid.detach()[mask], weight.detach(), t_grid[mask], t_weight, beta=0.5, temperature=1.0)
    torch.testing.assert_close(per_token[mask].detach(), ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. Padding: -inf or -1e30 log-probs in padded positions, reduced with masked_mean


PAD_LOSSES: dict[str, LossFn] = {
    **LOSSES,
    **{
        f"gkd-{beta}": (lambda lp, slp, o, t, tlp, te, beta=beta: generalized_jsd(slp, tlp, beta=beta))
        for beta in (0.0, 0.5, 1.0)
    },
}
# Log-prob inputs are sanitised at the top of each loss (losses._finite: nan_to_num, whose gradient
# is 0 at non-finite entries), so -inf padding gives no NaN through masked_mean's where.


def pad_cases():
    for fill in (-math.inf, -1e30):
        for dtype in (torch.float32, torch.bfloat16):
            for name in sorted(PAD_LOSSES):
                fill_id = "-inf" if fill == -math.inf else "-1e30"
                yield pytest.param(name, fill, dtype, id=f"{name}-{fill_id}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("name", "fill", "dtype"), list(pad_cases()))
def test_padded_positions_give_finite_loss_and_gradients(name, fill, dtype):
    gen = torch.Generator().manual_seed(10)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    pad = ~valid
    logits = torch.randn(B, T, V, generator=gen)
    logprobs = torch.log_softmax(logits, -1)
    sampled = torch.randint(0, V, (B, T, 1), generator=gen)
    logp = logprobs.gather(-1, sampled).squeeze(-1)
    old = logp - 0.1 * torch.randn(B, T, generator=gen)
    teacher_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=gen), -1)
    teacher = teacher_logprobs.gather(-1, sampled).squeeze(-1)
    teacher_topk, ids = teacher_logprobs.topk(K, dim=-1)
    student_topk = logprobs.gather(-1, ids)
    teacher_entropy = torch.full((B, T), 1.0)
    gkd = name.startswith("gkd")
    if gkd:  # full-vocabulary log-probs in place of the top-k ones
        student_topk, teacher_topk = logprobs, teacher_logprobs
    for x in (logp, old, teacher, student_topk, teacher_topk):
        x[pad] = fill
    logp = logp.to(dtype).requires_grad_(True)
    student_topk = student_topk.to(dtype).requires_grad_(True)
    old, teacher, teacher_topk, teacher_entropy = (x.to(dtype) for x in (old, teacher, teacher_topk, teacher_entropy))

    per_token = PAD_LOSSES[name](logp, student_topk, old, teacher, teacher_topk, teacher_entropy)
    assert per_token.shape == (B, T)
    loss = masked_mean(per_token, valid)
    assert torch.isfinite(loss)
    loss.backward()
    for g in (logp.grad, student_topk.grad):
        if g is not None:
            assert torch.isfinite(g).all()
            assert torch.equal(g[pad], torch.zeros_like(g[pad]))


# ---------------------------------------------------------------------------------------------
# 6. Engine: one trainer step per method and per preset


def finite_metrics(metrics: dict[str, float]) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, bad


@pytest.fixture
def make_trainer(load_models, tiny_examples) -> Callable[[TrainConfig], Run]:
    def make(cfg: TrainConfig) -> Run:
        teacher, student = load_models(cfg)
        torch.manual_seed(cfg.seed)
        return build_run(cfg, teacher=teacher, student=student, examples=tiny_examples)

    return make


def record_gradients(monkeypatch) -> list[dict[str, Tensor]]:
    """Gradients seen by each optimizer step (before clipping), in order."""
    grads: list[dict[str, Tensor]] = []
    inner = step_module.optimizer_step

    def recording(run: Run, loss: float) -> float:
        grads.append(
            {n: p.grad.detach().clone() for n, p in run.student.model.named_parameters() if p.grad is not None}
        )
        return inner(run, loss)

    monkeypatch.setattr(step_module, "optimizer_step", recording)
    return grads


def record_inputs(trainer: Run) -> list[TokenInputs]:
    seen: list[TokenInputs] = []
    fn = trainer.method.fn

    def recording(x: TokenInputs, cfg: TrainConfig, step: int):
        seen.append(x)
        return fn(x, cfg, step)

    trainer.method = dataclasses.replace(trainer.method, fn=recording)
    return seen


def weights(trainer: Run) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trainer.student.model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_name_runs_one_finite_step(make_config, make_trainer, name):
    trainer = make_trainer(make_config(method={"name": name}, steps=1))
    metrics = train_step(trainer, 0)
    finite_metrics(metrics)
    assert metrics["optimizer_steps"] == 1.0 and metrics["tokens"] > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_preset_runs_one_finite_step(tmp_path, make_trainer, preset):
    overrides = ["experiment=tiny", f"method={preset}", "device=cpu", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = common.to_object(compose("train", overrides=overrides), TrainConfig)
    validate_train(cfg)
    metrics = train_step(make_trainer(cfg), 0)
    finite_metrics(metrics)
    assert metrics["tokens"] > 0


def test_reopold_refinement_keeps_the_top_half_by_student_entropy(make_config, make_trainer):
    cfg = make_config(method={"name": "reopold", "two_stage": True}, guidance={"enabled": False}, steps=2)
    trainer = make_trainer(cfg)
    seen = record_inputs(trainer)

    explore = train_step(trainer, 0)  # step 0 < 0.5 * 2: exploration, no entropy selection
    assert "kept_fraction" not in explore
    assert seen[-1].keep_mask is None

    refine = train_step(trainer, 1)
    finite_metrics(refine)
    x = seen[-1]
    assert x.keep_mask is not None
    n = int(x.student_mask.sum())
    assert refine["kept_fraction"] == pytest.approx(round(0.5 * n) / n)
    assert abs(refine["kept_fraction"] - 0.5) <= 0.5 / n + 1e-9
    # The selection is by the *student's* entropy: every kept token is at least as uncertain as any
    # dropped one, and it is what top_fraction_mask gives on the student entropies.
    ent = x.student_entropy
    kept, dropped = ent[x.keep_mask], ent[x.student_mask & ~x.keep_mask]
    assert kept.min() >= dropped.max()
    assert torch.equal(x.keep_mask, top_fraction_mask(ent, x.student_mask, 0.5))


def test_single_stage_reopold_logs_no_kept_fraction(make_config, make_trainer):
    trainer = make_trainer(make_config(method={"name": "reopold"}, guidance={"enabled": False}, steps=2))
    assert "kept_fraction" not in train_step(trainer, 1)


def test_entropy_opd_keeps_about_twenty_percent(make_config, make_trainer):
    trainer = make_trainer(make_config(method={"name": "entropy_opd"}, guidance={"enabled": False}))
    metrics = train_step(trainer, 0)
    n = metrics["tokens"]
    assert metrics["kept_fraction"] == pytest.approx(max(1, round(0.2 * n)) / n)
    assert abs(metrics["kept_fraction"] - 0.2) <= 0.5 / n + 1e-9


def test_ppo_epochs_and_mini_batches_take_more_optimizer_steps(make_config, make_trainer):
    base = make_trainer(make_config(steps=1))
    base_metrics = train_step(base, 0)
    ppo = make_trainer(make_config(steps=1, method={"ppo_epochs": 2, "clip_eps": 0.2, "mini_batches": 2}))
    ppo_metrics = train_step(ppo, 0)
    finite_metrics(ppo_metrics)
    assert base_metrics["optimizer_steps"] == 1.0
    assert ppo_metrics["optimizer_steps"] == 4.0
    before, after = weights(base), weights(ppo)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_one_epoch_one_mini_batch_equals_the_default_path_bitwise(make_config, make_trainer, clip_eps):
    default = make_trainer(make_config(steps=1))
    default_metrics = train_step(default, 0)
    explicit = make_trainer(make_config(steps=1, method={"ppo_epochs": 1, "mini_batches": 1, "clip_eps": clip_eps}))
    explicit_metrics = train_step(explicit, 0)
    assert explicit_metrics["loss"] == default_metrics["loss"]
    assert explicit_metrics["grad_norm"] == default_metrics["grad_norm"]
    a, b = weights(default), weights(explicit)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "method",
    [
        {"name": "entropy_opd"},  # pre-pass for the batch-level entropy selection
        {"name": "tropd", "ppo_epochs": 2, "clip_eps": 0.2},  # pre-pass for the rollout-time log-probs
        {"name": "jsd_topk"},  # no pre-pass
    ],
    ids=["entropy_opd", "tropd-ppo2", "jsd_topk"],
)
def test_micro_batching_gives_the_same_gradient(make_config, make_trainer, method, monkeypatch):
    """Top-entropy selection and rollout-time log-probs are batch-level and the token mean is global,
    so splitting the rollouts into micro-batches changes nothing but summation order. (Only the first
    optimizer step is compared: later ones start from Adam updates that amplify rounding.)"""
    results = []
    seen = record_gradients(monkeypatch)
    for micro in (1, 2):
        trainer = make_trainer(make_config(steps=1, method=method, optim={"micro_batches": micro}))
        metrics = train_step(trainer, 0)
        finite_metrics(metrics)
        results.append((list(seen), metrics))
        seen.clear()
    (g1, m1), (g2, m2) = results
    assert len(g1) == len(g2) == method.get("ppo_epochs", 1)
    assert g1[0].keys() == g2[0].keys() and len(g1[0]) > 0
    for key in g1[0]:
        torch.testing.assert_close(g2[0][key], g1[0][key], rtol=1e-4, atol=1e-7)
    if "kept_fraction" in m1:
        assert m2["kept_fraction"] == m1["kept_fraction"]
    for key in ("reward_mean", "trust_fraction", "student_entropy"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key


def test_constant_advantage_control_ignores_the_teacher():
    # pg(c) at ratio 1: loss -c and gradient -c * grad logp on every token, whatever the teacher says.
    old = t64([math.log(0.5), math.log(0.25)])
    logp = old.clone().requires_grad_(True)
    loss = losses.constant_advantage_loss(logp, old, -1.0)
    torch.testing.assert_close(loss, t64([1.0, 1.0]))
    torch.testing.assert_close(grad_of(loss, logp), t64([1.0, 1.0]))  # lowers log pi_S of the sampled tokens
    x = TokenInputs(
        logp=logp,
        old_logp=old,
        teacher_logp=t64([0.0, -9.0]),
        student_topk_logp=None,
        teacher_topk_logp=None,
        teacher_entropy=t64([0.0, 0.0]),
        student_entropy=t64([0.0, 0.0]),
        trust_mask=torch.tensor([True, True]),
        prefix_mask=torch.tensor([False, False]),
        response_mask=torch.tensor([True, True]),
    )
    cfg = TrainConfig()
    cfg.method.constant_advantage = -0.5
    out = METHODS["constant_advantage"].fn(x, cfg, 0)
    torch.testing.assert_close(out.loss, t64([0.5, 0.5]))
