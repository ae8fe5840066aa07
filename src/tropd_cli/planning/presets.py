"""The paper's models and runs as planning inputs (config.json fields that matter; sources in docs/scaling.md)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tropd_cli.planning.memory import RunShape
from tropd_cli.planning.shapes import ModelShape

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


SMOLLM2_135M: dict[str, Any] = {  # HuggingFaceTB/SmolLM2-135M-Instruct (tropd's default teacher and student)
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "tie_word_embeddings": True,
}

#: Hub ids whose shapes ``tropd plan`` knows without the hub (the paper's models and tropd's default pair).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": R1_DISTILL_QWEN_1_5B,
    "Skywork/Skywork-OR1-Math-7B": SKYWORK_OR1_MATH_7B,
    "Qwen/Qwen3-1.7B": QWEN3_1_7B,
    "Qwen/Qwen3-4B": QWEN3_4B,
    "Qwen/Qwen3-4B-Base": QWEN3_4B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M,
}
