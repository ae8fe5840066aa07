"""Cluster launcher presets (conf/hydra/launcher/, docs/cluster.md): every preset composes with its plugin and
renders the sbatch script it should; real sweeps and an ablation through submitit's local executor, which runs
each job as its own process exactly as on SLURM except for the executor; a real SIGUSR2 requeue that resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import tropd_cli.commands.common  # noqa: F401  (registers the schemas and the tropd_* resolvers)
from conftest import tropd_command

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
SLURM_PRESETS = [p for p in PRESETS if p.startswith("slurm_")]
RAY_PRESETS = [p for p in PRESETS if p.startswith("ray_")]
FAST = ["experiment=tiny", "threads=1"]  # 2 steps on tiny random models; two jobs share the 2 cores

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher (the dev extra)")


def has_ray_plugin() -> bool:
    try:
        import hydra_plugins.hydra_ray_launcher  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def launcher_config(config: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config, list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


def sbatch_script(launcher: DictConfig, folder: Path, jobs: int) -> str:
    """The sbatch file submitit would submit for ``jobs`` jobs with this launcher config.

    The same steps as ``hydra_submitit_launcher``'s ``launch`` and submitit's ``SlurmExecutor``: generic keys
    renamed (timeout_min -> time, ...), then submitit's own renderer; only ``sbatch`` itself is not run
    (the executor refuses to start without ``srun``)."""
    from submitit.slurm import slurm

    params = OmegaConf.to_container(launcher, resolve=True)
    assert isinstance(params, dict)
    for key in ("_target_", "submitit_folder", "max_num_timeout"):  # the executor's constructor takes these
        params.pop(key)
    names = slurm.SlurmExecutor._equivalence_dict()
    kwargs = {names.get(str(k), str(k)): v for k, v in params.items()}
    if kwargs.get("mem") is not None:
        kwargs["mem"] = slurm._convert_mem(kwargs["mem"])
    return slurm._make_sbatch_string(
        command="python -u -m submitit.core._submit X", folder=folder, map_count=jobs, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Presets compose


def test_the_presets_are_there():
    assert {"slurm_gpu", "slurm_2gpu", "slurm_8gpu", "slurm_cpu"} <= set(SLURM_PRESETS)
    assert {"ray_local", "ray_cluster"} <= set(RAY_PRESETS)


@pytest.mark.parametrize("config", ["train", "ablate"])
@pytest.mark.parametrize("preset", SLURM_PRESETS)
def test_slurm_presets_compose_into_submitit_slurm(preset, config):
    launcher = launcher_config(config, f"hydra/launcher={preset}", "hydra.launcher.partition=gpu")
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    gpus = {"slurm_gpu": 1, "slurm_2gpu": 2, "slurm_8gpu": 8, "slurm_cpu": None}[preset]
    assert launcher.partition == "gpu" and launcher.nodes == 1
    assert launcher.tasks_per_node == (8 if preset == "slurm_8gpu" else 1)  # one rank per GPU
    assert launcher.max_num_timeout == 0 and launcher.setup is None
    assert launcher.signal_delay_s == (300 if preset == "slurm_8gpu" else 120)
    assert launcher.gpus_per_node == gpus
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
    # Job logs and pickles go under the sweep directory (for ablate: next to the cells).
    sweep_dir = "outputs/ablate/paper_table1" if config == "ablate" else "multirun/train/"
    assert launcher.submitit_folder.startswith(sweep_dir) and launcher.submitit_folder.endswith("/.submitit/%j")


def test_slurm_gpu_renders_one_gpu_per_array_task(tmp_path):
    launcher = launcher_config("train", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu")
    lines = set(sbatch_script(launcher, tmp_path / "%j", jobs=4).splitlines())
    expected = {
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",  # submitit's timeout/preemption signal (docs/cluster.md#requeue-and-preemption)
        "#SBATCH --array=0-3%4",
        "#SBATCH --job-name=tropd-app",  # tropd-<command> on the command line; "app" under the compose API
    }
    assert expected <= lines, sorted(expected - lines)


def test_slurm_2gpu_is_one_process_with_two_gpus(tmp_path):
    launcher = launcher_config("train", "hydra/launcher=slurm_2gpu", "teacher_device=cuda:1")
    lines = set(sbatch_script(launcher, tmp_path / "%j", jobs=1).splitlines())
    assert {"#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=16"} <= lines


def test_slurm_8gpu_is_eight_tasks_with_a_gpu_each(tmp_path):
    launcher = launcher_config("train", "hydra/launcher=slurm_8gpu")
    lines = set(sbatch_script(launcher, tmp_path / "%j", jobs=1).splitlines())
    assert {"#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=USR2@300"} <= lines


def test_slurm_overrides_reach_the_sbatch_script(tmp_path):
    launcher = launcher_config(
        "ablate",
        "hydra/launcher=slurm_cpu",
        "hydra.launcher.account=lab",
        "+hydra.launcher.additional_parameters.requeue=true",
        "hydra.launcher.setup=['export TROPD_CACHE=/shared/tropd']",
    )
    script = sbatch_script(launcher, tmp_path / "%j", jobs=2)
    assert "#SBATCH --account=lab" in script and "#SBATCH --requeue" in script
    assert "export TROPD_CACHE=/shared/tropd" in script and "--gpus-per-node" not in script
    assert "--partition" not in script  # none named: the cluster's default partition


def test_the_command_line_selects_a_preset(tropd):
    proc = tropd("train", "--cfg", "hydra", "--resolve", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100")
    assert proc.returncode == 0, proc.stderr
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["partition"] == "a100" and launcher["gpus_per_node"] == 1 and launcher["name"] == "tropd-train"


@pytest.mark.parametrize("preset", RAY_PRESETS)
def test_ray_presets_compose_with_the_ray_plugin(preset):
    if not has_ray_plugin():
        pytest.skip("hydra-ray-launcher is not installed (not in the dev extra: docs/cluster.md#ray)")
    launcher = launcher_config("train", f"hydra/launcher={preset}")
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    if preset == "ray_local":
        assert launcher.ray.init.address is None and launcher.ray.remote.num_cpus == 1
    else:
        assert launcher.ray.init.address == "auto" and launcher.ray.remote.num_gpus == 1


def test_without_the_ray_plugin_a_ray_preset_is_one_line_and_exit_2(tropd):
    if has_ray_plugin():
        pytest.skip("hydra-ray-launcher is installed")
    proc = tropd("train", "--cfg", "hydra", "hydra/launcher=ray_local")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: In 'hydra/launcher/ray_local': Could not load 'hydra/launcher/ray'"


# ---------------------------------------------------------------------------------------------
# Real runs through submitit's local executor (a process per job, like a SLURM array task)


def submitit_logs(sweep: Path) -> dict[str, str]:
    """Each submitit job's log by job id: ``<sweep>/.submitit/<job id>/<job id>_0_log.out`` (submitit's own
    lines) followed by ``..._log.err`` (tropd's progress and errors)."""
    return {
        p.parent.name: p.read_text() + p.with_name(p.name.replace("_log.out", "_log.err")).read_text()
        for p in sweep.glob(".submitit/*/*_0_log.out")
    }


def test_train_sweep_through_submitit_local(tropd, tmp_path):
    proc = tropd("train", "-m", *FAST, "seed=0,1", "hydra/launcher=submitit_local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list((tmp_path / "multirun" / "train").glob("*/*"))
    logs = submitit_logs(sweep)
    assert len(logs) == 2 and all("Job completed successfully" in log for log in logs.values())
    for num, seed in (("0", 0), ("1", 1)):
        job = sweep / num
        assert (job / "checkpoint" / "config.json").exists() and (job / "checkpoint" / "model.safetensors").exists()
        assert json.loads((job / "summary.json").read_text())["steps"] == 2
        assert len((job / "metrics.jsonl").read_text().splitlines()) == 2
        hydra_cfg = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
        assert hydra_cfg.job.id in logs  # the job ran as that submitit job, in its own process
        assert OmegaConf.load(job / ".hydra" / "config.yaml").seed == seed
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["variant"], r["n_seeds"]) for r in rows] == [("experiment=tiny threads=1", "2")]
    assert "| experiment=tiny threads=1 | 2 |" in (sweep / "summary.md").read_text()


def test_ablation_through_submitit_local(tropd, tmp_path):
    proc = tropd("ablate", "ablation=tiny", "seeds=[5]", "threads=1", "hydra/launcher=submitit_local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "outputs" / "ablate" / "tiny"
    cells = sorted(root.glob("*/seed_5/cell.json"))
    assert [p.parent.parent.name for p in cells] == ["opd", "tropd"]
    assert all(json.loads(p.read_text())["overrides"][-1] == "seed=5" for p in cells)
    assert "| opd | 1 |" in (root / "summary.md").read_text() and (root / "summary.csv").exists()
    logs = submitit_logs(root)  # the cells' submitit logs live next to the cells
    assert len(logs) == 2 and sum("seed 5: experiment=tiny method=" in log for log in logs.values()) == 2


def job_process(sweep: Path, timeout: float = 60) -> int:
    """The pid of the job process: submitit's local controller (its pid names the job's folder) starts it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in sweep.glob(".submitit/[0-9]*"):
            children = Path(f"/proc/{folder.name}/task/{folder.name}/children")
            if children.exists() and children.read_text().split():
                return int(children.read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError(f"no submitit job process under {sweep}")


@pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="finds the job process through Linux's /proc/<pid>/task/<pid>/children",
)
def test_sigusr2_requeues_the_job_and_resume_auto_continues_it(tmp_path, tropd_env):
    """SIGUSR2 is the signal submitit has SLURM send before the time limit (and on preemption, where the cluster
    sets preempt_send_user_signal). submitit requeues the same job, which restarts in the same directory and, with
    ``resume=auto``, continues from the newest ``save_every`` checkpoint (docs/cluster.md#requeue-and-preemption).
    Early in a job's time limit submitit counts the signal as a preemption: requeued whatever max_num_timeout."""
    steps = 16
    args = ["train", "-m", *FAST, f"steps={steps}", "save_every=2", "resume=auto", "hydra/launcher=submitit_local"]
    with subprocess.Popen(
        [*tropd_command(), *args],
        cwd=tmp_path,
        env=tropd_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob("multirun/train/*/*/0/checkpoints/step_*")):
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
                time.sleep(0.05)
            (sweep,) = list((tmp_path / "multirun" / "train").glob("*/*"))
            os.kill(job_process(sweep), signal.SIGUSR2)
            _, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    (log,) = submitit_logs(sweep).values()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log and "Requeued job" in log
    job = sweep / "0"
    assert "resumed from" in (job / "train.log").read_text()
    # tropd caught the signal first: it finished the step and saved a checkpoint, then submitit requeued.
    err = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    assert "SIGUSR2: finishing this step, then saving a checkpoint" in err
    assert json.loads((job / "summary.json").read_text())["steps"] == steps
    assert len((job / "metrics.jsonl").read_text().splitlines()) == steps  # one line per step, no repeats
    assert (sweep / "summary.md").exists()


@pytest.mark.skipif(not has_ray_plugin(), reason="hydra-ray-launcher is not installed (docs/cluster.md#ray)")
def test_train_sweep_through_ray_local(tropd, tmp_path):
    proc = tropd("train", "-m", *FAST, "seed=0,1", "hydra/launcher=ray_local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list((tmp_path / "multirun" / "train").glob("*/*"))
    for num in ("0", "1"):
        assert json.loads((sweep / num / "summary.json").read_text())["steps"] == 2
    assert "| experiment=tiny threads=1 | 2 |" in (sweep / "summary.md").read_text()
