"""The training loop, top to bottom: rollout -> score -> loss -> step -> log -> checkpoint.

Engine code: no Hydra, no printing. The command layer passes a :class:`TrainConfig` and hooks that
draw progress and write logs.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tropd_cli import distributed as D
from tropd_cli.batch import RolloutBatch, TeacherScores
from tropd_cli.config import TrainConfig
from tropd_cli.data import Example, dataset_prompts, examples_from_config, sft_target
from tropd_cli.device import fast_bf16, resolve_device, resolve_dtype
from tropd_cli.distributed import SINGLE, Dist
from tropd_cli.errors import UserError
from tropd_cli.evals.engine import SuiteTasks, evaluate, load_suites
from tropd_cli.models import LoadedModel, default_cache_dir, load_pair, merge_lora, save_adapter, shared_vocab
from tropd_cli.rng import generator, seeded
from tropd_cli.rollout import vllm as vllm_backend
from tropd_cli.rollout.sampling import prefix_cap, rollout, tokenize_prompts
from tropd_cli.train import checkpoint, heldout, losses
from tropd_cli.train.methods import TokenInputs, get_method
from tropd_cli.train.scoring import ForwardAdapter, StudentScorer, TeacherScorer, to_grid

log = logging.getLogger(__name__)


class TrainHooks(Protocol):
    """What the command layer gets told (progress bars, metric files, wandb)."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


class NoHooks:
    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False  # stopped early on request; ``checkpoint`` is then the resumable one


# ---------------------------------------------------------------------------------------------
# Data order


class PromptOrder:
    """Prompts in a fresh seeded permutation each epoch; batch ``s`` is a pure function of (seed, s)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def batch(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=generator(self.seed, epoch, 17))
            out.append(int(perm[offset]))
        return out


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


# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint atomically: a temp dir beside ``path``, then one rename.

    ``state_dict``: the weights to write instead of the model's own (the gathered weights of a sharded model).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _micro_batches(n: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class Trainer:
    """Holds models, optimizer and data for a run; :meth:`step` does one optimizer step."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        teacher: LoadedModel,
        student: LoadedModel,
        examples: list[Example],
        dist: Dist = SINGLE,
        work_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.work_dir = work_dir  # where vLLM engines read their starting weights (a temp dir when None)
        self.teacher, self.student = teacher, student
        self.tokenizer = student.tokenizer
        self.device = next(student.model.parameters()).device
        self.teacher_device = next(teacher.model.parameters()).device
        self.method = get_method(cfg)
        vocab = self.vocab = shared_vocab(teacher, student)  # teacher rows beyond it (lm_head padding): not scored
        if self.method.needs_topk and cfg.method.top_k > vocab:
            # Top-k over more ids than exist is top-V: the full-vocabulary forward KL (e.g. a k=512 grid row on the
            # 100-token char lab). Said once, loudly, since a typo in k lands here too.
            log.warning(
                "method.top_k=%d is larger than the vocabulary (%d tokens): scoring all %d tokens (full forward KL)",
                cfg.method.top_k,
                vocab,
                vocab,
            )
        D.require_even_split(cfg.rollout.batch_size, dist)
        self.examples = examples
        self.prompts = dataset_prompts(self.tokenizer, examples, cfg.dataset)
        self.order = PromptOrder(len(examples), cfg.rollout.batch_size, cfg.seed)
        self.scoring_temperature = cfg.rollout.scoring_temperature or cfg.rollout.temperature
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.device.type == "cuda" and fast_bf16("cuda")
        )
        # Parameter counts before sharding (a shard counts only its part).
        self.n_params = tuple(sum(p.numel() for p in m.model.parameters()) for m in (teacher, student))
        self.teacher_engine: Any = None
        self._engine_dir: Path | None = None
        if cfg.rollout.backend == "vllm":
            self.sampler = self._make_engines()  # before sharding: saved from the full student
        else:
            self.sampler = self._make_sampler()  # before sharding: a full copy of the student
        self.scorer = StudentScorer(
            student.model,
            chunk_size=cfg.scoring.chunk_size,
            temperature=self.scoring_temperature,
            bf16=self.bf16 and not dist.enabled,  # under FSDP, its mixed-precision policy does this
        )
        self.teacher_scorer = TeacherScorer(
            teacher.model, chunk_size=cfg.scoring.chunk_size, temperature=self.scoring_temperature, vocab=vocab
        )
        shard_teacher = dist.enabled and cfg.distributed.shard_teacher
        if dist.enabled:
            D.shard(
                self.scorer,
                student.model,
                bf16=self.bf16,
                reshard_after_forward=cfg.distributed.reshard_after_forward,
                trainable=True,
            )
            if shard_teacher:
                D.shard(
                    self.teacher_scorer,
                    teacher.model,
                    bf16=False,
                    reshard_after_forward=cfg.distributed.reshard_after_forward,
                    trainable=False,
                )
                D.register_forward_method(self.teacher_scorer, "lm_forward")
        # What samples guidance prefixes (and SFT teacher responses): the teacher itself, or an adapter when
        # it is sharded or lives on another device.
        self.teacher_sampler: Any = teacher.model
        if shard_teacher or self.teacher_device != self.device:
            if cfg.rollout.backend == "generate":
                raise UserError(
                    "rollout.backend=generate needs the teacher whole on the student's device; use rollout.backend=loop "
                    "with distributed.shard_teacher or teacher_device"
                )
            forward = self.teacher_scorer.lm_forward if shard_teacher else teacher.model
            self.teacher_sampler = ForwardAdapter(forward, self.teacher_device, self.device)
        params = [p for p in student.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        if self.scoring_temperature != cfg.rollout.temperature:
            log.warning(
                "rollout.temperature=%s but scoring at %s: rewards are then not on-policy log-ratios",
                cfg.rollout.temperature,
                self.scoring_temperature,
            )

    def _rank_keys(self) -> tuple[int, ...]:
        """Extra seed keys that give each rank its own randomness (none in a single process)."""
        return (1_000_003, self.dist.rank) if self.dist.enabled else ()

    # -- rollout ------------------------------------------------------------------------------
    def _make_sampler(self) -> PreTrainedModel:
        """The model rollouts are sampled from: the student itself, or a low-precision copy of it.

        A bf16 copy samples faster; it is re-synced from the fp32 student before every rollout, and
        the trainer still scores ``old_logp`` with the fp32 student.
        """
        model = self.student.model
        dtype = resolve_dtype(self.cfg.rollout.sampler_dtype, self.device, frozen=True)
        if dtype == next(model.parameters()).dtype and not self.dist.enabled:
            return model
        sampler = copy.deepcopy(model).to(dtype)  # type: ignore[arg-type]
        sampler.requires_grad_(False)
        return sampler.eval()

    def _make_engines(self) -> Any:
        """``rollout.backend=vllm``: a colocated vLLM engine of the student (and of the teacher with
        ``rollout.vllm.teacher_scoring``), started from the weights saved here once and asleep until used."""
        cfg, v = self.cfg, self.cfg.rollout.vllm
        root = Path(D.broadcast_object(str(self.work_dir or tempfile.mkdtemp(prefix="tropd-vllm-")), self.dist))
        self._engine_dir = root
        common: dict[str, Any] = dict(
            dtype=v.dtype,
            max_model_len=v.max_model_len or cfg.dataset.max_prompt_tokens + cfg.rollout.max_new_tokens,
            seed=cfg.seed,
            enable_sleep_mode=v.enable_sleep_mode,
            tensor_parallel_size=v.tensor_parallel_size,
            max_logprobs=v.max_logprobs,
            enforce_eager=v.enforce_eager,
        )
        writes = cfg.guidance.enabled or (cfg.method.name == "sft" and cfg.method.sft_source == "teacher")
        want_teacher = v.teacher_scoring or (v.teacher_prefixes and writes)
        if self.dist.is_main:
            save_checkpoint(self.student.model, self.tokenizer, root / "student")
            if want_teacher:
                save_checkpoint(self.teacher.model, self.teacher.tokenizer, root / "teacher")
        D.barrier(self.dist)
        engine = vllm_backend.VLLMEngine(root / "student", gpu_memory_utilization=v.gpu_memory_utilization, **common)
        if v.enable_sleep_mode:
            engine.sleep()
        if want_teacher:
            self.teacher_engine = vllm_backend.VLLMEngine(
                root / "teacher", gpu_memory_utilization=v.teacher_gpu_memory_utilization, **common
            )
            if v.enable_sleep_mode:
                self.teacher_engine.sleep()
        return engine

    def close(self) -> None:
        """Shut down vLLM engines and remove the weights they started from (the end of a run)."""
        if not self.uses_engine:
            return
        for engine in (self.sampler, self.teacher_engine):
            if engine is not None:
                engine.close()
        if self.dist.is_main and self._engine_dir is not None:
            shutil.rmtree(self._engine_dir, ignore_errors=True)

    def _after_prefixes(self, prefixes_by_engine: bool) -> Any:
        """What runs once the teacher's prefixes are written, before the student's engine wakes: the teacher
        engine goes to sleep, or (HF teacher) torch's cached KV blocks of the prefixes are given back."""
        if prefixes_by_engine and self.cfg.rollout.vllm.enable_sleep_mode:
            return self.teacher_engine.sleep
        if self.uses_engine and self.device.type == "cuda":
            return torch.cuda.empty_cache
        return None

    @property
    def prefixes_by_engine(self) -> bool:
        """Does the teacher engine write what the teacher writes (guidance prefixes, SFT targets)?"""
        return self.teacher_engine is not None and self.cfg.rollout.vllm.teacher_prefixes

    @property
    def scores_by_engine(self) -> bool:
        return self.teacher_engine is not None and self.cfg.rollout.vllm.teacher_scoring

    @property
    def uses_engine(self) -> bool:
        return self.cfg.rollout.backend == "vllm"

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        if self.uses_engine:
            # Whole tensors, gathered from the shards under FSDP (collective; the same order on every rank).
            self.sampler.load_weights(
                (name, D.full_tensor(param.detach())) for name, param in self.student.model.named_parameters()
            )
            return
        if self.sampler is not self.student.model:
            # Under FSDP each parameter is gathered from its shards (a collective, same order on every rank).
            for dst, src in zip(self.sampler.parameters(), self.student.model.parameters(), strict=True):
                dst.copy_(D.full_tensor(src.detach()))

    def make_batch(self, step: int) -> RolloutBatch:
        cfg = self.cfg
        index = self.order.batch(step)
        per_rank = len(index) // self.dist.world_size
        index = index[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]  # this rank's prompts
        n = cfg.rollout.n_samples_per_prompt
        texts = [self.prompts[i] for i in index for _ in range(n)]
        prompt_index = torch.tensor([i for i in index for _ in range(n)], device=self.device)
        prompt_ids, prompt_mask = tokenize_prompts(
            self.tokenizer, texts, max_prompt_tokens=cfg.dataset.max_prompt_tokens, device=self.device
        )
        if not self.method.on_policy:
            return self._sft_batch(step, prompt_ids, prompt_mask, prompt_index)
        guided = None
        prefix_max = 0
        if cfg.guidance.enabled:
            # Steps run 0..S-1: anneal over S-1 so that the cap reaches 0 at the last step.
            prefix_max = prefix_cap(step, cfg.steps - 1, cfg.rollout.max_new_tokens, cfg.guidance.schedule)
            # One draw for the whole (global) batch, sliced per rank: the same rows are guided at any world size.
            draw = torch.rand(len(texts) * self.dist.world_size, generator=generator(cfg.seed, step, 3))
            draw = draw[self.dist.rank * len(texts) : (self.dist.rank + 1) * len(texts)]
            guided = (draw < cfg.guidance.fraction).to(self.device)
        prefixes_by_engine = self.prefixes_by_engine
        if self.uses_engine and self.device.type == "cuda":
            # Blocks torch cached during the last step's scoring and backward would sit beside the engines:
            # vLLM maps its memory outside torch's allocator, so give them back before the engines wake.
            torch.cuda.empty_cache()
        self._sync_sampler()
        batch = rollout(
            self.sampler,
            self.teacher_engine if prefixes_by_engine else self.teacher_sampler,
            self.tokenizer,
            prompt_ids,
            prompt_mask,
            prompt_index=prompt_index,
            max_new_tokens=cfg.rollout.max_new_tokens,
            min_new_tokens=cfg.rollout.min_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            seed=seeded(cfg.seed, step, *self._rank_keys()),
            prefix_max=prefix_max,
            prefix_sampling=cfg.guidance.prefix_sampling,
            guided_rows=guided,
            backend=cfg.rollout.backend,
            teacher_backend="vllm" if prefixes_by_engine else None,
            chunk_rows=cfg.rollout.generation_batch_size,
            # The teacher engine sleeps as soon as its prefixes are written: the student's engine then has
            # the room to itself.
            after_prefixes=self._after_prefixes(prefixes_by_engine),
        )
        if self.uses_engine and cfg.rollout.vllm.enable_sleep_mode:
            self.sampler.sleep()  # give its KV cache back before scoring and backward
        return batch

    def _sft_batch(self, step: int, prompt_ids: Tensor, prompt_mask: Tensor, prompt_index: Tensor) -> RolloutBatch:
        """SFT targets: the dataset's answers, or responses the teacher writes."""
        cfg = self.cfg
        if cfg.method.sft_source == "teacher":
            by_engine = self.prefixes_by_engine
            batch = rollout(
                self.teacher_engine if by_engine else self.teacher_sampler,
                None,
                self.tokenizer,
                prompt_ids,
                prompt_mask,
                prompt_index=prompt_index,
                max_new_tokens=cfg.rollout.max_new_tokens,
                min_new_tokens=0,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                seed=seeded(cfg.seed, step, *self._rank_keys()),
                backend="vllm" if by_engine else "loop" if cfg.rollout.backend == "vllm" else cfg.rollout.backend,
                chunk_rows=cfg.rollout.generation_batch_size,
            )
            if by_engine and cfg.rollout.vllm.enable_sleep_mode:
                self.teacher_engine.sleep()
            return batch
        eos = self.tokenizer.eos_token or ""
        answers = [sft_target(self.examples[int(i)], cfg.dataset.target_field) for i in prompt_index.tolist()]
        if any(a is None for a in answers):
            raise UserError(
                "method=sft with sft_source=dataset needs dataset answers; set dataset.answer_field "
                "(or dataset.target_field) or method.sft_source=teacher"
            )
        enc = self.tokenizer(
            [f"{a}{eos}" for a in answers],
            add_special_tokens=False,
            truncation=True,
            max_length=cfg.rollout.max_new_tokens,
            padding=True,
            return_tensors="pt",
            padding_side="right",
        )
        response_ids = enc["input_ids"].to(self.device)
        response_mask = enc["attention_mask"].to(self.device).bool()
        return RolloutBatch(
            input_ids=torch.cat([prompt_ids, response_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
            prompt_len=prompt_ids.shape[1],
            response_mask=response_mask,
            prefix_mask=torch.zeros_like(response_mask),
            prompt_index=prompt_index,
        )

    # -- one optimizer step ---------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """One training step: rollouts, teacher scoring, then ``ppo_epochs x mini_batches`` optimizer steps."""
        cfg = self.cfg
        times: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        batch = self.make_batch(step)
        times["time_generate"] = time.perf_counter() - t0

        n_seqs = batch.response_mask.shape[0]
        parts = _micro_batches(n_seqs, cfg.method.mini_batches * cfg.optim.micro_batches)
        minis = [parts[s] for s in _micro_batches(len(parts), cfg.method.mini_batches)]
        # One draw of trust-region noise per rollout batch, keyed by (seed, step): micro-batching and
        # PPO epochs see the same mask.
        noise_gen = generator(cfg.seed, step, 5, *self._rank_keys())
        noise = torch.rand(batch.response_mask.shape, generator=noise_gen).to(self.device)
        # The loss is a mean over the step's tokens (or sequences) on *all* ranks: one all-reduce of the
        # counts per optimizer step, then each rank's share is its own sum over the global count.
        mini_rows = [slice(mini[0].start, mini[-1].stop) for mini in minis]
        counts = D.all_reduce(
            [float(batch.response_mask[r].sum()) for r in mini_rows]
            + [float(r.stop - r.start) for r in mini_rows]
            + [float(batch.response_mask.sum()), float(n_seqs), float(batch.prefix_mask.sum())],
            self.dist,
        )
        mini_tokens, mini_seqs = counts[: len(minis)], counts[len(minis) : 2 * len(minis)]
        total_tokens, total_seqs, total_prefix = counts[2 * len(minis) :]

        t = time.perf_counter()
        teacher = [self._score_teacher(batch.rows(p)) for p in parts]
        if self.scores_by_engine and cfg.rollout.vllm.enable_sleep_mode:
            self.teacher_engine.sleep()
        times["time_teacher"] = time.perf_counter() - t

        # Rollout-time log-probs must be frozen before the first optimizer step when there is more than
        # one (PPO epochs, mini-batches) or when a batch-level statistic (entropy share) is needed.
        keep_fraction = self.method.keep_fraction(cfg, step)
        old_logp: list[Tensor | None] = [None] * len(parts)
        keep_grid = None
        if cfg.method.ppo_epochs > 1 or len(minis) > 1 or keep_fraction is not None:
            t = time.perf_counter()
            entropy_grid = torch.zeros(batch.response_mask.shape, device=self.device)
            with torch.no_grad():
                for i, p in enumerate(parts):
                    mb = batch.rows(p)
                    logp_flat, _, ent_flat, _ = self._score_student(mb, None)
                    old_logp[i] = logp_flat
                    entropy_grid[p] = to_grid(ent_flat, mb.response_mask)
            if keep_fraction is not None:
                keep_grid = self._top_fraction(entropy_grid, batch.response_mask & ~batch.prefix_mask, keep_fraction)
            times["time_old_logp"] = time.perf_counter() - t

        metrics = Metrics()
        grad_norms: list[float] = []
        losses_per_step: list[float] = []
        skipped = 0  # optimizer updates left out because their loss or gradient was not finite
        lr = float(self.scheduler.get_last_lr()[0])
        for epoch in range(cfg.method.ppo_epochs):
            for j, mini in enumerate(minis):
                tokens, seqs = mini_tokens[j], mini_seqs[j]
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for p in mini:
                    i = parts.index(p)
                    t = time.perf_counter()
                    loss = self._micro_loss(
                        batch.rows(p),
                        teacher[i],
                        old_logp[i],
                        None if keep_grid is None else keep_grid[p],
                        noise[p],
                        step,
                        tokens,
                        seqs,
                        metrics if epoch == 0 else None,
                    )
                    times["time_student_fwd"] += time.perf_counter() - t
                    t = time.perf_counter()
                    # FSDP averages gradients over ranks; each rank's loss is its share of the global mean,
                    # so scaling by the world size makes the reduced gradient that of the global mean.
                    (loss * self.dist.world_size if self.dist.enabled else loss).backward()
                    times["time_student_bwd"] += time.perf_counter() - t
                    step_loss += float(loss.detach())
                step_loss = D.all_reduce([step_loss], self.dist)[0]
                t = time.perf_counter()
                grad_norm = self._optimizer_step(step_loss)
                times["time_optimizer"] += time.perf_counter() - t
                if math.isfinite(grad_norm):
                    grad_norms.append(grad_norm)
                    losses_per_step.append(step_loss)
                else:
                    skipped += 1
        self.scheduler.step()

        result = metrics.means(self.dist)
        result.update(
            step=step + 1,
            loss=sum(losses_per_step) / len(losses_per_step) if losses_per_step else math.nan,
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else math.nan,
            lr=lr,
            optimizer_steps=float(len(grad_norms)),
            skipped_updates=float(skipped),
            prefix_len=total_prefix / total_seqs,
            response_len=total_tokens / total_seqs,
            tokens=total_tokens,
            time_step=time.perf_counter() - t0,
        )
        result.update(times)
        return result

    def _score_teacher(self, mb: RolloutBatch) -> tuple[TeacherScores, Tensor | None, Tensor | None]:
        """Teacher statistics at a micro-batch's response positions (and its hidden states and lm_head for GKD)."""
        top_k = min(self.cfg.method.top_k, self.vocab) if self.method.needs_topk else 0
        if self.scores_by_engine:  # rollout.vllm.teacher_scoring (validated: not gkd/eopd, temperature 1)
            if self.device.type == "cuda" and getattr(self.teacher_engine, "asleep", False):
                torch.cuda.empty_cache()  # before the engine wakes (see make_batch)

            sequences, start = vllm_backend.scoring_sequences(mb)
            scores = self.teacher_engine.teacher_scores(
                sequences, start, top_k=top_k, temperature=self.scoring_temperature, device=self.device
            )
            return scores, None, None
        dev = self.teacher_device
        scores, hidden, weight = self.teacher_scorer(
            mb.input_ids.to(dev),
            mb.attention_mask.to(dev),
            mb.response_mask.to(dev),
            mb.prompt_len,
            top_k,
            self.method.full_vocab,
        )
        if dev != self.device:
            scores = TeacherScores(
                *(t.to(self.device) for t in (scores.logp, scores.topk_ids, scores.topk_logp, scores.entropy))
            )
        if not self.method.full_vocab:
            return scores, None, None
        # GKD needs the teacher's whole distribution: its hidden states and (gathered) lm_head on our device.
        assert weight is not None
        return scores, hidden.to(self.device), weight.to(self.device)

    def _score_student(
        self, mb: RolloutBatch, gather_ids: Tensor | None, teacher: tuple[Tensor | None, Tensor | None] = (None, None)
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return self.scorer(
            mb.input_ids,
            mb.attention_mask,
            mb.response_mask,
            mb.prompt_len,
            gather_ids,
            teacher[0],
            teacher[1],
            self.cfg.method.gkd_beta,
        )

    def _top_fraction(self, scores: Tensor, valid: Tensor, fraction: float) -> Tensor:
        """:func:`losses.top_fraction_mask` over the step's tokens on every rank (one global threshold)."""
        if not self.dist.enabled:
            return losses.top_fraction_mask(scores, valid, fraction)
        everyone = torch.cat(D.gather_object(scores[valid.bool()].float().cpu(), self.dist)).to(scores.device)
        return losses.top_fraction_mask(scores, valid, fraction, pool=everyone)

    def _micro_loss(
        self,
        mb: RolloutBatch,
        teacher: tuple[TeacherScores, Tensor | None, Tensor | None],
        old_logp_flat: Tensor | None,
        keep_mask: Tensor | None,
        noise: Tensor,
        step: int,
        total_tokens: float,
        total_seqs: float,
        metrics: Metrics | None,
    ) -> Tensor:
        """Student forward on one micro-batch and its share of the optimizer step's loss."""
        cfg = self.cfg
        tscores, t_hidden, t_weight = teacher
        mask = mb.response_mask
        logp_flat, topk_flat, entropy_flat, jsd_flat = self._score_student(
            mb, tscores.topk_ids if self.method.needs_topk else None, (t_hidden, t_weight)
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
            student_topk_logp=to_grid(topk_flat, mask) if self.method.needs_topk else None,
            teacher_topk_logp=to_grid(tscores.topk_logp, mask) if tscores.topk_ids.shape[-1] else None,
            teacher_entropy=to_grid(tscores.entropy, mask),
            student_entropy=to_grid(entropy_flat, mask),
            trust_mask=trust,
            prefix_mask=mb.prefix_mask,
            response_mask=mask,
            keep_mask=keep_mask,
            full_vocab_loss=full_vocab,
        )
        out = self.method.fn(inputs, cfg, step)
        loss = self._aggregate(out.loss, mask, total_tokens, total_seqs)
        # The losses map non-finite log-probs to finite values (padding holds -inf); a non-finite value at a
        # real token means a broken model or overflow, so the whole update must be skipped, not masked.
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
        return loss

    def _optimizer_step(self, loss: float) -> float:
        """Clip and apply the accumulated gradients; returns the gradient norm. A non-finite loss or
        gradient norm skips the update (gradients dropped, weights untouched) and returns NaN."""
        params = [p for p in self.student.model.parameters() if p.requires_grad]
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else math.inf
        grad_norm = float(D.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))  # global under FSDP
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("non-finite loss (%s) or gradient norm (%s): update skipped", loss, grad_norm)
            return math.nan
        self.optimizer.step()
        return grad_norm

    def _aggregate(self, per_token: Tensor, mask: Tensor, total_tokens: float, n_seqs: float) -> Tensor:
        """Reduce one micro-batch's per-token loss so that micro-batches sum to the step's mean."""
        if self.cfg.method.aggregation == "token_mean":
            return losses.masked_mean(per_token, mask, total=total_tokens)
        # seq_mean_token_mean: mean over each sequence's tokens, then over all sequences of the step.
        per_seq = torch.where(mask, per_token, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
        return per_seq.sum() / n_seqs


def eval_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, suites: list[SuiteTasks], *, seed: int
) -> dict[str, float]:
    """The student's score on every eval task (``eval/<task>``, avg@n) and their mean (``eval/average``)."""
    t0 = time.perf_counter()
    results = evaluate(model, tokenizer, suites, seed=seed)
    out = {f"eval/{r.suite}/{r.task}": r.score for r in results}
    out["eval/average"] = sum(out.values()) / len(out)
    out["time_eval"] = time.perf_counter() - t0
    return out


class StopRequest:
    """Set by the command layer's signal handlers; the loop checks it after each step, saves a resumable
    checkpoint and returns early (``TrainResult.interrupted``)."""

    def __init__(self) -> None:
        self.requested = False


def train(
    cfg: TrainConfig,
    *,
    output_dir: Path,
    hooks: TrainHooks | None = None,
    stop: StopRequest | None = None,
    dist: Dist = SINGLE,
    device: torch.device | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` optimizer steps (from a checkpoint with ``cfg.resume``) and save the student as a
    Hugging Face checkpoint; with ``stop`` set mid-run, save a resumable checkpoint and return early.

    Under ``torchrun`` every rank calls this with its :class:`Dist` and device (see
    :func:`tropd_cli.distributed.init_from_env`); only rank 0 should be given hooks, and only rank 0
    writes files (resumable checkpoints are sharded: every rank writes its shard).
    """
    hooks = hooks or NoHooks()
    if dist.enabled and cfg.student.lora.r:
        raise UserError("student.lora is not supported on several ranks yet; train LoRA in a single process")
    D.require_even_split(cfg.rollout.batch_size, dist)  # before any model loads
    heldout.validate(cfg)
    if dist.enabled and cfg.eval_every and cfg.rollout.backend == "vllm":
        raise UserError(
            "eval_every with rollout.backend=vllm on several ranks is not supported: the student is sharded and "
            "the engine is not an HF model; run `tropd eval` on the checkpoint (or eval_every=0)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = device or resolve_device(cfg.device)
    teacher_device = resolve_device(cfg.teacher_device) if cfg.teacher_device else device
    cache = default_cache_dir(cfg.cache_dir)
    t0 = time.perf_counter()
    teacher, student = load_pair(
        cfg.teacher, cfg.student, device=device, cache_dir=cache, teacher_device=teacher_device
    )
    examples = examples_from_config(cfg.dataset)
    # Eval data is loaded before training starts; during training only rank 0 evaluates (the sampler copy).
    eval_suites = load_suites(cfg.eval_suite) if cfg.eval_every and dist.is_main else []
    trainer = Trainer(
        cfg, teacher=teacher, student=student, examples=examples, dist=dist, work_dir=output_dir / ".vllm"
    )
    try:
        return _train_loop(cfg, trainer, output_dir, hooks, stop, dist, device, t0, eval_suites)
    finally:
        trainer.close()


def _heldout_set(cfg: TrainConfig, trainer: Trainer, dist: Dist) -> heldout.HeldOut | None:
    """The held-out prompts and the teacher's responses to them, on rank 0 (None when off or empty)."""
    if not (dist.is_main and heldout.enabled(cfg, dist)):
        return None
    examples = heldout.heldout_examples(cfg, trainer.examples)
    if not examples:
        log.warning("held-out signals are off: every held-out candidate prompt is a training prompt")
        return None
    held = heldout.HeldOut(trainer, examples, cache_dir=None if dist.enabled else cfg.heldout.cache_dir)
    log.info(
        "held-out set: %d prompts, %d teacher tokens (%s in %.1fs)",
        len(examples),
        held.tokens,
        "read from the cache" if held.cached else "written",
        held.build_seconds,
    )
    return held


def _train_loop(
    cfg: TrainConfig,
    trainer: Trainer,
    output_dir: Path,
    hooks: TrainHooks,
    stop: StopRequest | None,
    dist: Dist,
    device: torch.device,
    t0: float,
    eval_suites: list[SuiteTasks],
) -> TrainResult:
    teacher, student, examples = trainer.teacher, trainer.student, trainer.examples
    hooks.on_start(
        {
            "teacher": teacher.source,
            "student": student.source,
            "teacher_params": trainer.n_params[0],
            "student_params": trainer.n_params[1],
            "prompts": len(examples),
            "device": str(device) + (f" x {dist.world_size} ranks" if dist.enabled else ""),
            "load_seconds": time.perf_counter() - t0,
        }
    )
    history: list[dict[str, float]] = []
    start = 0
    held = _heldout_set(cfg, trainer, dist)  # rank 0; the teacher writes its held-out responses here
    resumed_from = checkpoint.resolve(cfg.resume, output_dir) if cfg.resume and dist.is_main else None
    resumed_from = D.broadcast_object(resumed_from, dist)
    if resumed_from is not None:
        state: dict[str, Any] = checkpoint.load_state(
            resumed_from, student.model, cfg, force=cfg.resume_force, optimizer=trainer.optimizer, dist=dist
        )
        if "optimizer" in state:
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        if isinstance(rng, list):  # one per rank
            if len(rng) == dist.world_size:
                checkpoint.set_rng_state(rng[dist.rank])
            else:
                log.warning(
                    "resume: saved by %d ranks, running on %d: RNG states not restored", len(rng), dist.world_size
                )
        else:
            checkpoint.set_rng_state(rng)
        start, history = int(state["step"]), list(state["history"])
        log.info("resumed from %s at step %d", resumed_from, start)
        for done, metrics in enumerate(history):
            hooks.on_step(done, metrics)  # replay the progress so metrics files and bars are complete
    nonfinite = 0  # steps in a row in which every update was skipped
    # Held-out signals and eval_every are measured on the sampling copy when there is one (synced first): the
    # numerics the rollouts and `tropd eval` of the checkpoint use (bf16 where fast), at twice the speed of the
    # fp32 student on a CPU; under FSDP it is the only whole copy. A vLLM sampler is no HF model: the student.
    on_sampler = dist.enabled or (not trainer.uses_engine and trainer.sampler is not student.model)
    eval_model = trainer.sampler if on_sampler else student.model
    measure_heldout = heldout.enabled(cfg, dist)  # the same on every rank (they sync the sampler together)
    # Before the first step (the sampling copy of a sharded student still equals the initial weights); its
    # numbers go into the first step's line as heldout/start/*. A resumed run has them in its history.
    before = held.measure_start(eval_model) if held is not None and start == 0 else None
    for step in range(start, cfg.steps):
        metrics = trainer.step(step)
        nonfinite = nonfinite + 1 if metrics["optimizer_steps"] == 0 else 0
        evaluate_now = bool(cfg.eval_every) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
        heldout_now = measure_heldout and heldout.due(cfg, step)
        if evaluate_now or heldout_now:
            if on_sampler:
                trainer._sync_sampler()  # under FSDP a collective: every rank, then rank 0 measures the synced copy
            if evaluate_now and eval_suites:
                metrics.update(eval_metrics(eval_model, trainer.tokenizer, eval_suites, seed=cfg.seed))
            if heldout_now and held is not None:
                metrics.update(held.measure(eval_model))
            D.barrier(dist)
        if before is not None and step == 0:
            metrics.update(heldout.start_metrics(before))
            metrics["time_heldout"] = metrics.get("time_heldout", 0.0) + before["time_heldout"]
        history.append(metrics)
        hooks.on_step(step, metrics)
        diverged = nonfinite >= cfg.optim.max_nonfinite_steps
        # Every rank must agree to stop at the same step (a signal may reach them at different times).
        stopping = diverged or D.any_rank(stop is not None and stop.requested, dist)
        if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps):
            state = {
                "step": step + 1,
                "history": history,
                "scheduler": trainer.scheduler.state_dict(),
                "fingerprint": checkpoint.fingerprint(cfg),
            }
            if dist.enabled:
                state["rng"] = D.gather_object(checkpoint.rng_state(), dist)
            else:
                state["rng"] = checkpoint.rng_state()
                state["optimizer"] = trainer.optimizer.state_dict()
            saved = checkpoint.save(
                output_dir / "checkpoints" / f"step_{step + 1:06d}",
                student.model,
                trainer.tokenizer,
                state,
                optimizer=trainer.optimizer,
                dist=dist,
            )
            if dist.is_main:
                checkpoint.prune(output_dir, cfg.keep_last)
            if diverged:
                hooks.on_end({"checkpoint": str(saved), "steps": step + 1, "interrupted": True})
                raise UserError(
                    f"steps {step + 2 - nonfinite}-{step + 1} all had a non-finite loss or gradient, so their "
                    f"updates were skipped; the weights of step {step + 1 - nonfinite} are saved in {saved} "
                    "(lower optim.lr, check the data and the models, then resume=... from there)"
                )
            if stopping:
                hooks.on_end({"checkpoint": str(saved), "steps": step + 1, "interrupted": True})
                return TrainResult(checkpoint=saved, history=history, interrupted=True)
    final = output_dir / "checkpoint"
    if dist.enabled:
        weights = D.full_state_dict(student.model, dist)  # collective: gathered to CPU on every rank
        if dist.is_main:
            save_checkpoint(student.model, trainer.tokenizer, final, state_dict=weights)
        D.barrier(dist)
    else:
        merged = merge_lora(student.model)  # LoRA: the checkpoint holds merged weights, adapter/ the adapter alone
        save_checkpoint(student.model, trainer.tokenizer, final)
        if merged is not None:
            save_adapter(*merged, final / "adapter", base_model=student.source)
    hooks.on_end({"checkpoint": str(final), "steps": cfg.steps})
    return TrainResult(checkpoint=final, history=history)
