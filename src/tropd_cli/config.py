"""Structured config schemas (the shape); YAML under ``conf/`` holds the values.

Registered in Hydra's ConfigStore by :func:`register_configs`, so an unknown key or a wrong type is
rejected while Hydra composes, before any work starts. Below the command layer nothing imports Hydra:
engine code receives these dataclasses (``OmegaConf.to_object``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoraConfig:
    """LoRA (through ``peft``) for a trained model: ``r: 0`` trains every weight (full fine-tuning)."""

    r: int = 0  # rank; 0 = off
    alpha: int | None = None  # scale numerator (scale = alpha / r); None = 2 * r
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    """A teacher or a student.

    ``name`` is a registry entry (``smollm2-135m-instruct``, ``tiny-random``), a local directory or a
    hub id. A student with ``from_teacher: true`` is a copy of the teacher keeping ``keep_layers``.
    """

    name: str | None = None
    from_teacher: bool = False
    keep_layers: list[int] | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    revision: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False  # student only: recompute layer activations in backward (less memory)
    attn_implementation: str = "auto"  # auto (= sdpa) | sdpa | eager | flash_attention_2 (needs flash-attn)
    # Sizes used only by the ``tiny-random`` registry entry (tests and smoke runs).
    tiny_layers: int = 4
    tiny_hidden: int = 64
    tiny_seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)  # student only: train a LoRA adapter, not every weight


@dataclass
class DatasetConfig:
    """Prompts for training (and their gold answers when there are any)."""

    source: str = "reasoning_gym"  # reasoning_gym | file | hub
    name: str | None = "chain_sum"  # reasoning-gym task, or hub dataset id
    path: str | None = None  # local .jsonl / .json / .parquet when source=file
    subset: str | None = None  # hub dataset config name (e.g. gsm8k's "main")
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    # method=sft, sft_source=dataset: the field that holds the target response (a worked solution) when it is
    # not the answer; looked up in the row, then in its `metadata` (reasoning-gym keeps extras there).
    target_field: str | None = None
    size: int = 512
    seed: int = 1234
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    prompt_suffix: str = ""
    chat_template: bool = True
    max_prompt_tokens: int = 256


@dataclass
class MethodConfig:
    """Which objective, and its knobs (each read only by the methods named in its comment)."""

    name: str = (
        "tropd"  # tropd | opd | eopd | reopold | entropy_opd | fkl_topk | jsd_topk | gkd | sft | constant_advantage
    )
    top_k: int = 64  # teacher top-k ids for fkl / eopd / jsd_topk
    clip_eps: float | None = None  # PPO clip; None = plain ratio (REINFORCE on the first epoch)
    ppo_epochs: int = 1  # passes over each rollout batch (the trust mask is reused)
    mini_batches: int = 1  # optimizer steps per epoch (rollouts split into this many parts)
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean
    sft_source: str = "dataset"  # sft: dataset | teacher (who writes the targets)
    entropy_threshold: float = 0.8  # eopd: teacher-entropy gate in nats
    reward_floor: float = -1.3862943611198906  # reopold: c = log(lambda / (1 - lambda)), lambda = 0.2
    two_stage: bool = False  # reopold: exploration then refinement
    switch_fraction: float = 0.5  # reopold: share of training spent exploring
    refine_top_fraction: float = 0.5  # reopold refinement: share of tokens kept by student entropy
    entropy_top_fraction: float = 0.2  # entropy_opd: share of tokens kept by student entropy
    jsd_beta: float = 0.5  # jsd_topk: mixture weight of the teacher
    gkd_beta: float = 0.5  # gkd: generalized JSD beta (0 forward KL, 1 reverse KL)
    constant_advantage: float = -1.0  # constant_advantage (a control): the advantage every sampled token gets


@dataclass
class OutlierConfig:
    """What happens to tokens outside the trust region (TrOPD's component 2)."""

    strategy: str = "fkl"  # fkl | mask | clip
    clip_floor: float = -1.3862943611198906  # log(0.2 / 0.8)
    renormalize: bool = False


@dataclass
class TrustRegionConfig:
    kind: str = "bernoulli"  # bernoulli | threshold | none
    tau: float = 0.0


@dataclass
class GuidanceConfig:
    """Off-policy guidance (TrOPD's component 3): a teacher-written prefix the student continues."""

    enabled: bool = True
    beta: float = 1e-3
    schedule: str = "cosine"  # cosine | constant
    prefix_sampling: str = "min"  # min: l = min(l_max, len); uniform: l ~ U[0, l_max]
    fraction: float = 1.0  # share of rollouts that get a prefix


@dataclass
class VLLMConfig:
    """The colocated vLLM engine of ``rollout.backend=vllm`` (docs/vllm.md)."""

    gpu_memory_utilization: float = 0.3  # share of the GPU for vLLM's weights + KV cache (it sleeps otherwise)
    dtype: str = "bfloat16"  # auto | bfloat16 | float16 | float32
    max_model_len: int | None = None  # None: dataset.max_prompt_tokens + rollout.max_new_tokens
    enable_sleep_mode: bool = True  # release the KV cache and offload the weights outside rollouts
    tensor_parallel_size: int = 1
    max_logprobs: int = 64  # >= method.top_k when teacher_scoring
    enforce_eager: bool = False  # no CUDA graphs (less memory, slower decode)
    # Guidance prefixes (and sft_source=teacher responses) from a teacher engine. vLLM's sleep mode allows one
    # engine per process (vLLM #18975): a second engine needs VLLM_ENABLE_V1_MULTIPROCESSING=1 or no sleep mode.
    teacher_prefixes: bool = False
    teacher_scoring: bool = False  # teacher log-probs and top-k from that engine too (temperature 1)
    teacher_gpu_memory_utilization: float = 0.2


@dataclass
class RolloutConfig:
    batch_size: int = 4  # prompts per optimizer step
    n_samples_per_prompt: int = 1
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    scoring_temperature: float | None = None  # None = same as rollout temperature
    backend: str = "loop"  # loop: minimal KV-cache loop | generate: HF generate | vllm: a colocated vLLM engine
    sampler_dtype: str = "auto"  # dtype of the sampling copy of the student (auto: bf16 where fast)
    generation_batch_size: int = (
        0  # loop/generate: sample at most this many sequences at once (bounds the KV cache); 0 = all
    )
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # rollout.backend=vllm only


@dataclass
class DistributedConfig:
    """Multi-process training (``torchrun``/``accelerate launch``; ignored in a single process): docs/scaling.md."""

    shard_teacher: bool = False  # FSDP-shard the teacher too (when a replica per GPU does not fit)
    reshard_after_forward: bool = True  # free gathered layers after forward (less memory, one more all-gather)
    timeout_minutes: int = 60  # collective timeout (rank 0 evaluates alone during eval_every)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batches: int = 1  # gradient accumulation: rollouts are split into this many micro-batches
    warmup_steps: int = 0
    max_nonfinite_steps: int = 3  # stop after this many steps in a row whose every update was non-finite


@dataclass
class LoggerConfig:
    name: str = "rich"  # rich | wandb | none
    project: str = "tropd"
    entity: str | None = None
    mode: str | None = None  # wandb mode; None = online with an API key, offline without


@dataclass
class EvalTaskConfig:
    """One benchmark of a suite (loaders and file schemas: docs/evaluation.md)."""

    name: str = "chain_sum"  # its column in the results table
    # gsm8k | math500 | aime24 | aime25 | amc23 | math (any file/hub set with prompt_field/answer_field)
    # | reasoning_gym | humaneval | mbpp | livecodebench | gpqa_diamond | mmlu_redux | ifeval | ifbench
    benchmark: str = "reasoning_gym"
    path: str | None = None  # a local .jsonl/.json/.parquet/.csv file instead of the hub dataset
    hub_name: str | None = None  # hub dataset id; None = the benchmark's usual one
    subset: str | None = None  # hub dataset config; None = the benchmark's default
    split: str | None = None  # None = the benchmark's default
    prompt_field: str | None = None  # benchmark=math: the question field (None = problem/question/prompt)
    answer_field: str | None = None  # benchmark=math: the gold-answer field (None = answer)
    task: str | None = None  # benchmark=reasoning_gym: the generator (None = name)
    size: int = 0  # first `size` problems; 0 = all (reasoning-gym needs a positive size)
    seed: int = 2024  # reasoning-gym generator seed; choice order for gpqa_diamond
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # per benchmark, e.g. livecodebench start_date


@dataclass
class EvalSuiteConfig:
    """Tasks sharing one set of sampling settings; several suites combine (``eval_suite=[math,code]``)."""

    tasks: list[EvalTaskConfig] = field(default_factory=list)
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n_samples: int = 1  # completions per problem: avg@n, maj@n (math, multiple choice), pass@k
    pass_k: list[int] = field(default_factory=lambda: [1])  # k values for pass@k (each <= n_samples)
    batch_size: int = 16
    chat_template: bool = True
    system_prompt: str | None = None
    prompt_suffix: str = ""
    stop: list[str] = field(default_factory=list)  # cut completions here (never inside a \boxed{} or code fence)
    max_prompt_tokens: int = 4096  # longer prompts are cut from the left
    # strip: grade only what follows a closed reasoning block (<think>...</think>, the tags the chat template
    # declares, reasoning_tags); an unclosed block scores 0 (truncated_reasoning). keep: grade the raw text.
    reasoning: str = "strip"
    reasoning_tags: list[list[str]] = field(default_factory=list)  # extra [open, close] pairs


@dataclass
class ScoringConfig:
    chunk_size: int = 512  # positions per lm_head chunk


@dataclass
class HeldoutConfig:
    """Held-out training signals: KLs, outlier share and empty answers on prompts the run never trains on.

    Definitions in docs/cli.md (``heldout/*`` in metrics.jsonl); the prompts: ``heldout.heldout_examples``.
    """

    size: int = 32  # held-out prompts; 0 = off
    max_new_tokens: int | None = None  # the teacher's and the student's responses; None = rollout.max_new_tokens
    every: int | None = None  # measure every N steps (and before the first, after the last); None = eval_every
    temperature: float = 0.0  # the teacher's responses: 0 = greedy; > 0 = sampled once, with a fixed seed
    # Keep the held-out set and the untrained student's measurement here, under a key of everything they depend
    # on, for runs that share them (an ablation's cells; `tropd ablate` sets <sweep>/reference/heldout); null = off.
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    trust_region: TrustRegionConfig = field(default_factory=TrustRegionConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    steps: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK, or cpu with gloo)
    teacher_device: str | None = None  # the teacher on its own device (e.g. cuda:1); None = same as the student
    precision: str = "auto"  # student compute: auto (bf16 on a bf16 GPU, else fp32) | bf16 | fp32
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    threads: int | None = None  # torch intra-op threads; None = torch's default
    save_every: int = 0  # resumable checkpoints every N steps (0 = only the final checkpoint)
    keep_last: int = 2  # resumable checkpoints kept (the newest; 0 = all)
    resume: str | None = None  # auto (newest valid checkpoint of this run dir, if any) | a run dir | a step_* dir
    resume_force: bool = False  # resume even if the model, data or method config changed
    cache_dir: str | None = None  # model cache; None = $TROPD_CACHE or ~/.cache/tropd
    eval_every: int = 0  # run eval_suite on the student every N steps (and after the last); 0 = never
    eval_suite: dict[str, EvalSuiteConfig] = field(default_factory=dict)  # eval_suite=NAME (group)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)  # held-out signals before, during, after training


@dataclass
class EvalConfig:
    """``tropd eval``: score ``models`` on ``eval_suite``.

    A ``models`` entry is a string (a registry name, a local directory, a hub id, or one of the shorthands
    ``latest``, ``teacher``, ``student_init``) or a mapping of :class:`ModelConfig` fields (plus an optional
    ``label``), e.g. ``{name: smollm2-135m-instruct, keep_layers: [0, 1, 28, 29]}``. ``teacher`` and
    ``student_init`` are this config's ``teacher`` and ``student`` (the ``teacher/`` and ``student/`` groups,
    as in ``tropd train``; with ``experiment=NAME``, that train preset's), the student as training starts it.
    """

    models: list[Any] = field(default_factory=list)
    teacher: ModelConfig = field(default_factory=ModelConfig)  # `teacher` in models, and from_teacher entries
    student: ModelConfig = field(default_factory=ModelConfig)  # `student_init` in models
    # A train experiment/ preset whose teacher and student (and eval suite, unless eval_suite=... is given)
    # this run uses. On the command line it is spelled `experiment=NAME`, renamed by the dispatcher.
    train_experiment: str | None = None
    eval_suite: dict[str, EvalSuiteConfig] = field(default_factory=dict)  # suite name -> suite
    generations: str | None = None  # re-score this generations.jsonl instead of generating
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    dtype: str = "auto"
    cache_dir: str | None = None
    runs_dir: str = "outputs/train"  # where `latest` looks for trained runs


@dataclass
class AblationConfig:
    """A grid: named variants (``tropd train`` overrides each), every one trained per seed, then scored."""

    name: str = "grid"
    description: str = ""
    variants: dict[str, list[str]] = field(default_factory=dict)  # variant -> train overrides
    base: list[str] = field(default_factory=list)  # train overrides every variant gets
    eval_suite: str | None = "tiny"  # an eval_suite/ option scored on each trained student; null = none


@dataclass
class AblateConfig:
    """``tropd ablate``: one Hydra multirun job per (variant, seed) cell, then a summary of them all."""

    ablation: AblationConfig = field(default_factory=AblationConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # A train experiment/ preset for every cell (e.g. tiny, lab). On the command line it is spelled
    # `experiment=NAME`: the dispatcher renames it, since `experiment` is also a config group name.
    train_experiment: str | None = None
    overrides: list[str] = field(default_factory=list)  # more train overrides for every cell
    variant: str | None = None  # this job's cell: set by the sweep
    seed: int = 0  # this job's cell: set by the sweep
    threads: int | None = None  # torch threads per cell (parallel launchers: cores / jobs)


def register_configs() -> None:
    """Register the schemas; YAML files extend them through their defaults lists."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="ablate_schema", node=AblateConfig)


def _check(condition: bool, message: str) -> None:
    if not condition:
        from tropd_cli.errors import UserError

        raise UserError(message)


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    _check(value in options, f"{key}={value!r} is not an option; choose one of: {', '.join(options)}")


def validate_train(cfg: TrainConfig) -> None:
    """Value checks that types alone cannot express; raises UserError naming the key to fix."""
    from tropd_cli.losses import OUTLIER_STRATEGIES, TRUST_REGION_KINDS
    from tropd_cli.methods import METHODS

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
    _check(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive")
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
    _check(cfg.distributed.timeout_minutes > 0, "distributed.timeout_minutes must be positive")
    _check(cfg.rollout.generation_batch_size >= 0, "rollout.generation_batch_size must be >= 0 (0 = all at once)")
    _choice(cfg.rollout.sampler_dtype, ("auto", "float32", "bfloat16", "float16"), "rollout.sampler_dtype")
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
    from tropd_cli.benchmarks import BENCHMARKS
    from tropd_cli.reasoning import REASONING_MODES

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
