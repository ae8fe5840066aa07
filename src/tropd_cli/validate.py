"""Value checks of the configs that types alone cannot express: each raises a UserError naming the key to fix.

The schemas (:mod:`tropd_cli.config`) import nothing of tropd; the checks here know the registries they check
names against (methods, losses, benchmarks, reasoning modes).
"""

from __future__ import annotations

import math

from tropd_cli.config import EvalSuiteConfig, ModelConfig, TrainConfig
from tropd_cli.errors import UserError
from tropd_cli.evals.benchmarks import BENCHMARKS
from tropd_cli.evals.reasoning import REASONING_MODES
from tropd_cli.train.losses import OUTLIER_STRATEGIES, TRUST_REGION_KINDS
from tropd_cli.train.methods import METHODS


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    _check(value in options, f"{key}={value!r} is not an option; choose one of: {', '.join(options)}")


def validate_train(cfg: TrainConfig) -> None:
    """Value checks that types alone cannot express; raises UserError naming the key to fix."""
    _choice(cfg.method.name, tuple(METHODS), "method.name")
    _choice(cfg.outlier.strategy, OUTLIER_STRATEGIES, "outlier.strategy")
    _choice(cfg.trust_region.kind, TRUST_REGION_KINDS, "trust_region.kind")
    _choice(cfg.guidance.schedule, ("cosine", "constant"), "guidance.schedule")
    _choice(cfg.guidance.prefix_sampling, ("min", "uniform"), "guidance.prefix_sampling")
    _choice(cfg.method.aggregation, ("token_mean", "seq_mean_token_mean"), "method.aggregation")
    _choice(cfg.method.sft_source, ("dataset", "teacher"), "method.sft_source")
    _choice(cfg.dataset.source, ("reasoning_gym", "file", "hub"), "dataset.source")
    _choice(cfg.logger.name, ("rich", "wandb", "none"), "logger.name")
    _check(cfg.steps > 0, f"steps={cfg.steps} must be a positive number of optimizer steps")
    _check(0 <= cfg.seed < 2**63, f"seed={cfg.seed} must be in [0, 2**63)")
    _check(
        cfg.threads is None or cfg.threads >= 1, f"threads={cfg.threads} must be at least 1 (or null: torch's default)"
    )
    _check(
        cfg.dataset.max_prompt_tokens >= 1, f"dataset.max_prompt_tokens={cfg.dataset.max_prompt_tokens} must be >= 1"
    )
    t = cfg.rollout.scoring_temperature
    _check(
        t is None or (math.isfinite(t) and t > 0),
        f"rollout.scoring_temperature={t} must be > 0 (or null: the rollout's)",
    )
    for key, device in (("device", cfg.device), ("teacher_device", cfg.teacher_device)):
        _check(
            device is None
            or device in ("auto", "cpu", "cuda")
            or (device.startswith("cuda:") and device[5:].isdigit()),
            f"{key}={device!r}: tropd runs on auto, cpu, cuda or cuda:N",
        )
    o = cfg.optim
    _check(0 < o.lr < 3.4e38, f"optim.lr={o.lr} must be a positive finite number (at most 3.4e38, float32's largest)")
    _check(math.isfinite(o.eps) and o.eps > 0, f"optim.eps={o.eps} must be a positive finite number (e.g. 1e-8)")
    _check(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        f"optim.weight_decay={o.weight_decay} must be a finite number >= 0",
    )
    _check(
        len(o.betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in o.betas),
        f"optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.999]",
    )
    _check(math.isfinite(o.max_grad_norm), f"optim.max_grad_norm={o.max_grad_norm} must be finite (0 = no clipping)")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(cfg.optim.micro_batches >= 1, "optim.micro_batches must be at least 1")
    _check(cfg.optim.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps must be at least 1")
    _check(cfg.rollout.max_new_tokens > 0, f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} must be positive")
    _check(cfg.rollout.batch_size > 0, f"rollout.batch_size={cfg.rollout.batch_size} must be positive")
    _check(cfg.rollout.n_samples_per_prompt > 0, "rollout.n_samples_per_prompt must be positive")
    _check(
        cfg.rollout.temperature > 0,
        "rollout.temperature must be > 0 for training (rewards are log-ratios of sampled tokens)",
    )
    _check(0.0 < cfg.rollout.top_p <= 1.0, "rollout.top_p must be in (0, 1]")
    _choice(cfg.rollout.backend, ("loop", "generate", "vllm"), "rollout.backend")
    _choice(cfg.precision, ("auto", "bf16", "fp32"), "precision")
    if cfg.rollout.backend == "vllm":
        v = cfg.rollout.vllm
        _check(0.0 < v.gpu_memory_utilization < 1.0, "rollout.vllm.gpu_memory_utilization must be in (0, 1)")
        _check(
            not (v.teacher_scoring and cfg.method.name in ("gkd", "eopd")),
            f"method={cfg.method.name} needs the teacher's full distribution (entropy or every logit); "
            "set rollout.vllm.teacher_scoring=false",
        )
        _check(
            not v.teacher_scoring or cfg.method.top_k <= v.max_logprobs,
            f"method.top_k={cfg.method.top_k} is above rollout.vllm.max_logprobs={v.max_logprobs}; raise max_logprobs",
        )
        _check(
            not v.teacher_scoring or (cfg.rollout.scoring_temperature or cfg.rollout.temperature) == 1.0,
            "rollout.vllm.teacher_scoring works at temperature 1 only (vLLM returns raw log-probs)",
        )
        import os

        _check(
            not ((v.teacher_prefixes or v.teacher_scoring) and v.enable_sleep_mode)
            or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1",
            "a teacher vLLM engine next to the student's needs each in its own process when they sleep (vLLM's "
            "sleep mode allows one engine per process): export VLLM_ENABLE_V1_MULTIPROCESSING=1, or set "
            "rollout.vllm.enable_sleep_mode=false (docs/vllm.md)",
        )
    _validate_served_teacher(cfg)
    _check(cfg.distributed.timeout_minutes > 0, "distributed.timeout_minutes must be positive")
    _check(cfg.rollout.generation_batch_size >= 0, "rollout.generation_batch_size must be >= 0 (0 = all at once)")
    _choice(cfg.rollout.sampler_dtype, ("auto", "float32", "bfloat16", "float16"), "rollout.sampler_dtype")
    _choice(cfg.rollout.is_correction, ("none", "tis", "mis"), "rollout.is_correction")
    _check(
        cfg.rollout.backend != "vllm"
        or cfg.rollout.is_correction == "none"
        or (cfg.rollout.scoring_temperature or cfg.rollout.temperature) == 1.0,
        "rollout.is_correction with rollout.backend=vllm works at temperature 1 only (vLLM returns raw log-probs); "
        "set rollout.is_correction=none or the temperature to 1",
    )
    _check(
        isinstance(cfg.rollout.is_cap, int | float) and math.isfinite(cfg.rollout.is_cap) and cfg.rollout.is_cap >= 1,
        f"rollout.is_cap={cfg.rollout.is_cap} must be a number >= 1 (the largest importance weight kept)",
    )
    _check(cfg.method.top_k > 0, f"method.top_k={cfg.method.top_k} must be positive")
    _check(cfg.method.ppo_epochs >= 1, "method.ppo_epochs must be at least 1")
    _check(cfg.method.mini_batches >= 1, "method.mini_batches must be at least 1")
    _check(cfg.method.clip_eps is None or cfg.method.clip_eps > 0, "method.clip_eps must be positive (or null)")
    for key in ("jsd_beta", "gkd_beta", "switch_fraction", "refine_top_fraction", "entropy_top_fraction"):
        value = getattr(cfg.method, key)
        _check(0.0 <= value <= 1.0, f"method.{key}={value} must be in [0, 1]")
    _check(0.0 <= cfg.guidance.fraction <= 1.0, "guidance.fraction must be in [0, 1]")
    _check(cfg.guidance.beta >= 0, "guidance.beta must be >= 0")
    _check(cfg.scoring.chunk_size > 0, "scoring.chunk_size must be positive")
    _check(cfg.dataset.size > 0, f"dataset.size={cfg.dataset.size} must be positive")
    _check(
        cfg.dataset.source == "file" or bool(cfg.dataset.name),
        f"dataset.source={cfg.dataset.source} needs dataset.name (a reasoning-gym task or a hub dataset id)",
    )
    _check(cfg.dataset.source != "file" or bool(cfg.dataset.path), "dataset=file needs dataset.path=FILE")
    for role in ("teacher", "student"):
        _choice(
            getattr(cfg, role).attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2"),
            f"{role}.attn_implementation",
        )
    _check(bool(cfg.teacher.name), "teacher.name is empty; set a registry name, a local directory or a hub id")
    _check(cfg.student.from_teacher or bool(cfg.student.name), "set student.name or student.from_teacher=true")
    validate_student(cfg.student, "student")
    _check(cfg.student.lora.r >= 0, f"student.lora.r={cfg.student.lora.r} must be >= 0 (0 = full fine-tuning)")
    _check(
        cfg.student.lora.r == 0 or cfg.rollout.backend != "vllm",
        "student.lora with rollout.backend=vllm is not supported (the engine syncs full weights); use the loop backend",
    )
    _check(
        cfg.teacher.lora.r == 0,
        "teacher.lora is for trained models; the teacher is frozen (give it merged weights or a registry name)",
    )
    _check(cfg.save_every >= 0, f"save_every={cfg.save_every} must be >= 0 (0 = only the final checkpoint)")
    _check(cfg.keep_last >= 0, f"keep_last={cfg.keep_last} must be >= 0 (0 = keep every checkpoint)")
    _check(cfg.eval_every >= 0, f"eval_every={cfg.eval_every} must be >= 0 (0 = no evaluation during training)")
    _check(
        cfg.eval_every == 0 or bool(cfg.eval_suite),
        f"eval_every={cfg.eval_every} needs a suite to run: add eval_suite=NAME (e.g. eval_suite=tiny)",
    )
    validate_suites(cfg.eval_suite)


def validate_student(cfg: ModelConfig, key: str) -> None:
    """A ``from_teacher`` student is a copy of the teacher: a ``name`` beside it would go unused, so it is refused.

    ``key`` names the block in the message (``student`` in ``tropd train``, ``models.<i>`` in ``tropd eval``).
    """
    if not (cfg.from_teacher and cfg.name):
        return
    load = (
        f"load {cfg.name} with student=hub student.name={cfg.name}"
        if key == "student"
        else f"set from_teacher: false to load {cfg.name}"
    )
    _check(
        False,
        f"{key}.name={cfg.name} conflicts with {key}.from_teacher=true (such a student is a copy of the teacher); "
        f"drop {key}.name, or {load}",
    )


def validate_suites(suites: dict[str, EvalSuiteConfig]) -> None:
    """Checks of eval suites that types cannot express; raises UserError naming the key."""
    for name, suite in suites.items():
        key = f"eval_suite.{name}"
        _check(bool(suite.tasks), f"{key} has no tasks; add some under {key}.tasks")
        _check(suite.n_samples > 0, f"{key}.n_samples={suite.n_samples} must be positive")
        _check(suite.max_new_tokens > 0, f"{key}.max_new_tokens={suite.max_new_tokens} must be positive")
        _check(suite.batch_size > 0, f"{key}.batch_size={suite.batch_size} must be positive")
        _check(suite.temperature >= 0, f"{key}.temperature={suite.temperature} must be >= 0 (0 = greedy)")
        _check(0.0 < suite.top_p <= 1.0, f"{key}.top_p={suite.top_p} must be in (0, 1]")
        _choice(suite.reasoning, REASONING_MODES, f"{key}.reasoning")
        for j, pair in enumerate(suite.reasoning_tags):
            _check(
                len(pair) == 2 and all(pair),
                f"{key}.reasoning_tags.{j}={list(pair)} must be a pair [open, close] of non-empty tags",
            )
        for k in suite.pass_k:
            _check(
                1 <= k <= suite.n_samples,
                f"{key}.pass_k has k={k}, but pass@k needs 1 <= k <= n_samples={suite.n_samples}",
            )
        for i, task in enumerate(suite.tasks):
            _choice(task.benchmark, tuple(BENCHMARKS), f"{key}.tasks.{i}.benchmark")
            _check(task.size >= 0, f"{key}.tasks.{i}.size={task.size} must be >= 0 (0 = all problems)")


def _validate_served_teacher(cfg: TrainConfig) -> None:
    """``teacher.backend=server``: what a teacher known only by its top-k prompt log-probs and its text can do."""
    _choice(cfg.teacher.backend, ("local", "server"), "teacher.backend")
    _check(cfg.student.backend == "local", "student.backend must be local (only the teacher can be served)")
    if cfg.teacher.backend != "server":
        return
    srv = cfg.teacher.server
    _check(
        isinstance(srv.url, str) and srv.url.startswith(("http://", "https://")),
        f"teacher.server.url={srv.url!r} must be an http:// or https:// address (e.g. http://127.0.0.1:8000)",
    )
    _check(srv.timeout_s > 0, f"teacher.server.timeout_s={srv.timeout_s} must be positive")
    _check(srv.retries >= 0, f"teacher.server.retries={srv.retries} must be >= 0")
    _check(srv.concurrency >= 1, f"teacher.server.concurrency={srv.concurrency} must be >= 1")
    _check(
        srv.sequences_per_request >= 1, f"teacher.server.sequences_per_request={srv.sequences_per_request} must be >= 1"
    )
    _check(
        not cfg.student.from_teacher,
        "student.from_teacher needs the teacher's weights here; with teacher.backend=server name the student (student.name)",
    )
    _check(
        cfg.method.name not in ("gkd", "eopd"),
        f"method={cfg.method.name} needs the teacher's full distribution (entropy or every logit); a served teacher "
        "returns its top-k log-probs only: use teacher.backend=local",
    )
    _check(
        (cfg.rollout.scoring_temperature or cfg.rollout.temperature) == 1.0,
        "teacher.backend=server scores at temperature 1 only (vLLM's prompt log-probs are raw); set rollout.temperature=1",
    )
    _check(
        not (cfg.rollout.vllm.teacher_prefixes or cfg.rollout.vllm.teacher_scoring),
        "teacher.backend=server already writes and scores; set rollout.vllm.teacher_prefixes=false and teacher_scoring=false",
    )
    _check(
        not cfg.distributed.shard_teacher and cfg.teacher_device is None,
        "teacher.backend=server has no local teacher to shard or place; drop distributed.shard_teacher / teacher_device",
    )
