"""The served teacher on the real-LM lab: the same steps as the colocated teacher, and what the HTTP hop costs.

Starts ``python -m tropd_cli.serving.hf_server`` with the lab's teacher (smol-lab-teacher, bf16 like the colocated
teacher under ``teacher.dtype=auto`` on a bf16 CPU) on loopback, then trains ``experiment=smol_lab`` for a few
on-policy steps (guidance off, so the teacher only scores: both runs sample the same rollouts) twice, with the
colocated teacher and with ``teacher.backend=server``, and writes per-step numbers of both to
``docs/results/teacher-server-smol_lab.md``.

    python benchmarks/teacher_server.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "teacher-server-smol_lab.md"
KEYS = ("loss", "rkl_estimate", "teacher_nll", "teacher_topk_mass", "trust_fraction", "grad_norm")


def train(work: Path, name: str, steps: int, extra: list[str]) -> list[dict]:
    run_dir = work / name
    cmd = [
        sys.executable,
        "-m",
        "tropd_cli",
        "train",
        "experiment=smol_lab",
        f"steps={steps}",
        "guidance.enabled=false",
    ]
    cmd += ["heldout.size=0", "logger=none", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["wall"] = time.perf_counter() - t0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        local = train(work, "local", args.steps, [])
        server = subprocess.Popen(
            [sys.executable, "-m", "tropd_cli.serving.hf_server", "--model", "smol-lab-teacher", "--dtype", "bfloat16",
             "--max-logprobs", "64", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            url = server.stdout.readline().split()[-1]
            served = train(work, "served", args.steps, ["teacher.backend=server", f"teacher.server.url={url}"])
        finally:
            server.kill()
    lines = [
        "# The served teacher on the real-LM lab (`python benchmarks/teacher_server.py`)",
        "",
        f"`tropd train experiment=smol_lab steps={args.steps} guidance.enabled=false heldout.size=0`, colocated teacher",
        "against `teacher.backend=server` (tropd_cli.serving.hf_server of smol-lab-teacher in bf16 on loopback, the same",
        "2-core CPU; the trainer waits while the server scores, so they do not compete). Guidance off: the teacher only",
        "scores, and both runs sample the same rollouts at step 1.",
        "",
        "| step | " + " | ".join(f"{k} (local / served)" for k in KEYS) + " | time_teacher s (local / served) |",
        "|---|" + "---|" * (len(KEYS) + 1),
    ]
    for a, b in zip(local, served, strict=True):
        cells = [f"{a[k]:.4f} / {b[k]:.4f}" for k in KEYS]
        lines.append(
            f"| {a['step']} | " + " | ".join(cells) + f" | {a['time_teacher']:.2f} / {b['time_teacher']:.2f} |"
        )
    lines += [
        "",
        f"Wall clock of the whole command: local {local[-1]['wall']:.0f} s, served {served[-1]['wall']:.0f} s.",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
