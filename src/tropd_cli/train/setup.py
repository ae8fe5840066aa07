"""One training run, built from its config: models, samplers, scorers, optimizer, prompt order.

:func:`build_run` is the one place that turns a :class:`TrainConfig` into the objects a step uses, and the
only reader of ``rollout.backend``. The order of construction is part of the run's behaviour (the global RNG
is seeded before it): method, vocabulary, prompts, sampler (before sharding: a whole copy), scorers,
sharding, the teacher's writer, AdamW, the warmup schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tropd_cli import distributed as D
from tropd_cli.config import TrainConfig
from tropd_cli.data import Example, dataset_prompts
from tropd_cli.device import fast_bf16
from tropd_cli.distributed import SINGLE, Dist
from tropd_cli.errors import UserError
from tropd_cli.models import LoadedModel, shared_vocab
from tropd_cli.rng import generator
from tropd_cli.rollout import engines as rollout_engines
from tropd_cli.rollout.samplers import HFSamplers, Samplers, sampling_copy
from tropd_cli.train.methods import Method, get_method
from tropd_cli.train.scoring import ForwardAdapter, StudentScorer, TeacherScorer

log = logging.getLogger(__name__)


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


@dataclass
class Run:
    """Everything one training run holds; :func:`tropd_cli.train.step.train_step` does one optimizer step of it."""

    cfg: TrainConfig
    dist: Dist
    teacher: LoadedModel | None  # None: teacher.backend=server (the served teacher is samplers.scoring_engine)
    student: LoadedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    teacher_device: torch.device
    method: Method
    vocab: int  # the ids both models score (a teacher's padded lm_head rows beyond it are not)
    examples: list[Example]
    prompts: list[str]  # the examples' prompts, formatted (chat template)
    order: PromptOrder
    scoring_temperature: float
    # The sampler is not the trained module (a bf16 copy, an engine): rollouts carry the sampler's own log-probs
    # (sampler/trainer KL logged each step) and rollout.is_correction weighs the loss; else "none", no log-probs.
    sampler_logp: bool
    is_correction: str
    bf16: bool  # the student's forward and backward under bf16 autocast
    n_params: tuple[int, int]  # teacher, student: counted before sharding
    samplers: Samplers
    teacher_writer: Any  # the HF teacher, or an adapter of it (sharded, on another device): held-out responses
    scorer: StudentScorer
    teacher_scorer: TeacherScorer | None  # None: a served teacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def rank_keys(self) -> tuple[int, ...]:
        """Extra seed keys that give each rank its own randomness (none in a single process)."""
        return (1_000_003, self.dist.rank) if self.dist.enabled else ()

    def close(self) -> None:
        self.samplers.close()
        if self.teacher is None:
            self.samplers.scoring_engine.close()


def build_run(
    cfg: TrainConfig,
    *,
    teacher: LoadedModel | None,
    student: LoadedModel,
    examples: list[Example],
    dist: Dist = SINGLE,
    work_dir: Path | None = None,
) -> Run:
    """The run of ``cfg`` on loaded models. ``work_dir``: where vLLM engines read their starting weights (a temp
    dir when None). ``teacher`` None: ``teacher.backend=server``, checked here before anything else is built."""
    device = next(student.model.parameters()).device
    method = get_method(cfg)
    server = None
    if teacher is None:
        from tropd_cli.serving.client import TeacherServer

        vocab = student.model.get_output_embeddings().weight.shape[0]
        server = TeacherServer(cfg.teacher.server, vocab=vocab)
        problem: UserError | None = None
        try:
            top_k = min(cfg.method.top_k, vocab) if method.needs_topk else 0
            server.check(student.tokenizer, top_k=top_k, self_test=dist.is_main)
        except UserError as err:
            problem = err
        if D.any_rank(problem is not None, dist):  # every rank stops, not only those whose check failed
            server.close()
            raise problem or UserError("the teacher server was refused on another rank; its line is in that rank's log")
        teacher_device = device
    else:
        teacher_device = next(teacher.model.parameters()).device
        vocab = shared_vocab(teacher, student)
    _warn_about_settings(cfg, method, vocab, student.model)
    D.require_even_split(cfg.rollout.batch_size, dist)
    tokenizer = student.tokenizer
    scoring_temperature = cfg.rollout.scoring_temperature or cfg.rollout.temperature
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and fast_bf16("cuda"))
    n_params = (
        0 if teacher is None else sum(p.numel() for p in teacher.model.parameters()),
        sum(p.numel() for p in student.model.parameters()),
    )
    backend = cfg.rollout.backend
    engines: Any = None
    copy = None
    if backend == "vllm":  # before sharding: saved from the full student
        engines = rollout_engines.start_engines(
            cfg, student, teacher, None, device=device, work_dir=work_dir, dist=dist
        )
    else:  # before sharding: a full copy of the student
        copy = sampling_copy(student.model, cfg.rollout.sampler_dtype, device, sharded=dist.enabled)
    scorer = StudentScorer(
        student.model,
        chunk_size=cfg.scoring.chunk_size,
        temperature=scoring_temperature,
        bf16=bf16 and not dist.enabled,  # under FSDP, its mixed-precision policy does this
    )
    teacher_scorer = None
    if teacher is not None:
        teacher_scorer = TeacherScorer(
            teacher.model, chunk_size=cfg.scoring.chunk_size, temperature=scoring_temperature, vocab=vocab
        )
    shard_teacher = dist.enabled and cfg.distributed.shard_teacher and teacher_scorer is not None
    if dist.enabled:
        reshard = cfg.distributed.reshard_after_forward
        D.shard(scorer, student.model, bf16=bf16, reshard_after_forward=reshard, trainable=True)
        if shard_teacher:
            assert teacher is not None and teacher_scorer is not None
            D.shard(teacher_scorer, teacher.model, bf16=False, reshard_after_forward=reshard, trainable=False)
            D.register_forward_method(teacher_scorer, "lm_forward")
    if teacher is None or teacher_scorer is None:  # the served teacher writes (prefixes, SFT targets) and scores
        teacher_writer: Any = server
    else:
        teacher_writer = _teacher_writer(backend, teacher, teacher_scorer, shard_teacher, teacher_device, device)
    samplers: Samplers
    if engines is not None:
        if engines.teacher_backend is None:  # the HF teacher writes the prefixes beside the student's engine
            engines.teacher = teacher_writer
        samplers = engines
    else:
        assert copy is not None
        samplers = HFSamplers(backend, copy, teacher_writer)
    if server is not None:
        samplers.teacher, samplers.teacher_backend, samplers.scoring_engine = server, "server", server
    # vLLM's sampled-token log-probs are raw (temperature 1): at another temperature there is nothing to compare
    # (validate_train refuses a correction there).
    sampler_logp = (copy is not student.model) and (backend != "vllm" or scoring_temperature == 1.0)
    optimizer, scheduler = _optimizer(cfg, student.model)  # after sharding: over the sharded parameters
    return Run(
        cfg=cfg,
        dist=dist,
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        device=device,
        teacher_device=teacher_device,
        method=method,
        vocab=vocab,
        examples=examples,
        prompts=dataset_prompts(tokenizer, examples, cfg.dataset),
        order=PromptOrder(len(examples), cfg.rollout.batch_size, cfg.seed),
        scoring_temperature=scoring_temperature,
        sampler_logp=sampler_logp,
        is_correction=cfg.rollout.is_correction if sampler_logp else "none",
        bf16=bf16,
        n_params=n_params,
        samplers=samplers,
        teacher_writer=teacher_writer,
        scorer=scorer,
        teacher_scorer=teacher_scorer,
        optimizer=optimizer,
        scheduler=scheduler,
    )


def _warn_about_settings(cfg: TrainConfig, method: Method, vocab: int, model: torch.nn.Module) -> None:
    """Settings that run but are likely not what was meant: said once, loudly."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = cfg.dataset.max_prompt_tokens + cfg.rollout.max_new_tokens
    if isinstance(positions, int) and longest > positions:
        log.warning(
            "dataset.max_prompt_tokens + rollout.max_new_tokens = %d is beyond the student's %d positions: "
            "sequences that long leave what the model was trained on (and take memory for nothing)",
            longest,
            positions,
        )
    if method.needs_topk and cfg.method.top_k > vocab:
        # Top-k over more ids than exist is top-V: the full-vocabulary forward KL (e.g. a k=512 grid row on the
        # 100-token char lab); a typo in k lands here too.
        log.warning(
            "method.top_k=%d is larger than the vocabulary (%d tokens): scoring all %d tokens (full forward KL)",
            cfg.method.top_k,
            vocab,
            vocab,
        )
    scoring_temperature = cfg.rollout.scoring_temperature or cfg.rollout.temperature
    if scoring_temperature != cfg.rollout.temperature:
        log.warning(
            "rollout.temperature=%s but scoring at %s: rewards are then not on-policy log-ratios",
            cfg.rollout.temperature,
            scoring_temperature,
        )


def _teacher_writer(
    backend: str,
    teacher: LoadedModel,
    teacher_scorer: TeacherScorer,
    shard_teacher: bool,
    teacher_device: torch.device,
    device: torch.device,
) -> Any:
    """What samples guidance prefixes (and SFT teacher responses): the teacher itself, or an adapter when it is
    sharded or lives on another device."""
    if not (shard_teacher or teacher_device != device):
        return teacher.model
    if backend == "generate":
        raise UserError(
            "rollout.backend=generate needs the teacher whole on the student's device; use rollout.backend=loop "
            "with distributed.shard_teacher or teacher_device"
        )
    return ForwardAdapter(teacher_scorer.lm_forward if shard_teacher else teacher.model, teacher_device, device)


def _optimizer(
    cfg: TrainConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters, with a linear warmup of ``optim.warmup_steps`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler
