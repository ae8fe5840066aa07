"""Exact resume, atomic checkpoints and clean stops on signals (tiny models on the CPU)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import tropd_command
from tropd_cli.errors import UserError
from tropd_cli.train import checkpoint
from tropd_cli.train.loop import NoHooks, StopRequest, train


class StopAt(NoHooks):
    """Asks the loop to stop after step ``at`` (what SIGTERM does through the command layer)."""

    def __init__(self, stop: StopRequest, at: int) -> None:
        self.stop, self.at = stop, at

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.at:
            self.stop.requested = True


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def without_times(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]


def test_three_steps_stop_resume_three_more_is_bitwise_the_six_step_run(make_config, tmp_path):
    cfg = make_config(steps=6)
    straight = train(cfg, output_dir=tmp_path / "straight")

    out = tmp_path / "resumed"
    stop = StopRequest()
    first = train(make_config(steps=6), output_dir=out, hooks=StopAt(stop, 2), stop=stop)
    assert first.interrupted and first.checkpoint == out / "checkpoints" / "step_000003"
    assert len(first.history) == 3 and not (out / "checkpoint").exists()
    second = train(make_config(steps=6, resume="auto"), output_dir=out)
    assert not second.interrupted

    a, b = weights(straight.checkpoint), weights(second.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_times(second.history) == without_times(straight.history)


def test_resume_auto_without_a_checkpoint_starts_fresh(make_config, tmp_path):
    result = train(make_config(steps=1, resume="auto"), output_dir=tmp_path)
    assert len(result.history) == 1


def test_keep_last_prunes_older_checkpoints(make_config, tmp_path):
    train(make_config(steps=5, save_every=1, keep_last=2), output_dir=tmp_path)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step_000004", "step_000003"]
    assert all(checkpoint.problem(p) is None for p in checkpoint.step_dirs(tmp_path))


def test_a_corrupted_checkpoint_is_skipped_with_a_warning(make_config, tmp_path, caplog):
    train(make_config(steps=4, save_every=1, keep_last=0), output_dir=tmp_path)
    newest = tmp_path / "checkpoints" / "step_000003"
    with open(newest / "model.safetensors", "r+b") as fh:  # a disk error flips bytes in the middle
        fh.seek(1000)
        fh.write(b"\x00" * 64)
    (tmp_path / "checkpoints" / ".step_000004-half").mkdir()  # what a kill mid-write leaves: not a step_ name
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest_valid(tmp_path) == tmp_path / "checkpoints" / "step_000002"
    assert "skipping checkpoint" in caplog.text and "corrupted" in caplog.text
    resumed = train(make_config(steps=4, resume="auto"), output_dir=tmp_path)
    assert len(resumed.history) == 4


def test_resuming_with_another_method_is_refused_unless_forced(make_config, tmp_path):
    stop = StopRequest()
    train(make_config(steps=4), output_dir=tmp_path, hooks=StopAt(stop, 0), stop=stop)
    with pytest.raises(UserError, match=r"saved with different method.*resume_force=true"):
        train(make_config(steps=4, resume="auto", method={"name": "opd"}), output_dir=tmp_path)
    forced = train(make_config(steps=4, resume="auto", method={"name": "opd"}, resume_force=True), output_dir=tmp_path)
    assert len(forced.history) == 4


def test_resume_names_what_is_wrong_with_a_bad_path(make_config, tmp_path):
    with pytest.raises(UserError, match="no such checkpoint or run directory"):
        train(make_config(steps=1, resume=str(tmp_path / "nope")), output_dir=tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no valid checkpoint under"):
        train(make_config(steps=1, resume=str(tmp_path / "empty")), output_dir=tmp_path / "run")


def start_training(
    cwd: Path, env: dict[str, str], *overrides: str, after_steps: int
) -> tuple[subprocess.Popen, list[str]]:
    """``tropd train experiment=tiny steps=150`` in the background, returned once ``after_steps`` steps are
    in ``cwd/run/metrics.jsonl``; also returns its command line."""
    args = [*tropd_command(), "train", "experiment=tiny", "steps=150", *overrides, f"hydra.run.dir={cwd / 'run'}"]
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cwd / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < after_steps):
        time.sleep(0.2)
    return proc, args


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_to_the_end(tmp_path, tropd_env):
    run_dir, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    proc, args = start_training(tmp_path, tropd_env, after_steps=3)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing this step" in err and "resumable checkpoint" in err
    saved = checkpoint.latest_valid(run_dir)
    assert saved is not None and not (run_dir / "checkpoint").exists()
    done = int(saved.name[5:])

    again = subprocess.run(
        [*args, f"resume={run_dir}"], cwd=tmp_path, env=tropd_env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(lines) == 150 and done < 150  # the replayed steps plus the rest, once each
    assert (run_dir / "checkpoint" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Non-finite guard


@pytest.fixture
def nan_teacher(tmp_path):
    """A tiny teacher whose layer 1 holds a NaN: its log-probs, hence every loss, are NaN. The student keeps
    layers [0, 3] only, so it starts finite."""
    from tropd_cli.config import ModelConfig
    from tropd_cli.models import tiny_random

    model, tokenizer = tiny_random(ModelConfig(name="tiny-random", tiny_layers=4, tiny_hidden=64))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan-teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_non_finite_updates_are_skipped_and_the_run_stops_after_n_in_a_row(make_config, tmp_path, nan_teacher):
    cfg = make_config(
        steps=6,
        teacher={"name": str(nan_teacher)},
        guidance={"enabled": False},
        optim={"lr": 1e-3, "max_nonfinite_steps": 2},
    )
    with pytest.raises(
        UserError, match=r"steps 1-2 all had a non-finite loss or gradient.*weights of step 0 are saved"
    ):
        train(cfg, output_dir=tmp_path / "run")
    saved = checkpoint.latest_valid(tmp_path / "run")
    assert saved is not None and saved.name == "step_000002"
    state = torch.load(saved / checkpoint.STATE_FILE, weights_only=False)
    assert [h["skipped_updates"] for h in state["history"]] == [1.0, 1.0]
    assert all(torch.isfinite(w).all() for w in weights(saved).values())  # no NaN reached the weights


def test_top_k_larger_than_the_vocabulary_scores_every_token_with_a_warning(make_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    clamped = train(make_config(method={"name": "fkl_topk", "top_k": 1000}, steps=1), output_dir=tmp_path / "a")
    assert "method.top_k=1000 is larger than the vocabulary (100 tokens)" in caplog.text
    full = train(make_config(method={"name": "fkl_topk", "top_k": 100}, steps=1), output_dir=tmp_path / "b")
    assert without_times(clamped.history) == without_times(full.history)


class DiskFull:
    """A tokenizer whose files cannot be written: what a full disk does to save_pretrained."""

    def save_pretrained(self, path: str | Path) -> None:
        raise OSError(28, "No space left on device", str(path))


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_ones(make_config, tmp_path):
    train(make_config(steps=3, save_every=1, keep_last=0), output_dir=tmp_path)
    before = {p.name: checkpoint.problem(p) for p in checkpoint.step_dirs(tmp_path)}
    assert before == {"step_000002": None, "step_000001": None}
    from tropd_cli.config import ModelConfig
    from tropd_cli.models import tiny_random

    model, _ = tiny_random(ModelConfig(name="tiny-random", tiny_layers=1, tiny_hidden=32))
    with pytest.raises(
        UserError, match=r"could not write checkpoint .*No space left on device; the previous checkpoints are kept"
    ):
        checkpoint.save(tmp_path / "checkpoints" / "step_000003", model, DiskFull(), {})
    after = {p.name: checkpoint.problem(p) for p in checkpoint.step_dirs(tmp_path)}
    assert after == before and not list((tmp_path / "checkpoints").glob(".step_*"))  # no temp dir left


def test_a_second_ctrl_c_stops_at_once(tmp_path, tropd_env):
    run_dir = tmp_path / "run"
    # Steps long enough (~1 s) that both signals arrive within one step.
    slow = ["rollout.batch_size=16", "rollout.max_new_tokens=64", "rollout.min_new_tokens=64"]
    proc, _ = start_training(tmp_path, tropd_env, *slow, after_steps=2)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err
    assert not (run_dir / "checkpoint").exists()  # it did not run on to the end
