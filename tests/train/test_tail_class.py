"""The top-k forward KL with a tail class (issue 16, item 3): against a hand-computed value, equal to the
full-vocabulary forward KL when the top-k leaves one token out, and wired into tropd, fkl_topk and eopd."""

from __future__ import annotations

import math

import pytest
import torch

from tropd_cli.train import losses


def logp(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_the_tail_class_against_a_hand_computed_value():
    # V = 4, k = 2: teacher (0.5, 0.3 | tail 0.2), student (0.4, 0.4 | tail 0.2)
    teacher, student = logp([0.5, 0.3])[None, None], logp([0.4, 0.4])[None, None]
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    got = losses.topk_forward_kl(student, teacher, tail=True)
    assert float(got) == pytest.approx(want, abs=1e-12)
    without = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert float(losses.topk_forward_kl(student, teacher)) == pytest.approx(without, abs=1e-12)
    # the student's tail is off: (0.5, 0.3 | 0.2) against (0.3, 0.1 | 0.6)
    student = logp([0.3, 0.1])[None, None]
    want = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.6)
    assert float(losses.topk_forward_kl(student, teacher, tail=True)) == pytest.approx(want, abs=1e-12)


def test_k_equal_to_v_minus_1_is_the_full_forward_kl_with_its_gradient():
    torch.manual_seed(0)
    vocab, k = 7, 6
    teacher_logits = torch.randn(3, 5, vocab, dtype=torch.float64)
    student_logits = torch.randn(3, 5, vocab, dtype=torch.float64, requires_grad=True)
    t_logp, s_logp = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    ids = t_logp.topk(k, dim=-1).indices
    tailed = losses.topk_forward_kl(s_logp.gather(-1, ids), t_logp.gather(-1, ids), tail=True)
    full = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    assert torch.allclose(tailed, full, atol=1e-10)
    (g_tail,) = torch.autograd.grad(tailed.sum(), student_logits, retain_graph=True)
    (g_full,) = torch.autograd.grad(full.sum(), student_logits)
    assert torch.allclose(g_tail, g_full, atol=1e-10)


def test_no_tail_mass_adds_nothing_and_a_full_student_top_k_stays_finite():
    teacher = logp([0.6, 0.4])[None, None]  # the teacher's top-k holds all its mass: tail 0
    student = logp([0.5, 0.5 - 1e-18])[None, None]  # the student's too, to rounding
    assert float(losses.topk_forward_kl(student, teacher, tail=True)) == pytest.approx(
        float(losses.topk_forward_kl(student, teacher))
    )
    teacher = logp([0.5, 0.3])[None, None]
    student = torch.tensor([[[0.0, -50.0]]], dtype=torch.float64, requires_grad=True)  # pS top-k mass 1
    value = losses.topk_forward_kl(student, teacher, tail=True)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("method", ["tropd", "fkl_topk", "eopd"])
def test_outlier_tail_reaches_each_top_k_method(make_config, tmp_path, method):
    from tropd_cli.train.loop import train

    plain = make_config(steps=2)
    plain.method.name = method
    tailed = make_config(steps=2)
    tailed.method.name, tailed.outlier.tail = method, True
    if method == "eopd":  # every token gets the FKL term
        plain.method.entropy_threshold = tailed.method.entropy_threshold = 0.0
    if method == "tropd":  # every student token an outlier, so the FKL term is the whole student loss
        for cfg in (plain, tailed):
            cfg.trust_region.kind, cfg.trust_region.tau = "threshold", 1e9
    a = train(plain, output_dir=tmp_path / "plain").history
    b = train(tailed, output_dir=tmp_path / "tail").history
    assert a[0]["rkl_estimate"] == b[0]["rkl_estimate"]  # same first rollouts
    assert a[0]["loss"] != b[0]["loss"]  # the tail term changed the objective
