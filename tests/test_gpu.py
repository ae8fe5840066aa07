"""The CUDA path (``pytest -m gpu``, run by benchmarks/gpu_check.sh); skipped without a GPU.

Also, on any machine: the GPU check script says so and exits cleanly when no GPU is visible.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tropd_cli.device import resolve_dtype

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out-json", str(tmp_path / "r.json"), "--out-md", str(tmp_path / "b.md")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU visible" in proc.stdout and not (tmp_path / "r.json").exists()


@pytest.mark.gpu
@needs_gpu
def test_teacher_is_bf16_and_student_fp32_on_cuda():
    device = torch.device("cuda")
    if torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", device, frozen=True) == torch.bfloat16
    assert resolve_dtype("auto", device, frozen=False) == torch.float32


@pytest.mark.gpu
@needs_gpu
def test_a_tropd_step_on_cuda_matches_the_cpu_step(make_config, tmp_path):
    from tropd_cli.train.loop import train

    cpu = train(make_config(steps=1, device="cpu"), output_dir=tmp_path / "cpu").history[0]
    gpu = train(make_config(steps=1, device="cuda"), output_dir=tmp_path / "gpu").history[0]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in gpu.items() if not k.startswith("time_"))
    # Same seed, same tiny fp32 models: the rollout can differ only through kernel rounding.
    assert gpu["response_len"] == pytest.approx(cpu["response_len"], abs=2.0)


@pytest.mark.gpu
@needs_gpu
def test_precision_auto_is_bf16_compute_on_a_bf16_gpu_and_stays_close_to_fp32(make_config, tmp_path):
    from tropd_cli.train.loop import train

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    runs = {
        p: train(make_config(steps=2, device="cuda", precision=p), output_dir=tmp_path / p).history
        for p in ("auto", "fp32")
    }
    for history in runs.values():
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert runs["auto"][0]["teacher_nll"] == pytest.approx(runs["fp32"][0]["teacher_nll"], rel=1e-3)
    assert runs["auto"][0]["rkl_estimate"] == pytest.approx(runs["fp32"][0]["rkl_estimate"], abs=0.05)
