"""Memory and throughput planning for a run: parameter counts from an HF ``config.json``, per-GPU bytes
of every component tropd holds, and a FLOP / bandwidth estimate of one step. Pure Python, no torch.

Everything here mirrors what the code does (docs/scaling.md explains each component and its knobs):

- the student trains with fp32 master weights, fp32 gradients and torch AdamW (two fp32 states); with
  ``world_size > 1`` FSDP2 shards all three over the ranks;
- rollouts come from a separate copy of the student in ``rollout.sampler_dtype`` (bf16 on a GPU),
  whole on every rank, with an HF ``DynamicCache`` over the rank's whole rollout batch; guidance
  prefixes are sampled by the teacher the same way, before the student continues them;
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
    prefix_tokens: int = 0  # guidance prefix cap at the step planned (step 0: max_new_tokens; 0: guidance off)
    micro_batches: int = 1  # optim.micro_batches (x method.mini_batches)
    chunk_size: int = 512  # scoring.chunk_size
    top_k: int = 64  # method.top_k
    gradient_checkpointing: bool = False  # student.gradient_checkpointing
    shard_teacher: bool = False  # distributed.shard_teacher
    precision: str = "bf16"  # precision: student compute, bf16 (a bf16 GPU's auto) or fp32
    sampler_dtype: str = "bfloat16"  # rollout.sampler_dtype as resolved
    teacher_dtype: str = "bfloat16"  # teacher.dtype as resolved
    backend: str = "loop"  # rollout.backend: loop / generate (HF cache) or vllm
    vllm_gpu_memory_utilization: float = 0.3  # vLLM's share of the GPU (weights + paged KV pool)
    vllm_sleep: bool = True  # the engine sleeps (frees its KV pool, weights to host) outside sampling

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


@dataclass(frozen=True)
class Component:
    name: str
    phase: str  # persistent | sampling | teacher_scoring | training | optimizer
    bytes: int
    note: str = ""


PHASES = ("sampling", "teacher_scoring", "training", "optimizer")


@dataclass
class MemoryPlan:
    """Named per-GPU components; the peak is the persistent state plus the largest phase."""

    run: RunShape
    components: list[Component] = field(default_factory=list)

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

    def fits(self, gpu: GPU, usable: float = 0.9) -> bool:
        """Peak within ``usable`` of the GPU (the rest: CUDA context, NCCL buffers, allocator fragmentation)."""
        return self.peak <= usable * gpu.memory_bytes


def _sampling_sub_phase(
    m: ModelShape, rows: int, prompt: int, new_tokens: int, dtype_bytes: int
) -> tuple[int, int, str]:
    """(KV cache, other temporaries, which moment) at the peak of one HF-loop sampling call.

    Prefill: the cache of ``prompt`` positions plus one layer's temporaries over all ``rows x prompt``
    tokens (the loop prefills the whole batch at once). Decode: the cache at its longest, ``prompt +
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


def plan_memory(run: RunShape, gpu: GPU | None = None) -> MemoryPlan:
    """Per-GPU bytes of every component of a step of ``run`` (``gpu`` needed for ``backend=vllm``)."""
    s, t = run.student, run.teacher
    n = run.world_size
    ps, pt = param_counts(s), param_counts(t)
    plan = MemoryPlan(run)
    rows, b = run.sequences_per_rank, run.micro_batch_sequences
    sampler_bytes = DTYPE_BYTES[run.sampler_dtype]
    teacher_bytes = DTYPE_BYTES[run.teacher_dtype]
    compute_bytes = FP32 if run.precision == "fp32" else BF16
    sharded = " / world_size (FSDP2)" if n > 1 else ""

    # -- persistent: lives through the whole step -------------------------------------------------
    plan.add("student_weights", "persistent", ps.total * FP32 // n, f"fp32 master weights{sharded}")
    plan.add(
        "student_grads", "persistent", ps.total * FP32 // n, f"fp32, kept from backward to the next zero_grad{sharded}"
    )
    plan.add("optimizer_states", "persistent", 2 * ps.total * FP32 // n, f"AdamW exp_avg + exp_avg_sq, fp32{sharded}")
    if run.backend == "vllm":
        if gpu is None:
            raise ValueError("backend=vllm: pass the GPU (vLLM reserves a share of its memory)")
        plan.add(
            "vllm_engine",
            "sampling" if run.vllm_sleep else "persistent",
            run.vllm_gpu_memory_utilization * gpu.memory_bytes,
            "gpu_memory_utilization x GPU: student weights + paged KV pool"
            + (", released while asleep" if run.vllm_sleep else ""),
        )
    elif n > 1 or sampler_bytes != FP32:  # one process with an fp32 sampler samples from the student itself
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

    # -- sampling: guidance prefixes (teacher), then the student's continuation --------------------
    # The two calls run one after the other; the larger is the phase's peak. With a prefix the student's
    # rows start at prompt + prefix cap (left-padded to the longest) and may run a full response further:
    # a row's budget is max_new_tokens minus the *shortest* prefix of the batch.
    start = run.prompt_tokens + run.prefix_tokens
    if run.backend == "vllm":
        kv, other, where = 0, 0, "student: in vLLM's pool (vllm_engine)"
    else:
        kv, other, moment = _sampling_sub_phase(s, rows, start, run.response_tokens, sampler_bytes)
        where = f"student {moment}"
    if run.prefix_tokens > 0:  # the teacher writes the prefixes with the HF loop (any backend)
        t_kv, t_other, moment = _sampling_sub_phase(t, rows, run.prompt_tokens, run.prefix_tokens, teacher_bytes)
        t_other += gathered_teacher
        if t_kv + t_other > kv + other:
            kv, other, where = t_kv, t_other, f"teacher (guidance prefixes) {moment}"
    plan.add("rollout_kv_cache", "sampling", kv, where)
    plan.add(
        "sampling_temporaries", "sampling", other, "prefill: one layer over all rows; decode: logits, cache growth"
    )
    if n > 1:
        largest = max(ps.embed, ps.lm_head, ps.per_layer)
        plan.add("sampler_sync", "sampling", largest * FP32, "one parameter gathered whole in fp32 to re-sync the copy")

    # -- teacher scoring: every micro-batch scored before the update --------------------------------
    tokens_mb = b * run.seq_len
    resp_mb = b * run.response_tokens
    topk_per_token = run.top_k * (INT64 + FP32) + 2 * FP32  # ids, log-probs; log-prob and entropy of the target
    topk_all = rows * run.response_tokens * topk_per_token
    plan.add(
        "teacher_forward",
        "teacher_scoring",
        tokens_mb * (inference_bytes_per_token(t, run.seq_len, teacher_bytes) + t.hidden * teacher_bytes)
        + resp_mb * t.hidden * teacher_bytes
        + gathered_teacher,
        "one micro-batch: a layer's temporaries, last hidden states",
    )
    chunk = min(run.chunk_size, resp_mb)  # a chunk never has more rows than the micro-batch's response tokens
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


# ---------------------------------------------------------------------------------------------
# Throughput


@dataclass(frozen=True)
class StepEstimate:
    """FLOPs (all ranks) and seconds of one step; ``decode_*`` are per rank (ranks sample in parallel)."""

    teacher_flops: float
    student_flops: float
    decode_steps: int
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
    step per new token over the rank's rows, bound by reading the weights and the KV cache at
    ``bw_efficiency`` of HBM bandwidth, and never faster than the eager loop's launch overhead
    (``launch_overhead_per_layer_s`` per decoder layer and step). All responses assumed full length.
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
    rows = run.sequences_per_rank
    sampler_bytes = DTYPE_BYTES[run.sampler_dtype]
    bound, floored = _decode_seconds(
        s,
        rows,
        run.prompt_tokens + run.prefix_tokens,
        run.response_tokens,
        sampler_bytes,
        gpu,
        bw_efficiency,
        0.0 if run.backend == "vllm" else launch_overhead_per_layer_s * s.layers,
    )
    steps = run.response_tokens
    if run.prefix_tokens:
        tb, tf = _decode_seconds(
            t,
            rows,
            run.prompt_tokens,
            run.prefix_tokens,
            DTYPE_BYTES[run.teacher_dtype],
            gpu,
            bw_efficiency,
            launch_overhead_per_layer_s * t.layers,
        )
        bound, floored, steps = bound + tb, floored + tf, steps + run.prefix_tokens
    return StepEstimate(
        teacher_flops=teacher,
        student_flops=student,
        decode_steps=steps,
        decode_bound_s=bound,
        decode_s=floored,
        teacher_s=teacher / rate,
        student_s=student / rate,
    )


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
