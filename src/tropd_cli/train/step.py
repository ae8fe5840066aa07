"""One optimizer step: rollout -> teacher scores -> (frozen log-probs) -> loss -> backward -> update.

:func:`train_step` reads as the step does, one timed phase per line; the functions below it are the phases.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tropd_cli import distributed as D
from tropd_cli.batch import RolloutBatch, TeacherScores
from tropd_cli.distributed import SINGLE, Dist
from tropd_cli.errors import UserError
from tropd_cli.rng import generator
from tropd_cli.rollout import vllm
from tropd_cli.train import losses
from tropd_cli.train.generate import make_batch
from tropd_cli.train.methods import TokenInputs
from tropd_cli.train.scoring import to_grid
from tropd_cli.train.setup import Run

log = logging.getLogger(__name__)

#: A micro-batch's teacher statistics, and (GKD) the teacher's hidden states and lm_head on the student's device.
Teacher = tuple[TeacherScores, Tensor | None, Tensor | None]


def train_step(run: Run, step: int) -> dict[str, float]:
    """One training step: rollouts, teacher scoring, then ``ppo_epochs x mini_batches`` optimizer steps.

    Returns the step's metrics (means over every rank's tokens) and one ``time_<phase>`` per phase.
    """
    cfg, timer = run.cfg, PhaseTimer()
    with timer("time_generate"):  # 1. the student's rollouts (with the teacher's guidance prefixes)
        batch = make_batch(run, step)
    split = split_step(batch, cfg.method.mini_batches, cfg.optim.micro_batches, run.dist)
    # One draw of trust-region noise per rollout batch, keyed by (seed, step): micro-batches and PPO epochs share it.
    noise = torch.rand(batch.response_mask.shape, generator=generator(cfg.seed, step, 5, *run.rank_keys()))
    noise = noise.to(run.device)
    with timer("time_teacher"):  # 2. the teacher's log-probs (top-k, entropy) at the response positions
        teacher = [score_teacher(run, batch.rows(p)) for p in split.parts]
        run.samplers.after_teacher_scoring()
    keep_fraction = run.method.keep_fraction(cfg, step)
    old_logp: list[Tensor | None] = [None] * len(split.parts)
    keep = None
    if cfg.method.ppo_epochs > 1 or len(split.minis) > 1 or keep_fraction is not None:
        with timer("time_old_logp"):  # 3. rollout-time log-probs, frozen before the first update
            old_logp, keep = frozen_logp(run, batch, split, keep_fraction)
    metrics, updates = Metrics(), Updates(lr=float(run.scheduler.get_last_lr()[0]))
    for epoch in range(cfg.method.ppo_epochs):  # 4. loss -> backward -> clipped update, per mini-batch
        for j, mini in enumerate(split.minis):
            run.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for p in mini:
                i = split.parts.index(p)
                with timer.add("time_student_fwd"):
                    loss = micro_loss(
                        run, batch.rows(p), teacher[i], old_logp[i], None if keep is None else keep[p], noise[p],
                        step, split.mini_tokens[j], split.mini_seqs[j], metrics if epoch == 0 else None,
                    )  # fmt: skip
                with timer.add("time_student_bwd"):
                    # FSDP averages gradients over ranks; each rank's loss is its share of the global mean, so
                    # scaling by the world size makes the reduced gradient that of the global mean.
                    (loss * run.dist.world_size if run.dist.enabled else loss).backward()
                step_loss += float(loss.detach())
            step_loss = D.all_reduce([step_loss], run.dist)[0]
            with timer.add("time_optimizer"):
                updates.record(optimizer_step(run, step_loss), step_loss)
    run.scheduler.step()
    return {**metrics.means(run.dist), **updates.summary(step, split), **timer.totals("time_step")}


# ---------------------------------------------------------------------------------------------
# The phases


@dataclass
class Split:
    """A step's rows cut into micro-batches (``parts``) and mini-batches of them (``minis``: one update each), and
    the global token and sequence counts every rank divides its loss by."""

    parts: list[slice]
    minis: list[list[slice]]
    mini_tokens: list[float]
    mini_seqs: list[float]
    tokens: float
    seqs: float
    prefix_tokens: float


def _slices(n: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def split_step(batch: RolloutBatch, mini_batches: int, micro_batches: int, dist: Dist = SINGLE) -> Split:
    """The loss is a mean over the step's tokens (or sequences) on *all* ranks: one all-reduce of the counts per
    step, then each rank's share is its own sum over the global count."""
    n_seqs = batch.response_mask.shape[0]
    parts = _slices(n_seqs, mini_batches * micro_batches)
    minis = [parts[s] for s in _slices(len(parts), mini_batches)]
    mini_rows = [slice(mini[0].start, mini[-1].stop) for mini in minis]
    counts = D.all_reduce(
        [float(batch.response_mask[r].sum()) for r in mini_rows]
        + [float(r.stop - r.start) for r in mini_rows]
        + [float(batch.response_mask.sum()), float(n_seqs), float(batch.prefix_mask.sum())],
        dist,
    )
    k = len(minis)
    return Split(parts, minis, counts[:k], counts[k : 2 * k], *counts[2 * k :])


def score_teacher(run: Run, mb: RolloutBatch) -> Teacher:
    """Teacher statistics at a micro-batch's response positions (and its hidden states and lm_head for GKD)."""
    top_k = min(run.cfg.method.top_k, run.vocab) if run.method.needs_topk else 0
    engine = run.samplers.scoring_engine
    if engine is not None:  # rollout.vllm.teacher_scoring (validated: not gkd/eopd, temperature 1)
        run.samplers.before_teacher_scoring()
        sequences, start = vllm.scoring_sequences(mb)
        scores = engine.teacher_scores(
            sequences, start, top_k=top_k, temperature=run.scoring_temperature, device=run.device
        )
        return scores, None, None
    dev = run.teacher_device
    assert run.teacher_scorer is not None  # a served teacher is the scoring engine above
    scores, hidden, weight = run.teacher_scorer(
        mb.input_ids.to(dev),
        mb.attention_mask.to(dev),
        mb.response_mask.to(dev),
        mb.prompt_len,
        top_k,
        run.method.full_vocab,
    )
    if dev != run.device:
        scores = TeacherScores(
            *(t.to(run.device) for t in (scores.logp, scores.topk_ids, scores.topk_logp, scores.entropy))
        )
    if not run.method.full_vocab:
        return scores, None, None
    # GKD needs the teacher's whole distribution: its hidden states and (gathered) lm_head on our device.
    assert weight is not None
    return scores, hidden.to(run.device), weight.to(run.device)


def score_student(
    run: Run, mb: RolloutBatch, gather_ids: Tensor | None, teacher: tuple[Tensor | None, Tensor | None] = (None, None)
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The student's log-probs of the response tokens, at ``gather_ids`` (top-k), its entropy, (GKD) the JSD."""
    return run.scorer(  # type: ignore[no-any-return]
        mb.input_ids,
        mb.attention_mask,
        mb.response_mask,
        mb.prompt_len,
        gather_ids,
        teacher[0],
        teacher[1],
        run.cfg.method.gkd_beta,
    )


def frozen_logp(
    run: Run, batch: RolloutBatch, split: Split, keep_fraction: float | None
) -> tuple[list[Tensor | None], Tensor | None]:
    """Rollout-time log-probs per micro-batch, frozen before the first update (PPO epochs, mini-batches), and
    (entropy-OPD) the mask of the step's ``keep_fraction`` highest-entropy student tokens."""
    old_logp: list[Tensor | None] = []
    entropy_grid = torch.zeros(batch.response_mask.shape, device=run.device)
    with torch.no_grad():
        for p in split.parts:
            mb = batch.rows(p)
            logp_flat, _, ent_flat, _ = score_student(run, mb, None)
            old_logp.append(logp_flat)
            entropy_grid[p] = to_grid(ent_flat, mb.response_mask)
    keep = None
    if keep_fraction is not None:
        keep = top_fraction(run, entropy_grid, batch.response_mask & ~batch.prefix_mask, keep_fraction)
    return old_logp, keep


def top_fraction(run: Run, scores: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """:func:`losses.top_fraction_mask` over the step's tokens on every rank (one global threshold)."""
    if not run.dist.enabled:
        return losses.top_fraction_mask(scores, valid, fraction)
    everyone = torch.cat(D.gather_object(scores[valid.bool()].float().cpu(), run.dist)).to(scores.device)
    return losses.top_fraction_mask(scores, valid, fraction, pool=everyone)


def micro_loss(
    run: Run,
    mb: RolloutBatch,
    teacher: Teacher,
    old_logp_flat: Tensor | None,
    keep_mask: Tensor | None,
    noise: Tensor,
    step: int,
    total_tokens: float,
    total_seqs: float,
    metrics: Metrics | None,
) -> Tensor:
    """Student forward on one micro-batch and its share of the optimizer step's loss."""
    cfg = run.cfg
    tscores, t_hidden, t_weight = teacher
    mask = mb.response_mask
    logp_flat, topk_flat, entropy_flat, jsd_flat = score_student(
        run, mb, tscores.topk_ids if run.method.needs_topk else None, (t_hidden, t_weight)
    )
    full_vocab = to_grid(jsd_flat, mask) if jsd_flat is not None else None
    logp = to_grid(logp_flat, mask)
    # Without a pre-pass this is the first and only pass on-policy: rollout-time log-prob == logp.
    old_logp = logp.detach() if old_logp_flat is None else to_grid(old_logp_flat, mask)
    teacher_logp = to_grid(tscores.logp, mask)
    reward = losses.k1_reward(old_logp, teacher_logp)
    student_mask = mask & ~mb.prefix_mask
    trust = losses.trust_region_mask(
        reward, tau=cfg.trust_region.tau, kind=cfg.trust_region.kind, uniform=noise, valid=student_mask
    )
    inputs = TokenInputs(
        logp=logp,
        old_logp=old_logp,
        teacher_logp=teacher_logp,
        student_topk_logp=to_grid(topk_flat, mask) if run.method.needs_topk else None,
        teacher_topk_logp=to_grid(tscores.topk_logp, mask) if tscores.topk_ids.shape[-1] else None,
        teacher_entropy=to_grid(tscores.entropy, mask),
        student_entropy=to_grid(entropy_flat, mask),
        trust_mask=trust,
        prefix_mask=mb.prefix_mask,
        response_mask=mask,
        keep_mask=keep_mask,
        full_vocab_loss=full_vocab,
    )
    out = run.method.fn(inputs, cfg, step)
    per_token = out.loss
    if mb.sampler_logp is not None:  # the sampler is not the trained module: weigh by pi_trainer / pi_sampler
        sampler_logp = mb.sampler_logp.to(old_logp.device)
        weights, capped = losses.importance_weights(
            old_logp, sampler_logp, student_mask, mode=run.is_correction, cap=cfg.rollout.is_cap
        )
        per_token = per_token * weights
    loss = aggregate(per_token, mask, total_tokens, total_seqs, cfg.method.aggregation)
    # The losses map non-finite log-probs to finite values (padding holds -inf); a non-finite value at a real
    # token means a broken model or overflow, so the whole update must be skipped, not masked.
    if not bool(torch.isfinite(tscores.logp).all() & torch.isfinite(logp_flat.detach()).all()):
        loss = loss * math.nan
    if metrics is not None:
        metrics.add("reward_mean", reward, student_mask)
        metrics.add("rkl_estimate", -reward, student_mask)
        metrics.add("trust_fraction", trust.float(), student_mask)
        metrics.add("outlier_loss", out.outlier_loss, student_mask & ~trust)
        if inputs.teacher_topk_logp is not None:
            metrics.add("teacher_topk_mass", inputs.teacher_topk_logp.exp().sum(-1), student_mask)
        if keep_mask is not None:
            metrics.add("kept_fraction", keep_mask.float(), student_mask)
        metrics.add("student_entropy", inputs.student_entropy, mask)
        metrics.add("teacher_entropy", inputs.teacher_entropy, mask)
        metrics.add("teacher_nll", -teacher_logp, mask)
        if mb.sampler_logp is not None:
            metrics.add("sampler_kl", losses.sampler_kl(old_logp, sampler_logp), student_mask)
            metrics.add("is_capped", capped.float(), student_mask)
            metrics.add("is_weight", weights, student_mask)
    return loss


def aggregate(per_token: Tensor, mask: Tensor, total_tokens: float, n_seqs: float, how: str) -> Tensor:
    """Reduce one micro-batch's per-token loss so that micro-batches sum to the step's mean."""
    if how == "token_mean":
        return losses.masked_mean(per_token, mask, total=total_tokens)
    # seq_mean_token_mean: mean over each sequence's tokens, then over all sequences of the step.
    per_seq = torch.where(mask, per_token, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_seq.sum() / n_seqs


def optimizer_step(run: Run, loss: float) -> float:
    """Clip and apply the accumulated gradients; returns the gradient norm. A non-finite loss or gradient norm
    skips the update (gradients dropped, weights untouched) and returns NaN; so does an update that made a
    weight non-finite (``optim.guard_updates``: the weights from before it are put back)."""
    params = [p for p in run.student.model.parameters() if p.requires_grad]
    max_norm = run.cfg.optim.max_grad_norm if run.cfg.optim.max_grad_norm > 0 else math.inf
    grad_norm = float(D.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))  # global under FSDP
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        log.warning("non-finite loss (%s) or gradient norm (%s): update skipped", loss, grad_norm)
        return math.nan
    before = [local(p).detach().clone() for p in params] if run.cfg.optim.guard_updates else None
    run.optimizer.step()
    if D.any_rank(not all_finite(params), run.dist):
        if before is None:
            raise UserError(
                "an update made the student's weights non-finite (optim.guard_updates=false, so they cannot be put "
                "back); nothing was saved from this step: lower optim.lr or use a float32 student, then resume"
            )
        with torch.no_grad():
            for p, saved in zip(params, before, strict=True):
                local(p).copy_(saved)
        log.warning("the update made weights non-finite (gradient norm %s): rolled back", grad_norm)
        return math.nan
    return grad_norm


def local(p: Tensor) -> Tensor:
    """A parameter's tensor on this rank (its shard under FSDP)."""
    to_local = getattr(p, "to_local", None)
    return p if to_local is None else to_local()


def all_finite(params: Sequence[Tensor]) -> bool:
    """Whether every element of every parameter (this rank's shards) is finite."""
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(local(p)).all() for p in params]).all()) if params else True


# ---------------------------------------------------------------------------------------------
# What a step reports


class Metrics:
    """Masked sums and counts across micro-batches, reduced to means at the end of a step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, values: Tensor, mask: Tensor) -> None:
        mask = mask.bool()
        self.sums[name] += float(torch.where(mask, values.detach().float(), 0.0).sum())
        self.counts[name] += float(mask.sum())

    def means(self, info: Dist = SINGLE) -> dict[str, float]:
        """Means over every rank's tokens (one all-reduce of all sums and counts)."""
        keys = sorted(self.sums)
        totals = D.all_reduce([self.sums[k] for k in keys] + [self.counts[k] for k in keys], info)
        sums, counts = totals[: len(keys)], totals[len(keys) :]
        return {k: (s / c if c else 0.0) for k, s, c in zip(keys, sums, counts, strict=True)}


@dataclass
class Updates:
    """The optimizer updates of a step: their losses and gradient norms; a NaN norm is a skipped update."""

    lr: float
    grad_norms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped: int = 0

    def record(self, grad_norm: float, loss: float) -> None:
        if math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
            self.losses.append(loss)
        else:
            self.skipped += 1

    def summary(self, step: int, split: Split) -> dict[str, float]:
        return {
            "step": step + 1,
            "loss": sum(self.losses) / len(self.losses) if self.losses else math.nan,
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else math.nan,
            "lr": self.lr,
            "optimizer_steps": float(len(self.grad_norms)),
            "skipped_updates": float(self.skipped),
            "prefix_len": split.prefix_tokens / split.seqs,
            "response_len": split.tokens / split.seqs,
            "tokens": split.tokens,
        }


class PhaseTimer:
    """Wall-clock seconds per phase (``time_<phase>``), and the whole step since the timer was made."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] += time.perf_counter() - t

    add = __call__  # phases that run many times in a step add up

    def totals(self, total: str) -> dict[str, float]:
        return {total: time.perf_counter() - self.start, **self.times}
