"""Non-finite updates never land (issue 15, item 5): an update that makes a weight non-finite is rolled back
and counted; a run never saves non-finite weights; bad optimizer settings are one-line errors (item 9)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from test_resume import weights
from tropd_cli.errors import UserError
from tropd_cli.train.loop import train
from tropd_cli.validate import validate_train


def finite(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights(path).values())


def poison(monkeypatch, steps: set[int]) -> None:
    """Fault injection: the optimizer's update on the given calls (1-based) leaves an inf in a weight, as a float16
    overflow or a far too large lr does."""
    original = torch.optim.AdamW.step
    calls = [0]

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] in steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_an_update_that_makes_a_weight_non_finite_is_rolled_back(make_config, tmp_path, monkeypatch):
    poison(monkeypatch, {2})
    result = train(make_config(steps=4), output_dir=tmp_path)
    assert [h["optimizer_steps"] for h in result.history] == [1, 0, 1, 1]  # counted as a skipped update
    assert math.isnan(result.history[1]["grad_norm"]) and finite(result.checkpoint)


def test_repeated_bad_updates_stop_the_run_and_only_finite_weights_are_saved(make_config, tmp_path, monkeypatch):
    poison(monkeypatch, {1, 2, 3, 4, 5, 6})
    with pytest.raises(UserError, match="non-finite") as err:
        train(make_config(steps=6), output_dir=tmp_path)
    saved = tmp_path / "checkpoints" / "step_000003"  # steps 1-3 rolled back: the initial weights, saved
    assert str(saved) in str(err.value) and finite(saved)


def test_a_float16_student_keeps_finite_weights(make_config, tmp_path):
    cfg = make_config(steps=3)
    cfg.student.dtype = "float16"
    cfg.optim.max_nonfinite_steps = 10
    result = train(cfg, output_dir=tmp_path)
    assert finite(result.checkpoint)
    assert all(math.isfinite(v) for h in result.history for k, v in h.items() if k.startswith("heldout/"))


def test_without_the_guard_a_bad_update_stops_before_anything_is_saved(make_config, tmp_path, monkeypatch):
    poison(monkeypatch, {1})
    cfg = make_config(steps=3)
    cfg.optim.guard_updates = False
    with pytest.raises(UserError, match="cannot be put back"):
        train(cfg, output_dir=tmp_path)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("lr", math.inf, "optim.lr=inf"),
        ("lr", 1e39, "optim.lr=1e+39"),
        ("lr", math.nan, "optim.lr=nan"),
        ("eps", 0.0, "optim.eps=0.0"),
        ("weight_decay", -1.0, "optim.weight_decay=-1.0"),
        ("betas", [1.5, 0.999], "optim.betas=[1.5, 0.999]"),
        ("betas", [0.9], "optim.betas=[0.9]"),
        ("max_grad_norm", math.inf, "optim.max_grad_norm=inf"),
    ],
)
def test_bad_optimizer_settings_are_one_line_errors(make_config, key, value, needle):
    cfg = make_config(steps=1)
    setattr(cfg.optim, key, value)
    with pytest.raises(UserError, match=re.escape(needle)):
        validate_train(cfg)
