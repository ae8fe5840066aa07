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
class ServerConfig:
    """``teacher.backend=server``: the teacher served by an OpenAI-compatible vLLM server (docs/teacher-server.md)."""

    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # the served model's name; None = the one model the server serves
    api_key_env: str = "TROPD_TEACHER_API_KEY"  # an environment variable with a bearer token, when the server wants one
    timeout_s: float = 120.0  # per request
    retries: int = 3  # more tries of a request that timed out, could not connect or got a 5xx
    concurrency: int = 8  # requests in flight at once (per rank)
    sequences_per_request: int = 8  # sequences scored per request


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
    # Teacher only. local: loaded here (name, dtype, ...); server: scored and written by a served teacher at
    # server.url (top-k prompt log-probs; the weights never load here).
    backend: str = "local"
    server: ServerConfig = field(default_factory=ServerConfig)


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
    # Beyond the paper: the top-k FKL (tropd's fkl outliers, fkl_topk, eopd) with the mass the top-k leaves out
    # as one more outcome on both sides (train/losses.py::topk_forward_kl).
    tail: bool = False


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
    # Sampler/trainer mismatch correction, whenever the sampler is not the trained module itself (a bf16 sampling
    # copy, a vLLM engine): each student token's loss is weighed by w = pi_trainer / pi_sampler of the sampled
    # token. tis: min(w, is_cap) (truncated importance sampling); mis: w where w <= is_cap, else 0 (masked);
    # none: unweighted. The trained module's own samples are on-policy: no weight (train/losses.py).
    is_correction: str = "tis"
    is_cap: float = 2.0
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
    # Copy the weights before each update and put them back when the update made any non-finite (a float16
    # student overflowing, an lr far too large): one copy of the trainable weights in memory. false: no copy,
    # and a non-finite update stops the run before it can be saved.
    guard_updates: bool = True


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
