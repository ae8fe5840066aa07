"""FLOP and bandwidth estimates of one step and of a whole run."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tropd_cli.planning.memory import RunShape, vllm_concurrent_rows
from tropd_cli.planning.shapes import BF16, DTYPE_BYTES, GPU, ModelShape, param_counts


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
