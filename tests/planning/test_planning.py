"""tropd_cli.planning against real objects: parameter counts of transformers models, byte sizes of real
optimizer states, gradients, model copies and KV caches, and the tensors autograd actually saves."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from tropd_cli import planning
from tropd_cli.planning import (
    FP32,
    H100,
    H200,
    ModelShape,
    RunShape,
    decoder_saved_bytes,
    kv_cache_bytes,
    linear_weights,
    param_counts,
    plan_memory,
)
from tropd_cli.rollout.sampling import sample

SMOLLM2_CONFIG = Path.home() / ".cache" / "tropd" / "smollm2-135m-instruct" / "config.json"

TINY = dict(
    vocab_size=96,
    hidden_size=40,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CONFIGS: dict[str, PretrainedConfig] = {
    "llama-untied-biases": LlamaConfig(**TINY, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "llama-tied": LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": MistralConfig(**TINY, tie_word_embeddings=False),
    "qwen2-untied": Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen2-tied": Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3-tied": Qwen3Config(**TINY, head_dim=12, tie_word_embeddings=True),
    "qwen3-untied-bias": Qwen3Config(**TINY, head_dim=12, tie_word_embeddings=False, attention_bias=True),
}


def build(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).to(dtype)


def shape_of(config: PretrainedConfig) -> ModelShape:
    return ModelShape.from_config(config.to_dict())


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_counts_equal_transformers_models(name: str) -> None:
    config = CONFIGS[name]
    counts = param_counts(config.to_dict())
    assert counts.total == numel(build(config))
    assert (counts.lm_head == 0) == config.tie_word_embeddings


@pytest.mark.parametrize("name", sorted(planning.PRESETS))
def test_param_counts_of_the_paper_models(name: str) -> None:
    """The preset configs (full size, built on the meta device: no memory, no download)."""
    classes = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}
    for raw in planning.PRESETS[name]:
        config = classes[raw["model_type"]](**{k: v for k, v in raw.items() if k != "model_type"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert param_counts(raw).total == numel(model)


def test_param_counts_published_totals() -> None:
    """The model cards' sizes: 1.78B, 7.62B, Qwen3-1.7B (1.4B without embeddings), Qwen3-4B (4.0B, 3.6B)."""
    assert param_counts(planning.R1_DISTILL_QWEN_1_5B).total == 1_777_088_000
    assert param_counts(planning.SKYWORK_OR1_MATH_7B).total == 7_615_616_512
    assert round(param_counts(planning.QWEN3_1_7B).body / 1e9, 1) == 1.4
    assert round(param_counts(planning.QWEN3_4B).total / 1e9, 1) == 4.0
    assert round(param_counts(planning.QWEN3_4B).body / 1e9, 1) == 3.6


@pytest.mark.skipif(not SMOLLM2_CONFIG.exists(), reason="SmolLM2 not cached (tropd builds it on first use)")
def test_param_counts_of_shipped_smollm2() -> None:
    raw: dict[str, Any] = json.loads(SMOLLM2_CONFIG.read_text())
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert param_counts(raw).total == numel(model) == 134_515_008


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelShape.from_config({"model_type": "gpt2"})


# ---------------------------------------------------------------------------------------------
# Persistent state: weights, gradients, AdamW states, the sampling copy, the teacher


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["qwen3-tied", "llama-untied-biases"])
def test_persistent_components_equal_real_tensors(name: str) -> None:
    config = CONFIGS[name]
    student = build(config)
    ids = torch.randint(0, config.vocab_size, (2, 6))
    student(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    optimizer.step()
    sampler = copy.deepcopy(student).to(torch.bfloat16)  # what samplers.sampling_copy makes
    teacher = build(CONFIGS["qwen2-untied"], torch.bfloat16)
    plan = plan_memory(
        RunShape(
            student=shape_of(config),
            teacher=shape_of(CONFIGS["qwen2-untied"]),
            sequences=2,
            prompt_tokens=4,
            response_tokens=2,
            precision="fp32",
        )
    )
    assert plan.get("student_weights") == _nbytes(student.parameters())
    assert plan.get("student_grads") == _nbytes(p.grad for p in student.parameters())
    states = [s[key] for s in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert plan.get("optimizer_states") == _nbytes(states)  # (plus one scalar ``step`` per tensor, on the host)
    assert plan.get("sampler_copy") == _nbytes(sampler.parameters())
    assert plan.get("teacher_weights") == _nbytes(teacher.parameters())


def test_sharding_divides_the_trained_state_not_the_sampler() -> None:
    run = planning.paper_run("r1-1.5b<-skywork-7b")
    one, eight = plan_memory(run), plan_memory(replace(run, world_size=8))
    for name in ("student_weights", "student_grads", "optimizer_states"):
        assert eight.get(name) == one.get(name) // 8
    assert eight.get("sampler_copy") == one.get("sampler_copy")
    assert eight.get("teacher_weights") == one.get("teacher_weights")
    sharded = plan_memory(replace(run, world_size=8, shard_teacher=True))
    assert sharded.get("teacher_weights") == one.get("teacher_weights") // 8


# ---------------------------------------------------------------------------------------------
# The rollout KV cache


@pytest.mark.parametrize(("name", "dtype"), [("qwen2-untied", torch.bfloat16), ("qwen3-tied", torch.float32)])
def test_kv_cache_equals_the_samplers_dynamic_cache(name: str, dtype: torch.dtype) -> None:
    """rollout.sample's own DynamicCache, captured, after exactly ``new`` tokens of 3 left-padded rows."""
    config = CONFIGS[name]
    model = build(config, dtype).eval()
    caches: set[Any] = set()

    def capture(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        caches.add(kwargs["past_key_values"])

    model.register_forward_pre_hook(capture, with_kwargs=True)
    rows, prompt, new = 3, 5, 7
    ids = torch.randint(3, config.vocab_size, (rows, prompt))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    sample(model, ids, mask, max_new_tokens=new, min_new_tokens=new, eos_token_id=1, pad_token_id=0, seed=0)
    (cache,) = caches
    measured = _nbytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    element = torch.tensor([], dtype=dtype).element_size()
    assert measured == kv_cache_bytes(shape_of(config), rows, prompt + new - 1, element)


def _capture_caches(*models: torch.nn.Module) -> dict[int, Any]:
    """Every DynamicCache the models are called with (one per sampling call), by id."""
    caches: dict[int, Any] = {}

    def capture(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None:
            caches[id(cache)] = cache

    for model in models:
        model.register_forward_pre_hook(capture, with_kwargs=True)
    return caches


def _cache_shape(cache: Any) -> tuple[int, int, int]:
    """(rows, positions, bytes) of a DynamicCache."""
    keys = cache.layers[0].keys
    return keys.shape[0], keys.shape[-2], _nbytes(t for layer in cache.layers for t in (layer.keys, layer.values))


def test_chunked_kv_cache_equals_each_chunks_dynamic_cache() -> None:
    """rollout.generation_batch_size: each chunk's own DynamicCache holds its rows x (its own width + new - 1)
    positions (chunks cut the left padding they do not need); the plan's bound is the first, widest chunk."""
    config = CONFIGS["qwen2-untied"]
    model = build(config, torch.bfloat16).eval()
    caches = _capture_caches(model)
    lengths, new, chunk = [5, 3, 7, 2, 6], 4, 2
    width = max(lengths)
    ids = torch.randint(3, config.vocab_size, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    sample(
        model,
        ids,
        mask,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=1,
        pad_token_id=0,
        seed=0,
        chunk_rows=chunk,
    )
    shape = shape_of(config)
    ordered = sorted(lengths, reverse=True)  # longest contexts first
    expected = [(len(ordered[i : i + chunk]), ordered[i] + new - 1) for i in range(0, len(ordered), chunk)]
    got = sorted((_cache_shape(c) for c in caches.values()), key=lambda x: -x[1])
    assert [(rows, positions) for rows, positions, _ in got] == expected  # (2, 10), (2, 8), (1, 5)
    for rows, positions, nbytes in got:
        assert nbytes == kv_cache_bytes(shape, rows, positions)
    run = RunShape(
        student=shape,
        teacher=shape,
        sequences=len(lengths),
        prompt_tokens=width,
        response_tokens=new,
        generation_batch_size=chunk,
    )
    assert max(nbytes for *_, nbytes in got) == planning.sampling_kv_cache_bytes(run, "student")


def test_guided_rollout_caches_reach_the_plans_bounds() -> None:
    """rollout() with guidance, per-row budgets and chunks: the teacher's calls hold at most generation_rows x
    (prompt + cap - 1) positions; a student chunk that mixes a guided row (context prompt + cap, budget
    max_new - cap) with an unguided one (budget max_new) decodes to prompt + cap + max_new - 1."""
    from types import SimpleNamespace

    from tropd_cli.rollout.sampling import rollout

    config = CONFIGS["qwen2-untied"]
    student, teacher = build(config).eval(), build(CONFIGS["llama-tied"]).eval()
    student_caches, teacher_caches = _capture_caches(student), _capture_caches(teacher)
    rows, prompt, cap, max_new, chunk = 4, 6, 5, 7, 2
    # An EOS id outside the vocabulary: no row ends early, every prefix reaches the cap.
    tokenizer = SimpleNamespace(eos_token_id=config.vocab_size + 7, pad_token_id=0)
    ids = torch.randint(3, config.vocab_size, (rows, prompt))
    batch = rollout(
        student,
        teacher,
        tokenizer,  # type: ignore[arg-type]
        ids,
        torch.ones_like(ids),
        prompt_index=torch.arange(rows),
        max_new_tokens=max_new,
        min_new_tokens=0,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        prefix_max=cap,
        guided_rows=torch.tensor([True, True, True, False]),
        chunk_rows=chunk,
    )
    assert batch.prefix_mask.sum(-1).tolist() == [cap, cap, cap, 0]
    assert batch.response_mask.sum(-1).tolist() == [max_new] * rows  # each row stopped at its own budget
    run = RunShape(
        student=shape_of(config),
        teacher=shape_of(CONFIGS["llama-tied"]),
        sequences=rows,
        prompt_tokens=prompt,
        response_tokens=max_new,
        prefix_tokens=cap,
        generation_batch_size=chunk,
        sampler_dtype="float32",
        teacher_dtype="float32",
    )
    # Teacher: 3 guided rows in chunks of 2 -> (2, 10) and (1, 10).
    assert sorted(_cache_shape(c)[:2] for c in teacher_caches.values()) == [
        (1, prompt + cap - 1),
        (2, prompt + cap - 1),
    ]
    assert max(_cache_shape(c)[2] for c in teacher_caches.values()) == planning.sampling_kv_cache_bytes(run, "teacher")
    # Student: two guided rows (budget 2 each: 11 + 2 - 1), then a guided and an unguided row (11 + 7 - 1).
    assert sorted(_cache_shape(c)[:2] for c in student_caches.values()) == [
        (2, prompt + cap + (max_new - cap) - 1),
        (2, prompt + cap + max_new - 1),
    ]
    assert max(_cache_shape(c)[2] for c in student_caches.values()) == planning.sampling_kv_cache_bytes(run, "student")


def test_generation_batch_size_bounds_only_the_hf_sampling_phase() -> None:
    run = planning.paper_run("qwen3-1.7b<-qwen3-4b", world_size=8, micro_batches=16, gradient_checkpointing=True)
    whole, chunked = plan_memory(run), plan_memory(replace(run, generation_batch_size=16))
    assert chunked.get("rollout_kv_cache") == whole.get("rollout_kv_cache") // 4  # 16 of 64 rows per call
    for phase in ("teacher_scoring", "training", "optimizer"):
        assert chunked.phase_total(phase) == whole.phase_total(phase)
    assert replace(run, generation_batch_size=16).generation_chunks == 4
    assert replace(run, generation_batch_size=100).generation_rows == 64  # never more than the rank's rows
    step0 = replace(run, prefix_tokens=run.response_tokens)
    n = planning.largest_generation_batch_size(step0, H100)
    assert n is not None and 1 < n < 64
    assert plan_memory(replace(step0, generation_batch_size=n)).fits(H100)
    assert not plan_memory(replace(step0, generation_batch_size=n + 1)).fits(H100)
    vllm = replace(run, backend="vllm")  # generation_batch_size is for loop/generate only
    assert plan_memory(replace(vllm, generation_batch_size=16), H100).components == plan_memory(vllm, H100).components


def test_guidance_cap_is_the_trainers() -> None:
    from tropd_cli.rollout.sampling import prefix_cap

    for steps in (1, 2, 200):
        for step in range(steps):
            assert planning.guidance_cap(step, steps, 8192) == prefix_cap(step, steps - 1, 8192, "cosine")
    assert planning.guidance_cap(0, 200, 8192) == 8192 and planning.guidance_cap(199, 200, 8192) == 0


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves in the decoder's forward


def saved_bytes(
    model: torch.nn.Module, rows: int, seq: int, *, autocast: bool = False, checkpointing: bool = False
) -> int:
    """Bytes of distinct non-parameter storages saved for backward in a padded decoder forward."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as in every rollout batch
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["llama-untied-biases", "qwen2-tied", "qwen3-tied"])
@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16"])
def test_activation_model_equals_saved_tensors(name: str, precision: str) -> None:
    """fp32; bf16 autocast over fp32 weights (one GPU); bf16 weights (FSDP2 mixed precision)."""
    config = CONFIGS[name]
    model = build(config, torch.bfloat16 if precision == "bf16" else torch.float32)
    rows, seq = 2, 24
    measured = saved_bytes(model, rows, seq, autocast=precision == "autocast")
    expected = decoder_saved_bytes(shape_of(config), rows, seq, precision)
    if precision == "autocast":  # the bf16 casts of the matmul weights are saved too
        expected += linear_weights(shape_of(config)) * 2
    assert measured == expected


def test_checkpointing_keeps_only_each_layers_input() -> None:
    """Two more checkpointed layers save exactly two more fp32 residual-stream tensors."""
    small = build(CONFIGS["qwen2-untied"])
    deep = build(Qwen2Config(**{**TINY, "num_hidden_layers": 4}))
    rows, seq = 2, 24
    extra = saved_bytes(deep, rows, seq, checkpointing=True) - saved_bytes(small, rows, seq, checkpointing=True)
    assert extra == 2 * rows * seq * TINY["hidden_size"] * FP32
    plain = saved_bytes(build(CONFIGS["qwen2-untied"]), rows, seq)
    assert plain > 5 * saved_bytes(build(CONFIGS["qwen2-untied"]), rows, seq, checkpointing=True)


# ---------------------------------------------------------------------------------------------
# The plan as a whole


def test_micro_batches_and_checkpointing_shrink_only_the_training_phase() -> None:
    run = planning.paper_run("r1-1.5b<-skywork-7b", world_size=8)
    coarse, fine = plan_memory(replace(run, micro_batches=2)), plan_memory(replace(run, micro_batches=32))
    assert fine.phase_total("training") < coarse.phase_total("training")
    assert fine.phase_total("sampling") == coarse.phase_total("sampling")
    checkpointed = plan_memory(replace(run, micro_batches=2, gradient_checkpointing=True))
    assert checkpointed.get("activations") < coarse.get("activations") / 5


def test_guidance_prefix_sampling_can_set_the_peak() -> None:
    """With a prefix cap the student's rows start prompt + cap wide and may run a whole response further."""
    run = planning.paper_run("qwen3-1.7b<-qwen3-4b", world_size=8, micro_batches=64, gradient_checkpointing=True)
    late, first = plan_memory(run), plan_memory(replace(run, prefix_tokens=run.response_tokens))
    assert first.get("rollout_kv_cache") > 1.9 * late.get("rollout_kv_cache")
    assert first.peak_phase == "sampling"


def test_a_served_teacher_leaves_the_trainers_gpus() -> None:
    """teacher.backend=server: no teacher weights, forward or guidance KV cache on the trainer's GPUs; the top-k it
    returns still lands there. Everything of the student is as with a local teacher."""
    run = planning.paper_run("r1-1.5b<-skywork-7b", world_size=8)
    for prefix in (0, run.response_tokens):  # a late step, and step 0 with the guidance prefixes
        local = plan_memory(replace(run, prefix_tokens=prefix))
        served = plan_memory(replace(run, prefix_tokens=prefix, served_teacher=True))
        names = {c.name for c in served.components}
        assert {"teacher_weights", "teacher_forward", "teacher_scoring_chunks"}.isdisjoint(names)
        assert served.get("teacher_topk") == local.get("teacher_topk")
        assert served.get("student_weights") == local.get("student_weights")
        assert served.peak < local.peak
        assert local.get("models_loaded") - served.get("models_loaded") == param_counts(run.teacher).total * 2  # bf16


def test_smallest_micro_batches_fits_and_one_fewer_does_not() -> None:
    run = planning.paper_run("r1-1.5b<-skywork-7b", world_size=8, micro_batches=1)
    m = planning.smallest_micro_batches(run, H100)
    assert m is not None and m > 1
    assert plan_memory(replace(run, micro_batches=m)).fits(H100)
    assert not plan_memory(replace(run, micro_batches=m - 1)).fits(H100)


def _sync_bytes(run: RunShape) -> int:
    """The sampler sync's largest gathered parameter, in fp32 (several ranks)."""
    ps = param_counts(run.student)
    return max(ps.embed, ps.lm_head, ps.per_layer) * FP32


def _in_phase(plan: planning.MemoryPlan, phase: str) -> list[tuple[str, int]]:
    """The plan's components of ``phase``, in order, with their bytes."""
    return [(c.name, c.bytes) for c in plan.components if c.phase == phase]


def _torch_high_water(plan: planning.MemoryPlan) -> int:
    """What torch's allocator reaches in scoring, training and the optimizer step (release_torch_cache=False keeps
    it cached into the next step's engine phases)."""
    return max(
        sum(c.bytes for c in plan.components if c.phase == p and not c.name.startswith(("vllm_", "torch_cache")))
        for p in ("teacher_scoring", "training", "optimizer")
    )


def test_vllm_engines_replace_the_sampler_copy_and_its_cache() -> None:
    """rollout.backend=vllm with a teacher engine (teacher_prefixes=true, each engine in its own process): no HF
    sampler copy or cache; each engine takes its share of the GPU while awake, one engine at a time: the teacher
    engine writes the prefixes beside the student engine's weights (woken by the weight sync), then sleeps; the
    student engine wakes whole and continues them."""
    run = planning.paper_run(
        "r1-1.5b<-skywork-7b",
        world_size=8,
        backend="vllm",
        vllm_gpu_memory_utilization=0.4,
        vllm_teacher_prefixes=True,
        vllm_multiprocessing=True,
    )
    plan = plan_memory(run, H200)
    share_s, share_t = int(0.4 * H200.memory_bytes), int(0.2 * H200.memory_bytes)
    s, t = param_counts(run.student).total, param_counts(run.teacher).total
    assert plan.get("sampler_copy") == 0 and plan.get("rollout_kv_cache") == 0
    assert plan.get("vllm_student_engine") == share_s
    assert plan.get("vllm_teacher_engine") == share_t  # guidance prefixes from a teacher engine
    assert plan.phase_total("prefixes") == share_t + s * 2 + _sync_bytes(run)
    assert plan.phase_total("sampling") == share_s + _sync_bytes(run)
    loop = plan_memory(replace(run, backend="loop"))
    assert plan.persistent == loop.persistent - loop.get("sampler_copy")  # asleep outside their phases
    # Level-1 sleep keeps every engine's bf16 weights in host RAM; the weight sync through collective_rpc copies
    # the fp32 student there; an engine starts with its share free.
    assert plan.get("engine_weights_offloaded") == (s + t) * 2
    assert plan.host == (s + t) * 2 + plan.get("weight_sync_host_copy") == (s + t) * 2 + s * FP32
    assert plan.startup == s * FP32 + t * 2 + share_s
    # Both engines in the trainer's process under sleep mode: vLLM refuses the second (one CuMemAllocator).
    one_process = (
        "a teacher engine beside the sleeping student engine needs VLLM_ENABLE_V1_MULTIPROCESSING=1 "
        "(vLLM's sleep mode allows one engine per process)"
    )
    inprocess = plan_memory(replace(run, vllm_multiprocessing=False), H200)
    assert inprocess.peak == plan.peak and inprocess.host == (s + t) * 2
    assert inprocess.problems(H200) == [*plan.problems(H200), one_process]
    awake = plan_memory(replace(run, vllm_sleep=False, vllm_multiprocessing=False), H200)
    assert awake.persistent == plan.persistent + share_s + share_t
    assert awake.phase_total("prefixes") == awake.phase_total("sampling") == _sync_bytes(run)
    assert awake.host == 0 and awake.startup == s * FP32 + t * 2 + share_s + share_t
    assert one_process not in awake.problems(H200)  # without sleep mode two engines may share a process
    with pytest.raises(ValueError, match="pass the GPU"):
        plan_memory(run)


def test_teacher_engine_follows_the_trainers_rules() -> None:
    """engines.start_engines: a teacher engine with teacher_scoring, or with teacher_prefixes and guidance; by
    default (teacher_prefixes=false) none: the HF teacher writes the prefixes."""
    run = planning.preset_run("qwen3-1.7b<-qwen3-4b")
    assert not run.vllm_teacher_prefixes and not run.teacher_engine
    two = replace(run, vllm_teacher_prefixes=True, vllm_multiprocessing=True)
    share = int(run.vllm_teacher_gpu_memory_utilization * H100.memory_bytes)
    assert two.teacher_engine and plan_memory(two, H100).get("vllm_teacher_engine") == share
    unguided = plan_memory(replace(two, guidance=False), H100)
    assert not replace(two, guidance=False).teacher_engine and unguided.get("vllm_teacher_engine") == 0
    assert unguided.phase_total("prefixes") == 0
    scoring = plan_memory(replace(run, guidance=False, vllm_teacher_scoring=True, vllm_multiprocessing=True), H100)
    assert scoring.get("vllm_teacher_engine_scoring") == share and scoring.get("teacher_forward") == 0
    # Prefixes from the HF teacher (the default), beside the student engine's weights and the weight sync's blocks.
    # tropd empties torch's cache once they are written (EngineSamplers.after_prefixes), so the student engine wakes whole
    # beside nothing of torch's: neither the loop's blocks nor the sync's. The older code (release_torch_cache=False)
    # kept both reserved there, and the last step's high-water mark of scoring and training above them.
    rows = planning.PRESET_GENERATION_BATCH_SIZE["qwen3-1.7b<-qwen3-4b"]
    assert run.generation_batch_size == rows and run.generation_chunks == -(-run.sequences_per_rank // rows)
    hf_run = replace(run, prefix_tokens=2048)
    hf = plan_memory(hf_run, H100)
    assert hf.get("vllm_teacher_engine") == 0 and hf.host == hf.get("engine_weights_offloaded")
    cache = planning.sampling_kv_cache_bytes(hf_run, "teacher")
    assert cache == kv_cache_bytes(run.teacher, rows, 1024 + 2048 - 1)  # one HF call of the preset's rows
    held = cache + hf.get("teacher_prefix_temporaries")
    engine, sync = int(0.3 * H100.memory_bytes), _sync_bytes(run)
    assert _in_phase(hf, "prefixes") == [
        ("vllm_student_engine_weights", param_counts(run.student).total * 2),
        ("teacher_prefix_kv_cache", cache),
        ("teacher_prefix_temporaries", held - cache),
        ("sampler_sync", sync),
    ]
    assert _in_phase(hf, "sampling") == [("vllm_student_engine", engine)]
    old = plan_memory(replace(hf_run, release_torch_cache=False), H100)
    high = _torch_high_water(old)
    assert high > held + sync  # Qwen3 at a 2048-token cap: scoring / training reach higher than the prefixes
    assert _in_phase(old, "sampling") == [
        ("vllm_student_engine", engine),
        ("teacher_prefix_blocks_held", held),
        ("sampler_sync", sync),
        ("torch_cache_held", high - held - sync),
    ]
    assert old.phase_total("sampling") == hf.phase_total("sampling") + high
    # At a 4096-token cap the preset's prefixes reach higher than scoring and training: the older code kept their
    # blocks and the sync's beside the engine, and nothing of the last step's high-water mark above them.
    long_run = replace(run, prefix_tokens=4096)
    long = plan_memory(long_run, H100)
    long_held = long.get("teacher_prefix_kv_cache") + long.get("teacher_prefix_temporaries")
    assert long.get("teacher_prefix_kv_cache") == kv_cache_bytes(run.teacher, rows, 1024 + 4096 - 1)
    assert _in_phase(long, "sampling") == [("vllm_student_engine", engine)]
    long_old = plan_memory(replace(long_run, release_torch_cache=False), H100)
    assert _torch_high_water(long_old) == high < long_held + sync  # the same scoring / training, larger prefixes
    assert _in_phase(long_old, "sampling") == [
        ("vllm_student_engine", engine),
        ("teacher_prefix_blocks_held", long_held),
        ("sampler_sync", sync),
        ("torch_cache_held", 0),
    ]


@pytest.mark.parametrize(
    ("setup", "phases"),
    [
        ({}, ("sampling",)),  # one engine (the default), late steps: the HF teacher writes no prefix
        ({"vllm_teacher_prefixes": True, "vllm_multiprocessing": True}, ("prefixes", "sampling")),  # two engines
    ],
)
def test_torch_cache_is_emptied_before_the_engines_wake(setup: dict[str, Any], phases: tuple[str, ...]) -> None:
    """Trainer empties torch's cache before the engines wake (release_torch_cache, the default). Without it (the code
    before), vLLM would wake its engines outside torch's allocator beside the blocks torch cached for the last
    step's scoring and training: the engines' phases would hold torch's high-water mark of those phases."""
    run = planning.preset_run("r1-1.5b<-skywork-7b", **setup)
    assert run.release_torch_cache
    plan = plan_memory(run, H100)
    assert plan.get("torch_cache_held") == 0
    before = plan_memory(replace(run, release_torch_cache=False), H100)
    torch_only = {
        p: sum(c.bytes for c in before.components if c.phase == p and not c.name.startswith(("vllm_", "torch_cache")))
        for p in planning.PHASES
    }
    high = max(torch_only["teacher_scoring"], torch_only["training"], torch_only["optimizer"])
    for phase in planning.PHASES:  # beside every phase an engine wakes in, and only there
        held = [c.bytes for c in before.components if c.name == "torch_cache_held" and c.phase == phase]
        assert held == ([high - torch_only[phase]] if phase in phases else [])
    assert before.phase_total("sampling") == high + plan.get("vllm_student_engine")
    if "prefixes" in phases:
        assert before.phase_total("prefixes") == high + plan.get("vllm_teacher_engine") + plan.get(
            "vllm_student_engine_weights"
        )
    assert before.peak > plan.peak + 10 * planning.GiB  # 58.6 against 42.3 GiB per H100


def test_each_engines_room_is_what_its_phases_and_the_startup_leave() -> None:
    """vllm_engine_room with two engines: the largest share an engine may take with the plan still fitting; the other
    engine's share does not enter it (the engines are never awake together)."""
    run = planning.preset_run("r1-1.5b<-skywork-7b", vllm_teacher_prefixes=True, vllm_multiprocessing=True)
    plan, limit, total = plan_memory(run, H100), 0.9 * H100.memory_bytes, H100.memory_bytes
    student = planning.vllm_engine_room(run, H100, role="student")
    teacher = planning.vllm_engine_room(run, H100, role="teacher")
    assert student is not None and teacher is not None
    sampling_rest = plan.phase_total("sampling") - plan.get("vllm_student_engine")
    prefixes_rest = plan.phase_total("prefixes") - plan.get("vllm_teacher_engine")
    startup_rest = plan.get("models_loaded")
    assert student * total == pytest.approx(min(limit - plan.persistent - sampling_rest, limit - startup_rest))
    assert teacher * total == pytest.approx(min(limit - plan.persistent - prefixes_rest, limit - startup_rest))
    keys = {"student": "vllm_gpu_memory_utilization", "teacher": "vllm_teacher_gpu_memory_utilization"}
    for role, room in (("student", student), ("teacher", teacher)):
        assert plan_memory(replace(run, **{keys[role]: room - 1e-4}), H100).fits(H100)
        assert not plan_memory(replace(run, **{keys[role]: room + 1e-4}), H100).fits(H100)
        other = "teacher" if role == "student" else "student"
        assert planning.vllm_engine_room(replace(run, **{keys[other]: 0.5}), H100, role=role) == pytest.approx(room)
    assert planning.vllm_engine_room(replace(run, guidance=False), H100, role="teacher") is None
    # Without sleep mode both shares stay on the GPU: they share one room.
    awake = replace(run, vllm_sleep=False)
    both = planning.vllm_engine_room(awake, H100, role="student")
    assert both is not None and both + run.vllm_teacher_gpu_memory_utilization < student
    assert plan_memory(replace(awake, vllm_gpu_memory_utilization=both - 1e-4), H100).fits(H100)


def test_the_student_engines_room_beside_the_hf_teachers_prefixes() -> None:
    """One engine (the presets): tropd empties torch's cache once the HF teacher's prefixes are written, so at step 0
    the student engine wakes beside nothing of torch's and its room does not depend on rollout.generation_batch_size;
    at the last steps (no prefixes, nothing emptied after the weight sync) the sync's cached blocks are beside it.
    With the older code (release_torch_cache=False) it woke beside the prefixes' blocks, the sync's and the last
    step's high-water mark of scoring and training, and its room shrank as the chunks grew."""
    run = replace(planning.preset_run("r1-1.5b<-skywork-7b"), prefix_tokens=8192)
    assert planning.vllm_engine_room(run, H100, role="teacher") is None
    limit, total = 0.9 * H100.memory_bytes, H100.memory_bytes
    engine, sync = int(0.3 * H100.memory_bytes), _sync_bytes(run)
    rooms: dict[tuple[bool, int, int], float] = {}
    for release, rows, prefix in (
        (True, 32, 8192),
        (True, 64, 8192),
        (True, 64, 0),
        (False, 32, 8192),
        (False, 64, 8192),
    ):
        chunked = replace(run, generation_batch_size=rows, release_torch_cache=release, prefix_tokens=prefix)
        plan = plan_memory(chunked, H100)
        held = plan.get("teacher_prefix_kv_cache") + plan.get("teacher_prefix_temporaries")
        assert (held > 0) == (prefix > 0)
        if release and prefix:
            expected = [("vllm_student_engine", engine)]
        elif release:
            expected = [("vllm_student_engine", engine), ("sampler_sync", sync)]
        else:
            assert plan.get("teacher_prefix_kv_cache") == kv_cache_bytes(run.teacher, rows, 1024 + 8192 - 1)
            expected = [
                ("vllm_student_engine", engine),
                ("teacher_prefix_blocks_held", held),
                ("sampler_sync", sync),
                ("torch_cache_held", max(0, _torch_high_water(plan) - held - sync)),
            ]
        assert _in_phase(plan, "sampling") == expected
        room = planning.vllm_engine_room(chunked, H100, role="student")
        assert room is not None
        beside = sum(nbytes for _, nbytes in expected[1:])
        assert room * total == pytest.approx(min(limit - plan.persistent - beside, limit - plan.get("models_loaded")))
        assert plan_memory(replace(chunked, vllm_gpu_memory_utilization=room - 1e-4), H100).fits(H100)
        assert not plan_memory(replace(chunked, vllm_gpu_memory_utilization=room + 1e-4), H100).fits(H100)
        rooms[(release, rows, prefix)] = room
    # R1's engine room is the startup's (the whole fp32 student and the teacher beside it) at every step.
    assert rooms[(True, 64, 8192)] == rooms[(True, 32, 8192)] == rooms[(True, 64, 0)]
    assert rooms[(False, 64, 8192)] < rooms[(False, 32, 8192)] < rooms[(True, 32, 8192)]


class TaggedEngine:
    """VLLMEngine's memory states over stub generation, for the trainer: which of an engine's tags (weights,
    kv_cache) are on the GPU, as load_weights (weights only), generate / teacher_scores (everything) and sleep
    (nothing) leave them; every call that runs an engine records what every engine holds at that moment."""

    built: list[TaggedEngine] = []
    moments: list[tuple[str, dict[str, frozenset[str]]]] = []

    def __init__(self, model_dir: Path, *, gpu_memory_utilization: float, **kwargs: Any) -> None:
        self.role, self.resident = Path(model_dir).name, {"weights", "kv_cache"}  # vLLM starts an engine whole
        TaggedEngine.built.append(self)

    @property
    def asleep(self) -> bool:
        return self.resident != {"weights", "kv_cache"}

    def load_weights(self, named_tensors: Any) -> None:
        for _ in named_tensors:
            pass
        self.resident.add("weights")

    def sleep(self) -> None:
        self.resident = set()

    def _run(self) -> None:
        self.resident = {"weights", "kv_cache"}
        TaggedEngine.moments.append((self.role, {e.role: frozenset(e.resident) for e in TaggedEngine.built}))

    def generate(self, prompt_token_ids: list[list[int]], *, max_new_tokens: Any, stop_token_ids: Any, **kw: Any):
        self._run()
        budgets = [max_new_tokens] * len(prompt_token_ids) if isinstance(max_new_tokens, int) else max_new_tokens
        token = next(t for t in range(3, 64) if t not in set(stop_token_ids))
        return [[token] * int(b) for b in budgets]

    def teacher_scores(self, sequences: Any, start: Any, *, top_k: int, temperature: float = 1.0, device: Any = None):
        from tropd_cli.batch import TeacherScores

        self._run()
        n, vocab = sum(len(s) - f for s, f in zip(sequences, start, strict=True)), 100  # the tiny character vocab
        flat = torch.full((n,), -float(torch.log(torch.tensor(vocab))), device=device)  # uniform
        ids = torch.arange(top_k, device=device).expand(n, top_k)
        return TeacherScores(flat, ids, flat[:, None].expand(n, top_k), -flat)

    def close(self) -> None:
        pass


def test_the_trainer_wakes_the_engines_one_at_a_time_as_planned(make_config, tmp_path, monkeypatch) -> None:
    """Two engines (teacher_prefixes and teacher_scoring, each engine in its own process): with stub engines that
    keep VLLMEngine's memory states, at every moment an engine runs, the engine memory on the GPU is exactly the
    vLLM components the plan puts in that phase (a whole engine: its share; the student engine's weights alone:
    vllm_student_engine_weights)."""
    import tropd_cli.rollout.vllm as backend
    from tropd_cli.errors import UserError
    from tropd_cli.train.loop import train
    from tropd_cli.validate import validate_train

    TaggedEngine.built, TaggedEngine.moments = [], []
    monkeypatch.setattr(backend, "VLLMEngine", TaggedEngine)
    cfg = make_config(steps=3, rollout={"batch_size": 2, "max_new_tokens": 8})
    cfg.rollout.backend = "vllm"
    cfg.rollout.vllm.teacher_prefixes = True
    cfg.rollout.vllm.teacher_scoring = True
    # A teacher engine beside the sleeping student engine needs each engine in its own process (as the plan says).
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with pytest.raises(UserError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1"):
        validate_train(cfg)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    validate_train(cfg)
    train(cfg, output_dir=tmp_path)
    assert [e.role for e in TaggedEngine.built] == ["student", "teacher"]
    whole, weights, none = frozenset({"weights", "kv_cache"}), frozenset({"weights"}), frozenset()
    prefixes = ("teacher", {"student": weights, "teacher": whole})
    sampling = ("student", {"student": whole, "teacher": none})
    scoring = ("teacher", {"student": none, "teacher": whole})
    # Prefix caps 8, 4, 0: step 1's prefixes leave the student nothing to write, step 3 has no prefixes; the
    # teacher engine scores every micro-batch of every step.
    assert TaggedEngine.moments == [prefixes, scoring, prefixes, sampling, scoring, sampling, scoring]
    names = {
        ("student", whole): "vllm_student_engine",
        ("student", weights): "vllm_student_engine_weights",
        ("teacher", whole): "vllm_teacher_engine",
    }
    run = planning.preset_run(
        "qwen3-1.7b<-qwen3-4b", vllm_teacher_prefixes=True, vllm_teacher_scoring=True, vllm_multiprocessing=True
    )
    plan = plan_memory(run, H100)
    assert not plan.problems(H100)
    assert plan_memory(replace(run, vllm_multiprocessing=False), H100).problems(H100)  # as validate_train refuses
    for phase, moment in (("prefixes", prefixes), ("sampling", sampling), ("teacher_scoring", scoring)):
        on_gpu = {names[role, tags] for role, tags in moment[1].items() if tags}
        planned = {c.name for c in plan.components if c.phase == phase and c.name.startswith("vllm_")}
        assert planned == {n + "_scoring" if phase == "teacher_scoring" else n for n in on_gpu}, phase


def test_the_trainer_runs_one_engine_by_default_as_planned(make_config, tmp_path, monkeypatch) -> None:
    """The default (teacher_prefixes=false): only the student has an engine, and the HF teacher writes the prefixes
    with the student engine's weights alone on the GPU (woken by the weight sync), as the plan's prefixes phase has
    them (vllm_student_engine_weights); the student engine then wakes whole to continue them (sampling)."""
    import tropd_cli.rollout.sampling as rollout_module
    import tropd_cli.rollout.vllm as backend
    from tropd_cli.train.loop import train
    from tropd_cli.validate import validate_train

    TaggedEngine.built, TaggedEngine.moments = [], []
    monkeypatch.setattr(backend, "VLLMEngine", TaggedEngine)
    real_sample = rollout_module.sample

    def recording_sample(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, TaggedEngine):  # the HF teacher writing prefixes (the student is an engine)
            TaggedEngine.moments.append(("hf teacher", {e.role: frozenset(e.resident) for e in TaggedEngine.built}))
        return real_sample(model, *args, **kwargs)

    monkeypatch.setattr(rollout_module, "sample", recording_sample)
    cfg = make_config(steps=3, rollout={"batch_size": 2, "max_new_tokens": 8})
    cfg.rollout.backend = "vllm"
    # The held-out set's teacher answers are written once before step 1, with every engine asleep (no GPU memory
    # beside the HF teacher); this test follows the rollouts' moments only.
    cfg.heldout.size = 0
    assert not cfg.rollout.vllm.teacher_prefixes and not cfg.rollout.vllm.teacher_scoring
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    validate_train(cfg)  # one engine: no multiprocessing needed
    train(cfg, output_dir=tmp_path)
    assert [e.role for e in TaggedEngine.built] == ["student"]
    whole, weights = frozenset({"weights", "kv_cache"}), frozenset({"weights"})
    prefixes = ("hf teacher", {"student": weights})
    sampling = ("student", {"student": whole})
    # Prefix caps 8, 4, 0: the HF teacher writes at steps 1 and 2 (the first thing each step runs); the student
    # engine continues whatever a prefix leaves (the tiny HF teacher may end one early), and writes whole rollouts
    # at step 3. Every moment holds exactly the memory states above.
    moments = TaggedEngine.moments
    assert moments[0] == prefixes and moments[-1] == sampling
    assert [m for m in moments if m[0] == "hf teacher"] == [prefixes, prefixes]
    assert all(m in (prefixes, sampling) for m in moments)
    names = {("student", whole): "vllm_student_engine", ("student", weights): "vllm_student_engine_weights"}
    run = planning.preset_run("qwen3-1.7b<-qwen3-4b")
    plan = plan_memory(replace(run, prefix_tokens=4096), H100)  # a step with prefixes
    for phase, moment in (("prefixes", prefixes), ("sampling", sampling)):
        on_gpu = {names[role, tags] for role, tags in moment[1].items() if tags}
        assert on_gpu == {c.name for c in plan.components if c.phase == phase and c.name.startswith("vllm_")}, phase
    assert not any(c.phase == "teacher_scoring" and c.name.startswith("vllm_") for c in plan.components)


def test_engine_pool_and_the_sequences_it_holds() -> None:
    run = planning.preset_run("r1-1.5b<-skywork-7b", vllm_teacher_prefixes=True, vllm_multiprocessing=True)
    pool = planning.vllm_kv_pool_bytes(run, H100, "teacher")
    assert pool == int(0.2 * H100.memory_bytes) - param_counts(run.teacher).total * 2
    per_sequence = planning.kv_cache_bytes(run.teacher, 1, 1024 + 8192)
    assert planning.vllm_concurrent_rows(run, H100, "teacher") == pool // per_sequence == 3
    assert planning.vllm_concurrent_rows(run, H100, "student") >= run.sequences_per_rank  # 64 rows at once
    # A share below the teacher's weights: vLLM would refuse to start the engine.
    small = replace(run, vllm_teacher_gpu_memory_utilization=0.15)
    assert planning.vllm_concurrent_rows(small, H100, "teacher") == 0
    assert not plan_memory(small, H100).fits(H100)
    assert any("teacher engine" in p for p in plan_memory(small, H100).problems(H100))


def test_preset_run_matches_the_paper_presets(monkeypatch) -> None:
    """planning.preset_run against the composed conf/experiment/paper/*.yaml (and VLLMConfig's defaults): one
    engine, the student's, which tropd accepts in its own process and the plan fits on an H100 at step 0."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tropd_cli.commands.common import register_configs
    from tropd_cli.config import TrainConfig
    from tropd_cli.validate import validate_train

    register_configs()
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    presets = {
        "r1-1.5b<-skywork-7b": ("paper/ds_r1_1p5b_from_skywork_math7b", []),
        "qwen3-1.7b<-qwen3-4b": (
            "paper/qwen3_1p7b_from_nemotron4b",
            ["teacher.name=t", "student.name=s", "dataset.path=p.jsonl"],
        ),
    }
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for name, (experiment, required) in presets.items():
            cfg = OmegaConf.to_object(compose("train", [f"experiment={experiment}", *required]))
            assert isinstance(cfg, TrainConfig)
            run, v = planning.preset_run(name), cfg.rollout.vllm
            assert run.sequences == cfg.rollout.batch_size * cfg.rollout.n_samples_per_prompt
            assert (run.response_tokens, run.prompt_tokens) == (
                cfg.rollout.max_new_tokens,
                cfg.dataset.max_prompt_tokens,
            )
            assert (run.micro_batches, run.chunk_size, run.top_k) == (
                cfg.optim.micro_batches,
                cfg.scoring.chunk_size,
                cfg.method.top_k,
            )
            assert run.gradient_checkpointing == cfg.student.gradient_checkpointing
            assert (run.backend, run.generation_batch_size, run.guidance) == (
                cfg.rollout.backend,
                cfg.rollout.generation_batch_size,
                cfg.guidance.enabled,
            )
            assert (run.vllm_gpu_memory_utilization, run.vllm_teacher_gpu_memory_utilization) == (
                v.gpu_memory_utilization,
                v.teacher_gpu_memory_utilization,
            )
            assert (run.vllm_teacher_prefixes, run.vllm_teacher_scoring, run.vllm_sleep) == (
                v.teacher_prefixes,
                v.teacher_scoring,
                v.enable_sleep_mode,
            )
            assert v.max_model_len is None  # the engines' max_model_len: prompt + response, as planned
            assert run.max_model_len == cfg.dataset.max_prompt_tokens + cfg.rollout.max_new_tokens
            assert run.world_size == 8 and run.sequences_per_rank * 8 == run.sequences
            assert not run.teacher_engine and not run.vllm_multiprocessing
            validate_train(cfg)  # one engine: no VLLM_ENABLE_V1_MULTIPROCESSING needed
            for prefix in (run.response_tokens, 0):  # step 0 and the last steps
                assert not plan_memory(replace(run, prefix_tokens=prefix), H100).problems(H100)


def test_one_process_fp32_sampler_is_the_student_itself() -> None:
    run = planning.paper_run("r1-1.5b<-skywork-7b", precision="fp32", sampler_dtype="float32")
    assert plan_memory(run).get("sampler_copy") == 0
    assert plan_memory(replace(run, world_size=8)).get("sampler_copy") == param_counts(run.student).total * FP32


def test_step_estimate_counts_flops_and_decode() -> None:
    run = planning.paper_run("r1-1.5b<-skywork-7b", world_size=8)
    est = planning.estimate_step(run, H200)
    tokens = run.sequences * run.seq_len
    # Dominant terms: 2 P_T and 6 P_S per token.
    assert est.teacher_flops > 2 * param_counts(run.teacher).body * tokens
    assert est.student_flops > 6 * param_counts(run.student).body * tokens
    ckpt = planning.estimate_step(replace(run, gradient_checkpointing=True), H200)
    assert ckpt.student_flops > est.student_flops
    assert est.decode_steps == run.response_tokens
    assert 0 < est.decode_bound_s <= est.decode_s
    assert planning.estimate_step(run, H100).decode_bound_s > est.decode_bound_s  # less bandwidth
    assert est.teacher_s == pytest.approx(est.teacher_flops / (8 * H200.bf16_flops * 0.35))


def test_step_estimate_chunks_budgets_and_waves() -> None:
    """HF chunks run one after the other; a guided row's continuation is max_new - prefix; a vLLM engine whose
    pool holds fewer rows than the rank's runs them in waves, the rows spread evenly over them."""
    run = planning.paper_run("r1-1.5b<-skywork-7b", world_size=8)
    one = planning.estimate_step(run, H100)
    four = planning.estimate_step(replace(run, generation_batch_size=16), H100)
    assert four.decode_steps == 4 * one.decode_steps
    assert four.decode_s == pytest.approx(4 * one.decode_s, rel=0.05)  # launch-bound: chunks cost time, not rows
    guided = planning.estimate_step(replace(run, prefix_tokens=3000), H100)
    assert guided.decode_steps == 3000 + (8192 - 3000)  # teacher prefix, then the student's remaining budget
    vllm = planning.preset_run("qwen3-1.7b<-qwen3-4b")
    rows_at_once = planning.vllm_concurrent_rows(vllm, H100, "student")
    waves = -(-vllm.sequences_per_rank // rows_at_once)
    assert waves > 1 and planning.estimate_step(vllm, H100).decode_steps == waves * 8192
    assert planning.throughput._sampling_groups(vllm, H100, "student", True) == (
        waves,
        -(-vllm.sequences_per_rank // waves),
    )
    # The preset's HF teacher writes the prefixes in calls of generation_batch_size rows, one after the other
    # (Qwen3: 2 calls of 32 rows, 3000 steps each), before the student engine's waves continue them.
    calls = -(-vllm.sequences_per_rank // planning.PRESET_GENERATION_BATCH_SIZE["qwen3-1.7b<-qwen3-4b"])
    assert vllm.generation_chunks == calls > 1
    assert planning.estimate_step(replace(vllm, prefix_tokens=3000), H100).decode_steps == (
        calls * 3000 + waves * (8192 - 3000)
    )
    # R1's preset writes all of the rank's prefixes in one call.
    r1 = planning.preset_run("r1-1.5b<-skywork-7b")
    assert r1.generation_batch_size == planning.PRESET_GENERATION_BATCH_SIZE["r1-1.5b<-skywork-7b"]
    assert r1.generation_chunks == 1 and r1.generation_rows == r1.sequences_per_rank
    r1_waves = planning.throughput._sampling_groups(r1, H100, "student", True)[0]
    assert planning.estimate_step(replace(r1, prefix_tokens=3000), H100).decode_steps == (
        3000 + r1_waves * (8192 - 3000)
    )
    two = replace(vllm, vllm_teacher_prefixes=True, vllm_multiprocessing=True)  # a teacher engine writes them
    t_waves = -(-two.sequences_per_rank // planning.vllm_concurrent_rows(two, H100, "teacher"))
    assert planning.estimate_step(replace(two, prefix_tokens=3000), H100).decode_steps == (
        t_waves * 3000 + waves * (8192 - 3000)
    )
    hours = planning.estimate_run_seconds(run, H100, steps=4) / 3600
    caps = [planning.guidance_cap(i, 4, 8192) for i in range(4)]
    expected = sum(planning.estimate_step(replace(run, prefix_tokens=c), H100).total_s for c in caps) / 3600
    assert hours == pytest.approx(expected)


def test_memory_plan_script_rewrites_only_its_section(tmp_path: Path) -> None:
    """benchmarks/memory_plan.py --no-measure: the generated section lands between its markers, twice over."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_plan.py"
    doc = tmp_path / "scaling.md"
    doc.write_text(
        "# Scaling\n\nbefore\n\n<!-- memory-plan:start -->\nSTALE-SECTION\n<!-- memory-plan:end -->\n\nafter\n"
    )
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, str(script), "--no-measure", "--out-md", str(doc)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    text = doc.read_text()
    assert text.count("<!-- memory-plan:start -->") == 1 and "STALE-SECTION" not in text
    assert text.index("before") < text.index("### Models") < text.index("after")
    assert "| 8 | H100 | on | late steps | 5 | 13 |" in text  # R1-1.5B <- Skywork-7B: 5 micro-batches fit
    # The presets as configured fit 8 H100s: one engine, alone once the HF teacher's prefixes are written (step 0),
    # beside the weight sync's cached blocks at the last steps; the startup is R1's largest figure.
    # The presets are configured as recommended (R1: all 64 prefixes in one HF call, Qwen3: two calls of 32).
    assert (
        "| H100 | as configured = recommended | 16 | 64 (1) | 0.3 / HF | 0.64 / HF | 54.4 (prefixes, 68%) | "
        "42.3 (sampling) | 44.7 (56%) | 3.3 | yes |" in text
    )
    assert (
        "| H100 | as configured = recommended | 16 | 32 (2) | 0.3 / HF | 0.73 / HF | 56.7 (prefixes, 71%) | "
        "35.8 (sampling) |" in text
    )
    # One recommended set per preset for H100 and H200 alike, within the headroom on both, and it is the preset as
    # configured (rollout.generation_batch_size as planning.PRESET_GENERATION_BATCH_SIZE): said as such, never as a
    # separate "recommended" setup; the two-engine alternative (a teacher engine, each engine in its own process)
    # fits too.
    for preset in planning.PRESETS:
        size = planning.PRESET_GENERATION_BATCH_SIZE[preset]
        assert (
            "Recommended for 8 x H100 and 8 x H200 alike: the preset as configured, `optim.micro_batches=16 "
            f"rollout.generation_batch_size={size} rollout.vllm.gpu_memory_utilization=0.3` (every phase" in text
        )
    assert text.count("alike: `") == 0 and text.count("alike: the preset as configured, `") == len(planning.PRESETS)
    rows = [line for line in text.splitlines() if line.startswith(("| H100 | ", "| H200 | "))]
    labels = {line.split(" | ")[1] for line in rows}
    assert not labels & {"as configured", "recommended", "vLLM as configured", "vLLM recommended"}
    recommended = [line for line in rows if line.split(" | ")[1] == "as configured = recommended"]
    two = [line for line in rows if line.split(" | ")[1] == "two engines (alternative)"]
    assert len(recommended) == 4 and all("| yes |" in line for line in recommended)
    assert len(two) == 4 and all("| yes |" in line for line in two)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=1" in text


def test_the_recommended_settings_fit_both_gpus_with_headroom() -> None:
    """benchmarks/memory_plan.py's RECOMMENDED (one engine) and TWO_ENGINES (the alternative): every phase of step 0
    (the HF teacher's prefix cache at its largest), of the last steps (no prefixes: the weight sync's cached blocks
    beside the student engine) and the startup within 85% of an H100 and of an H200."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_plan.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("memory_plan", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    assert set(module.RECOMMENDED) == set(module.TWO_ENGINES) == set(planning.PRESETS)
    for preset in planning.PRESETS:
        one = replace(planning.preset_run(preset), **module.RECOMMENDED[preset])
        two = replace(planning.preset_run(preset), **module.TWO_ENGINES[preset])
        assert not one.teacher_engine and two.teacher_engine and two.vllm_multiprocessing
        for run in (one, two):
            for gpu in (H100, H200):
                first, last = (plan_memory(replace(run, prefix_tokens=p), gpu) for p in (run.response_tokens, 0))
                for plan in (first, last):
                    assert not plan.problems(gpu)
                    assert max(plan.peak, plan.startup) <= module.HEADROOM * gpu.memory_bytes, (preset, gpu.name)
                # Step 0 and the last steps bound every step: the prefixes shrink with the cap, and the sampling
                # phase differs only by the weight sync's blocks (one engine: emptied with the HF teacher's
                # prefixes at every step that has them; two engines: the teacher engine's sleep, in its own
                # process, leaves them).
                sync = _sync_bytes(run) if run is one else 0
                assert last.phase_total("sampling") == first.phase_total("sampling") + sync
                assert last.phase_total("prefixes") <= first.phase_total("prefixes")
