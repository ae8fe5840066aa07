"""Multi-process training on the CPU: ``torchrun`` with 2 gloo ranks, FSDP2-sharded student (and teacher).

What a 2-rank run must match: the single-process run on the same global batch. SFT on dataset answers
has no sampling noise, so there the two must agree to float rounding, step by step and in the final
weights; that pins the data split, the global token mean, the gradient reduction, the global gradient
norm, the sharded AdamW and the consolidated checkpoint. TrOPD with guidance (teacher prefixes through
a sharded teacher), evaluation on rank 0, sharded resumable checkpoints and resuming them at another
world size are checked on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tropd_cli.train import checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

SFT = ["experiment=tiny", "method=sft", "rollout.batch_size=4", "dataset.size=8", "optim.lr=1e-3"]


def torchrun(cwd: Path, env: dict[str, str], *args: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node RANKS -m tropd_cli train ARGS`` (one thread per rank)."""
    env = {**env, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run(
        [*command, "-m", "tropd_cli", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, atol: float = 2e-6) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=atol), (name, (wa[name] - wb[name]).abs().max())


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tropd_env, tropd_in):
    """The same 3-step SFT run in one process and on 2 ranks (with a sharded checkpoint after each step)."""
    root = tmp_path_factory.mktemp("dist-sft")
    single = tropd_in(root, "train", *SFT, "steps=3", f"hydra.run.dir={root / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ranked = torchrun(
        root, tropd_env, *SFT, "steps=3", "save_every=1", "keep_last=0", f"hydra.run.dir={root / 'ranked'}"
    )
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    return root


def test_two_ranks_take_the_same_steps_as_one_process(sft_runs):
    one, two = history(sft_runs / "single"), history(sft_runs / "ranked")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        # Global token counts and the global loss / gradient norm: reduced over ranks, not per rank.
        assert a["tokens"] == b["tokens"] and a["response_len"] == b["response_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["teacher_nll"] == pytest.approx(b["teacher_nll"], rel=1e-5)
    assert one[0]["loss"] != one[-1]["loss"]  # it trained
    summary = json.loads((sft_runs / "ranked" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_the_consolidated_checkpoint_equals_the_single_process_one(sft_runs):
    assert_same_weights(sft_runs / "single" / "checkpoint", sft_runs / "ranked" / "checkpoint")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_runs / "ranked" / "checkpoint")  # a plain HF model
    assert model.config.num_hidden_layers == 2


def test_only_rank_0_writes_the_run_directory(sft_runs):
    ranked = sft_runs / "ranked"
    assert sorted(p.name for p in ranked.iterdir()) == [
        ".hydra",
        ".tropd.lock",  # rank 0's lock: one run per run directory
        "checkpoint",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "train.log",
    ]
    assert len(history(ranked)) == 3  # one line per step, not one per rank


def test_sharded_checkpoints_are_valid_and_resume_at_another_world_size(sft_runs, tropd_env, tropd_in):
    ranked = sft_runs / "ranked"
    steps = checkpoint.step_dirs(ranked)
    assert [p.name for p in steps] == ["step_000002", "step_000001"]
    for path in steps:
        assert checkpoint.problem(path) is None
        assert (path / checkpoint.SHARDED / ".metadata").exists() and not (path / "model.safetensors").exists()
    # Two ranks from step 1, and one process from step 2: both end where the uninterrupted run ended.
    again = torchrun(
        sft_runs, tropd_env, *SFT, "steps=3", f"resume={steps[1]}", f"hydra.run.dir={sft_runs / 'resumed2'}"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(sft_runs / "resumed2" / "checkpoint", ranked / "checkpoint")
    one = tropd_in(sft_runs, "train", *SFT, "steps=3", f"resume={steps[0]}", f"hydra.run.dir={sft_runs / 'resumed1'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(sft_runs / "resumed1" / "checkpoint", ranked / "checkpoint")
    assert [h["loss"] for h in history(sft_runs / "resumed1")] == pytest.approx([h["loss"] for h in history(ranked)])


def test_a_single_process_checkpoint_is_refused_on_two_ranks(sft_runs, tropd_env, tropd_in):
    single = tropd_in(sft_runs, "train", *SFT, "steps=2", "save_every=1", f"hydra.run.dir={sft_runs / 'single-ckpt'}")
    assert single.returncode == 0, single.stderr[-3000:]
    step = checkpoint.step_dirs(sft_runs / "single-ckpt")[0]
    out = torchrun(sft_runs, tropd_env, *SFT, "steps=2", f"resume={step}", f"hydra.run.dir={sft_runs / 'refused'}")
    assert out.returncode != 0  # torchrun's own code (1) for a worker that exited 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "was saved by a single process" in errors[0] and "student.name=" in errors[0]


def test_tropd_with_a_sharded_teacher_guidance_and_rank_0_eval(tmp_path, tropd_env):
    """The default method end to end on 2 ranks: teacher prefixes sampled through the sharded teacher,
    trust-region noise and top-k per rank, the student evaluated on rank 0 during training."""
    out = torchrun(
        tmp_path,
        tropd_env,
        "experiment=tiny",
        "steps=2",
        "rollout.batch_size=4",
        "distributed.shard_teacher=true",
        "eval_every=2",
        "eval_suite=tiny",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = history(tmp_path / "run")
    assert len(lines) == 2
    for line in lines:
        assert all(v == v for v in line.values())  # no NaN
        assert 0.0 <= line["trust_fraction"] <= 1.0 and line["optimizer_steps"] == 1
    # Step 1: the cosine cap is the whole budget, so the sharded teacher wrote the prefixes; step 2 (the
    # last) is fully on-policy, with student tokens in and out of the trust region.
    assert lines[0]["prefix_len"] > 0 and lines[-1]["prefix_len"] == 0
    assert 0.0 < lines[-1]["trust_fraction"] <= 1.0
    assert "eval/tiny/chain_sum" in lines[-1]
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()


def test_batch_must_split_over_ranks_and_other_commands_refuse_torchrun(tmp_path, tropd_env):
    out = torchrun(tmp_path, tropd_env, "experiment=tiny", "rollout.batch_size=3", f"hydra.run.dir={tmp_path / 'r'}")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0 and errors
    assert "rollout.batch_size=3 prompts do not split evenly over 2 ranks; use a multiple of 2" in errors[0]
    assert os.listdir(tmp_path) == ["r"]  # rank 0's run directory only
    env = {**tropd_env, "WORLD_SIZE": "2", "RANK": "0"}
    evaluated = subprocess.run(
        [sys.executable, "-m", "tropd_cli", "eval"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert evaluated.returncode == 2 and "launch only `tropd train` with torchrun" in evaluated.stderr


def test_the_paper_preset_runs_on_two_ranks_at_toy_scale(tmp_path, tropd_env):
    """experiment=paper/ds_r1_... with its structure kept (4 rollouts per prompt, 16 micro-batches, activation
    checkpointing, fp32 student + bf16 teacher, resume=auto, DeepScaleR's problem/answer fields) and only
    the sizes cut: tiny models, a local prompt file."""
    prompts = tmp_path / "deepscaler.jsonl"
    prompts.write_text(
        "".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(8))
    )
    out = torchrun(
        tmp_path,
        tropd_env,
        "experiment=paper/ds_r1_1p5b_from_skywork_math7b",
        "teacher.name=tiny-random",  # the preset names its models itself, so values, not group choices
        "student.name=null",
        "student.from_teacher=true",
        "student.keep_layers=[0,3]",
        "dataset.source=file",
        f"dataset.path={prompts}",
        "dataset.size=8",
        "rollout.batch_size=2",
        "rollout.max_new_tokens=8",
        "rollout.backend=loop",
        "scoring.chunk_size=16",
        "steps=2",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "n_samples_per_prompt: 4" in config and "micro_batches: 16" in config and "lr: 5.0e-06" in config
    lines = history(tmp_path / "run")
    assert [line["optimizer_steps"] for line in lines] == [1, 1]
    assert all(line["tokens"] > 0 for line in lines)


def test_accelerate_launch_runs_the_same_job(tmp_path, tropd_env, sft_runs):
    """``accelerate launch --multi_gpu`` exports the same rank variables as torchrun: same run, same weights."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate is not installed (pip install 'tropd[gguf]' or accelerate)")
    command = [str(accelerate), "launch", "--num_processes=2", "--num_machines=1", "--multi_gpu"]
    command += ["--mixed_precision=no", "--dynamo_backend=no", "-m", "tropd_cli", "train"]
    out = subprocess.run(
        [*command, *SFT, "steps=3", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={**tropd_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    assert_same_weights(tmp_path / "run" / "checkpoint", sft_runs / "single" / "checkpoint")


def test_a_submitit_job_of_two_tasks_is_one_two_rank_run(tmp_path, tropd_in, sft_runs):
    """hydra/launcher=slurm_8gpu's path: submitit starts N tasks of one job; tropd reads their ranks from
    submitit's environment. submitit_local with 2 tasks runs the same code without SLURM."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = tropd_in(
        tmp_path,
        "train",
        "-m",
        *SFT,
        "steps=3",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job = tmp_path / "sweep" / "0"
    assert json.loads((job / "summary.json").read_text())["world_size"] == 2
    assert len(history(job)) == 3
    assert_same_weights(job / "checkpoint", sft_runs / "single" / "checkpoint")


def test_gkd_scores_the_full_vocabulary_of_a_sharded_teacher(tmp_path, tropd_env):
    """GKD needs the teacher's lm_head outside its forward: a copy, since the shards are freed after it."""
    out = torchrun(
        tmp_path,
        tropd_env,
        "experiment=tiny",
        "method=gkd",
        "steps=1",
        "rollout.batch_size=4",
        "distributed.shard_teacher=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = history(tmp_path / "run")
    assert line["loss"] > 0 and line["grad_norm"] > 0 and line["optimizer_steps"] == 1


def test_ppo_epochs_mini_batches_and_a_global_entropy_share_on_two_ranks(tmp_path, tropd_env):
    """The rollout-time log-prob pre-pass under FSDP, 2 epochs x 2 mini-batches, and entropy_opd's top-20%
    share taken over the step's tokens on both ranks (one threshold), not per rank."""
    out = torchrun(
        tmp_path,
        tropd_env,
        "experiment=tiny",
        "method=entropy_opd",
        "method.ppo_epochs=2",
        "method.mini_batches=2",
        "method.clip_eps=0.2",
        "guidance.enabled=false",
        "steps=2",
        "rollout.batch_size=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for line in history(tmp_path / "run"):
        assert line["optimizer_steps"] == 4 and line["skipped_updates"] == 0
        kept = round(line["kept_fraction"] * line["tokens"])
        assert kept == max(1, round(0.2 * line["tokens"]))  # of all ranks' tokens (ties aside)


def test_sigterm_to_torchrun_saves_a_sharded_checkpoint_that_resumes(tmp_path, tropd_env):
    """Preemption of a multi-GPU job: torchrun passes SIGTERM to every rank, the ranks agree on the step to
    stop after, save one sharded checkpoint and exit; the same command with resume=auto continues."""
    import signal
    import time

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*command, "-m", "tropd_cli", "train", "experiment=tiny", "rollout.batch_size=4", f"hydra.run.dir={run}"]
    env = {**tropd_env, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen([*args, "steps=400"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    assert "SIGTERM: finishing this step, then saving a checkpoint" in err
    (saved,) = checkpoint.step_dirs(run)
    assert checkpoint.problem(saved) is None and (saved / checkpoint.SHARDED).is_dir()
    done = int(saved.name[5:])
    again = subprocess.run(
        [*args, f"steps={done + 2}", "resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {saved} at step {done}" in (run / "train.log").read_text()
    assert len(history(run)) == done + 2 and (run / "checkpoint" / "model.safetensors").exists()
