"""Log-probabilities, top-k and entropy from hidden states, chunked over positions.

A full-vocabulary logits tensor ``[B, T, V]`` in fp32 is 1.2 GB per 2048 tokens at Qwen's vocabulary.
Both scorers here project the lm_head only at response positions and only ``chunk_size`` rows at a
time. The student's scorer is a custom autograd function that recomputes each chunk's logits in
backward (the Liger-kernel approach), so peak memory is O(chunk x V), never O(N x V).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tropd_cli.batch import RolloutBatch, TeacherScores
from tropd_cli.train.losses import generalized_jsd


def _score_dtype(hidden: Tensor) -> torch.dtype:
    """fp32 for half-precision models, the model's own dtype when it is wider (fp64 in tests)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _chunk_logits(hidden: Tensor, weight: Tensor, inv_temperature: float) -> Tensor:
    logits = (hidden @ weight.t()).to(_score_dtype(hidden))
    if inv_temperature != 1.0:
        logits.mul_(inv_temperature)
    return logits


def _entropy(logits: Tensor, lse: Tensor) -> Tensor:
    """``H = lse - sum(p * z)`` with one ``[chunk, V]`` temporary (in-place exp and product)."""
    weighted = (logits - lse[:, None]).exp_().mul_(logits)
    return lse - weighted.sum(-1)


def _accumulate_weight_grad(grad_weight: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """``grad_weight += grad_logits^T @ hidden`` without a second ``[V, H]`` temporary when dtypes match."""
    if grad_weight.dtype == grad_logits.dtype == hidden.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    else:
        grad_weight += (grad_logits.t() @ hidden).to(grad_weight.dtype)


@torch.no_grad()
def teacher_scores(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    top_k: int,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> TeacherScores:
    """Score ``target_ids`` under the teacher from its final hidden states ``[N, H]``.

    ``weight`` is the lm_head matrix ``[V, H]``. Returns fp32 statistics; ``top_k = 0`` skips top-k.
    """
    n = hidden.shape[0]
    inv_t = 1.0 / temperature
    logp = torch.empty(n, dtype=_score_dtype(hidden), device=hidden.device)
    entropy = torch.empty_like(logp)
    topk_ids = torch.empty(n, top_k, dtype=torch.long, device=hidden.device)
    topk_logp = torch.empty(n, top_k, dtype=_score_dtype(hidden), device=hidden.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = _chunk_logits(hidden[start:stop], weight, inv_t)
        lse = torch.logsumexp(logits, dim=-1)
        logp[start:stop] = logits.gather(1, target_ids[start:stop, None]).squeeze(1) - lse
        entropy[start:stop] = _entropy(logits, lse)
        if top_k:
            values, ids = torch.topk(logits, top_k, dim=-1)
            topk_ids[start:stop] = ids
            topk_logp[start:stop] = values - lse[:, None]
    return TeacherScores(logp=logp, topk_ids=topk_ids, topk_logp=topk_logp, entropy=entropy)


@dataclass
class FullVocabKL:
    """Exact per-position divergences between two next-token distributions (all detached, fp32 or wider)."""

    reverse: Tensor  # [N] KL(pi_S || pi_T) = sum_v pS(v) (log pS(v) - log pT(v))
    forward: Tensor  # [N] KL(pi_T || pi_S) = sum_v pT(v) (log pT(v) - log pS(v))
    student_logp: Tensor  # [N] log pi_S of the target token
    teacher_logp: Tensor  # [N] log pi_T of the target token


@torch.no_grad()
def full_vocab_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target_ids: Tensor,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> FullVocabKL:
    """Reverse and forward KL over the whole vocabulary at N positions, from both models' final hidden
    states ``[N, H_S]``, ``[N, H_T]`` and lm_heads ``[V, H_S]``, ``[V, H_T]`` (same device, same V).

    Sums over the vocabulary, not sampled estimates; ``chunk_size`` positions at a time, so at most a
    few ``[chunk, V]`` buffers exist at once. Also returns both log-probs of ``target_ids``.
    """
    n = student_hidden.shape[0]
    dtype = _score_dtype(student_hidden)
    inv_t = 1.0 / temperature
    out = FullVocabKL(*(torch.empty(n, dtype=dtype, device=student_hidden.device) for _ in range(4)))
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        s_lp = torch.log_softmax(_chunk_logits(student_hidden[start:stop], student_weight, inv_t).to(dtype), -1)
        t_lp = torch.log_softmax(_chunk_logits(teacher_hidden[start:stop], teacher_weight, inv_t).to(dtype), -1)
        target = target_ids[start:stop, None]
        out.student_logp[start:stop] = s_lp.gather(1, target).squeeze(1)
        out.teacher_logp[start:stop] = t_lp.gather(1, target).squeeze(1)
        diff = s_lp - t_lp  # log pS - log pT
        out.reverse[start:stop] = s_lp.exp_().mul_(diff).sum(-1)
        out.forward[start:stop] = -t_lp.exp_().mul_(diff).sum(-1)
    return out


class _ChunkedStudentScores(torch.autograd.Function):
    """Forward: log-probs of targets and of top-k ids, plus entropy. Backward: recompute logits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        target_ids: Tensor,
        gather_ids: Tensor,
        chunk_size: int,
        inv_temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, k = gather_ids.shape
        logp = torch.empty(n, dtype=_score_dtype(hidden), device=hidden.device)
        gathered = torch.empty(n, k, dtype=_score_dtype(hidden), device=hidden.device)
        entropy = torch.empty_like(logp)
        lse_all = torch.empty_like(logp)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:stop], weight, inv_temperature)
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[start:stop] = lse
            logp[start:stop] = logits.gather(1, target_ids[start:stop, None]).squeeze(1) - lse
            if k:
                gathered[start:stop] = logits.gather(1, gather_ids[start:stop]) - lse[:, None]
            entropy[start:stop] = _entropy(logits, lse)
        ctx.save_for_backward(hidden, weight, target_ids, gather_ids, lse_all)
        ctx.chunk_size = chunk_size
        ctx.inv_temperature = inv_temperature
        ctx.mark_non_differentiable(entropy)
        return logp, gathered, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_gathered: Tensor, _grad_entropy: Tensor):  # type: ignore[override]
        hidden, weight, target_ids, gather_ids, lse_all = ctx.saved_tensors
        inv_t = ctx.inv_temperature
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=_score_dtype(weight), device=weight.device) if need_weight else None
        )
        k = gather_ids.shape[1]
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:stop]
            # d log p_j / d z = onehot(j) - softmax(z), for the target and each gathered id; built in
            # place in the chunk's logits buffer, so backward holds one [chunk, V] tensor.
            grad_logits = _chunk_logits(h, weight, inv_t)
            grad_logits.sub_(lse_all[start:stop, None]).exp_()  # softmax probabilities
            g_target = grad_logp[start:stop].to(grad_logits.dtype)
            g_total = g_target
            if k:
                g_gathered = grad_gathered[start:stop].to(grad_logits.dtype)
                g_total = g_total + g_gathered.sum(-1)
            grad_logits.mul_(-g_total[:, None])
            grad_logits.scatter_add_(1, target_ids[start:stop, None], g_target[:, None])
            if k:
                grad_logits.scatter_add_(1, gather_ids[start:stop], g_gathered)
            if inv_t != 1.0:
                grad_logits.mul_(inv_t)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ weight
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def student_scores(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    gather_ids: Tensor | None = None,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable student statistics at N flattened response positions.

    Returns ``(logp [N], gathered_logp [N, k], entropy [N])``: the full-vocabulary log-prob of each
    target, the full-vocabulary log-probs at ``gather_ids`` (the teacher's top-k ids), and the
    (non-differentiable) entropy. Gradients flow to ``hidden`` and ``weight`` through a recomputing
    backward, so no ``[N, V]`` tensor outlives one chunk.
    """
    if gather_ids is None:
        gather_ids = torch.empty(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
    return _ChunkedStudentScores.apply(hidden, weight, target_ids, gather_ids, chunk_size, 1.0 / temperature)


def naive_scores(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, gather_ids: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference implementation with a full log-softmax (tests and benchmarks only)."""
    logits = (hidden @ weight.t()).to(_score_dtype(hidden)) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return (
        logprobs.gather(1, target_ids[:, None]).squeeze(1),
        logprobs.gather(1, gather_ids),
        entropy.detach(),
    )


class _ChunkedGeneralizedJSD(torch.autograd.Function):
    """Per-token full-vocabulary generalized JSD from both models' hidden states, chunked.

    Neither model's ``[N, V]`` logits exist at once: each chunk's student and teacher logits are
    computed, reduced to a per-token loss and dropped; backward recomputes them chunk by chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        beta: float,
        chunk_size: int,
        inv_temperature: float,
    ) -> Tensor:
        n = student_hidden.shape[0]
        out = torch.empty(n, dtype=_score_dtype(student_hidden), device=student_hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            s_lp = torch.log_softmax(_chunk_logits(student_hidden[start:stop], student_weight, inv_temperature), -1)
            t_lp = torch.log_softmax(_chunk_logits(teacher_hidden[start:stop], teacher_weight, inv_temperature), -1)
            out[start:stop] = generalized_jsd(s_lp, t_lp.to(s_lp.dtype), beta=beta)
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight)
        ctx.beta, ctx.chunk_size, ctx.inv_temperature = beta, chunk_size, inv_temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        s_hidden, s_weight, t_hidden, t_weight = ctx.saved_tensors
        inv_t = ctx.inv_temperature
        grad_hidden = torch.zeros_like(s_hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(s_weight.shape, dtype=_score_dtype(s_weight), device=s_weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, s_hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, s_hidden.shape[0])
            h = s_hidden[start:stop]
            with torch.no_grad():
                t_lp = torch.log_softmax(_chunk_logits(t_hidden[start:stop], t_weight, inv_t), -1)
            with torch.enable_grad():
                logits = _chunk_logits(h, s_weight, 1.0).detach().requires_grad_(True)
                s_lp = torch.log_softmax(logits * inv_t, -1)
                loss = generalized_jsd(s_lp, t_lp.to(s_lp.dtype), beta=ctx.beta)
                (grad_logits,) = torch.autograd.grad(loss, logits, grad_out[start:stop].to(loss.dtype))
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ s_weight
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(s_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def generalized_jsd_chunked(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    beta: float = 0.5,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token generalized JSD ``[N]`` (GKD's loss) with O(chunk x V) memory; grads reach the student only."""
    return _ChunkedGeneralizedJSD.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        beta,
        chunk_size,
        1.0 / temperature,
    )


# ---------------------------------------------------------------------------------------------
# The models' forwards at response positions: hidden states, the scorers the trainer runs, their adapters


def response_hidden(model: PreTrainedModel, batch: RolloutBatch) -> Tensor:
    """Final hidden states that predict each response token, flattened to ``[N, H]`` (N = valid tokens)."""
    return _response_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_len, batch.response_mask)


def _response_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, response_mask: Tensor
) -> Tensor:
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model.get_decoder()(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, prompt_len - 1 : -1]  # position t-1 predicts token t
    return hidden[response_mask]


class StudentScorer(nn.Module):
    """The student's training forward: backbone, then chunked lm_head scoring at response positions.

    One module, so that under FSDP its root (embeddings, final norm, lm_head) is gathered for the whole
    forward and backward, like any model forward. ``bf16``: the backbone runs under bf16 autocast and
    the lm_head projection in bf16 (log-softmax in fp32); the fp32 weights stay the optimizer's.
    """

    def __init__(self, model: PreTrainedModel, *, chunk_size: int, temperature: float, bf16: bool) -> None:
        super().__init__()
        self.model = model
        self.chunk_size, self.temperature, self.bf16 = chunk_size, temperature, bf16

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prompt_len: int,
        gather_ids: Tensor | None = None,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        gkd_beta: float = 0.5,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(logp [N], gathered [N, k], entropy [N], generalized JSD [N] or None)`` at response tokens."""
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16 and device_type in ("cuda", "cpu")):
            hidden = _response_hidden(self.model, input_ids, attention_mask, prompt_len, response_mask)
        weight = lm_head_weight(self.model)  # type: ignore[arg-type]
        if self.bf16:
            hidden = hidden.to(torch.bfloat16)
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)  # differentiable cast: gradients reach the fp32 weight
        targets = input_ids[:, prompt_len:][response_mask]
        logp, gathered, entropy = student_scores(
            hidden, weight, targets, gather_ids, chunk_size=self.chunk_size, temperature=self.temperature
        )
        full = None
        if teacher_hidden is not None and teacher_weight is not None:
            full = generalized_jsd_chunked(
                hidden,
                weight,
                teacher_hidden,
                teacher_weight,
                beta=gkd_beta,
                chunk_size=self.chunk_size,
                temperature=self.temperature,
            )
        return logp, gathered, entropy, full


class TeacherScorer(nn.Module):
    """The teacher's scoring forward (no gradients), as one module so that a sharded teacher gathers its root."""

    def __init__(
        self, model: PreTrainedModel, *, chunk_size: int, temperature: float, vocab: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size, self.temperature = chunk_size, temperature
        self.vocab = vocab  # score over the first `vocab` lm_head rows (the student's; None = all)

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prompt_len: int,
        top_k: int,
        keep_weight: bool = False,
    ) -> tuple[TeacherScores, Tensor, Tensor | None]:
        """Teacher statistics at response tokens, its hidden states there and, with ``keep_weight``, a copy of
        its lm_head (GKD; a copy because a sharded teacher frees its gathered weights after forward)."""
        hidden = _response_hidden(self.model, input_ids, attention_mask, prompt_len, response_mask)
        weight = lm_head_weight(self.model)  # type: ignore[arg-type]
        if self.vocab is not None and weight.shape[0] > self.vocab:
            weight = weight[: self.vocab]
        targets = input_ids[:, prompt_len:][response_mask]
        scores = teacher_scores(
            hidden, weight, targets, top_k=top_k, chunk_size=self.chunk_size, temperature=self.temperature
        )
        return scores, hidden, weight.detach().clone() if keep_weight else None

    def lm_forward(self, **kwargs: Any) -> Any:
        """The wrapped model's own forward (sampling guidance prefixes); under FSDP a registered forward method."""
        return self.model(**kwargs)


class ForwardAdapter:
    """What the sampling loop needs from a model (``__call__``, ``eval``/``train``), for a teacher that is
    sharded (calls go through :meth:`TeacherScorer.lm_forward`) or on another device (inputs moved there,
    logits moved back)."""

    def __init__(self, forward: Any, device: torch.device, home: torch.device) -> None:
        self.forward, self.device, self.home = forward, device, home
        self.training = False

    def __call__(self, **kwargs: Any) -> Any:
        moved = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        out = self.forward(**moved)
        if self.device != self.home:
            out.logits = out.logits.to(self.home)
        return out

    def eval(self) -> ForwardAdapter:
        return self

    def train(self, mode: bool = True) -> ForwardAdapter:
        return self


def to_grid(values: Tensor, mask: Tensor) -> Tensor:
    """Scatter flattened per-token values ``[N, ...]`` back to ``[b, T, ...]`` (zeros elsewhere)."""
    out = values.new_zeros(tuple(mask.shape) + tuple(values.shape[1:]))
    out[mask] = values
    return out


def lm_head_weight(model: PreTrainedModel) -> Tensor:
    return model.get_output_embeddings().weight
