"""rollout.is_correction: the sampler's own log-probs, the capped importance weights, and what a run does with them.

The student samples from a bf16 copy of itself (``rollout.sampler_dtype=auto`` on a bf16 CPU) or from a vLLM
engine, and is trained in fp32: the tokens come from a distribution a little off the one the loss assumes.
"""

from __future__ import annotations

import math

import pytest
import torch

from tropd_cli.config import ModelConfig
from tropd_cli.errors import UserError
from tropd_cli.models import tiny_random
from tropd_cli.rng import generator
from tropd_cli.rollout.sampling import _sample_loop, sample
from tropd_cli.train import losses
from tropd_cli.train.loop import train
from tropd_cli.validate import validate_train

# ---------------------------------------------------------------------------------------------
# The weights


def test_weights_by_hand():
    """Ratios 0.5, 1.5, 3 at cap 2: tis keeps 0.5, 1.5, 2; mis keeps 0.5, 1.5, 0; none 1, 1, 1. A token outside
    ``valid`` (a teacher prefix, padding) weighs 1 whatever its ratio."""
    sampler = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.1]]))
    trainer = torch.log(torch.tensor([[0.2, 0.3, 0.3, 0.5]]))
    valid = torch.tensor([[True, True, True, False]])
    tis, capped = losses.importance_weights(trainer, sampler, valid, mode="tis", cap=2.0)
    torch.testing.assert_close(tis, torch.tensor([[0.5, 1.5, 2.0, 1.0]]))
    assert capped.tolist() == [[False, False, True, False]]
    mis, _ = losses.importance_weights(trainer, sampler, valid, mode="mis", cap=2.0)
    torch.testing.assert_close(mis, torch.tensor([[0.5, 1.5, 0.0, 1.0]]))
    none, _ = losses.importance_weights(trainer, sampler, valid, mode="none", cap=2.0)
    assert none.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    # k3 estimate of KL(sampler || trainer) per token: r - 1 - log r, 0 exactly at r = 1, positive elsewhere.
    kl = losses.sampler_kl(trainer, sampler)
    r = torch.tensor([0.5, 1.5, 3.0, 5.0])
    torch.testing.assert_close(kl[0], r - 1 - torch.log(r))
    assert losses.sampler_kl(trainer, trainer).eq(0).all()
    with pytest.raises(ValueError, match="is_correction"):
        losses.importance_weights(trainer, sampler, valid, mode="ice")


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_ratio_one_gives_the_uncorrected_loss_exactly(mode):
    """Sampler = trainer: every weight is exactly 1.0, and the weighted TrOPD loss is bitwise the unweighted one."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 5, 11, generator=g), -1)[..., 0]
    teacher = torch.log_softmax(torch.randn(3, 5, 11, generator=g), -1)[..., 0]
    valid = torch.rand(3, 5, generator=g) > 0.2
    weights, capped = losses.importance_weights(logp, logp.clone(), valid, mode=mode, cap=2.0)
    assert weights.eq(1.0).all() and not capped.any()
    per_token = losses.policy_gradient_loss(logp, logp, losses.k1_reward(logp, teacher))
    assert torch.equal(per_token * weights, per_token)


def test_a_known_mismatch_is_corrected():
    """Tokens drawn from a sampler q that is off the trained policy p: the policy gradient of E_p[f] estimated from
    q's tokens is biased without the weights and unbiased with them (the cap, 2, is above every ratio here, so tis
    is plain importance sampling). 200k draws; the bars are 5 Monte-Carlo standard errors."""
    f = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.1], dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.tensor([0.0, 0.2, 0.0, 0.1, 0.3], dtype=torch.float64), 0)  # the sampler
    p = torch.softmax(theta.detach(), 0)
    assert float((p / q).max()) < 2.0
    exact = torch.autograd.grad((torch.softmax(theta, 0) * f).sum(), theta)[0]
    n = 200_000
    y = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(n, dtype=torch.bool)
    estimates = {}
    for mode in ("none", "tis"):
        logp = torch.log_softmax(theta, 0)[y]
        w, _ = losses.importance_weights(logp, torch.log(q)[y], valid, mode=mode, cap=2.0)
        # per-sample gradients of -w f(y) log p(y) (REINFORCE with advantage f), averaged
        per_sample = torch.nn.functional.one_hot(y, 5).double() - torch.softmax(theta.detach(), 0)
        g = (w * f[y])[:, None] * per_sample
        estimates[mode] = (g.mean(0), g.std(0) / math.sqrt(n))
        # the same through autograd on the weighted loss (what the step does)
        auto = torch.autograd.grad((w * f[y] * logp).mean(), theta)[0]
        torch.testing.assert_close(auto, g.mean(0).to(auto.dtype), rtol=1e-5, atol=1e-6)
    mean, se = estimates["tis"]
    assert ((mean - exact).abs() < 5 * se).all(), (mean, exact)
    mean, se = estimates["none"]
    assert ((mean - exact).abs() > 20 * se).any(), "the uncorrected estimate should be visibly biased"


# ---------------------------------------------------------------------------------------------
# The sampler's own log-probs


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_random(ModelConfig(name="tiny-random"))
    return model.eval(), tokenizer


def _prompts(tokenizer):
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    return ids, (ids != 0).long()


def _full_forward_logp(model, prompt_ids, prompt_mask, tokens, temperature):
    """log softmax(logits / T) of each sampled token from one forward over prompt + tokens (teacher forcing)."""
    ids = torch.cat([prompt_ids, tokens], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(tokens)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logits = logits[:, prompt_ids.shape[1] - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("backend", ["loop", "generate"])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_the_sampler_returns_its_own_raw_log_probs(tiny, backend, temperature, top_p):
    """The log-probs the sampler hands back are the model's full-vocabulary log-probs of the tokens it wrote at the
    scoring temperature (raw: before top-p and the min-tokens EOS ban), as a teacher-forced forward computes them;
    0 after a row's EOS. Loop and generate, whole and in chunks of 2 rows."""
    model, tokenizer = tiny
    ids, mask = _prompts(tokenizer)
    for chunk_rows in (0, 2):
        sink: list[torch.Tensor] = []
        tokens = sample(
            model, ids, mask, max_new_tokens=6, min_new_tokens=2, temperature=temperature, top_p=top_p,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=0, seed=3, backend=backend,
            chunk_rows=chunk_rows, logp_out=sink, logp_temperature=temperature,
        )  # fmt: skip
        (logp,) = sink
        assert logp.shape == tokens.shape
        expected = _full_forward_logp(model, ids, mask, tokens, temperature)
        from tropd_cli.batch import completion_mask

        alive = completion_mask(tokens, tokenizer.eos_token_id)
        torch.testing.assert_close(logp[alive], expected[alive], atol=1e-4, rtol=0)
        assert logp[~alive].eq(0).all()


def test_asking_for_log_probs_leaves_the_samples_unchanged(tiny):
    model, tokenizer = tiny
    ids, mask = _prompts(tokenizer)
    common = dict(max_new_tokens=6, min_new_tokens=0, temperature=1.0, top_p=1.0, pad_token_id=0)
    eos = torch.tensor([tokenizer.eos_token_id])
    plain = _sample_loop(model, ids, mask, eos_ids=eos, generator=generator(1), **common)
    scored = _sample_loop(model, ids, mask, eos_ids=eos, generator=generator(1), logp_out=[], **common)
    assert torch.equal(plain, scored)


# ---------------------------------------------------------------------------------------------
# Runs


def _strip(history, *prefixes):
    return [{k: v for k, v in h.items() if not k.startswith(("time_", *prefixes))} for h in history]


def test_a_sampler_that_is_the_trained_module_gets_no_weights(make_config, tmp_path):
    """sampler_dtype=float32: the sampler is the fp32 student itself, on-policy by construction: tis changes
    nothing (bitwise the same steps as none) and no sampler metrics are logged."""
    common = dict(steps=2, rollout={"batch_size": 2, "max_new_tokens": 8, "sampler_dtype": "float32"})
    tis = train(make_config(**common), output_dir=tmp_path / "tis")
    cfg = make_config(**common)
    cfg.rollout.is_correction = "none"
    none = train(cfg, output_dir=tmp_path / "none")
    assert _strip(tis.history) == _strip(none.history)
    assert "sampler_kl" not in tis.history[0]


def test_a_bf16_sampler_is_corrected_and_measured(make_config, tmp_path):
    """sampler_dtype=bfloat16: the same rollouts either way (the weights do not touch sampling), the sampler/trainer
    KL and weights are logged, and tis changes the first step's loss (none does not weigh)."""
    common = dict(steps=2, rollout={"batch_size": 2, "max_new_tokens": 8, "sampler_dtype": "bfloat16"})
    tis = train(make_config(**common), output_dir=tmp_path / "tis")
    cfg = make_config(**common)
    cfg.rollout.is_correction = "none"
    none = train(cfg, output_dir=tmp_path / "none")
    first_tis, first_none = tis.history[0], none.history[0]
    for key in ("rkl_estimate", "sampler_kl", "is_capped", "trust_fraction", "prefix_len"):
        assert first_tis[key] == first_none[key], key  # same rollouts, same trainer log-probs at step 1
    assert 0 < first_tis["sampler_kl"] < 0.05  # bf16 vs fp32 of one model: small, not zero
    assert first_tis["is_weight"] != 1.0
    assert first_none["is_weight"] == 1.0
    assert first_tis["loss"] != first_none["loss"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"is_correction": "ice"}, "rollout.is_correction='ice' is not an option"),
        ({"is_cap": 0.5}, "rollout.is_cap=0.5 must be a number >= 1"),
        ({"is_cap": float("inf")}, "rollout.is_cap=inf must be a number >= 1"),
        ({"backend": "vllm", "temperature": 0.7}, "rollout.is_correction with rollout.backend=vllm"),
    ],
)
def test_bad_correction_settings_are_one_line_errors(make_config, change, message):
    cfg = make_config(rollout=change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        validate_train(cfg)
    assert "\n" not in str(err.value)


class ShiftedSampler:
    """A run whose sampler is an fp32 copy of the student (so it is not the trained module, and its own log-probs
    equal the trainer's to fp32 rounding), with its log-probs moved by ``shift`` nats: a sampler/trainer ratio of
    exp(-shift) by construction."""

    def __init__(self, monkeypatch, shift: float) -> None:
        import copy

        import tropd_cli.train.generate as generate_module
        import tropd_cli.train.setup as setup_module

        def separate_copy(model, dtype_name, device, *, sharded):
            return copy.deepcopy(model).requires_grad_(False).eval()

        def shifted_rollout(*args, **kwargs):
            batch = rollout(*args, **kwargs)
            if batch.sampler_logp is not None:
                student = batch.response_mask & ~batch.prefix_mask
                batch.sampler_logp = torch.where(student, batch.sampler_logp + shift, batch.sampler_logp)
            return batch

        rollout = generate_module.rollout
        monkeypatch.setattr(setup_module, "sampling_copy", separate_copy)
        monkeypatch.setattr(generate_module, "rollout", shifted_rollout)


@pytest.mark.parametrize(
    ("mode", "shift", "weight"),
    [
        ("tis", math.log(2.0), 0.5),
        ("tis", -math.log(3.0), 2.0),
        ("mis", -math.log(3.0), 0.0),
        ("none", math.log(2.0), 1.0),
    ],
)
def test_the_weight_is_trainer_over_sampler_and_scales_the_loss(
    make_config, tmp_path, monkeypatch, mode, shift, weight
):
    """A sampler twice as sure of its tokens as the trainer (ratio 1/2) halves every student token's loss under tis;
    one three times less sure (ratio 3) is capped at 2 (tis) or dropped (mis). No guidance: every token is the
    student's, so the step's loss is exactly the weight times the unweighted one (first step, same rollouts)."""
    common = dict(steps=1, guidance={"enabled": False}, rollout={"batch_size": 2, "max_new_tokens": 8})
    ShiftedSampler(monkeypatch, 0.0)
    cfg = make_config(**common)
    cfg.rollout.is_correction = "none"
    plain = train(cfg, output_dir=tmp_path / "plain").history[0]
    ShiftedSampler(monkeypatch, shift)
    cfg = make_config(**common)
    cfg.rollout.is_correction = mode
    weighted = train(cfg, output_dir=tmp_path / mode).history[0]
    assert plain["sampler_kl"] < 1e-9  # the fp32 copy's own log-probs are the trainer's
    assert weighted["is_weight"] == pytest.approx(weight, rel=1e-4, abs=1e-6)
    assert weighted["is_capped"] == (1.0 if shift < 0 else 0.0)
    assert weighted["loss"] == pytest.approx(weight * plain["loss"], rel=1e-4, abs=1e-7)


def test_a_checkpoint_from_before_the_correction_resumes_as_none(make_config):
    """A fingerprint saved before rollout.is_correction (and teacher.backend) existed reads as what that version did:
    it matches a run with is_correction=none and is refused against the new default tis."""
    from tropd_cli.train.checkpoint import fingerprint, with_missing_keys

    old = fingerprint(make_config())
    for key in ("is_correction", "is_cap"):
        del old["rollout"][key]
    for key in ("backend", "server"):
        del old["teacher"][key]
    as_none = make_config()
    as_none.rollout.is_correction = "none"
    assert with_missing_keys(old) == fingerprint(as_none)
    assert with_missing_keys(old)["rollout"] != fingerprint(make_config())["rollout"]
    assert with_missing_keys(old)["teacher"] == fingerprint(make_config())["teacher"]
