"""Nothing lost on a refused resume, the final checkpoint swapped atomically, one run per run directory
(issue 15, items 3, 4, 6, 7, 8 and the malformed manifest of 9). Each test fails on the code before it."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tropd_command
from test_resume import weights
from tropd_cli.errors import UserError
from tropd_cli.models import save_checkpoint, tiny_random
from tropd_cli.train import checkpoint
from tropd_cli.train.loop import train


def run_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tropd_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


RUN = ["train", "experiment=tiny", "steps=3", "save_every=1", "hydra.run.dir=run"]


@pytest.fixture
def trained_run(tmp_path, tropd_env):
    """A finished tiny run with resumable checkpoints, in ``tmp_path/run``."""
    proc = run_cli(tmp_path, tropd_env, *RUN)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    return run, (run / "metrics.jsonl").read_text(), (run / "config.yaml").read_text()


def corrupt(run: Path) -> None:
    with open(run / "checkpoints" / "step_000002" / "model.safetensors", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00" * 32)


def malformed(run: Path) -> None:
    (run / "checkpoints" / "step_000001" / "manifest.json").write_text(json.dumps(["not", "a", "map"]))


@pytest.mark.parametrize(
    ("bad", "damage"),
    [
        (["method=opd", "resume=auto"], None),  # a resume refused for a changed method
        (["resume=/no/such/run"], None),  # a bad resume= path
        (["resume=run/checkpoints/step_000002"], corrupt),  # a corrupt explicit checkpoint
        (["resume=run/checkpoints/step_000001"], malformed),  # a malformed manifest
    ],
)
def test_a_refused_resume_keeps_the_runs_history(trained_run, tmp_path, tropd_env, bad, damage):
    run, metrics, config = trained_run
    if damage is not None:
        damage(run)
    proc = run_cli(tmp_path, tropd_env, *RUN, *bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "config.yaml").read_text() == config


def test_malformed_manifests_are_problems_not_tracebacks(tmp_path):
    for manifest in (["a"], {"state.pt": 3}, {"state.pt": {"bytes": "x", "sha256": 1}}, "text"):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert "malformed manifest" in (checkpoint.problem(tmp_path) or "")


def test_resume_auto_on_a_finished_run_says_so_and_trains_nothing(trained_run, tmp_path, tropd_env):
    run, metrics, _ = trained_run
    for step_dir in checkpoint.step_dirs(run):  # a run without periodic checkpoints
        import shutil

        shutil.rmtree(step_dir)
    before = weights(run / "checkpoint")
    proc = run_cli(tmp_path, tropd_env, *RUN, "resume=auto", "seed=7")
    assert proc.returncode == 0, proc.stderr
    assert "already finished" in " ".join(proc.stderr.split())
    after = weights(run / "checkpoint")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (run / "metrics.jsonl").read_text() == metrics


def test_the_final_checkpoint_is_swapped_in_and_a_torn_swap_is_recovered(tmp_path, make_config):
    from tropd_cli.config import ModelConfig

    model, tokenizer = tiny_random(ModelConfig(name="tiny-random"))
    final = tmp_path / "checkpoint"
    save_checkpoint(model, tokenizer, final)
    save_checkpoint(model, tokenizer, final)  # replaced: the old one moved aside, the new one renamed in
    assert (final / "config.json").is_file() and not (tmp_path / ".checkpoint.old").exists()
    os.replace(final, tmp_path / ".checkpoint.old")  # a kill between the two renames
    checkpoint.recover_final(tmp_path)
    assert (final / "config.json").is_file() and not (tmp_path / ".checkpoint.old").exists()


def test_a_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from tropd_cli.config import ModelConfig

    model, tokenizer = tiny_random(ModelConfig(name="tiny-random"))
    final = tmp_path / "checkpoint"
    save_checkpoint(model, tokenizer, final)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos: No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with pytest.raises(UserError, match="could not write checkpoint .*No space left"):
        save_checkpoint(model, tokenizer, final)
    assert (final / "config.json").is_file()
    monkeypatch.setattr(torch, "save", full)  # the resumable checkpoint's trainer state
    with pytest.raises(UserError, match="could not write checkpoint"):
        checkpoint.save(tmp_path / "checkpoints" / "step_000001", model, tokenizer, {"step": 1})
    assert not list((tmp_path / "checkpoints").iterdir())


def test_keep_last_counts_only_complete_checkpoints_and_stale_temps_are_cleaned(make_config, tmp_path):
    train(make_config(steps=3, save_every=1, keep_last=0), output_dir=tmp_path)
    for name in ("step_000010", "step_000011"):  # newer, but corrupt
        (tmp_path / "checkpoints" / name).mkdir()
        (tmp_path / "checkpoints" / name / "manifest.json").write_text("{")
    checkpoint.prune(tmp_path, keep_last=2)
    names = [p.name for p in checkpoint.step_dirs(tmp_path)]
    assert names == ["step_000011", "step_000010", "step_000002", "step_000001"]  # the good ones kept
    (tmp_path / "checkpoints" / ".step_000004-x1").mkdir()
    (tmp_path / ".checkpoint-y2").mkdir()
    assert sorted(p.name for p in checkpoint.clean_temporaries(tmp_path)) == [".checkpoint-y2", ".step_000004-x1"]
    assert not (tmp_path / "checkpoints" / ".step_000004-x1").exists()


def test_two_runs_in_one_run_dir_are_refused(make_config, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".tropd.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run holds the directory
        with pytest.raises(UserError, match="another tropd train is running"):
            train(make_config(steps=1), output_dir=tmp_path)
    assert len(train(make_config(steps=1), output_dir=tmp_path).history) == 1  # free again
