"""The loss-memory benchmark's machinery, on tiny shapes: children, peak memory, summary keys, both outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_memory.py"


def run_quick(script: Path, tmp_path: Path, results: dict, section: str, timeout: float = 300) -> tuple[Path, Path]:
    """Run ``script --quick`` into a results.json holding ``results`` and a benchmarks.md holding another
    benchmark's ``section``; both must survive. Returns (results.json, benchmarks.md)."""
    out_json, out_md = tmp_path / "results.json", tmp_path / "benchmarks.md"
    out_json.write_text(json.dumps(results))
    out_md.write_text(f"# Benchmarks\n\n<!-- {section}:start -->\nkept\n<!-- {section}:end -->\n")
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out-json", str(out_json), "--out-md", str(out_md)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out_json, out_md


def test_loss_memory_quick_writes_results(tmp_path: Path) -> None:
    out_json, out_md = run_quick(SCRIPT, tmp_path, {"other_benchmark": 1}, "other")  # other keys survive

    data = json.loads(out_json.read_text())
    assert data["other_benchmark"] == 1
    for key in ("loss_peak_mem_ratio_vs_naive", "loss_peak_mem_ratio_vs_trl"):
        assert data[key] > 0, key
    assert math.isfinite(data["loss_peak_growth_2x_to_16x"])
    assert set(data["machine"]) >= {"cpu", "cores", "ram_gib"}
    assert set(data["versions"]) >= {"python", "torch", "transformers", "trl"}
    rows = data["loss_memory"]["measurements"]
    assert {r["path"] for r in rows} == {"tropd", "naive", "trl"}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["peak_extra_gib"] > 0 and row["seconds"] > 0, row
    # Same tensors, same objective: the chunked path and the full log-softmax agree.
    by_path = {(r["path"], r["tokens"]): r for r in rows}
    tokens = min(r["tokens"] for r in rows)
    assert by_path["tropd", tokens]["loss"] == pytest.approx(by_path["naive", tokens]["loss"], rel=1e-4)
    assert by_path["tropd", tokens]["weight_grad_norm"] == pytest.approx(
        by_path["naive", tokens]["weight_grad_norm"], rel=1e-4
    )

    md = out_md.read_text()
    assert "kept" in md and md.count("<!-- loss-memory:start -->") == 1
    assert "| path | chunk | tokens |" in md


STEP_TIME = SCRIPT.parent / "step_time.py"


def test_step_time_quick_writes_results(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    out_json, out_md = run_quick(STEP_TIME, tmp_path, {"loss_peak_mem_ratio_vs_naive": 0.5}, "loss-memory", 600)

    data = json.loads(out_json.read_text())
    assert data["loss_peak_mem_ratio_vs_naive"] == 0.5
    for key in ("step_time_ratio_vs_trl", "step_time_ratio_vs_trl_distillation", "overhead_fraction"):
        assert isinstance(data[key], float) and math.isfinite(data[key]) and data[key] > 0, key
    assert set(data["versions"]) >= {"python", "torch", "transformers", "trl"}
    runners = data["step_time"]["runners"]
    assert set(runners) == {"tropd", "tropd_fp32", "trl_gkd", "trl_distillation"}
    for name, r in runners.items():
        assert r["median_s"] > 0 and r["n_steps"] >= 1, name
        # Every trainer sampled exactly the requested number of tokens (min_new_tokens = max_new_tokens).
        assert r["new_tokens_min"] == r["new_tokens_max"] == data["step_time"]["setup"]["new_tokens"], name
    assert runners["tropd"]["sampler_dtype"] in ("torch.bfloat16", "torch.float32")
    assert runners["tropd_fp32"]["sampler_dtype"] == runners["tropd_fp32"]["teacher_dtype"] == "torch.float32"

    md = out_md.read_text()
    assert "kept" in md and md.count("<!-- step-time:start -->") == 1
    assert "| trainer | median s/step |" in md


def test_eval_speed_quick_writes_its_keys_and_section(tmp_path: Path) -> None:
    results = {"other_benchmark": 1, "machine": {"gpu": "H100"}}
    out_json, out_md = run_quick(SCRIPT.parent / "eval_speed.py", tmp_path, results, "other")
    data = json.loads(out_json.read_text())
    assert data["other_benchmark"] == 1 and data["machine"]["gpu"] == "H100"  # other keys survive, machine merges
    result = data["eval_speed"]
    for order in ("sorted", "arrival"):
        assert result["generation"][order]["problems_per_s"] > 0
    # Sorting by length never pads more than arrival order does.
    assert result["generation"]["sorted"]["padding_fraction"] <= result["generation"]["arrival"]["padding_fraction"]
    assert result["code_scoring"]["workers_2"]["passed"] == result["code_scoring"]["samples"]  # canonical ones pass
    assert result["math_scoring"]["workers_1"]["pairs_per_s"] > 0
    md = out_md.read_text()
    assert "kept" in md and "<!-- eval-speed:start -->" in md and "problems/s" in md


def _load(name: str):  # a benchmarks/ script as a module
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_token_eos_push_is_minus_the_reverse_kl_gradient_on_the_eos_logit() -> None:
    import torch

    eos_push = _load("first_token_eos").eos_push
    torch.manual_seed(0)
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), -1)
    s = torch.log_softmax(z, -1)
    kl = (s.exp() * (s - t)).sum(-1)
    kl.sum().backward()
    push, kl_rows = eos_push(s.detach(), t, eos=3)
    assert torch.allclose(push, -z.grad[:, 3], atol=1e-12)
    assert torch.allclose(kl_rows, kl.detach())
    # a student far from the teacher: descent raises EOS even where the teacher finds it less likely than it does
    far = torch.log_softmax(torch.tensor([[4.0, 0.0, 0.0, -3.0]]), -1)
    teacher = torch.log_softmax(torch.tensor([[-4.0, 4.0, 0.0, -3.5]]), -1)
    assert teacher[0, 3] < far[0, 3] and eos_push(far, teacher, eos=3)[0].item() > 0


def test_first_token_eos_measures_the_tiny_pair(tmp_path: Path) -> None:
    rows = _load("first_token_eos").measure(["teacher=tiny", "student=tiny", "dataset=chain_sum"], None, 4)
    assert [r["model"] for r in rows] == ["untrained student"]
    assert 0 <= float(rows[0]["share_raised"]) <= 1 and float(rows[0]["first_token_kl"]) >= 0
