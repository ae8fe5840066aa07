"""Held-out training signals (``heldout/*``): exact KLs, outlier share, empty answers, the prompt set, the loop.

Tiny random models built in-process (CPU, seconds), as in test_engine.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from tropd_cli.config import ModelConfig, TrainConfig
from tropd_cli.data import examples_from_config
from tropd_cli.errors import UserError
from tropd_cli.train import heldout
from tropd_cli.train.loop import train
from tropd_cli.train.losses import outlier_probability, trust_region_mask
from tropd_cli.train.scoring import full_vocab_kl
from tropd_cli.train.setup import Run, build_run


def held_out_set(cfg: TrainConfig, load_models) -> tuple[heldout.HeldOut, Run]:
    teacher, student = load_models(cfg)
    examples = examples_from_config(cfg.dataset)
    trainer = build_run(cfg, teacher=teacher, student=student, examples=examples)
    return heldout.HeldOut(trainer, heldout.heldout_examples(cfg, examples)), trainer


def direct_measurement(held: heldout.HeldOut, trainer: Run) -> dict[str, float]:
    """The KLs and outlier share from a plain, unpadded full forward of each row, log-softmax over the whole
    vocabulary in float64: what ``HeldOut.measure`` must equal."""
    batch = held.teacher_batch
    rkl, fkl, reward = [], [], []
    prompt_part = batch.attention_mask[:, : batch.prompt_len].bool()
    with torch.no_grad():
        for row in range(batch.input_ids.shape[0]):
            prompt = batch.input_ids[row, : batch.prompt_len][prompt_part[row]]
            response = batch.response_ids[row][batch.response_mask[row]]
            ids = torch.cat([prompt, response])[None]
            positions = torch.arange(len(response)) + len(prompt) - 1
            s = torch.log_softmax(trainer.student.model(input_ids=ids).logits[0, positions].double(), -1)
            t = torch.log_softmax(trainer.teacher.model(input_ids=ids).logits[0, positions].double(), -1)
            rkl.append((s.exp() * (s - t)).sum(-1))
            fkl.append((t.exp() * (t - s)).sum(-1))
            reward.append((t - s).gather(1, response[:, None]).squeeze(1))
    r = torch.cat(reward)
    tau = trainer.cfg.trust_region.tau
    share = 1 - torch.exp(torch.clamp(r - tau, max=0.0))  # bernoulli: 1 - min(1, exp(R - tau))
    return {
        "heldout/rkl": float(torch.cat(rkl).mean()),
        "heldout/fkl": float(torch.cat(fkl).mean()),
        "heldout/outlier_share": float(share.mean()),
    }


def test_kls_and_outlier_share_equal_a_direct_full_vocabulary_computation(make_config, load_models):
    # A chunk size that does not divide the positions, and a row chunk (generation_batch_size) that splits the set.
    cfg = make_config(
        heldout={"size": 6, "max_new_tokens": 10}, scoring={"chunk_size": 7}, rollout={"generation_batch_size": 4}
    )
    held, trainer = held_out_set(cfg, load_models)
    assert held.teacher_batch.input_ids.shape[0] == 6 and held.tokens > 6
    measured = held.measure(trainer.student.model)
    expected = direct_measurement(held, trainer)
    assert expected["heldout/rkl"] > 1e-4 and expected["heldout/fkl"] > 1e-4  # a layer-dropped student differs
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, abs=1e-5), key
    assert measured["heldout/tokens"] == held.tokens and measured["heldout/prompts"] == 6
    # The teacher's responses are written once: a second measurement is on the same tokens, with the same result.
    again = held.measure(trainer.student.model)
    assert {k: again[k] for k in expected} == {k: measured[k] for k in expected}


def test_full_vocab_kl_equals_the_naive_sums_for_any_chunk_size():
    gen = torch.Generator().manual_seed(0)
    n, hs, ht, vocab = 13, 8, 12, 50
    s_hidden, t_hidden = torch.randn(n, hs, generator=gen).double(), torch.randn(n, ht, generator=gen).double()
    s_weight, t_weight = torch.randn(vocab, hs, generator=gen).double(), torch.randn(vocab, ht, generator=gen).double()
    targets = torch.randint(vocab, (n,), generator=gen)
    s = torch.log_softmax(s_hidden @ s_weight.t() / 0.7, -1)
    t = torch.log_softmax(t_hidden @ t_weight.t() / 0.7, -1)
    for chunk in (1, 5, 64):
        kl = full_vocab_kl(s_hidden, s_weight, t_hidden, t_weight, targets, chunk_size=chunk, temperature=0.7)
        torch.testing.assert_close(kl.reverse, (s.exp() * (s - t)).sum(-1))
        torch.testing.assert_close(kl.forward, (t.exp() * (t - s)).sum(-1))
        torch.testing.assert_close(kl.student_logp, s.gather(1, targets[:, None]).squeeze(1))
        torch.testing.assert_close(kl.teacher_logp, t.gather(1, targets[:, None]).squeeze(1))
    assert bool((kl.reverse > 0).all() and (kl.forward > 0).all())
    same = full_vocab_kl(s_hidden, s_weight, s_hidden, s_weight, targets, chunk_size=4)
    assert same.reverse.abs().max() < 1e-12 and same.forward.abs().max() < 1e-12


@pytest.mark.parametrize(("kind", "tau"), [("bernoulli", 0.0), ("threshold", -1.386), ("none", 0.0)])
def test_a_student_equal_to_its_teacher_has_zero_divergence_and_no_outliers(make_config, load_models, kind, tau):
    cfg = make_config(
        student=ModelConfig(from_teacher=True, keep_layers=None),
        heldout={"size": 4},
        trust_region={"kind": kind, "tau": tau},
    )
    held, trainer = held_out_set(cfg, load_models)
    measured = held.measure(trainer.student.model)
    assert measured["heldout/rkl"] == pytest.approx(0.0, abs=1e-6)
    assert measured["heldout/fkl"] == pytest.approx(0.0, abs=1e-6)
    assert measured["heldout/outlier_share"] == 0.0


def test_outlier_probability_is_the_chance_the_trust_mask_leaves_a_token_out():
    reward = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.5, 2.0, -math.inf, math.nan])
    share = outlier_probability(reward, tau=0.0, kind="bernoulli")
    expected = 1 - torch.exp(torch.clamp(reward[:6], max=0.0))
    torch.testing.assert_close(share[:6], expected)
    assert share[6:].tolist() == [1.0, 1.0]  # non-finite rewards are never trusted
    gen = torch.Generator().manual_seed(3)
    left_out = ~trust_region_mask(reward[:6].expand(20000, 6), tau=0.5, generator=gen, kind="bernoulli")
    expected = outlier_probability(reward[:6], tau=0.5, kind="bernoulli")
    torch.testing.assert_close(left_out.float().mean(0), expected, atol=0.015, rtol=0)
    for tau in (-1.0, 0.0, 0.5):
        threshold = outlier_probability(reward, tau=tau, kind="threshold")
        assert torch.equal(threshold.bool(), ~trust_region_mask(reward, tau=tau, kind="threshold"))
    assert not outlier_probability(reward, kind="none").any()


def test_empty_answers_and_response_lengths_of_the_students_greedy_responses(make_config, load_models, monkeypatch):
    cfg = make_config(heldout={"size": 4, "max_new_tokens": 6})
    held, trainer = held_out_set(cfg, load_models)
    eos = trainer.tokenizer.eos_token_id
    rows = [[eos], [ord("7") - 28, eos], [ord(" ") - 28, eos], [ord(" ") - 28] * 6]  # char ids: 4 specials, then ' '
    assert trainer.tokenizer.decode(rows[1][:1]) == "7" and trainer.tokenizer.decode(rows[2][:1]) == " "
    pad = trainer.tokenizer.pad_token_id
    scripted = torch.tensor([r + [pad] * (6 - len(r)) for r in rows])
    monkeypatch.setattr(heldout, "sample", lambda *args, **kwargs: scripted)  # the student's "greedy" answers
    measured = held.measure(trainer.student.model)
    # EOS only, "7", " " then EOS, six spaces without EOS: three of four are empty.
    assert measured["heldout/empty_rate"] == pytest.approx(0.75)
    assert measured["heldout/response_len"] == pytest.approx((1 + 2 + 2 + 6) / 4)


def test_held_out_prompts_are_not_training_prompts(make_config, tmp_path):
    cfg = make_config(heldout={"size": 16})
    train_examples = examples_from_config(cfg.dataset)
    held = heldout.heldout_examples(cfg, train_examples)
    prompts = [ex.prompt for ex in held]
    assert len(prompts) == 16 == len(set(prompts))
    assert not set(prompts) & {ex.prompt for ex in train_examples}

    # A small task whose training prompts cover most of it (two one-digit terms, 512 draws): still disjoint,
    # only fewer of them.
    small = make_config(
        dataset={"size": 512, "seed": 7, "generator_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
        heldout={"size": 32},
    )
    train_small = examples_from_config(small.dataset)
    held_small = heldout.heldout_examples(small, train_small)
    assert 0 < len(held_small) < 32
    assert not {ex.prompt for ex in held_small} & {ex.prompt for ex in train_small}

    # A file (the seed does not matter): the rows after the training ones, repeats of training prompts left out.
    rows = [{"prompt": f"q{i % 10 if i < 12 else i}", "answer": "0"} for i in range(30)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = make_config(dataset={"source": "file", "path": str(path), "size": 10}, heldout={"size": 5})
    train_file = examples_from_config(from_file.dataset)
    assert [ex.prompt for ex in heldout.heldout_examples(from_file, train_file)] == ["q12", "q13", "q14", "q15", "q16"]
    assert heldout.heldout_examples(make_config(heldout={"size": 0}), train_examples) == []

    # A task with disjoint splits trained on split=train: held-out prompts come from split=eval.
    kwargs = {"split": "train", "min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    split = make_config(dataset={"name": "worked_sum", "size": 64, "generator_kwargs": kwargs}, heldout={"size": 8})
    held_split = heldout.heldout_examples(split, examples_from_config(split.dataset))
    assert len(held_split) == 8 and {ex.metadata["metadata"]["split"] for ex in held_split} == {"eval"}


def without_heldout(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if not k.startswith(("heldout/", "time_"))} for h in history]


def test_the_loop_measures_before_every_n_steps_and_after_and_changes_no_training(make_config, tmp_path):
    every = train(make_config(steps=3, heldout={"size": 4, "every": 2}), output_dir=tmp_path / "every").history
    assert [sorted(k for k in h if k.startswith("heldout/start/")) for h in every] == [
        sorted(f"heldout/start/{m}" for m in heldout.METRICS),
        [],
        [],
    ]
    assert ["heldout/rkl" in h for h in every] == [False, True, True]  # after step 2 and after the last
    assert all(math.isfinite(every[i][f"heldout/{m}"]) for i in (1, 2) for m in heldout.METRICS)
    assert every[0]["heldout/start/rkl"] > 0 and every[0]["time_heldout"] > 0

    off = train(make_config(steps=3, heldout={"size": 0}), output_dir=tmp_path / "off").history
    assert not any(k.startswith("heldout/") or k == "time_heldout" for h in off for k in h)
    # Measuring takes no randomness and changes no weight: the training steps are the same.
    assert without_heldout(every) == without_heldout(off)


def test_default_measures_before_and_after_training_only(make_config, tmp_path):
    history = train(make_config(steps=2, heldout={"size": 3}), output_dir=tmp_path).history
    assert "heldout/start/rkl" in history[0] and "heldout/rkl" not in history[0]
    assert history[-1]["heldout/prompts"] == 3 and history[-1]["heldout/tokens"] > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"size": -1}, "heldout.size=-1 must be >= 0"),
        ({"max_new_tokens": 0}, "heldout.max_new_tokens=0 must be positive"),
        ({"every": -2}, "heldout.every=-2 must be >= 0"),
        ({"temperature": -0.5}, "heldout.temperature=-0.5 must be >= 0"),
    ],
)
def test_bad_heldout_values_are_refused(make_config, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(make_config(heldout=override), output_dir=tmp_path)


def test_the_summary_and_the_closing_lines_lead_with_held_out_numbers():
    from tropd_cli.commands.train import heldout_summary
    from tropd_cli.loggers import closing_lines

    start = {f"heldout/start/{m}": v for m, v in zip(heldout.METRICS, (6.29, 7.5, 0.4, 0.0, 48.0), strict=True)}
    end = dict(zip((f"heldout/{m}" for m in heldout.METRICS), (5.1, 6.0, 0.3, 0.03125, 30.25), strict=True))
    history = [{"step": 1, **start}, {"step": 2}, {"step": 3, **end, "heldout/prompts": 32.0, "heldout/tokens": 900.0}]
    summary = {"rkl_first": 3.0312, "rkl_last": 1.5392, "checkpoint": "run/checkpoint"}
    summary["heldout"] = heldout_summary(history)
    assert summary["heldout"] == {
        "prompts": 32,
        "tokens": 900,
        "start": {"rkl": 6.29, "fkl": 7.5, "outlier_share": 0.4, "empty_rate": 0.0, "response_len": 48.0},
        "end": {"rkl": 5.1, "fkl": 6.0, "outlier_share": 0.3, "empty_rate": 0.03125, "response_len": 30.25},
    }
    first, second = closing_lines(summary, window=1)
    assert first == (
        "held-out (32 prompts, 900 teacher tokens): reverse KL 6.2900 -> 5.1000, forward KL 7.5000 -> 6.0000, "
        "outlier share 40.0% -> 30.0%, empty answers 0% -> 3%, answer length 48.0 -> 30.2 tokens"
    )
    assert second.startswith("training signal (on-policy reverse-KL estimate): 3.0312 (first 1 steps) -> 1.5392")
    assert heldout_summary([{"step": 1}]) == {}
    assert len(closing_lines({**summary, "heldout": {}}, window=1)) == 1


def test_the_cache_gives_the_same_set_and_start_measurement_and_keys_what_they_depend_on(
    make_config, load_models, tmp_path, caplog
):
    cache = tmp_path / "heldout-cache"
    cfg = make_config(heldout={"size": 4, "temperature": 1.0})
    teacher, student = load_models(cfg)
    examples = examples_from_config(cfg.dataset)
    trainer = build_run(cfg, teacher=teacher, student=student, examples=examples)
    held_examples = heldout.heldout_examples(cfg, examples)
    fresh = heldout.HeldOut(trainer, held_examples)
    first = heldout.HeldOut(trainer, held_examples, cache_dir=cache)
    assert not first.cached and (first.cache / "teacher.pt").exists()
    start = first.measure_start(trainer.student.model)
    assert (first.cache / "start.pt").exists()

    second = heldout.HeldOut(trainer, held_examples, cache_dir=cache)
    assert second.cached and second.cache == first.cache
    for field in ("input_ids", "attention_mask", "response_mask", "prefix_mask", "prompt_index"):
        assert torch.equal(getattr(second.teacher_batch, field), getattr(fresh.teacher_batch, field)), field
    assert all(torch.equal(a, b) for a, b in zip(second.teacher_hidden, fresh.teacher_hidden, strict=True))
    # The start measurement is read, not measured: a model that would measure differently is never run.
    trainer.student.model.model.embed_tokens.weight.data.add_(1.0)
    stored = second.measure_start(trainer.student.model)
    expected = fresh.measure(load_models(cfg)[1].model)
    for key in heldout.METRICS:
        assert stored[f"heldout/{key}"] == start[f"heldout/{key}"] == pytest.approx(expected[f"heldout/{key}"]), key

    # The outlier share is the run's trust region's, recomputed from the stored log-probs.
    cfg_tau = dataclasses.replace(cfg, trust_region=dataclasses.replace(cfg.trust_region, tau=cfg.trust_region.tau + 3))
    trainer.cfg = cfg_tau
    assert heldout.cache_key(trainer, held_examples) == second.cache.name  # tau is not in the key
    shifted = heldout.HeldOut(trainer, held_examples, cache_dir=cache).measure_start(trainer.student.model)
    assert shifted["heldout/rkl"] == start["heldout/rkl"]
    assert shifted["heldout/outlier_share"] != start["heldout/outlier_share"]

    # What the set or the start depends on is in the key: another teacher temperature, student or prompt set.
    trainer.cfg = dataclasses.replace(cfg, heldout=dataclasses.replace(cfg.heldout, temperature=0.5))
    assert heldout.cache_key(trainer, held_examples) != first.cache.name
    trainer.cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, keep_layers=[0, 2]))
    assert heldout.cache_key(trainer, held_examples) != first.cache.name
    trainer.cfg = cfg
    assert heldout.cache_key(trainer, held_examples[:3]) != first.cache.name

    # A torn entry is recomputed, with a warning, and rewritten.
    (first.cache / "teacher.pt").write_bytes(b"torn")
    with caplog.at_level("WARNING"):
        again = heldout.HeldOut(trainer, held_examples, cache_dir=cache)
    assert not again.cached and "unreadable" in caplog.text
    assert torch.equal(again.teacher_batch.input_ids, fresh.teacher_batch.input_ids)
    assert heldout.HeldOut(trainer, held_examples, cache_dir=cache).cached


def test_runs_sharing_a_cache_log_the_start_numbers_of_a_run_without_it(make_config, tmp_path):
    plain = train(make_config(steps=1, heldout={"size": 3}), output_dir=tmp_path / "plain").history[0]
    cache = str(tmp_path / "shared")
    first = train(make_config(steps=1, heldout={"size": 3, "cache_dir": cache}), output_dir=tmp_path / "a").history[0]
    other = make_config(steps=1, seed=5, heldout={"size": 3, "cache_dir": cache}, method={"name": "opd"})
    second = train(other, output_dir=tmp_path / "b").history[0]
    assert len(list(Path(cache).iterdir())) == 1  # one entry: seed and method are not in the key
    for key in heldout.METRICS:
        name = f"heldout/start/{key}"
        assert plain[name] == first[name] == second[name], name
    assert without_heldout([first]) == without_heldout([plain])  # the cache changes no training
