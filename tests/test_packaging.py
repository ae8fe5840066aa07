"""Packaging: a built wheel carries the configs, so a non-editable install works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_built_wheel_ships_configs_and_runs(tmp_path):
    """A non-editable install: the configs travel inside the wheel and `tropd train` finds them."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("tropd-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    assert (site / "tropd_cli" / "conf" / "train.yaml").exists()
    # The labs' models travel too: the char lab's weights and the real-LM lab's adapters.
    assert (site / "tropd_cli" / "lab_models" / "teacher" / "model.safetensors").exists()
    for role in ("teacher", "student"):
        assert (site / "tropd_cli" / "lab_models" / "smol" / f"{role}_adapter" / "adapter_model.safetensors").exists()
    assert (site / "tropd_cli" / "lab_models" / "smol" / "student_adapter" / "tropd_layers.json").exists()
    # nltk's English Punkt model for the instruction checkers (no download at run time)
    punkt = site / "tropd_cli" / "data" / "punkt_tab" / "english"
    assert {p.name for p in punkt.iterdir()} >= {
        "abbrev_types.txt",
        "collocations.tab",
        "sent_starters.txt",
        "ortho_context.tab",
    }
    code = "import sys, tropd_cli; print(tropd_cli.__file__); from tropd_cli.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "experiment=tiny"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(site) in proc.stdout.splitlines()[0]
    assert list(tmp_path.glob("outputs/train/*/*/checkpoint/config.json"))
