"""Bitwise behaviour record of short same-seed runs, for refactors that must not change behaviour.

Runs a few tiny ``tropd train`` configurations (the default method with guidance, micro-batches, two gloo
ranks under torchrun), each with one thread per process, and records per run the SHA-256 of the final
``model.safetensors`` and of ``metrics.jsonl`` without its wall-clock fields (``time_*``). ``--record``
writes them to ``benchmarks/behaviour_hashes.json``; ``--check`` runs again and compares, listing every run
that differs. Bitwise equality holds on one machine and torch build; another CPU may round differently,
so record and check on the same machine.

    python benchmarks/behaviour_hash.py --record   # before the first move
    python benchmarks/behaviour_hash.py --check    # after the last one
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "behaviour_hashes.json"
TINY = ["experiment=tiny", "steps=4", "rollout.batch_size=4", "dataset.size=16"]
#: name -> (number of torchrun ranks, 0 = a plain process; overrides)
RUNS: dict[str, tuple[int, list[str]]] = {
    "tropd_guided": (0, [*TINY]),  # the default method: trust region, FKL outliers, guidance
    "tropd_micro_batches": (0, [*TINY, "optim.micro_batches=2"]),
    "opd": (0, [*TINY, "method=opd"]),
    "sft": (0, [*TINY, "method=sft", "optim.lr=1e-3"]),
    "tropd_two_ranks": (2, [*TINY]),
}


def run(name: str, ranks: int, overrides: list[str], work: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"}
    run_dir = work / name
    args = ["train", *overrides, f"hydra.run.dir={run_dir}"]
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m"]
        cmd += ["tropd_cli", *args]
    else:
        cmd = [sys.executable, "-m", "tropd_cli", *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    weights = hashlib.sha256((run_dir / "checkpoint" / "model.safetensors").read_bytes()).hexdigest()
    lines = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = {k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
        lines.append(json.dumps(row, sort_keys=True))
    metrics = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"weights_sha256": weights, "metrics_sha256": metrics, "steps": str(len(lines))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true")
    mode.add_argument("--check", action="store_true")
    parser.add_argument("--only", nargs="*", default=list(RUNS), help="run names (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = {name: run(name, *RUNS[name], Path(tmp)) for name in args.only}
    if args.record:
        import torch

        OUT.write_text(json.dumps({"torch": torch.__version__, "runs": got}, indent=2) + "\n")
        print(f"recorded {len(got)} runs in {OUT}")
        return
    want = json.loads(OUT.read_text())["runs"]
    differ = [name for name in got if got[name] != want.get(name)]
    for name in got:
        print(f"{name}: {'same' if name not in differ else 'DIFFERS'}")
    if differ:
        raise SystemExit(f"behaviour changed in {len(differ)} run(s): {', '.join(differ)}")


if __name__ == "__main__":
    main()
