"""Model shapes, parameter counts, the activation and KV-cache models, and GPUs: the sizes every plan adds up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
