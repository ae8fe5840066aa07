"""Held-out training signals: how far the student is from its teacher on prompts the run never trains on.

The on-policy reverse-KL estimate (``rkl_estimate``, K1 on the student's own samples) is a training
signal, not evidence: it falls whenever the student writes less, or writes what it already likes. The
signals here are measured on a fixed set of held-out prompts instead, before the first step, every
``heldout.every`` steps and after the last:

- ``heldout/rkl``, ``heldout/fkl``: the exact reverse KL ``KL(pi_S || pi_T)`` and forward KL
  ``KL(pi_T || pi_S)``, summed over the whole vocabulary, per token, at every position of the
  responses the *teacher* writes for the held-out prompts. Those responses are written once, when the
  run starts (greedy by default, ``heldout.temperature``), so every measurement is on the same token
  positions and the numbers are comparable across steps and runs.
- ``heldout/outlier_share``: on that teacher-written (off-policy) text, the expected share of tokens
  the run's trust region would leave out, :func:`tropd_cli.train.losses.outlier_probability` of
  ``R = log pi_T(y_t) - log pi_S(y_t)`` at the teacher's token ``y_t``.
- ``heldout/empty_rate``, ``heldout/response_len``: the student's greedy responses to the held-out
  prompts: the share with no non-whitespace text before EOS, and the mean number of tokens
  (EOS included, as ``response_len`` counts rollouts).

Engine code: no Hydra, no printing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import PreTrainedModel

from tropd_cli import __version__
from tropd_cli.batch import RolloutBatch, completion_mask
from tropd_cli.config import TrainConfig
from tropd_cli.data import Example, dataset_prompts, examples_from_config
from tropd_cli.distributed import Dist
from tropd_cli.errors import UserError
from tropd_cli.rng import seeded
from tropd_cli.rollout.sampling import rollout, sample, tokenize_prompts
from tropd_cli.train import losses
from tropd_cli.train.scoring import full_vocab_kl, lm_head_weight, response_hidden
from tropd_cli.train.setup import Run

log = logging.getLogger(__name__)

#: Added to ``dataset.seed`` to draw the held-out prompts (and to sample the teacher's responses).
SEED_OFFSET = 1_000_003
#: What each measurement logs, as ``heldout/<name>`` (and ``heldout/start/<name>`` before training).
METRICS = ("rkl", "fkl", "outlier_share", "empty_rate", "response_len")


def validate(cfg: TrainConfig) -> None:
    """Value checks of the ``heldout`` block; raises UserError naming the key."""
    h = cfg.heldout
    if h.size < 0:
        raise UserError(f"heldout.size={h.size} must be >= 0 (0 = no held-out signals)")
    if h.max_new_tokens is not None and h.max_new_tokens <= 0:
        raise UserError(f"heldout.max_new_tokens={h.max_new_tokens} must be positive (or null = rollout's)")
    if h.every is not None and h.every < 0:
        raise UserError(f"heldout.every={h.every} must be >= 0 (0 = before and after training only)")
    if h.temperature < 0:
        raise UserError(f"heldout.temperature={h.temperature} must be >= 0 (0 = greedy)")


def every(cfg: TrainConfig) -> int:
    """Steps between measurements (``heldout.every``, else ``eval_every``); 0 = only before and after training."""
    return cfg.eval_every if cfg.heldout.every is None else cfg.heldout.every


def enabled(cfg: TrainConfig, dist: Dist) -> bool:
    """Whether the run measures held-out signals (the same answer on every rank).

    Under ``torchrun`` rank 0 measures alone, on its full sampling copy of the student and its own whole
    teacher: not possible with a sharded teacher or a vLLM sampler (a warning says so, and the run goes on).
    """
    if cfg.heldout.size == 0:
        return False
    if cfg.teacher.backend == "server":
        log.warning(
            "held-out signals are off: they need the teacher's whole distribution, and a served teacher returns its "
            "top-k (teacher.backend=server); compare checkpoints with `tropd eval`, and set heldout.size=0 to silence"
        )
        return False
    if dist.enabled and (cfg.distributed.shard_teacher or cfg.rollout.backend == "vllm"):
        log.warning(
            "held-out signals are off: on several ranks they need a whole teacher and an HF sampling copy of the "
            "student on rank 0 (distributed.shard_teacher=false, rollout.backend=loop); set heldout.size=0 to silence"
        )
        return False
    return True


def due(cfg: TrainConfig, step: int) -> bool:
    """Is there a measurement after 0-based ``step``? Every :func:`every` steps and after the last one."""
    n = every(cfg)
    return step + 1 == cfg.steps or (n > 0 and (step + 1) % n == 0)


def heldout_examples(cfg: TrainConfig, train: Sequence[Example]) -> list[Example]:
    """The held-out prompts: up to ``heldout.size`` examples from the training ``dataset`` config drawn with
    ``seed = dataset.seed + SEED_OFFSET``, leaving out any prompt text that is a training prompt (and
    repeats). Sources that ignore the seed (file, hub) give their first rows that are not training prompts:
    the rows after the training ones. Another source of held-out prompts (a split) needs only this function.

    A generator task with a ``split`` keyword (:mod:`tropd_cli.worked_sum`) trained on ``split=train`` gives its
    held-out prompts from ``split=eval`` instead: the eval suites' distribution, disjoint by construction.

    There may be fewer than ``heldout.size`` (a small task whose training prompts cover most of it): a
    warning says how many.
    """
    size = cfg.heldout.size
    if size <= 0:
        return []
    # Files and hub sets are read whole anyway (size 0 = every row); a generator makes enough for the held-out
    # set even if its new seed repeated every training prompt.
    candidates = 0 if cfg.dataset.source in ("file", "hub") else cfg.dataset.size + size
    source = dataclasses.replace(cfg.dataset, seed=cfg.dataset.seed + SEED_OFFSET, size=candidates)
    if cfg.dataset.generator_kwargs.get("split") == "train":
        # A task with disjoint splits (worked_sum): held-out prompts come from its eval split, the eval suites'.
        source.generator_kwargs = {**cfg.dataset.generator_kwargs, "split": "eval"}
    seen = {ex.prompt for ex in train}
    out = []
    for ex in examples_from_config(source):
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == size:
                break
    if len(out) < size:
        log.warning(
            "heldout.size=%d but only %d candidate prompts are not training prompts: measuring on %d",
            size,
            len(out),
            len(out),
        )
    return out


#: Bump when what the cache holds, or how it is computed, changes: older entries are then never read.
CACHE_VERSION = 1


def cache_key(run: Run, examples: Sequence[Example]) -> str:
    """The cache entry of a held-out set and of the untrained student's measurement on it: a hash of everything
    either depends on (both models and their dtypes, the sampling copy's, the prompts, the sampling and scoring
    settings, the devices and thread count, the library versions), and of nothing a method or a seed sets."""
    cfg = run.cfg
    fields: dict[str, Any] = {
        "version": CACHE_VERSION,
        "tropd": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "teacher": dataclasses.asdict(cfg.teacher),
        "student": dataclasses.asdict(cfg.student),
        "sampler_dtype": str(getattr(run.samplers.hf_student, "dtype", cfg.rollout.sampler_dtype)),
        "dataset": dataclasses.asdict(cfg.dataset),
        "prompts": [ex.prompt for ex in examples],
        "heldout": {k: v for k, v in dataclasses.asdict(cfg.heldout).items() if k != "cache_dir"},
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "generation_batch_size": cfg.rollout.generation_batch_size,
        "scoring_temperature": run.scoring_temperature,
        "chunk_size": cfg.scoring.chunk_size,
        "devices": [str(run.device), str(run.teacher_device)],
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # a torn or foreign file: recompute (and overwrite it)
        log.warning("held-out cache %s is unreadable (%s): recomputing it", path, err)
        return None


def _write(path: Path, value: dict[str, Any]) -> None:
    """Atomically (a temporary file, then a rename): a reader sees a whole entry or none."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")
        torch.save(value, tmp)
        tmp.replace(path)
    except OSError as err:  # a cache that cannot be written costs time, never the run
        log.warning("held-out cache %s not written: %s", path, err)


class HeldOut:
    """The held-out prompts, the teacher's responses to them (written once, here) and :meth:`measure`.

    ``cache_dir`` (``heldout.cache_dir``): read the teacher's responses and hidden states, and the untrained
    student's measurement (:meth:`measure_start`), from ``<cache_dir>/<key>/`` when an earlier run with the same
    :func:`cache_key` wrote them, else compute and write them there: an ablation's cells share both.
    """

    def __init__(self, run: Run, examples: list[Example], cache_dir: str | Path | None = None) -> None:
        if not examples:
            raise ValueError("HeldOut needs at least one example")
        cfg = self.cfg = run.cfg
        self.run = run
        self.examples = examples
        self.tokenizer = run.tokenizer
        self.max_new_tokens = cfg.heldout.max_new_tokens or cfg.rollout.max_new_tokens
        self.rows = cfg.rollout.generation_batch_size or len(examples)  # rows per model call
        texts = dataset_prompts(self.tokenizer, examples, cfg.dataset)
        self.prompt_ids, self.prompt_mask = tokenize_prompts(
            self.tokenizer, texts, max_prompt_tokens=cfg.dataset.max_prompt_tokens, device=run.device
        )
        self.cache = Path(cache_dir) / cache_key(run, examples) if cache_dir else None
        t0 = time.perf_counter()
        stored = _read(self.cache / "teacher.pt") if self.cache else None
        self.cached = stored is not None
        if stored is not None:
            fields: dict[str, Any] = stored["batch"]
            self.teacher_batch = _moved(RolloutBatch(**fields), run.device)
            self.teacher_hidden = list(stored["hidden"])
            self.build_seconds = time.perf_counter() - t0
            return
        self.teacher_batch = rollout(
            run.teacher_writer,
            None,
            self.tokenizer,
            self.prompt_ids,
            self.prompt_mask,
            prompt_index=torch.arange(len(examples), device=run.device),
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=0,
            temperature=cfg.heldout.temperature,
            top_p=1.0,
            seed=seeded(cfg.dataset.seed, SEED_OFFSET),
            backend="loop",
            chunk_rows=cfg.rollout.generation_batch_size,
        )
        # The teacher is frozen: its final hidden states at these positions are computed once and kept on the
        # CPU (small: tokens x hidden size), so a measurement runs the student alone.
        self.teacher_hidden = self._teacher_hidden()
        self.build_seconds = time.perf_counter() - t0
        if self.cache:
            batch = {f.name: getattr(self.teacher_batch, f.name) for f in dataclasses.fields(self.teacher_batch)}
            _write(
                self.cache / "teacher.pt",
                {"batch": {k: _cpu(v) for k, v in batch.items()}, "hidden": self.teacher_hidden},
            )
        run.samplers.free_cached_memory()  # before a vLLM engine wakes

    @property
    def tokens(self) -> int:
        """Teacher-written tokens every measurement scores."""
        return int(self.teacher_batch.response_mask.sum())

    def measure(self, student: PreTrainedModel) -> dict[str, float]:
        """``heldout/<name>`` for each of :data:`METRICS`, plus ``heldout/prompts``, ``heldout/tokens`` and
        ``time_heldout``, for ``student`` (an HF model: the run's student, or its sampling copy)."""
        t0 = time.perf_counter()
        return self._metrics(self._measured(student), time.perf_counter() - t0)

    def measure_start(self, student: PreTrainedModel) -> dict[str, float]:
        """:meth:`measure` of the untrained student, read from the cache when an earlier run with the same key
        measured it (the trust region's outlier share is recomputed from the stored log-probs: it is the run's)."""
        t0 = time.perf_counter()
        stored = _read(self.cache / "start.pt") if self.cache and self.cached else None
        if stored is None:
            stored = self._measured(student)
            if self.cache:
                _write(self.cache / "start.pt", {k: _cpu(v) for k, v in stored.items()})
        return self._metrics(stored, time.perf_counter() - t0)

    @torch.no_grad()
    def _measured(self, student: PreTrainedModel) -> dict[str, Tensor]:
        """Per token: both KLs and both log-probs at the teacher's tokens; per prompt: greedy lengths and emptiness."""
        was_training = student.training
        student.eval()
        try:
            kl = self._divergences(student)
            kl["lengths"], kl["empty"] = self._greedy_answers(student)
        finally:
            student.train(was_training)
        self.run.samplers.free_cached_memory()
        return kl

    def _metrics(self, kl: dict[str, Tensor], seconds: float) -> dict[str, float]:
        tr = self.cfg.trust_region
        outlier = losses.outlier_probability(kl["teacher_logp"] - kl["student_logp"], tau=tr.tau, kind=tr.kind)
        return {
            "heldout/rkl": float(kl["reverse"].mean()),
            "heldout/fkl": float(kl["forward"].mean()),
            "heldout/outlier_share": float(outlier.mean()),
            "heldout/empty_rate": float(kl["empty"].float().mean()),
            "heldout/response_len": float(kl["lengths"].float().mean()),
            "heldout/prompts": float(len(self.examples)),
            "heldout/tokens": float(self.tokens),
            "time_heldout": seconds,
        }

    def _row_chunks(self) -> list[RolloutBatch]:
        n = self.teacher_batch.input_ids.shape[0]
        return [self.teacher_batch.rows(slice(start, start + self.rows)) for start in range(0, n, self.rows)]

    @torch.no_grad()
    def _teacher_hidden(self) -> list[Tensor]:
        """The teacher's final hidden states ``[N_chunk, H]`` at the response positions of each row chunk (CPU)."""
        assert self.run.teacher is not None  # held-out signals are off with a served teacher
        model, device = self.run.teacher.model, self.run.teacher_device
        was_training = model.training
        model.eval()
        try:
            return [response_hidden(model, _moved(mb, device)).cpu() for mb in self._row_chunks()]
        finally:
            model.train(was_training)

    def _divergences(self, student: PreTrainedModel) -> dict[str, Tensor]:
        """Per-token full-vocabulary KLs and both log-probs at the teacher's tokens, over all held-out rows."""
        run = self.run
        device = run.device
        s_weight = lm_head_weight(student)[: run.vocab]
        assert run.teacher is not None
        t_weight = lm_head_weight(run.teacher.model)[: run.vocab].to(device)
        parts: dict[str, list[Tensor]] = {}
        for mb, t_hidden in zip(self._row_chunks(), self.teacher_hidden, strict=True):
            s_hidden = response_hidden(student, mb)
            kl = full_vocab_kl(
                s_hidden,
                s_weight,
                t_hidden.to(device),
                t_weight,
                mb.response_ids[mb.response_mask],
                chunk_size=self.cfg.scoring.chunk_size,
                temperature=run.scoring_temperature,
            )
            for name, value in dataclasses.asdict(kl).items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def _greedy_answers(self, student: PreTrainedModel) -> tuple[Tensor, Tensor]:
        """The student's greedy responses: their lengths ``[n]`` (EOS included) and which are empty ``[n]``."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        tokens = sample(
            student,
            self.prompt_ids,
            self.prompt_mask,
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            eos_token_id=eos,
            pad_token_id=pad,
            seed=0,
            backend="loop",
            chunk_rows=self.cfg.rollout.generation_batch_size,
        )
        valid = completion_mask(tokens, eos)
        eos_ids = torch.tensor([eos] if not isinstance(eos, list) else eos, device=tokens.device)
        text = valid & ~torch.isin(tokens, eos_ids)
        answers = self.tokenizer.batch_decode(
            [row[keep].tolist() for row, keep in zip(tokens, text, strict=True)], skip_special_tokens=True
        )
        return valid.sum(-1), torch.tensor([not answer.strip() for answer in answers])


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value


def _moved(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if batch.input_ids.device == device:
        return batch
    return RolloutBatch(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        prompt_len=batch.prompt_len,
        response_mask=batch.response_mask.to(device),
        prefix_mask=batch.prefix_mask.to(device),
        prompt_index=batch.prompt_index.to(device),
    )


def start_metrics(measured: dict[str, float]) -> dict[str, float]:
    """A measurement before training under the names the first step's line carries: ``heldout/start/<name>``."""
    return {f"heldout/start/{name}": measured[f"heldout/{name}"] for name in METRICS}
