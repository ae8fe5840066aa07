"""The training loop, top to bottom: build the run, measure, step, log, checkpoint, save.

Engine code: no Hydra, no printing. The command layer passes a :class:`TrainConfig` and hooks that draw
progress and write logs. One step is :func:`tropd_cli.train.step.train_step`; the run it steps is built by
:func:`tropd_cli.train.setup.build_run`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tropd_cli import distributed as D
from tropd_cli.config import TrainConfig
from tropd_cli.data import examples_from_config
from tropd_cli.device import resolve_device
from tropd_cli.distributed import SINGLE, Dist
from tropd_cli.errors import UserError
from tropd_cli.evals.engine import SuiteTasks, evaluate, load_suites
from tropd_cli.models import default_cache_dir, load_pair, merge_lora, save_adapter, save_checkpoint
from tropd_cli.train import checkpoint, heldout
from tropd_cli.train.setup import Run, build_run
from tropd_cli.train.step import train_step

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
    already_finished: bool = False  # resume=auto on a finished run: nothing was trained or written


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
    # The run directory is checked before anything in it is written: a refused resume changes nothing.
    resumed_from = checkpoint.preflight(cfg, output_dir) if dist.is_main else None
    resumed_from = D.broadcast_object(resumed_from, dist)
    done = (
        dist.is_main and cfg.resume == "auto" and resumed_from is None and checkpoint.finished(output_dir) is not None
    )
    if D.broadcast_object(done, dist):
        return TrainResult(checkpoint=output_dir / "checkpoint", already_finished=True)
    with checkpoint.run_lock(output_dir) if dist.is_main else contextlib.nullcontext():
        return _load_and_train(cfg, output_dir, hooks, stop, dist, device, resumed_from)


def _load_and_train(
    cfg: TrainConfig,
    output_dir: Path,
    hooks: TrainHooks,
    stop: StopRequest | None,
    dist: Dist,
    device: torch.device | None,
    resumed_from: Path | None,
) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = device or resolve_device(cfg.device)
    teacher_device = resolve_device(cfg.teacher_device) if cfg.teacher_device else device
    cache = default_cache_dir(cfg.cache_dir)
    t0 = time.perf_counter()
    teacher, student = load_pair(
        cfg.teacher, cfg.student, device=device, cache_dir=cache, teacher_device=teacher_device
    )  # teacher None: teacher.backend=server
    examples = examples_from_config(cfg.dataset)
    # Eval data is loaded before training starts; during training only rank 0 evaluates (the sampler copy).
    eval_suites = load_suites(cfg.eval_suite) if cfg.eval_every and dist.is_main else []
    run = build_run(cfg, teacher=teacher, student=student, examples=examples, dist=dist, work_dir=output_dir / ".vllm")
    try:
        hooks.on_start(
            {
                "teacher": teacher.source if teacher else f"{cfg.teacher.server.url} (served)",
                "student": student.source,
                "teacher_params": run.n_params[0],
                "student_params": run.n_params[1],
                "prompts": len(examples),
                "device": str(device) + (f" x {dist.world_size} ranks" if dist.enabled else ""),
                "load_seconds": time.perf_counter() - t0,
            }
        )
        return _train_loop(run, output_dir, hooks, stop, eval_suites, resumed_from)
    finally:
        run.close()


def _heldout_set(run: Run, enabled: bool) -> heldout.HeldOut | None:
    """The held-out prompts and the teacher's responses to them, on rank 0 (None when off or empty)."""
    cfg, dist = run.cfg, run.dist
    if not (dist.is_main and enabled):
        return None
    examples = heldout.heldout_examples(cfg, run.examples)
    if not examples:
        log.warning("held-out signals are off: every held-out candidate prompt is a training prompt")
        return None
    held = heldout.HeldOut(run, examples, cache_dir=None if dist.enabled else cfg.heldout.cache_dir)
    log.info(
        "held-out set: %d prompts, %d teacher tokens (%s in %.1fs)",
        len(examples),
        held.tokens,
        "read from the cache" if held.cached else "written",
        held.build_seconds,
    )
    return held


def _train_loop(
    run: Run,
    output_dir: Path,
    hooks: TrainHooks,
    stop: StopRequest | None,
    eval_suites: list[SuiteTasks],
    resumed_from: Path | None,
) -> TrainResult:
    cfg, dist = run.cfg, run.dist
    # Asked once (it warns when the signals are off): the same on every rank (they sync the sampler together).
    measure_heldout = heldout.enabled(cfg, dist)
    held = _heldout_set(run, measure_heldout)  # rank 0; the teacher writes its held-out responses here
    start, history = _resume(run, resumed_from, hooks)
    nonfinite = 0  # steps in a row in which every update was skipped
    # Held-out signals and eval_every are measured on the sampling copy when there is one (synced first): the
    # numerics the rollouts and `tropd eval` of the checkpoint use (bf16 where fast), at twice the speed of the
    # fp32 student on a CPU; under FSDP it is the only whole copy. A vLLM sampler is no HF model: the student.
    measured = run.student.model if run.samplers.hf_student is None else run.samplers.hf_student
    # Before the first step (the sampling copy of a sharded student still equals the initial weights); its
    # numbers go into the first step's line as heldout/start/*. A resumed run has them in its history.
    before = held.measure_start(measured) if held is not None and start == 0 else None
    for step in range(start, cfg.steps):
        metrics = train_step(run, step)
        nonfinite = nonfinite + 1 if metrics["optimizer_steps"] == 0 else 0
        evaluate_now = bool(cfg.eval_every) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
        heldout_now = measure_heldout and heldout.due(cfg, step)
        if evaluate_now or heldout_now:
            if dist.enabled or measured is not run.student.model:
                run.samplers.sync(run.student.model)  # under FSDP a collective: every rank, then rank 0 measures
            if evaluate_now and eval_suites:
                metrics.update(eval_metrics(measured, run.tokenizer, eval_suites, seed=cfg.seed))
            if heldout_now and held is not None:
                metrics.update(held.measure(measured))
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
            saved = _save_resumable(run, output_dir, step, history)
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
    final = _save_final(run, output_dir)
    hooks.on_end({"checkpoint": str(final), "steps": cfg.steps})
    return TrainResult(checkpoint=final, history=history)


def _resume(run: Run, resumed_from: Path | None, hooks: TrainHooks) -> tuple[int, list[dict[str, float]]]:
    """The step to start from and the history so far: ``(0, [])``, or the checkpoint's that
    :func:`checkpoint.preflight` resolved, with the optimizer, scheduler and RNG states restored and the history
    replayed to the hooks."""
    cfg, dist = run.cfg, run.dist
    if resumed_from is None:
        return 0, []
    state: dict[str, Any] = checkpoint.load_state(
        resumed_from, run.student.model, cfg, force=cfg.resume_force, optimizer=run.optimizer, dist=dist
    )
    if "optimizer" in state:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if isinstance(rng, list):  # one per rank
        if len(rng) == dist.world_size:
            checkpoint.set_rng_state(rng[dist.rank])
        else:
            log.warning("resume: saved by %d ranks, running on %d: RNG states not restored", len(rng), dist.world_size)
    else:
        checkpoint.set_rng_state(rng)
    start, history = int(state["step"]), list(state["history"])
    log.info("resumed from %s at step %d", resumed_from, start)
    for done, metrics in enumerate(history):
        hooks.on_step(done, metrics)  # replay the progress so metrics files and bars are complete
    return start, history


def _save_resumable(run: Run, output_dir: Path, step: int, history: list[dict[str, float]]) -> Path:
    """A checkpoint to resume from after 0-based ``step`` (sharded: every rank writes its part), pruned to
    ``keep_last``."""
    cfg, dist = run.cfg, run.dist
    state = {
        "step": step + 1,
        "history": history,
        "scheduler": run.scheduler.state_dict(),
        "fingerprint": checkpoint.fingerprint(cfg),
    }
    if dist.enabled:
        state["rng"] = D.gather_object(checkpoint.rng_state(), dist)
    else:
        state["rng"] = checkpoint.rng_state()
        state["optimizer"] = run.optimizer.state_dict()
    saved = checkpoint.save(
        output_dir / "checkpoints" / f"step_{step + 1:06d}",
        run.student.model,
        run.tokenizer,
        state,
        optimizer=run.optimizer,
        dist=dist,
    )
    if dist.is_main:
        checkpoint.prune(output_dir, cfg.keep_last)
    return saved


def _save_final(run: Run, output_dir: Path) -> Path:
    """The trained student as a Hugging Face checkpoint (LoRA: merged, and the adapter alone in ``adapter/``)."""
    final = output_dir / "checkpoint"
    student = run.student
    if run.dist.enabled:
        weights = D.full_state_dict(student.model, run.dist)  # collective: gathered to CPU on every rank
        if run.dist.is_main:
            save_checkpoint(student.model, run.tokenizer, final, state_dict=weights)
        D.barrier(run.dist)
    else:
        merged = merge_lora(student.model)
        save_checkpoint(student.model, run.tokenizer, final)
        if merged is not None:
            save_adapter(*merged, final / "adapter", base_model=student.source)
    return final
