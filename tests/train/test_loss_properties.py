"""Property tests (hypothesis): every objective stays NaN-free on extreme inputs, and the trust mask
never trusts a token outside the student's own ones.

Inputs are real log-softmaxes of random logits (so they are valid distributions), including one-hot
distributions (-inf logits), identical student and teacher, huge logit scales, bf16, and padding
filled with -inf or very negative values the way padded grids are.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tropd_cli.train import losses

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def token_batches(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Student/teacher log-probs of sampled tokens and of the teacher's top-k, with padding."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    vocab = draw(st.integers(2, 8))
    k = draw(st.integers(1, vocab))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1.0, 10.0, 1e4]))
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(b, t, vocab, generator=gen) * scale
    teacher_logits = torch.randn(b, t, vocab, generator=gen) * scale
    case = draw(st.sampled_from(["random", "identical", "one_hot_student", "one_hot_teacher", "one_hot_both"]))
    if case == "identical":
        teacher_logits = student_logits.clone()
    if case in ("one_hot_student", "one_hot_both"):
        student_logits = torch.full_like(student_logits, -torch.inf)
        student_logits[..., 0] = 0.0
    if case in ("one_hot_teacher", "one_hot_both"):
        teacher_logits = torch.full_like(teacher_logits, -torch.inf)
        teacher_logits[..., -1] = 0.0
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    student = torch.log_softmax(student_logits.float(), -1).to(dtype).float()
    teacher = torch.log_softmax(teacher_logits.float(), -1).to(dtype).float()
    # Sampled tokens come from the student (so they have its support); top-k ids from the teacher.
    tokens = torch.multinomial(student.exp().reshape(-1, vocab), 1, generator=gen).reshape(b, t, 1)
    topk_ids = teacher.topk(k, dim=-1).indices
    response = torch.rand(b, t, generator=gen) < 0.7
    response[:, 0] = True  # every row has at least one real token
    prefix = response & (torch.rand(b, t, generator=gen) < 0.3)
    pad = draw(st.sampled_from([-torch.inf, -1e30, float("nan")]))
    out = {
        "logp": student.gather(-1, tokens).squeeze(-1),
        "teacher_logp": teacher.gather(-1, tokens).squeeze(-1),
        "student_topk_logp": student.gather(-1, topk_ids),
        "teacher_topk_logp": teacher.gather(-1, topk_ids),
        "teacher_entropy": -(teacher.exp() * torch.nan_to_num(teacher, neginf=0.0)).sum(-1),
        "student_entropy": -(student.exp() * torch.nan_to_num(student, neginf=0.0)).sum(-1),
    }
    for name in ("logp", "teacher_logp"):
        out[name] = torch.where(response, out[name], torch.full_like(out[name], pad))
    for name in ("student_topk_logp", "teacher_topk_logp"):
        out[name] = torch.where(response[..., None], out[name], torch.full_like(out[name], pad))
    out["response_mask"], out["prefix_mask"] = response, prefix
    out["uniform"] = torch.rand(b, t, generator=gen)
    return out


def per_token_losses(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every objective on the same inputs (``logp`` and ``student_topk_logp`` carry the gradient)."""
    logp, old_logp = x["logp"], x["logp"].detach()
    student = x["response_mask"] & ~x["prefix_mask"]
    reward = losses.k1_reward(old_logp, x["teacher_logp"])
    trust = losses.trust_region_mask(reward, uniform=x["uniform"], valid=student)
    out = {
        f"tropd_{outlier}": losses.tropd_loss(
            logp,
            old_logp,
            x["teacher_logp"],
            x["student_topk_logp"],
            x["teacher_topk_logp"],
            trust_mask=trust,
            prefix_mask=x["prefix_mask"],
            outlier=outlier,
            clip_eps=0.2,
        )
        for outlier in losses.OUTLIER_STRATEGIES
    }
    out["opd"] = losses.opd_loss(logp, old_logp, x["teacher_logp"])
    out["eopd"] = losses.eopd_loss(
        logp, old_logp, x["teacher_logp"], x["student_topk_logp"], x["teacher_topk_logp"], x["teacher_entropy"]
    )
    out["reopold"] = losses.reopold_loss(logp, old_logp, x["teacher_logp"])
    keep = losses.top_fraction_mask(x["student_entropy"], student, 0.2)
    out["entropy_opd"] = losses.entropy_opd_loss(logp, old_logp, x["teacher_logp"], keep_mask=keep)
    out["jsd_topk"] = losses.jsd_topk_loss(
        logp, old_logp, x["teacher_logp"], x["student_topk_logp"], x["teacher_topk_logp"]
    )
    out["sft"] = losses.sft_loss(logp)
    out["fkl_topk"] = losses.topk_forward_kl(x["student_topk_logp"], x["teacher_topk_logp"])
    return out


@SETTINGS
@given(token_batches())
def test_no_objective_gives_nan_losses_or_gradients(x):
    logp = x["logp"].clone().requires_grad_(True)
    topk = x["student_topk_logp"].clone().requires_grad_(True)
    for name, per_token in per_token_losses({**x, "logp": logp, "student_topk_logp": topk}).items():
        loss = losses.masked_mean(per_token, x["response_mask"])
        assert not torch.isnan(loss), name
        grads = torch.autograd.grad(loss, [logp, topk], retain_graph=True, allow_unused=True)
        assert all(g is None or not torch.isnan(g).any() for g in grads), name


@SETTINGS
@given(token_batches(), st.sampled_from(list(losses.TRUST_REGION_KINDS)), st.floats(-5, 5))
def test_the_trust_mask_never_trusts_a_token_outside_the_students_own(x, kind, tau):
    student = x["response_mask"] & ~x["prefix_mask"]
    reward = losses.k1_reward(x["logp"], x["teacher_logp"])
    trust = losses.trust_region_mask(reward, tau=tau, kind=kind, uniform=x["uniform"], valid=student)
    assert not (trust & ~student).any()


@SETTINGS
@given(token_batches())
def test_identical_models_give_zero_reward_and_full_trust(x):
    same = x["logp"]
    student = x["response_mask"]
    reward = losses.k1_reward(same, same)
    assert torch.equal(reward[student], torch.zeros_like(reward[student]))
    trust = losses.trust_region_mask(reward, uniform=x["uniform"], valid=student)
    assert torch.equal(trust, student)  # tau = 0: a token the teacher likes as much is always trusted
