"""Chunked scorers in ``tropd_cli.train.scoring`` against the full log-softmax reference ``naive_scores``."""

from __future__ import annotations

import pytest
import torch

from tropd_cli.train.scoring import naive_scores, student_scores, teacher_scores

N, H, V, K = 37, 16, 50, 5  # odd N so that most chunk sizes leave a ragged last chunk
CHUNKS = [1, 7, 64, 1000]
TEMPERATURE = 0.7


def make_inputs(dtype: torch.dtype, seed: int = 0, n: int = N, h: int = H, v: int = V, k: int = K):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5 * 2).to(dtype)
    target_ids = torch.randint(0, v, (n,), generator=gen)
    gather_ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    return hidden, weight, target_ids, gather_ids


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise max relative error: max |a - e| / max |e|."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual - expected).abs().max() / scale).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_student_scores_match_naive_values_and_gradients(dtype, chunk_size):
    hidden, weight, target_ids, gather_ids = make_inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    grad_logp = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    grad_gathered = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype)

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, gathered, entropy = student_scores(
        h1, w1, target_ids, gather_ids, chunk_size=chunk_size, temperature=TEMPERATURE
    )
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_logp, ref_gathered, ref_entropy = naive_scores(h2, w2, target_ids, gather_ids, temperature=TEMPERATURE)

    assert logp.shape == (N,) and gathered.shape == (N, K) and entropy.shape == (N,)
    assert logp.dtype == dtype and gathered.dtype == dtype and entropy.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(logp, ref_logp) < tol
    assert rel_err(gathered, ref_gathered) < tol
    assert rel_err(entropy, ref_entropy) < tol
    assert not entropy.requires_grad

    ((grad_logp * logp).sum() + (grad_gathered * gathered).sum()).backward()
    ((grad_logp * ref_logp).sum() + (grad_gathered * ref_gathered).sum()).backward()
    assert h1.grad.dtype == dtype and w1.grad.dtype == dtype
    assert rel_err(h1.grad, h2.grad) < tol
    assert rel_err(w1.grad, w2.grad) < tol


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_teacher_scores_match_naive_and_topk(chunk_size):
    for dtype in (torch.float32, torch.float64):
        hidden, weight, target_ids, gather_ids = make_inputs(dtype, seed=2)
        scores = teacher_scores(hidden, weight, target_ids, top_k=K, chunk_size=chunk_size, temperature=TEMPERATURE)
        ref_logp, _, ref_entropy = naive_scores(hidden, weight, target_ids, gather_ids, temperature=TEMPERATURE)
        full = torch.log_softmax((hidden @ weight.t()) / TEMPERATURE, dim=-1)
        ref_topk_logp, ref_topk_ids = torch.topk(full, K, dim=-1)
        tol = TOL[dtype]
        assert rel_err(scores.logp, ref_logp) < tol
        assert rel_err(scores.entropy, ref_entropy) < tol
        assert torch.equal(scores.topk_ids, ref_topk_ids)
        assert rel_err(scores.topk_logp, ref_topk_logp) < tol
        assert scores.topk_ids.shape == (N, K) and scores.topk_ids.dtype == torch.long
        # Entropy by its definition, -sum p log p.
        torch.testing.assert_close(scores.entropy, -(full.exp() * full).sum(-1), rtol=tol, atol=tol)
        for field in (scores.logp, scores.topk_logp, scores.entropy):
            assert not field.requires_grad


def test_teacher_scores_without_topk_and_detached():
    hidden, weight, target_ids, gather_ids = make_inputs(torch.float32, seed=3)
    hidden.requires_grad_(True)
    scores = teacher_scores(hidden, weight, target_ids, top_k=0, chunk_size=8)
    assert scores.topk_ids.shape == (N, 0) and scores.topk_logp.shape == (N, 0)
    assert not scores.logp.requires_grad
    ref_logp, _, ref_entropy = naive_scores(hidden.detach(), weight, target_ids, gather_ids)
    assert rel_err(scores.logp, ref_logp) < 1e-5
    assert rel_err(scores.entropy, ref_entropy) < 1e-5


def test_student_scores_teacher_topk_ids_feed_gather():
    """The trainer gathers the student at the teacher's top-k ids; both sides must agree with naive."""
    hidden, weight, target_ids, _ = make_inputs(torch.float64, seed=4)
    t_hidden, t_weight, _, _ = make_inputs(torch.float64, seed=5)
    tscores = teacher_scores(t_hidden, t_weight, target_ids, top_k=K, chunk_size=10)
    _, gathered, _ = student_scores(hidden, weight, target_ids, tscores.topk_ids, chunk_size=10)
    _, ref_gathered, _ = naive_scores(hidden, weight, target_ids, tscores.topk_ids)
    assert rel_err(gathered, ref_gathered) < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_student_scores_without_gather_ids(chunk_size):
    hidden, weight, target_ids, gather_ids = make_inputs(torch.float64, seed=6)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, gathered, entropy = student_scores(h1, w1, target_ids, chunk_size=chunk_size)
    assert gathered.shape == (N, 0)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_logp, _, ref_entropy = naive_scores(h2, w2, target_ids, gather_ids)
    assert rel_err(logp, ref_logp) < 1e-12
    assert rel_err(entropy, ref_entropy) < 1e-12
    logp.sum().backward()
    ref_logp.sum().backward()
    assert rel_err(h1.grad, h2.grad) < 1e-10
    assert rel_err(w1.grad, w2.grad) < 1e-10


def test_student_scores_partial_grads():
    """Gradient through only one output, and to only one of hidden / weight."""
    hidden, weight, target_ids, gather_ids = make_inputs(torch.float64, seed=7)
    # Only the gathered output is used: the logp cotangent is zero.
    w1 = weight.clone().requires_grad_(True)
    _, gathered, _ = student_scores(hidden, w1, target_ids, gather_ids, chunk_size=5, temperature=1.3)
    gathered.sum().backward()
    w2 = weight.clone().requires_grad_(True)
    _, ref_gathered, _ = naive_scores(hidden, w2, target_ids, gather_ids, temperature=1.3)
    ref_gathered.sum().backward()
    assert rel_err(w1.grad, w2.grad) < 1e-10
    # Only hidden requires grad.
    h1 = hidden.clone().requires_grad_(True)
    logp, _, _ = student_scores(h1, weight, target_ids, gather_ids, chunk_size=5)
    logp.sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    naive_scores(h2, weight, target_ids, gather_ids)[0].sum().backward()
    assert rel_err(h1.grad, h2.grad) < 1e-10


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_student_scores_gradcheck(temperature):
    hidden, weight, target_ids, gather_ids = make_inputs(torch.float64, seed=8, n=5, h=4, v=7, k=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def scores(h, w):
        logp, gathered, _ = student_scores(h, w, target_ids, gather_ids, chunk_size=2, temperature=temperature)
        return logp, gathered

    assert torch.autograd.gradcheck(scores, (hidden, weight))


def test_bf16_inputs_close_to_fp32():
    hidden32, weight32, target_ids, gather_ids = make_inputs(torch.float32, seed=9)
    hidden16 = hidden32.to(torch.bfloat16).requires_grad_(True)
    weight16 = weight32.to(torch.bfloat16).requires_grad_(True)
    logp, gathered, entropy = student_scores(
        hidden16, weight16, target_ids, gather_ids, chunk_size=7, temperature=TEMPERATURE
    )
    # Statistics are computed in fp32 for half-precision models.
    assert logp.dtype == gathered.dtype == entropy.dtype == torch.float32
    h32, w32 = hidden32.clone().requires_grad_(True), weight32.clone().requires_grad_(True)
    ref_logp, ref_gathered, ref_entropy = naive_scores(h32, w32, target_ids, gather_ids, temperature=TEMPERATURE)
    for got, ref in ((logp, ref_logp), (gathered, ref_gathered), (entropy, ref_entropy)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.1)

    (logp.sum() + gathered.sum()).backward()
    (ref_logp.sum() + ref_gathered.sum()).backward()
    assert hidden16.grad.dtype == torch.bfloat16 and weight16.grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden16.grad.float()).all() and torch.isfinite(weight16.grad.float()).all()
    assert rel_err(hidden16.grad.float(), h32.grad) < 0.05
    assert rel_err(weight16.grad.float(), w32.grad) < 0.05

    tscores = teacher_scores(hidden16.detach(), weight16.detach(), target_ids, top_k=K, temperature=TEMPERATURE)
    assert tscores.logp.dtype == torch.float32
    assert torch.isfinite(tscores.logp).all() and torch.isfinite(tscores.topk_logp).all()
    torch.testing.assert_close(tscores.logp, ref_logp.detach(), rtol=0.05, atol=0.1)
    torch.testing.assert_close(tscores.entropy, ref_entropy, rtol=0.05, atol=0.1)
