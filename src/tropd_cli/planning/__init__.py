"""Memory and throughput planning for a run (``tropd plan`` prints it): parameter counts from an HF ``config.json``, per-GPU bytes
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
measured on CPU with ``torch.autograd.graph.saved_tensors_hooks`` (tests/planning/test_planning.py checks it
exactly). It assumes a memory-efficient SDPA kernel on GPU (saves q, k, v, output, log-sum-exp: no
``[S, S]`` probabilities) and counts the float copy of the padding mask SDPA makes in every layer.

Modules: ``shapes`` (model shapes, parameter counts, activation and cache sizes, GPUs), ``memory``
(:class:`RunShape`, :func:`plan_memory` and the searches over it), ``throughput`` (step and run time
estimates), ``presets`` (the paper's models and runs), ``from_config`` (a ``tropd train`` config as a
:class:`RunShape`).
"""

from __future__ import annotations

from tropd_cli.planning.memory import (
    ENGINE_COMPONENTS,
    PHASES,
    Component,
    MemoryPlan,
    RunShape,
    largest_generation_batch_size,
    plan_memory,
    sampling_kv_cache_bytes,
    smallest_micro_batches,
    vllm_concurrent_rows,
    vllm_engine_room,
    vllm_kv_pool_bytes,
)
from tropd_cli.planning.presets import (
    PRESET_GENERATION_BATCH_SIZE,
    PRESETS,
    QWEN3_1_7B,
    QWEN3_4B,
    R1_DISTILL_QWEN_1_5B,
    SKYWORK_OR1_MATH_7B,
    paper_run,
    preset_run,
)
from tropd_cli.planning.shapes import (
    BF16,
    DTYPE_BYTES,
    FP32,
    GPU,
    H100,
    H200,
    INT64,
    GiB,
    ModelShape,
    ParamCounts,
    decoder_saved_bytes,
    inference_bytes_per_token,
    kv_cache_bytes,
    layer_activation_bytes_per_token,
    linear_weights,
    outside_layers_bytes_per_token,
    param_counts,
    training_activation_bytes,
)
from tropd_cli.planning.throughput import (
    StepEstimate,
    estimate_run_seconds,
    estimate_step,
    forward_flops_per_token,
    guidance_cap,
)

__all__ = [
    "BF16",
    "Component",
    "DTYPE_BYTES",
    "ENGINE_COMPONENTS",
    "FP32",
    "GPU",
    "GiB",
    "H100",
    "H200",
    "INT64",
    "MemoryPlan",
    "ModelShape",
    "PHASES",
    "PRESETS",
    "PRESET_GENERATION_BATCH_SIZE",
    "ParamCounts",
    "QWEN3_1_7B",
    "QWEN3_4B",
    "R1_DISTILL_QWEN_1_5B",
    "RunShape",
    "SKYWORK_OR1_MATH_7B",
    "StepEstimate",
    "decoder_saved_bytes",
    "estimate_run_seconds",
    "estimate_step",
    "forward_flops_per_token",
    "guidance_cap",
    "inference_bytes_per_token",
    "kv_cache_bytes",
    "largest_generation_batch_size",
    "layer_activation_bytes_per_token",
    "linear_weights",
    "outside_layers_bytes_per_token",
    "paper_run",
    "param_counts",
    "plan_memory",
    "preset_run",
    "sampling_kv_cache_bytes",
    "smallest_micro_batches",
    "training_activation_bytes",
    "vllm_concurrent_rows",
    "vllm_engine_room",
    "vllm_kv_pool_bytes",
]
