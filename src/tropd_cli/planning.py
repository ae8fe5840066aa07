"""Memory and throughput planning for a run: parameter counts from an HF ``config.json``, per-GPU bytes
of every component tropd holds, and a FLOP / bandwidth estimate of one step. Pure Python, no torch.

Everything here mirrors what the code does (docs/scaling.md explains each component and its knobs):

- the student trains with fp32 master weights, fp32 gradients and torch AdamW (two fp32 states); with
  ``world_size > 1`` FSDP2 shards all three over the ranks;
- HF rollouts (``rollout.backend=loop|generate``) come from a separate copy of the student in
  ``rollout.sampler_dtype`` (bf16 on a GPU), whole on every rank, with an HF ``DynamicCache`` over the
  rows of one sampling call: ``rollout.generation_batch_size`` rows at a time (0: the rank's whole batch);
  guidance prefixes are sampled by the teacher the same way, before the student continues them, and
  each row's continuation stops at its own budget (``max_new_tokens - len(prefix)``);
- ``rollout.backend=vllm`` has no HF sampler: a student engine takes ``gpu_memory_utilization`` of the
  GPU while awake and nothing while asleep (level 1: bf16 weights in host RAM). By default
  (``rollout.vllm.teacher_prefixes=false``) it is the only engine: the HF teacher writes the guidance
  prefixes with the loop sampler, ``rollout.generation_batch_size`` rows at a time, and ``EngineSamplers``
  empties torch's cache once they are written, so the student engine wakes to continue them without the
  blocks torch cached for them (nor the weight sync's). A teacher engine (``teacher_prefixes`` or
  ``teacher_scoring``) takes ``teacher_gpu_memory_utilization``; beside a sleeping student engine it
  needs ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (vLLM's sleep mode allows one engine per process:
  ``vllm_multiprocessing``). The engines are awake one at a time: the weight sync wakes the student
  engine's weights (not its KV cache), the teacher engine wakes to write the prefixes and sleeps once
  they are written, then the student engine wakes whole, continues them and sleeps; a teacher engine
  that scores (``teacher_scoring``) wakes again for that. vLLM maps an engine's memory outside torch's
  caching allocator, so ``EngineSamplers`` empties torch's cache before the engines wake (before the weight
  sync, once the HF teacher's prefixes are written, and before a sleeping teacher engine scores), and
  vLLM empties it whenever an engine in tropd's process goes to sleep (not one in a process of its own:
  a teacher engine's sleep leaves the weight sync's blocks cached). Each request's ``max_tokens`` is
  its row's own budget, so no sequence outgrows ``max_model_len`` (= prompt + ``max_new_tokens``);
- the teacher is frozen in bf16, replicated or (``distributed.shard_teacher``) FSDP-sharded;
- scoring projects the lm_head only at response positions, ``scoring.chunk_size`` rows at a time;
  the teacher's top-k ids and log-probs of the whole rank batch are kept until the update is done;
- ``optim.micro_batches`` splits the rank's rollouts for gradient accumulation (one micro-batch's
  activations at a time), ``student.gradient_checkpointing`` keeps only each layer's input.

The activation model (:func:`layer_activation_bytes_per_token`) counts the tensors autograd saves in
one Llama / Qwen2 / Qwen3 decoder layer of transformers 5 with SDPA attention and a padding mask, as
measured on CPU with ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_planning.py checks it
exactly). It assumes a memory-efficient SDPA kernel on GPU (saves q, k, v, output, log-sum-exp: no
``[S, S]`` probabilities) and counts the float copy of the padding mask SDPA makes in every layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

GiB = 2**30
FP32, BF16, INT64 = 4, 2, 8
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}

# ---------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only LM that memory and FLOPs depend on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = False  # lm_head shares the input embedding matrix
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From an HF ``config.json`` dict of a ``llama``, ``mistral``, ``qwen2`` or ``qwen3`` model."""
        kind = config.get("model_type")
        if kind not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"model_type {kind!r}: planning knows llama, mistral, qwen2 and qwen3 decoders")
        heads = int(config["num_attention_heads"])
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab=int(config["vocab_size"]),
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate=int(config["intermediate_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o bias; Llama and Qwen3 put attention_bias on all four.
            qkv_bias=True if kind == "qwen2" else attention_bias and kind != "mistral",
            o_bias=attention_bias and kind in ("llama", "qwen3"),
            mlp_bias=bool(config.get("mlp_bias", False)) and kind == "llama",
            qk_norm=kind == "qwen3",
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by part; ``total`` counts a tied embedding once (as ``model.parameters()`` does)."""

    embed: int
    attention: int  # all layers
    mlp: int  # all layers
    norms: int  # all layers' norms + the final norm
    lm_head: int  # 0 when tied
    per_layer: int
    layers: int

    @property
    def total(self) -> int:
        return self.embed + self.attention + self.mlp + self.norms + self.lm_head

    @property
    def body(self) -> int:
        """Parameters of the decoder layers (what every token's matmuls touch)."""
        return self.per_layer * self.layers


def linear_weights(m: ModelShape) -> int:
    """Matmul weights of the decoder layers (no biases or norms): what bf16 autocast casts and saves."""
    return m.layers * (2 * m.hidden * m.q_dim + 2 * m.hidden * m.kv_dim + 3 * m.hidden * m.intermediate)


def param_counts(shape: ModelShape | Mapping[str, Any]) -> ParamCounts:
    """Exact parameter counts of a Llama / Mistral / Qwen2 / Qwen3 causal LM (from its config or shape)."""
    m = shape if isinstance(shape, ModelShape) else ModelShape.from_config(shape)
    h, q, kv = m.hidden, m.q_dim, m.kv_dim
    attn = h * q + 2 * h * kv + q * h
    attn += (q + 2 * kv) if m.qkv_bias else 0
    attn += h if m.o_bias else 0
    attn += 2 * m.head_dim if m.qk_norm else 0
    mlp = 3 * h * m.intermediate + ((2 * m.intermediate + h) if m.mlp_bias else 0)
    norms = 2 * h
    return ParamCounts(
        embed=m.vocab * h,
        attention=attn * m.layers,
        mlp=mlp * m.layers,
        norms=norms * m.layers + h,
        lm_head=0 if m.tied else m.vocab * h,
        per_layer=attn + mlp + norms,
        layers=m.layers,
    )


# ---------------------------------------------------------------------------------------------
# Activations and caches


def kv_cache_bytes(m: ModelShape, sequences: int, tokens: int, dtype_bytes: int = BF16) -> int:
    """An HF ``DynamicCache`` holding ``tokens`` positions of ``sequences`` rows: K and V per layer."""
    return 2 * m.layers * m.kv_dim * dtype_bytes * sequences * tokens


def layer_activation_bytes_per_token(m: ModelShape, seq_len: int, precision: str) -> int:
    """Bytes autograd saves per token in one decoder layer (transformers 5, SDPA, padded batch).

    ``precision``: ``fp32`` (fp32 weights and activations), ``autocast`` (fp32 weights under bf16
    autocast: tropd's single-GPU ``precision=bf16``) or ``bf16`` (bf16 compute weights: FSDP2's
    mixed-precision policy on several GPUs). What is counted, per token:

    - two RMSNorms: their fp32 input and normalised input (``x``, ``x * rsqrt``), one rsqrt each, and
      the output as the next linears save it (fp32: once; autocast: one bf16 cast per consumer, 3 for
      q/k/v and 2 for gate/up; bf16: the bf16 normalised value and the bf16 output);
    - attention: rotated q, k and v repeated to all heads (``repeat_kv``: a padded batch cannot use
      SDPA's GQA path), the output, the fp32 log-sum-exp per head, and SDPA's float copy of the
      padding mask (``seq_len`` entries per query, made again in every layer);
    - Qwen3's q/k norms: their fp32 inputs and normalised values, one rsqrt per head;
    - SwiGLU MLP: gate output, SiLU output, up output and their product (4 x intermediate).
    """
    if precision not in ("fp32", "autocast", "bf16"):
        raise ValueError(f"precision {precision!r}: choose fp32, autocast or bf16")
    a = FP32 if precision == "fp32" else BF16
    h = m.hidden
    if precision == "fp32":  # per norm: x, x * rsqrt, output (shared by the linears that read it)
        norms = 2 * 3 * h * FP32
    elif precision == "autocast":  # fp32 residual stream; each consumer linear saves its own bf16 cast
        norms = 2 * 2 * h * FP32 + 5 * h * BF16
    else:  # bf16: the fp32 upcast of x, the bf16 normalised value, the bf16 output
        norms = 2 * (h * FP32 + 2 * h * BF16)
    norms += 2 * FP32  # one rsqrt per norm
    attention = 4 * m.q_dim * a + m.heads * FP32 + seq_len * a
    qk_norm = 0
    if m.qk_norm:
        norm_dims = m.q_dim + m.kv_dim
        qk_norm = norm_dims * (FP32 + (FP32 if precision == "fp32" else BF16)) + (m.heads + m.kv_heads) * FP32
    mlp = 4 * m.intermediate * a
    return norms + attention + qk_norm + mlp


def outside_layers_bytes_per_token(m: ModelShape, precision: str) -> int:
    """Saved per token outside the layers: the embedding output (bf16: the final norm's fp32 upcast),
    the final norm's ``x * rsqrt`` and rsqrt, the token ids, RoPE's cos and sin."""
    if precision == "bf16":
        return m.hidden * (FP32 + BF16) + FP32 + INT64 + 2 * m.head_dim * BF16
    return m.hidden * 2 * FP32 + FP32 + INT64 + 2 * m.head_dim * FP32


def decoder_saved_bytes(m: ModelShape, sequences: int, seq_len: int, precision: str) -> int:
    """Everything autograd saves in a decoder forward over ``sequences x seq_len`` tokens (no checkpointing)."""
    tokens = sequences * seq_len
    return tokens * (
        m.layers * layer_activation_bytes_per_token(m, seq_len, precision)
        + outside_layers_bytes_per_token(m, precision)
    )


def training_activation_bytes(
    m: ModelShape, sequences: int, seq_len: int, precision: str, *, checkpointing: bool
) -> int:
    """Peak activation memory of one micro-batch's forward + backward through the decoder.

    Without checkpointing: everything :func:`decoder_saved_bytes` counts, plus one layer's worth of
    gradient buffers in flight during backward (a heuristic: the backward of a layer allocates about as
    much as the layer saved). With checkpointing: each layer keeps only its input (the residual stream:
    fp32, or bf16 under FSDP mixed precision) and the shared boolean padding mask; in backward one
    layer is recomputed at a time, so add one layer's saved activations and its gradient buffers.
    """
    tokens = sequences * seq_len
    layer = tokens * layer_activation_bytes_per_token(m, seq_len, precision)
    outside = tokens * outside_layers_bytes_per_token(m, precision)
    if not checkpointing:
        return m.layers * layer + outside + layer
    residual = BF16 if precision == "bf16" else FP32
    kept = m.layers * tokens * m.hidden * residual + sequences * seq_len * seq_len  # + bool [b, 1, S, S] mask
    return kept + outside + 2 * layer


def inference_bytes_per_token(m: ModelShape, seq_len: int, dtype_bytes: int) -> int:
    """Peak temporaries of one no-grad decoder layer per token (prefill, teacher scoring); an estimate.

    Residual in, the norm's fp32 copy and ``x * rsqrt``, its output, q/k/v, k and v repeated to all
    heads, the attention output, gate/up/SiLU of the MLP, and the layer's float copy of the padding mask.
    """
    a = dtype_bytes
    hidden = m.hidden * (2 * FP32 + 2 * a)
    attention = (m.q_dim + 2 * m.kv_dim) * a + 3 * m.q_dim * a
    return hidden + attention + 3 * m.intermediate * a + seq_len * a


# ---------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # what the driver reports as total
    bf16_flops: float  # dense peak, tensor cores
    fp32_flops: float  # dense peak without TF32 (tropd does not enable TF32)
    hbm_bytes_per_s: float


# NVIDIA datasheets (SXM): H100 80 GB HBM3 3.35 TB/s, H200 141 GB HBM3e 4.8 TB/s; both 989 TFLOP/s dense
# BF16 and 67 TFLOP/s FP32. Totals as nvidia-smi reports them (81559 MiB, 143771 MiB).
H100 = GPU("H100 SXM 80GB", 81559 * 2**20, 989e12, 67e12, 3.35e12)
H200 = GPU("H200 SXM 141GB", 143771 * 2**20, 989e12, 67e12, 4.8e12)


# ---------------------------------------------------------------------------------------------
# A run and its memory plan


@dataclass(frozen=True)
class RunShape:
    """What memory depends on in a ``tropd train`` run (config keys in the comments)."""

    student: ModelShape
    teacher: ModelShape
    world_size: int = 1
    sequences: int = 512  # rollout.batch_size x rollout.n_samples_per_prompt, all ranks together
    prompt_tokens: int = 512  # prompt width after left-padding (<= dataset.max_prompt_tokens)
    response_tokens: int = 8192  # rollout.max_new_tokens
    prefix_tokens: int = 0  # guidance prefix cap at the step planned (step 0: max_new_tokens; late steps: about 0)
    micro_batches: int = 1  # optim.micro_batches (x method.mini_batches)
    chunk_size: int = 512  # scoring.chunk_size
    top_k: int = 64  # method.top_k
    gradient_checkpointing: bool = False  # student.gradient_checkpointing
    shard_teacher: bool = False  # distributed.shard_teacher
    precision: str = "bf16"  # precision: student compute, bf16 (a bf16 GPU's auto) or fp32
    sampler_dtype: str = "bfloat16"  # rollout.sampler_dtype as resolved
    teacher_dtype: str = "bfloat16"  # teacher.dtype as resolved
    backend: str = "loop"  # rollout.backend: loop / generate (HF cache) or vllm
    # rollout.generation_batch_size: rows one HF sampling call holds (0: all), the student's (loop / generate)
    # and the HF teacher's guidance prefixes (any backend without a teacher engine writing them)
    generation_batch_size: int = 0
    guidance: bool = True  # guidance.enabled (the teacher writes prefixes at every step whose cap is > 0)
    vllm_gpu_memory_utilization: float = 0.3  # rollout.vllm.gpu_memory_utilization: the student engine's share
    vllm_teacher_gpu_memory_utilization: float = 0.2  # rollout.vllm.teacher_gpu_memory_utilization
    vllm_teacher_prefixes: bool = False  # rollout.vllm.teacher_prefixes: a teacher engine writes the prefixes
    vllm_teacher_scoring: bool = False  # rollout.vllm.teacher_scoring: ... and scores the rollouts
    vllm_sleep: bool = True  # rollout.vllm.enable_sleep_mode: engines asleep (level 1) outside their use
    # VLLM_ENABLE_V1_MULTIPROCESSING=1: every engine core in its own process (tropd sets 0 unless the user did).
    # vLLM's sleep mode allows one engine per process, so a teacher engine beside a sleeping student engine
    # needs it (validate.validate_train refuses the run otherwise; ``MemoryPlan.problems`` says so). The weight
    # sync then goes through ``collective_rpc``: the fp32 student copied to host RAM on every rank.
    vllm_multiprocessing: bool = False
    # Whether torch.cuda.empty_cache() runs before an engine wakes. tropd calls it (generate.make_batch before
    # the weight sync wakes the student engine, EngineSamplers.after_prefixes once the HF teacher's prefixes are
    # written and before the student engine wakes whole, step.score_teacher before a sleeping teacher
    # engine wakes to score). False plans the code before those calls, for comparison: vLLM maps an engine's
    # memory outside torch's caching allocator, so without them the blocks torch cached during the previous
    # step's scoring, backward and optimizer step stay reserved beside the waking engines
    # (``torch_cache_held``), and so do those of the HF teacher's prefixes (``teacher_prefix_blocks_held``).
    release_torch_cache: bool = True

    @property
    def sequences_per_rank(self) -> int:
        if self.sequences % self.world_size:
            raise ValueError(f"{self.sequences} sequences do not split over {self.world_size} ranks")
        return self.sequences // self.world_size

    @property
    def micro_batch_sequences(self) -> int:
        """The largest micro-batch (trainer: ``min(micro_batches, rows)`` near-equal parts)."""
        parts = max(1, min(self.micro_batches, self.sequences_per_rank))
        return -(-self.sequences_per_rank // parts)

    @property
    def seq_len(self) -> int:
        """Training / scoring width: the prompt, then the response (guidance prefix included)."""
        return self.prompt_tokens + self.response_tokens

    @property
    def training_precision(self) -> str:
        """Activation model: fp32, autocast (one GPU, bf16) or bf16 (FSDP mixed precision)."""
        if self.precision == "fp32":
            return "fp32"
        return "bf16" if self.world_size > 1 else "autocast"

    @property
    def generation_rows(self) -> int:
        """Rows one HF sampling call holds (``rollout.sample``: chunks of ``generation_batch_size`` rows)."""
        rows = self.sequences_per_rank
        return min(self.generation_batch_size, rows) if self.generation_batch_size > 0 else rows

    @property
    def generation_chunks(self) -> int:
        """HF sampling calls per rank and rollout, one after the other."""
        return -(-self.sequences_per_rank // self.generation_rows)

    @property
    def teacher_engine(self) -> bool:
        """``engines.start_engines`` starts a teacher engine (it writes prefixes and/or scores)."""
        return self.backend == "vllm" and (self.vllm_teacher_scoring or (self.vllm_teacher_prefixes and self.guidance))

    @property
    def max_model_len(self) -> int:
        """The engines' ``max_model_len`` (``dataset.max_prompt_tokens + rollout.max_new_tokens``)."""
        return self.prompt_tokens + self.response_tokens


@dataclass(frozen=True)
class Component:
    name: str
    phase: str  # persistent | sampling | teacher_scoring | training | optimizer | startup | host
    bytes: int
    note: str = ""


# In the order of a step: the teacher writes the guidance prefixes, the student samples (continues them),
# the teacher scores, the student trains (one micro-batch at a time), the optimizer steps.
PHASES = ("prefixes", "sampling", "teacher_scoring", "training", "optimizer")


@dataclass
class MemoryPlan:
    """Named per-GPU components; the peak is the persistent state plus the largest phase.

    Two more figures stand apart: ``startup`` (the models as loaded, before FSDP shards them, plus the
    share an engine asks for when it starts) and ``host`` (host RAM per rank: engine weights while asleep).
    """

    run: RunShape
    components: list[Component] = field(default_factory=list)
    gpu: GPU | None = None

    def add(self, name: str, phase: str, nbytes: float, note: str = "") -> None:
        self.components.append(Component(name, phase, int(nbytes), note))

    def get(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    def phase_total(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def persistent(self) -> int:
        return self.phase_total("persistent")

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.persistent + self.phase_total(self.peak_phase)

    @property
    def startup(self) -> int:
        return self.phase_total("startup")

    @property
    def host(self) -> int:
        return self.phase_total("host")

    def problems(self, gpu: GPU, usable: float = 0.9) -> list[str]:
        """Why the plan does not fit ``gpu`` (empty: it fits)."""
        limit = usable * gpu.memory_bytes
        out = []
        if self.peak > limit:
            out.append(f"peak {self.peak / GiB:.1f} GiB ({self.peak_phase}) > {limit / GiB:.1f} GiB")
        if self.startup > limit:
            out.append(f"startup {self.startup / GiB:.1f} GiB > {limit / GiB:.1f} GiB")
        if self.run.backend == "vllm":
            if self.run.teacher_engine and self.run.vllm_sleep and not self.run.vllm_multiprocessing:
                out.append(
                    "a teacher engine beside the sleeping student engine needs VLLM_ENABLE_V1_MULTIPROCESSING=1 "
                    "(vLLM's sleep mode allows one engine per process)"
                )
            roles = ["student"] + (["teacher"] if self.run.teacher_engine else [])
            for role in roles:
                if vllm_concurrent_rows(self.run, gpu, role) < 1:
                    out.append(f"the {role} engine's KV pool cannot hold one {self.run.max_model_len}-token sequence")
        return out

    def fits(self, gpu: GPU, usable: float = 0.9) -> bool:
        """Peak and startup within ``usable`` of the GPU (the rest: CUDA context, NCCL buffers, allocator
        fragmentation), every vLLM engine's KV pool holds at least one ``max_model_len`` sequence, and two
        sleeping engines run in processes of their own (``vllm_multiprocessing``)."""
        return not self.problems(gpu, usable)


def _sampling_sub_phase(
    m: ModelShape, rows: int, prompt: int, new_tokens: int, dtype_bytes: int
) -> tuple[int, int, str]:
    """(KV cache, other temporaries, which moment) at the peak of one HF-loop sampling call.

    Prefill: the cache of ``prompt`` positions plus one layer's temporaries over all ``rows x prompt``
    tokens (the loop prefills the whole call at once). Decode: the cache at its longest, ``prompt +
    new_tokens - 1`` positions (the last sampled token is never fed back), one layer's cache twice
    while ``torch.cat`` grows it, and the last position's logits (model dtype, fp32 copy, probabilities).
    """
    final = prompt + max(new_tokens, 1) - 1
    kv_prefill = kv_cache_bytes(m, rows, prompt, dtype_bytes)
    prefill = rows * prompt * inference_bytes_per_token(m, prompt, dtype_bytes)
    kv_final = kv_cache_bytes(m, rows, final, dtype_bytes)
    decode = kv_final // max(1, m.layers) + rows * m.vocab * (dtype_bytes + 2 * FP32)
    if kv_prefill + prefill > kv_final + decode:
        return kv_prefill, prefill, f"prefill of {rows} rows x {prompt} positions"
    return kv_final, decode, f"decode, {rows} rows x up to {final} positions"


def sampling_kv_cache_bytes(run: RunShape, role: str = "student") -> int:
    """The largest ``DynamicCache`` one HF sampling call of ``run`` reaches (the end of its decode).

    Student: ``generation_rows`` rows x (prompt + prefix cap + a whole response - 1) positions: a call's
    rows are left-padded to its longest context, and it decodes until its longest budget is spent (a row
    with no or a short prefix has a whole response). Teacher (guidance prefixes): ``generation_rows`` rows x
    (prompt + prefix cap - 1). The last sampled token is never fed back, hence the - 1.
    """
    if role == "student":
        positions = run.prompt_tokens + run.prefix_tokens + run.response_tokens - 1
        return kv_cache_bytes(run.student, run.generation_rows, positions, DTYPE_BYTES[run.sampler_dtype])
    if role == "teacher":
        positions = run.prompt_tokens + max(run.prefix_tokens, 1) - 1
        return kv_cache_bytes(run.teacher, run.generation_rows, positions, DTYPE_BYTES[run.teacher_dtype])
    raise ValueError(f"role {role!r}: student or teacher")


def vllm_kv_pool_bytes(run: RunShape, gpu: GPU, role: str = "student") -> int:
    """An engine's paged KV pool, at most: its share of the GPU less its bf16 weights. vLLM also takes its
    profiled activation peak (and, in recent releases, its CUDA graphs) out of the share: not modelled."""
    model, share = _engine(run, role)
    return int(share * gpu.memory_bytes) - param_counts(model).total * BF16


def vllm_concurrent_rows(run: RunShape, gpu: GPU, role: str = "student") -> int:
    """Sequences of ``max_model_len`` positions the engine's pool holds at once (vLLM refuses to start
    below 1); with fewer than a rank's rollouts it queues or preempts the rest."""
    model, _ = _engine(run, role)
    return max(0, vllm_kv_pool_bytes(run, gpu, role) // kv_cache_bytes(model, 1, run.max_model_len))


def _engine(run: RunShape, role: str) -> tuple[ModelShape, float]:
    if role == "student":
        return run.student, run.vllm_gpu_memory_utilization
    if role == "teacher":
        return run.teacher, run.vllm_teacher_gpu_memory_utilization
    raise ValueError(f"role {role!r}: student or teacher")


def plan_memory(run: RunShape, gpu: GPU | None = None) -> MemoryPlan:
    """Per-GPU bytes of every component of a step of ``run`` (``gpu`` needed for ``backend=vllm``)."""
    s, t = run.student, run.teacher
    n = run.world_size
    ps, pt = param_counts(s), param_counts(t)
    plan = MemoryPlan(run, gpu=gpu)
    rows, b = run.sequences_per_rank, run.micro_batch_sequences
    sampler_bytes = DTYPE_BYTES[run.sampler_dtype]
    teacher_bytes = DTYPE_BYTES[run.teacher_dtype]
    compute_bytes = FP32 if run.precision == "fp32" else BF16
    sharded = " / world_size (FSDP2)" if n > 1 else ""
    vllm = run.backend == "vllm"
    if vllm and gpu is None:
        raise ValueError("backend=vllm: pass the GPU (an engine takes a share of its memory)")
    # One process with an fp32 sampler samples from the student itself; vLLM needs no HF sampler at all.
    sampler_copy = not vllm and (n > 1 or sampler_bytes != FP32)

    # -- startup: the models as load_pair leaves them, before FSDP shards them --------------------
    plan.add(
        "models_loaded",
        "startup",
        ps.total * FP32 + pt.total * teacher_bytes + (ps.total * sampler_bytes if sampler_copy else 0),
        "student whole in fp32, teacher whole" + (", the sampling copy" if sampler_copy else "") + " (before sharding)",
    )

    # -- persistent: lives through the whole step -------------------------------------------------
    plan.add("student_weights", "persistent", ps.total * FP32 // n, f"fp32 master weights{sharded}")
    plan.add(
        "student_grads", "persistent", ps.total * FP32 // n, f"fp32, kept from backward to the next zero_grad{sharded}"
    )
    plan.add("optimizer_states", "persistent", 2 * ps.total * FP32 // n, f"AdamW exp_avg + exp_avg_sq, fp32{sharded}")
    if sampler_copy:
        plan.add(
            "sampler_copy",
            "persistent",
            ps.total * sampler_bytes,
            f"whole student in {run.sampler_dtype} on every rank",
        )
    teacher_div = n if run.shard_teacher and n > 1 else 1
    plan.add(
        "teacher_weights",
        "persistent",
        pt.total * teacher_bytes // teacher_div,
        f"frozen, {run.teacher_dtype}" + (", sharded" if teacher_div > 1 else ", whole on every rank"),
    )

    gathered_teacher = 0
    if teacher_div > 1:  # the root (embeddings, lm_head) for the whole forward, plus two layers in flight
        gathered_teacher = (pt.embed + pt.lm_head + 2 * pt.per_layer) * teacher_bytes

    # -- vLLM engines: a share of the GPU each while awake, one engine at a time ------------------------
    # With sleep mode (generate.make_batch / _score_teacher): torch's cache emptied, the weight sync wakes
    # the student engine's weights; the teacher engine wakes, writes the prefixes and sleeps (or the HF
    # teacher writes them and torch's cache is emptied: EngineSamplers.after_prefixes); the student engine wakes
    # its KV cache, continues them and sleeps; a scoring teacher engine wakes again to score.
    engine_prefixes = vllm and run.guidance and run.vllm_teacher_prefixes  # the teacher engine writes them
    hf_prefixes = run.guidance and run.prefix_tokens > 0 and not engine_prefixes  # the HF teacher writes them
    if vllm:
        assert gpu is not None
        asleep = ", asleep (nothing on the GPU) otherwise" if run.vllm_sleep else ", always resident (no sleep mode)"
        share_s = run.vllm_gpu_memory_utilization * gpu.memory_bytes
        plan.add(
            "vllm_student_engine",
            "sampling" if run.vllm_sleep else "persistent",
            share_s,
            "gpu_memory_utilization x GPU: bf16 student, activations, paged KV pool" + asleep,
        )
        shares = [share_s]
        if run.teacher_engine:
            share_t = run.vllm_teacher_gpu_memory_utilization * gpu.memory_bytes
            shares.append(share_t)
            note = "teacher_gpu_memory_utilization x GPU: bf16 teacher, activations, paged KV pool"
            if not run.vllm_sleep:
                plan.add("vllm_teacher_engine", "persistent", share_t, note + asleep)
            else:
                if engine_prefixes:
                    plan.add(
                        "vllm_teacher_engine",
                        "prefixes",
                        share_t,
                        note + ", awake while it writes the prefixes (asleep before the student engine continues them)",
                    )
                if run.vllm_teacher_scoring:
                    plan.add(
                        "vllm_teacher_engine_scoring", "teacher_scoring", share_t, note + ", awake while it scores"
                    )
        if run.vllm_sleep and (engine_prefixes or hf_prefixes):
            plan.add(
                "vllm_student_engine_weights",
                "prefixes",
                ps.total * BF16,
                "the student engine's bf16 weights, woken by the weight sync before the prefixes (KV cache asleep)",
            )
        # An engine starts only when its share is free (vLLM checks): the first beside the whole models, the
        # second once the first is asleep (or beside it, without sleep mode).
        plan.add(
            "engine_start",
            "startup",
            max(shares) if run.vllm_sleep else sum(shares),
            "vLLM starts an engine only with gpu_memory_utilization x GPU free",
        )
        if run.vllm_sleep:
            plan.add(
                "engine_weights_offloaded",
                "host",
                ps.total * BF16 + (pt.total * BF16 if run.teacher_engine else 0),
                "sleep level 1: every engine's bf16 weights in pinned host RAM while it sleeps",
            )
        if run.vllm_multiprocessing:
            plan.add(
                "weight_sync_host_copy",
                "host",
                ps.total * FP32,
                "collective_rpc weight sync: the fp32 student copied to host RAM (vLLM's serializer adds its own)",
            )

    # -- prefixes and sampling: the teacher writes guidance prefixes, then the student continues them -------
    # HF backends sample `generation_rows` rows at a time (longest contexts first, each chunk cut to its own
    # width); each row stops at its own budget, max_new_tokens - len(prefix), but a chunk's cache grows until
    # its last row is done: bound by its longest context (prompt + prefix cap) plus the longest budget in it
    # (a whole response when it also holds a row with a short or no prefix). A vLLM engine's KV pool is part
    # of its share; each request's max_tokens is its row's own budget.
    g = run.generation_rows
    chunks = f" (chunks of {g} rows)" if g < rows else ""
    if not vllm:
        kv, other, moment = _sampling_sub_phase(
            s, g, run.prompt_tokens + run.prefix_tokens, run.response_tokens, sampler_bytes
        )
        plan.add("rollout_kv_cache", "sampling", kv, f"student {moment}{chunks}")
        plan.add(
            "sampling_temporaries",
            "sampling",
            other,
            "prefill: one layer over a call's rows; decode: logits, cache growth",
        )
    if hf_prefixes:
        t_kv, t_other, moment = _sampling_sub_phase(t, g, run.prompt_tokens, run.prefix_tokens, teacher_bytes)
        t_other += gathered_teacher
        plan.add("teacher_prefix_kv_cache", "prefixes", t_kv, f"teacher (guidance prefixes, HF loop) {moment}{chunks}")
        plan.add(
            "teacher_prefix_temporaries",
            "prefixes",
            t_other,
            "prefill: one layer over a call's rows; decode: logits, cache growth"
            + ("; the sharded teacher's root + 2 layers gathered" if gathered_teacher else ""),
        )
        # tropd empties torch's cache once the HF teacher's prefixes are written (EngineSamplers.after_prefixes); without
        # that (release_torch_cache=False, the older code) their blocks stay reserved when the student engine wakes.
        if vllm and run.vllm_sleep and not run.release_torch_cache:
            plan.add(
                "teacher_prefix_blocks_held",
                "sampling",
                t_kv + t_other,
                "blocks torch cached for the HF teacher's prefixes, still reserved when the student engine wakes",
            )
    # The sync runs before the prefixes and torch keeps its blocks cached: through the prefixes, and beside the
    # student engine unless something empties torch's cache in between. With the HF teacher's prefixes under vLLM
    # tropd does (EngineSamplers.after_prefixes); a teacher engine's sleep does not (it runs in a process of its own).
    if n > 1:
        largest = max(ps.embed, ps.lm_head, ps.per_layer)
        note = "one parameter gathered whole in fp32 to re-sync the sampler"
        if engine_prefixes or hf_prefixes:
            plan.add("sampler_sync", "prefixes", largest * FP32, note + ", its blocks still cached")
        if not (vllm and hf_prefixes and run.release_torch_cache):
            plan.add(
                "sampler_sync",
                "sampling",
                largest * FP32,
                note + (", its blocks still cached beside the engine" if vllm else ""),
            )

    # -- teacher scoring: every micro-batch scored before the update --------------------------------
    tokens_mb = b * run.seq_len
    resp_mb = b * run.response_tokens
    topk_per_token = run.top_k * (INT64 + FP32) + 2 * FP32  # ids, log-probs; log-prob and entropy of the target
    topk_all = rows * run.response_tokens * topk_per_token
    chunk = min(run.chunk_size, resp_mb)  # a chunk never has more rows than the micro-batch's response tokens
    if not (vllm and run.vllm_teacher_scoring):
        plan.add(
            "teacher_forward",
            "teacher_scoring",
            tokens_mb * (inference_bytes_per_token(t, run.seq_len, teacher_bytes) + t.hidden * teacher_bytes)
            + resp_mb * t.hidden * teacher_bytes
            + gathered_teacher,
            "one micro-batch: a layer's temporaries, last hidden states",
        )
        plan.add(
            "teacher_scoring_chunks",
            "teacher_scoring",
            chunk * t.vocab * (teacher_bytes + 2 * FP32),
            "chunk x V: the product, its fp32 copy, one fp32 temporary",
        )
    plan.add("teacher_topk", "teacher_scoring", topk_all, f"k={run.top_k} ids + log-probs, whole rank batch")

    # -- training: one micro-batch forward + backward, then the optimizer step -----------------------
    plan.add("teacher_topk_held", "training", topk_all, "the teacher's top-k, held until the update is done")
    plan.add(
        "activations",
        "training",
        training_activation_bytes(s, b, run.seq_len, run.training_precision, checkpointing=run.gradient_checkpointing)
        + b * run.seq_len * s.hidden * FP32,  # gradient of the final hidden states
        f"{b} sequences x {run.seq_len} tokens, "
        + ("checkpointed" if run.gradient_checkpointing else "no checkpointing"),
    )
    lm_head = s.vocab * s.hidden
    plan.add(
        "scoring_temporaries",
        "training",
        chunk * s.vocab * (2 * FP32 + (BF16 if compute_bytes == BF16 else 0))
        + lm_head * (FP32 + (BF16 if compute_bytes == BF16 else 0))
        + resp_mb * s.hidden * (compute_bytes + FP32)
        + 8 * resp_mb * run.top_k * FP32,
        "2 fp32 chunk x V buffers, lm_head gradient before accumulation, response hidden states, top-k loss terms",
    )
    if n > 1:
        # FSDP2: the root (embeddings, final norm, lm_head) stays gathered for the whole forward + backward,
        # plus the current and the prefetched layer, in the compute dtype; one layer's unsharded fp32 grads.
        plan.add(
            "fsdp_gathered",
            "training",
            (ps.embed + ps.lm_head + 2 * ps.per_layer) * compute_bytes + ps.per_layer * FP32,
            "root + 2 layers gathered, one layer's grads before reduce-scatter",
        )
    elif compute_bytes == BF16:
        plan.add(
            "autocast_weight_copies",
            "training",
            (linear_weights(s) + lm_head) * BF16,
            "bf16 casts of every layer matmul weight and the lm_head, saved for backward",
        )

    # -- optimizer: clip_grad_norm_ and AdamW (foreach), activations gone ---------------------------
    plan.add("teacher_topk_held", "optimizer", topk_all, "the teacher's top-k, still referenced")
    plan.add(
        "adamw_temporaries",
        "optimizer",
        ps.total * FP32 // n,
        f"foreach AdamW's sqrt(exp_avg_sq) / bias correction + eps: one parameter-sized fp32 buffer{sharded}",
    )

    # -- what torch would keep cached when the engines wake (release_torch_cache=False: the code before) ----
    # An engine maps its memory with the CUDA driver, outside torch's caching allocator, and vLLM empties
    # torch's cache when an engine goes to sleep, not when it wakes. Without tropd's empty_cache() before the
    # wake, the blocks torch cached for the previous step's scoring, backward and optimizer step would still
    # be reserved beside the waking engines: their phases would hold torch's high-water mark of those phases.
    if vllm and run.vllm_sleep and not run.release_torch_cache:
        torch_phase = {
            p: sum(c.bytes for c in plan.components if c.phase == p and not c.name.startswith("vllm_")) for p in PHASES
        }
        high = max(torch_phase[p] for p in ("teacher_scoring", "training", "optimizer"))
        for p in ("prefixes", "sampling"):
            if any(c.phase == p and c.name.startswith("vllm_") for c in plan.components):
                plan.add(
                    "torch_cache_held",
                    p,
                    max(0, high - torch_phase[p]),
                    "blocks torch cached in the last step's scoring / training, still reserved beside the engine",
                )
    return plan


def smallest_micro_batches(run: RunShape, gpu: GPU, usable: float = 0.9) -> int | None:
    """The fewest ``optim.micro_batches`` whose plan fits ``gpu`` (None: none does, the limit is elsewhere)."""
    rows = run.sequences_per_rank
    tried: set[int] = set()
    for m in range(1, rows + 1):
        size = -(-rows // m)
        if size in tried:
            continue
        tried.add(size)
        if plan_memory(replace(run, micro_batches=m), gpu).fits(gpu, usable):
            return m
    return None


def largest_generation_batch_size(run: RunShape, gpu: GPU, usable: float = 0.9) -> int | None:
    """The most rows ``rollout.generation_batch_size`` may sample at once with the plan fitting ``gpu``
    (HF backends; None: not even one row fits). Returns the rank's row count when no chunking is needed."""
    for size in range(run.sequences_per_rank, 0, -1):
        if plan_memory(replace(run, generation_batch_size=size), gpu).fits(gpu, usable):
            return size
    return None


ENGINE_COMPONENTS = {
    "student": ("vllm_student_engine",),
    "teacher": ("vllm_teacher_engine", "vllm_teacher_engine_scoring"),
}


def vllm_engine_room(run: RunShape, gpu: GPU, usable: float = 0.9, role: str = "student") -> float | None:
    """The most GPU share ``role``'s engine may take with the plan's peak and startup within ``usable``
    (``gpu_memory_utilization`` for the student, ``teacher_gpu_memory_utilization`` for the teacher), the other
    engine's share as ``run`` has it; None when ``run`` has no such engine.

    With sleep mode an engine's share counts only in the phases it is awake in (the student engine: sampling;
    the teacher engine: prefixes, and teacher scoring with ``teacher_scoring``), beside the rest of that phase;
    without it, always. At startup an engine needs its share free beside the models as loaded (and, without
    sleep mode, beside the engine started before it). The rest of the sampling phase depends on the step: once
    the HF teacher has written prefixes tropd empties torch's cache, so the student engine wakes beside nothing
    of torch's, while at the last steps (no prefixes) the weight sync's cached blocks are beside it. The room of
    the whole run is the smaller of step 0's (``prefix_tokens=response_tokens``) and a late step's
    (``prefix_tokens=0``). With ``release_torch_cache=False`` the HF teacher's cached prefix blocks stay beside
    the engine and grow with ``prefix_tokens``: there step 0 binds.
    """
    if role not in ENGINE_COMPONENTS:
        raise ValueError(f"role {role!r}: student or teacher")
    key = "vllm_gpu_memory_utilization" if role == "student" else "vllm_teacher_gpu_memory_utilization"
    names = ENGINE_COMPONENTS[role]

    def with_share(share: float) -> MemoryPlan:
        shares: dict[str, Any] = {key: share}
        return plan_memory(replace(run, **shares), gpu)

    phases = {c.phase for c in with_share(1.0).components if c.name in names}
    if not phases:
        return None
    base = with_share(0.0)
    limit = usable * gpu.memory_bytes
    if "persistent" in phases:
        rooms = [limit - base.peak]
    else:
        rooms = [limit - base.persistent - base.phase_total(p) for p in phases]
    rooms.append(limit - base.get("models_loaded") - (0 if run.vllm_sleep else base.get("engine_start")))
    return min(rooms) / gpu.memory_bytes


def guidance_cap(step: int, steps: int, max_new_tokens: int, schedule: str = "cosine") -> int:
    """The guidance prefix cap at ``step`` of ``steps`` (``tropd_cli.rollout.sampling.prefix_cap`` as the trainer calls
    it: annealed over ``steps - 1`` so that it reaches 0 at the last step)."""
    if schedule == "constant":
        return max_new_tokens
    return int(max_new_tokens * 0.5 * (1.0 + math.cos(math.pi * step / max(steps - 1, 1))))


# ---------------------------------------------------------------------------------------------
# Throughput


@dataclass(frozen=True)
class StepEstimate:
    """FLOPs (all ranks) and seconds of one step; ``decode_*`` are per rank (ranks sample in parallel)."""

    teacher_flops: float
    student_flops: float
    decode_steps: int  # decode steps one after the other on a rank (chunks and vLLM waves add up)
    decode_bound_s: float  # HBM-bandwidth bound of the student's (and the teacher's prefix) sampling
    decode_s: float  # with the per-step launch overhead floor
    teacher_s: float
    student_s: float

    @property
    def total_s(self) -> float:
        return self.decode_s + self.teacher_s + self.student_s


def forward_flops_per_token(m: ModelShape, context: float) -> float:
    """Matmul FLOPs of one token through the layers (2 x layer parameters) plus causal attention
    (QK^T and AV over ``context`` keys on average: 4 x heads x head_dim x context)."""
    return 2.0 * param_counts(m).body + m.layers * 4.0 * m.q_dim * context


def _decode_seconds(
    m: ModelShape, rows: int, prompt: int, steps: int, dtype_bytes: int, gpu: GPU, bw_eff: float, overhead: float
) -> tuple[float, float]:
    """Bandwidth bound and overhead-floored time of ``steps`` decode steps (weights + cache read per step)."""
    weights = param_counts(m).total * dtype_bytes
    per_token = 2 * m.layers * m.kv_dim * dtype_bytes
    bound = floored = 0.0
    for i in range(0, steps, 64):  # 64-step blocks: exact enough, fast
        n = min(64, steps - i)
        ctx = prompt + i + n / 2
        seconds = (weights + rows * ctx * per_token) / (gpu.hbm_bytes_per_s * bw_eff)
        bound += n * seconds
        floored += n * max(seconds, overhead)
    return bound, floored


def _sampling_groups(run: RunShape, gpu: GPU, role: str, by_engine: bool) -> tuple[int, int]:
    """(calls one after the other, rows per call): HF chunks of ``generation_rows``, or the vLLM waves an engine
    whose pool holds fewer than the rank's rows needs, the rows spread evenly over them (continuous batching
    keeps at most what the pool holds running; no wave runs more rows than the rank has)."""
    rows = run.sequences_per_rank
    if by_engine:
        at_once = max(1, min(rows, vllm_concurrent_rows(run, gpu, role)))
        waves = -(-rows // at_once)
        return waves, -(-rows // waves)
    return run.generation_chunks, run.generation_rows


def estimate_step(
    run: RunShape,
    gpu: GPU,
    *,
    mfu: float = 0.35,
    bw_efficiency: float = 0.7,
    launch_overhead_per_layer_s: float = 6e-4,
) -> StepEstimate:
    """One step's FLOPs and time: an estimate, with every assumption a parameter.

    Teacher: ``2 P T`` forward over prompt + response, lm_head at response tokens only. Student:
    ``6 P T`` (+ ``2 P T`` recompute with checkpointing); its lm_head costs 8 V H per response token
    (forward, recomputed forward in backward, two gradient matmuls). Compute runs at ``mfu`` of the
    bf16 peak (fp32 peak for ``precision=fp32``: tropd does not enable TF32). Sampling is one decode
    step per new token over the rows of a call, bound by reading the weights and the KV cache at
    ``bw_efficiency`` of HBM bandwidth, and (HF loop) never faster than the eager loop's launch overhead
    (``launch_overhead_per_layer_s`` per decoder layer and step). Every response runs to
    ``max_new_tokens``, so every guided row's prefix reaches the cap and its student continuation is the
    rest (``max_new_tokens - prefix``: with vLLM, each request's ``max_tokens``). HF chunks (``generation_batch_size``) run one after the other;
    a vLLM engine whose pool holds fewer than the rank's rows runs them in waves of what it holds.
    """
    s, t = run.student, run.teacher
    tokens = run.sequences * run.seq_len
    resp = run.sequences * run.response_tokens
    ctx = run.seq_len / 2
    teacher = tokens * forward_flops_per_token(t, ctx) + resp * 2.0 * t.vocab * t.hidden
    passes = 4.0 if run.gradient_checkpointing else 3.0
    student = passes * tokens * forward_flops_per_token(s, ctx) + resp * 8.0 * s.vocab * s.hidden
    peak = gpu.fp32_flops if run.precision == "fp32" else gpu.bf16_flops
    rate = run.world_size * peak * mfu
    vllm = run.backend == "vllm"
    prefix = min(run.prefix_tokens, run.response_tokens)
    steps = run.response_tokens - prefix
    groups, rows = _sampling_groups(run, gpu, "student", vllm)
    bound, floored = _decode_seconds(
        s,
        rows,
        run.prompt_tokens + prefix,
        steps,
        BF16 if vllm else DTYPE_BYTES[run.sampler_dtype],
        gpu,
        bw_efficiency,
        0.0 if vllm else launch_overhead_per_layer_s * s.layers,
    )
    bound, floored, steps = groups * bound, groups * floored, groups * steps
    if prefix:
        by_engine = vllm and run.teacher_engine and run.vllm_teacher_prefixes
        t_groups, t_rows = _sampling_groups(run, gpu, "teacher", by_engine)
        tb, tf = _decode_seconds(
            t,
            t_rows,
            run.prompt_tokens,
            prefix,
            BF16 if by_engine else DTYPE_BYTES[run.teacher_dtype],
            gpu,
            bw_efficiency,
            0.0 if by_engine else launch_overhead_per_layer_s * t.layers,
        )
        bound, floored, steps = bound + t_groups * tb, floored + t_groups * tf, steps + t_groups * prefix
    return StepEstimate(
        teacher_flops=teacher,
        student_flops=student,
        decode_steps=steps,
        decode_bound_s=bound,
        decode_s=floored,
        teacher_s=teacher / rate,
        student_s=student / rate,
    )


def estimate_run_seconds(run: RunShape, gpu: GPU, steps: int = 200, **kwargs: Any) -> float:
    """The whole run: :func:`estimate_step` at every step's guidance cap (cosine, ``steps`` steps)."""
    caps = [guidance_cap(i, steps, run.response_tokens) if run.guidance else 0 for i in range(steps)]
    per_cap: dict[int, float] = {}
    for cap in caps:
        if cap not in per_cap:
            per_cap[cap] = estimate_step(replace(run, prefix_tokens=cap), gpu, **kwargs).total_s
    return sum(per_cap[cap] for cap in caps)


# ---------------------------------------------------------------------------------------------
# The paper's models (config.json fields that matter; sources in docs/scaling.md)

R1_DISTILL_QWEN_1_5B: dict[str, Any] = {  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "tie_word_embeddings": False,
}
SKYWORK_OR1_MATH_7B: dict[str, Any] = {  # Skywork/Skywork-OR1-Math-7B (= DeepSeek-R1-Distill-Qwen-7B's shape)
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "tie_word_embeddings": False,
}
QWEN3_1_7B: dict[str, Any] = {  # Qwen/Qwen3-1.7B (the "Qwen3-SFT-1.7B" student's architecture)
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 6144,
    "tie_word_embeddings": True,
}
QWEN3_4B: dict[str, Any] = {  # Qwen/Qwen3-4B-Base (the "Qwen3-Nemotron-4B" teacher's architecture)
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9728,
    "tie_word_embeddings": True,
}

# name -> (student config, teacher config)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "r1-1.5b<-skywork-7b": (R1_DISTILL_QWEN_1_5B, SKYWORK_OR1_MATH_7B),
    "qwen3-1.7b<-qwen3-4b": (QWEN3_1_7B, QWEN3_4B),
}


def paper_run(preset: str, **overrides: Any) -> RunShape:
    """The paper's hyperparameters (128 prompts x 4 rollouts, 8192 new tokens, k = 64) for ``preset``."""
    student, teacher = PRESETS[preset]
    base = RunShape(student=ModelShape.from_config(student), teacher=ModelShape.from_config(teacher))
    return replace(base, **overrides)


# rollout.generation_batch_size of each preset: the rows the HF teacher writes guidance prefixes for at once.
PRESET_GENERATION_BATCH_SIZE = {"r1-1.5b<-skywork-7b": 64, "qwen3-1.7b<-qwen3-4b": 32}


def preset_run(preset: str, **overrides: Any) -> RunShape:
    """``paper_run`` as ``conf/experiment/paper/*.yaml`` configure it, on one node of 8 GPUs: prompts up to
    ``dataset.max_prompt_tokens`` (1024, planned at that bound), ``scoring.chunk_size=1024``,
    ``optim.micro_batches=16``, checkpointing, ``rollout.backend=vllm`` with the ``rollout.vllm`` defaults
    (one engine, the student's, share 0.3, sleep mode; HF teacher scoring), the HF teacher writing the
    guidance prefixes ``rollout.generation_batch_size`` rows at a time (64 for R1 <- Skywork, 32 for Qwen3).
    ``prefix_tokens`` stays 0 (late steps); step 0, where the HF teacher's prefix cache peaks, is
    ``prefix_tokens=response_tokens``."""
    base = paper_run(
        preset,
        world_size=8,
        prompt_tokens=1024,
        chunk_size=1024,
        micro_batches=16,
        gradient_checkpointing=True,
        backend="vllm",
        generation_batch_size=PRESET_GENERATION_BATCH_SIZE[preset],
    )
    return replace(base, **overrides)
