"""Engine tests on tiny random HF models built in-process (no hub, CPU, seconds).

The tiny teacher is a random 4-layer Llama over a character tokenizer; the student keeps its layers
[0, 3]. These tests drive ``trainer.train``, ``trainer.Trainer`` and ``rollout.rollout`` directly.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tropd_cli.batch import RolloutBatch
from tropd_cli.config import ModelConfig, TrainConfig
from tropd_cli.data import format_prompt
from tropd_cli.errors import UserError
from tropd_cli.models import LoadedModel
from tropd_cli.rollout.sampling import rollout, tokenize_prompts
from tropd_cli.train.loop import train
from tropd_cli.train.scoring import lm_head_weight, response_hidden, student_scores
from tropd_cli.train.setup import Run, build_run
from tropd_cli.train.step import train_step

CPU = torch.device("cpu")
LOGGED = (
    "loss",
    "rkl_estimate",
    "trust_fraction",
    "grad_norm",
    "student_entropy",
    "teacher_entropy",
    "prefix_len",
    "response_len",
    "lr",
    "outlier_loss",
)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# train(): finiteness, learning, determinism, checkpoints


def test_two_steps_are_finite_and_change_the_student(tiny_run, load_models):
    result, cfg = tiny_run
    assert len(result.history) == 2
    for metrics in result.history:
        for key in LOGGED:
            assert math.isfinite(metrics[key]), (key, metrics[key])
    assert all(m["tokens"] > 0 for m in result.history)

    _, initial = load_models(cfg)
    before = initial.model.state_dict()
    after = checkpoint_weights(result.checkpoint)
    assert after.keys() <= before.keys()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    # Every trainable matrix of the kept layers moves under Adam at lr 1e-3.
    assert len(changed) > len(after) // 2, changed


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_run, make_config, tmp_path):
    result, _ = tiny_run
    reference = checkpoint_weights(result.checkpoint)

    again = train(make_config(seed=0), output_dir=tmp_path / "again")
    repeated = checkpoint_weights(again.checkpoint)
    assert repeated.keys() == reference.keys()
    for key in reference:
        assert torch.equal(repeated[key], reference[key]), f"{key} differs between two runs with seed 0"
    assert [h["loss"] for h in again.history] == [h["loss"] for h in result.history]

    other = checkpoint_weights(train(make_config(seed=1), output_dir=tmp_path / "other").checkpoint)
    assert any(not torch.equal(other[k], reference[k]) for k in reference)


def greedy(model, input_ids: torch.Tensor, *, use_cache: bool, new_tokens: int = 6) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


def test_checkpoint_loads_with_kept_layers_and_generates(tiny_run):
    result, cfg = tiny_run
    assert cfg.student.keep_layers is not None
    kept = len(cfg.student.keep_layers)
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    model.eval()
    assert model.config.num_hidden_layers == kept
    assert len(model.get_decoder().layers) == kept
    assert [layer.self_attn.layer_idx for layer in model.get_decoder().layers] == list(range(kept))

    ids = tokenizer(format_prompt(tokenizer, "1 + 2 ="), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        cached = greedy(model, ids, use_cache=True)
        uncached = greedy(model, ids, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_layer_dropped_student_generates_with_kv_cache(make_config, load_models):
    """Before saving: the in-memory student renumbers layer_idx so the KV cache has one slot per kept layer."""
    _, student = load_models(make_config(student=ModelConfig(from_teacher=True, keep_layers=[0, 3])))
    model = student.model.eval()
    assert [layer.self_attn.layer_idx for layer in model.get_decoder().layers] == [0, 1]
    ids = student.tokenizer(format_prompt(student.tokenizer, "7 + 5 ="), return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ]
    with torch.no_grad():
        assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))


# ---------------------------------------------------------------------------------------------
# rollout(): layout, masks and the trainer's scoring path


def boost_eos(loaded: LoadedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, nats: float = 2.5) -> None:
    """Raise the EOS logit by about ``nats`` so that rollouts of a random model end early now and then.

    The final hidden states of the tiny model share a mean direction; adding it to the EOS row of the
    (tied) lm_head shifts every EOS logit by about the same amount.
    """
    model = loaded.model
    with torch.no_grad():
        out = model.get_decoder()(input_ids=prompt_ids, attention_mask=prompt_mask)
        mean = out.last_hidden_state[prompt_mask.bool()].mean(0)
        lm_head_weight(model)[loaded.tokenizer.eos_token_id] += nats * mean / mean.square().sum()


@pytest.fixture
def rollout_models(make_config, load_models, tiny_examples):
    """Teacher, EOS-boosted student and four left-padded prompts of different lengths."""
    cfg = make_config()
    teacher, student = load_models(cfg)
    tokenizer = student.tokenizer
    texts = [
        format_prompt(tokenizer, ex.prompt + " ?" * extra)
        for ex, extra in zip(tiny_examples[:4], (0, 9, 3, 17), strict=True)
    ]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, texts, max_prompt_tokens=256, device=CPU)
    lengths = prompt_mask.sum(-1)
    assert len(set(lengths.tolist())) == 4 and bool((prompt_mask[:, 0] == 0).any())  # really left-padded
    boost_eos(student, prompt_ids, prompt_mask)
    return teacher, student, prompt_ids, prompt_mask


def make_rollout(rollout_models, *, seed: int, max_new_tokens: int = 16, prefix_max: int = 0, sampling: str = "min"):
    teacher, student, prompt_ids, prompt_mask = rollout_models
    rows = prompt_ids.shape[0]
    return rollout(
        student.model,
        teacher.model,
        student.tokenizer,
        prompt_ids,
        prompt_mask,
        prompt_index=torch.arange(rows),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        temperature=1.0,
        top_p=1.0,
        seed=seed,
        prefix_max=prefix_max,
        prefix_sampling=sampling,
        guided_rows=torch.ones(rows, dtype=torch.bool) if prefix_max else None,
    )


def response_lengths(batch: RolloutBatch) -> list[int]:
    return batch.response_mask.sum(-1).tolist()


def assert_masks_are_prefixes(batch: RolloutBatch) -> None:
    for mask in (batch.response_mask, batch.prefix_mask):
        for row, n in enumerate(mask.sum(-1).tolist()):
            assert mask[row, :n].all() and not mask[row, n:].any(), f"row {row}: mask is not a prefix: {mask[row]}"


@pytest.mark.parametrize("prefix_max", [0, 5], ids=["on-policy", "guided"])
def test_trainer_scoring_matches_plain_forward(rollout_models, prefix_max):
    """response_hidden + student_scores == log_softmax of an unpadded full forward, row by row."""
    _, student, _, _ = rollout_models
    batch = make_rollout(rollout_models, seed=3, prefix_max=prefix_max)
    model = student.model.eval()
    targets = batch.response_ids[batch.response_mask]
    with torch.no_grad():
        logp, _, _ = student_scores(response_hidden(model, batch), lm_head_weight(model), targets, chunk_size=7)

    expected = []
    prompt_part = batch.attention_mask[:, : batch.prompt_len].bool()
    with torch.no_grad():
        for row in range(batch.input_ids.shape[0]):
            prompt = batch.input_ids[row, : batch.prompt_len][prompt_part[row]]
            response = batch.response_ids[row][batch.response_mask[row]]
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0]
            positions = torch.arange(len(response)) + len(prompt) - 1
            expected.append(torch.log_softmax(logits[positions].double(), -1).gather(1, response[:, None]).squeeze(1))
    expected_logp = torch.cat(expected)
    assert logp.shape == expected_logp.shape
    torch.testing.assert_close(logp.double(), expected_logp, atol=1e-4, rtol=0)


def test_response_mask_covers_tokens_through_the_first_eos(rollout_models):
    _, student, _, _ = rollout_models
    eos = student.tokenizer.eos_token_id
    max_new = 16
    ended = 0
    for seed in range(6):
        batch = make_rollout(rollout_models, seed=seed, max_new_tokens=max_new)
        assert batch.response_ids.shape[1] <= max_new
        assert batch.input_ids.shape[1] == batch.prompt_len + batch.response_ids.shape[1]
        assert torch.equal(batch.attention_mask[:, batch.prompt_len :], batch.response_mask.long())
        assert not batch.prefix_mask.any()
        assert_masks_are_prefixes(batch)
        for row, n in enumerate(response_lengths(batch)):
            tokens = batch.response_ids[row]
            assert n >= 1
            assert eos not in tokens[: n - 1].tolist(), "a token after the first EOS is inside response_mask"
            if n < max_new:
                assert tokens[n - 1] == eos, "a response that stopped early must end with its EOS"
                ended += 1
            else:
                assert tokens[n - 1] == eos or n == max_new
    assert ended > 0, "no rollout ended with EOS; the test did not exercise the EOS path"


@pytest.mark.parametrize("sampling", ["min", "uniform"])
@pytest.mark.parametrize("prefix_max", [3, 10])
def test_guidance_prefix_starts_the_response(rollout_models, prefix_max, sampling):
    teacher, _, _, _ = rollout_models
    eos = teacher.tokenizer.eos_token_id
    max_new = 10
    for seed in range(3):
        batch = make_rollout(
            rollout_models, seed=seed, max_new_tokens=max_new, prefix_max=prefix_max, sampling=sampling
        )
        assert batch.response_ids.shape[1] <= max_new
        assert_masks_are_prefixes(batch)
        assert not (batch.prefix_mask & ~batch.response_mask).any()
        prefix_lens = batch.prefix_mask.sum(-1)
        assert int(prefix_lens.max()) <= prefix_max
        assert max(response_lengths(batch)) <= max_new
        assert eos not in batch.response_ids[batch.prefix_mask].tolist(), (
            "the prefix must not contain the teacher's EOS"
        )
        if sampling == "min":
            # The random teacher rarely stops, so the prefix is the cap in (nearly) every row.
            assert int(prefix_lens.max()) == prefix_max
            # After the prefix the student keeps writing (unless the prefix used up the budget).
            for row, (n_prefix, n) in enumerate(zip(prefix_lens.tolist(), response_lengths(batch), strict=True)):
                if n_prefix < max_new:
                    assert n > n_prefix, f"row {row}: no student tokens after the prefix"


# ---------------------------------------------------------------------------------------------
# Trainer.step(): micro-batching, every method, a student equal to its teacher


def one_step(cfg: TrainConfig, load_models, examples, step: int = 1) -> tuple[dict[str, float], Run]:
    """One optimizer step of a fresh Run; step 1 of 3 gets a guidance prefix of about half the budget."""
    teacher, student = load_models(cfg)
    trainer = build_run(cfg, teacher=teacher, student=student, examples=examples)
    return train_step(trainer, step), trainer


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_give_the_same_gradient(make_config, load_models, tiny_examples, aggregation):
    grads, metrics = {}, {}
    for parts in (1, 2, 3):
        cfg = make_config(
            steps=3,
            rollout={"batch_size": 4, "max_new_tokens": 10},
            optim={"micro_batches": parts, "max_grad_norm": 0.0, "lr": 1e-6},
            method={"aggregation": aggregation},
        )
        metrics[parts], trainer = one_step(cfg, load_models, tiny_examples)
        grads[parts] = {n: p.grad.clone() for n, p in trainer.student.model.named_parameters() if p.grad is not None}
    assert metrics[1]["prefix_len"] > 0 and metrics[1]["response_len"] > metrics[1]["prefix_len"]
    for parts in (2, 3):
        assert grads[parts].keys() == grads[1].keys()
        for name, grad in grads[1].items():
            torch.testing.assert_close(grads[parts][name], grad, atol=1e-5, rtol=0, msg=f"{name} with {parts} parts")
        for key in ("loss", "rkl_estimate", "trust_fraction", "grad_norm", "outlier_loss"):
            assert metrics[parts][key] == pytest.approx(metrics[1][key], abs=1e-5), key


METHOD_CASES = [
    *[
        pytest.param({"name": "tropd"}, {"strategy": outlier}, {"kind": kind}, id=f"tropd-{outlier}-{kind}")
        for outlier in ("fkl", "mask", "clip")
        for kind in ("bernoulli", "threshold", "none")
    ],
    pytest.param({"name": "opd"}, {"strategy": "fkl"}, {"kind": "none"}, id="opd"),
    pytest.param({"name": "sft", "sft_source": "dataset"}, {}, {"kind": "none"}, id="sft-dataset"),
    pytest.param({"name": "sft", "sft_source": "teacher"}, {}, {"kind": "none"}, id="sft-teacher"),
]


@pytest.mark.parametrize(("method", "outlier", "trust_region"), METHOD_CASES)
def test_every_method_runs_one_finite_step(make_config, load_models, tiny_examples, method, outlier, trust_region):
    cfg = make_config(steps=3, method=method, outlier=outlier, trust_region=trust_region)
    metrics, _ = one_step(cfg, load_models, tiny_examples)
    assert metrics["tokens"] > 0
    for key in LOGGED:
        assert math.isfinite(metrics[key]), (key, metrics[key])
    if trust_region["kind"] == "none" and method["name"] != "sft":
        assert metrics["trust_fraction"] == 1.0


def test_student_equal_to_teacher_has_zero_reward_and_full_trust(make_config, load_models, tiny_examples):
    cfg = make_config(
        student=ModelConfig(from_teacher=True, keep_layers=None),
        method={"name": "opd"},
        guidance={"enabled": False},
        trust_region={"kind": "bernoulli", "tau": 0.0},
    )
    metrics, _ = one_step(cfg, load_models, tiny_examples, step=0)
    assert metrics["prefix_len"] == 0
    assert metrics["rkl_estimate"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reward_mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["trust_fraction"] == 1.0
    assert metrics["student_entropy"] == pytest.approx(metrics["teacher_entropy"], abs=1e-5)
    assert metrics["grad_norm"] == pytest.approx(0.0, abs=1e-6)  # zero reward: no policy gradient


def test_gradient_checkpointing_gives_the_same_step(make_config, tmp_path):
    from tropd_cli.train.loop import train

    plain = train(make_config(steps=2), output_dir=tmp_path / "plain")
    checkpointed = train(make_config(steps=2, student={"gradient_checkpointing": True}), output_dir=tmp_path / "ckpt")
    for a, b in zip(plain.history, checkpointed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-4
        )
    from safetensors.torch import load_file

    wa, wb = load_file(plain.checkpoint / "model.safetensors"), load_file(checkpointed.checkpoint / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ---------------------------------------------------------------------------------------------
# Precision, attention kernels, teacher placement (the GPU path's knobs, exercised on the CPU)


def test_bf16_scorer_tracks_fp32_and_its_gradients_reach_the_fp32_weights(rollout_models):
    """precision=bf16: bf16 autocast backbone and lm_head, fp32 log-softmax, gradients into fp32 weights."""
    from tropd_cli.train.scoring import StudentScorer

    _, student, _, _ = rollout_models
    batch = make_rollout(rollout_models, seed=5, prefix_max=3)
    model = student.model.float()
    args = (batch.input_ids, batch.attention_mask, batch.response_mask, batch.prompt_len)
    results = {}
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        logp, _, entropy, _ = StudentScorer(model, chunk_size=5, temperature=1.0, bf16=bf16)(*args)
        assert logp.dtype == torch.float32  # scored in fp32 either way
        (-logp.mean()).backward()
        grad = lm_head_weight(model).grad
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
        results[bf16] = logp.detach(), entropy, grad.clone()
    (lp32, ent32, g32), (lp16, ent16, g16) = results[False], results[True]
    assert not torch.equal(lp32, lp16)  # bf16 really ran
    torch.testing.assert_close(lp16, lp32, atol=0.05, rtol=0.02)
    torch.testing.assert_close(ent16, ent32, atol=0.05, rtol=0.02)
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99


def test_a_bf16_training_run_is_finite_and_learns_like_fp32(make_config, tmp_path):
    runs = {p: train(make_config(precision=p, steps=3), output_dir=tmp_path / p).history for p in ("fp32", "bf16")}
    for history in runs.values():
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    # Same rollouts at step 1 (the sampler is the same fp32 copy): bf16 scores them within bf16 rounding.
    assert runs["bf16"][0]["teacher_nll"] == pytest.approx(runs["fp32"][0]["teacher_nll"], rel=1e-6)
    assert runs["bf16"][0]["rkl_estimate"] == pytest.approx(runs["fp32"][0]["rkl_estimate"], abs=0.05)


def test_attention_implementation_is_applied_and_sdpa_equals_eager(make_config, tmp_path):
    from tropd_cli.models import load_model

    scores = {}
    for impl in ("eager", "sdpa"):
        cfg = ModelConfig(name="tiny-random", dtype="float32", attn_implementation=impl)
        loaded = load_model(cfg, device=CPU, cache_dir=tmp_path, frozen=True)
        assert loaded.model.config._attn_implementation == impl
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        scores[impl] = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(scores["sdpa"], scores["eager"], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match=r"student.attn_implementation='flash' is not an option"):
        from tropd_cli.validate import validate_train

        validate_train(make_config(student={"attn_implementation": "flash"}))


def test_a_teacher_behind_the_forward_adapter_samples_the_same_prefixes(rollout_models):
    """teacher_device / distributed.shard_teacher sample guidance prefixes through ForwardAdapter."""
    from tropd_cli.train.scoring import ForwardAdapter

    teacher, student, prompt_ids, prompt_mask = rollout_models
    direct = make_rollout(rollout_models, seed=11, prefix_max=6)
    behind = SimpleNamespace(model=ForwardAdapter(teacher.model, CPU, CPU))
    adapted = make_rollout((behind, student, prompt_ids, prompt_mask), seed=11, prefix_max=6)
    assert direct.prefix_mask.any()
    assert torch.equal(direct.input_ids, adapted.input_ids) and torch.equal(direct.prefix_mask, adapted.prefix_mask)


def test_a_teacher_with_a_padded_lm_head_is_scored_over_the_shared_rows(rollout_models, tmp_path):
    """Qwen2.5-7B pads its lm_head to 152064 rows, the 1.5B has 151936 (same tokenizer): the teacher's
    extra rows are left out, so its scores equal those of the unpadded teacher."""
    import copy

    from tropd_cli.models import shared_vocab
    from tropd_cli.train.scoring import TeacherScorer

    teacher, student, _, _ = rollout_models
    vocab = lm_head_weight(student.model).shape[0]
    padded = copy.deepcopy(teacher.model)
    padded.resize_token_embeddings(vocab + 8)
    with torch.no_grad():
        lm_head_weight(padded)[vocab:] = 5.0  # rows that would dominate the softmax if they were scored
    padded_teacher = LoadedModel(padded, teacher.tokenizer, "padded")
    assert shared_vocab(padded_teacher, student) == vocab
    batch = make_rollout(rollout_models, seed=2)
    args = (batch.input_ids, batch.attention_mask, batch.response_mask, batch.prompt_len, 4)
    want, _, _ = TeacherScorer(teacher.model, chunk_size=16, temperature=1.0)(*args)
    got, _, _ = TeacherScorer(padded, chunk_size=16, temperature=1.0, vocab=vocab)(*args)
    for name in ("logp", "topk_ids", "topk_logp", "entropy"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))
    with pytest.raises(UserError, match="the student's lm_head has more rows than the teacher's"):
        shared_vocab(student, padded_teacher)
    small = copy.deepcopy(student.model)
    small.resize_token_embeddings(vocab - 8)
    with pytest.raises(UserError, match=f"lm_head sizes differ \\({vocab} vs {vocab - 8}\\) and the tokenizer has"):
        shared_vocab(teacher, LoadedModel(small, student.tokenizer, "small"))


# ---------------------------------------------------------------------------------------------
# Sampling cost: per-row budgets and chunked sampling


class ForwardLog:
    """Rows and context width of every forward call of a model (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        mask = kwargs["attention_mask"]
        self.calls.append((mask.shape[0], mask.shape[1]))


def test_guided_continuations_stop_at_each_rows_budget(rollout_models):
    """A row with a long teacher prefix has a short student budget; the loop stops once every row is done,
    with the same tokens as running all rows to the longest budget and cutting afterwards."""
    teacher, student, prompt_ids, prompt_mask = rollout_models
    log = ForwardLog(student.model)
    with_limits = make_rollout(rollout_models, seed=8, max_new_tokens=24, prefix_max=20, sampling="uniform")
    log.handle.remove()
    prefix = with_limits.prefix_mask.sum(-1)
    assert prefix.max() > prefix.min()  # uneven prefixes

    import tropd_cli.rollout.sampling as rollout_mod

    original = rollout_mod._sample_loop

    def no_limits(*args, **kwargs):
        kwargs.pop("row_limits", None)
        return original(*args, **kwargs)

    rollout_mod._sample_loop = no_limits
    try:
        log_all = ForwardLog(student.model)
        without = make_rollout(rollout_models, seed=8, max_new_tokens=24, prefix_max=20, sampling="uniform")
        log_all.handle.remove()
    finally:
        rollout_mod._sample_loop = original
    assert torch.equal(with_limits.input_ids, without.input_ids)
    assert torch.equal(with_limits.response_mask, without.response_mask)
    assert len(log.calls) <= len(log_all.calls)


def test_chunked_sampling_bounds_the_batch_and_keeps_greedy_outputs(rollout_models):
    _, student, prompt_ids, prompt_mask = rollout_models
    from tropd_cli.rollout.sampling import sample

    kwargs = dict(max_new_tokens=10, temperature=0.0, eos_token_id=None, pad_token_id=0, seed=1)
    whole_log = ForwardLog(student.model)
    whole = sample(student.model, prompt_ids, prompt_mask, **kwargs)
    whole_log.handle.remove()
    chunk_log = ForwardLog(student.model)
    chunked = sample(student.model, prompt_ids, prompt_mask, chunk_rows=2, **kwargs)
    chunk_log.handle.remove()
    assert torch.equal(chunked, whole)  # greedy: the same tokens however the rows are grouped
    assert max(rows for rows, _ in chunk_log.calls) == 2 and max(rows for rows, _ in whole_log.calls) == 4
    # Rows of similar length share a chunk and drop the padding they do not need: the short pair's
    # context is narrower than the whole batch's.
    assert min(width for _, width in chunk_log.calls) < min(width for _, width in whole_log.calls)
    sampled = sample(student.model, prompt_ids, prompt_mask, chunk_rows=3, **{**kwargs, "temperature": 1.0})
    assert sampled.shape[0] == 4 and not torch.equal(sampled, whole)


def test_training_with_chunked_sampling(make_config, tmp_path):
    """rollout.generation_batch_size=1: every rollout (teacher prefixes, student continuations) one row at a time."""
    chunked = train(make_config(rollout={"generation_batch_size": 1}), output_dir=tmp_path / "c").history
    whole = train(make_config(), output_dir=tmp_path / "w").history
    assert all(math.isfinite(h["loss"]) for h in chunked) and chunked[0]["prefix_len"] > 0
    assert [h["tokens"] for h in chunked] != [h["tokens"] for h in whole] or chunked[0]["loss"] != whole[0]["loss"]


def test_sampling_applies_the_lm_head_to_contiguous_rows_of_one_position(rollout_models):
    """The prefill's LM head gets a contiguous ``[B, 1, H]``: a strided slice of the prompt's hidden states sent
    torch's bf16 CPU ``linear`` through a per-row copy of the whole [V, H] weight (10 s per 100-row eval batch)."""
    _, student, prompt_ids, prompt_mask = rollout_models
    from tropd_cli.rollout.sampling import sample

    seen: list[tuple[tuple[int, ...], bool]] = []
    head = student.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(
        lambda module, args: seen.append((tuple(args[0].shape), args[0].is_contiguous()))
    )
    try:
        tokens = sample(
            student.model,
            prompt_ids,
            prompt_mask,
            max_new_tokens=3,
            temperature=0.0,
            eos_token_id=None,
            pad_token_id=0,
            seed=1,
        )
    finally:
        handle.remove()
    rows = prompt_ids.shape[0]
    assert tokens.shape == (rows, 3)
    assert len(seen) == 3  # prefill + 2 decode calls
    assert all(shape[:2] == (rows, 1) and contiguous for shape, contiguous in seen), seen
