"""Gradient signal of one optimizer step: does a K1 batch point where many batches point?

At the starting weights, ``--batches`` independent rollout batches (each one step's prompts and samples) give
gradients g_1..g_N of the run's objective (nothing is updated in between). For each batch size this reports

- ``cos_loo``: the mean over i of cos(g_i, mean of the other N - 1): how well one step's gradient agrees with
  the direction many steps average to (leave-one-out, so g_i is not compared with itself);
- ``cos_expected``: the cosine with the expected gradient that ``cos_loo`` implies (:func:`expected_cosine`);
- ``tokens``: scored tokens per step (mean);
- ``s_per_batch``: seconds per batch (rollout + scoring + backward).

A cosine near 0 means one step is mostly noise: the method ranks gradient noise, not objectives. The char lab's
16 prompts per step gave cos 0.26 for OPD (issue 12); the real-LM lab is meant to give more.

Usage::

    python benchmarks/gradient_signal.py --experiment smol_lab --method opd --batch-sizes 4 16 32 --batches 12
    python benchmarks/gradient_signal.py --experiment lab --method opd --batch-sizes 16 128   # the char lab
    python benchmarks/gradient_signal.py --experiment tiny --batches 3 --batch-sizes 2      # seconds (tests)

Prints a Markdown table; ``--out-json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def gradients(overrides: list[str], batches: int) -> tuple[list[torch.Tensor], list[float], float]:
    """``batches`` flattened gradients at the starting weights, the tokens of each, and seconds per batch."""
    from hydra import compose, initialize_config_dir

    from tropd_cli.commands.common import CONF_DIR, to_object
    from tropd_cli.config import TrainConfig
    from tropd_cli.data import examples_from_config
    from tropd_cli.device import resolve_device
    from tropd_cli.models import default_cache_dir, load_pair
    from tropd_cli.train import step as step_module
    from tropd_cli.train.setup import build_run
    from tropd_cli.validate import validate_train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("train", [*overrides, "logger=none", "heldout.size=0"]), TrainConfig)
    validate_train(cfg)
    cfg.steps = max(cfg.steps, batches)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    teacher, student = load_pair(cfg.teacher, cfg.student, device=device, cache_dir=default_cache_dir(cfg.cache_dir))
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(
            cfg, teacher=teacher, student=student, examples=examples_from_config(cfg.dataset), work_dir=Path(tmp)
        )
        params = [p for p in student.model.parameters() if p.requires_grad]
        grads: list[torch.Tensor] = []

        def capture(run: object, loss: float) -> float:  # replaces the optimizer step: record, never update
            grads.append(torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None]).clone())
            return float(grads[-1].norm())

        step_module.optimizer_step = capture  # type: ignore[assignment]
        tokens = []
        t0 = time.perf_counter()
        for step in range(batches):
            tokens.append(step_module.train_step(run, step)["tokens"])
        seconds = (time.perf_counter() - t0) / batches
        run.close()
    return grads, tokens, seconds


def leave_one_out_cosine(grads: list[torch.Tensor]) -> float:
    total = torch.stack(grads).sum(0)
    cos = [torch.nn.functional.cosine_similarity(g, (total - g) / (len(grads) - 1), dim=0).item() for g in grads]
    return sum(cos) / len(cos)


def expected_cosine(cos_loo: float, n: int) -> float:
    """The cosine of one step's gradient with the *expected* gradient implied by ``cos_loo`` over ``n`` batches.

    With g_i = mu + noise (variance sigma^2, r = sigma^2 / |mu|^2), cos(g_i, mean of the other m = n - 1) is
    1 / sqrt((1 + r)(1 + r / m)) and the cosine with mu itself is 1 / sqrt(1 + r): solve the first for r.
    """
    if cos_loo <= 0:
        return 0.0
    m = n - 1
    b, c = 1 + 1 / m, 1 - 1 / cos_loo**2
    r = (-b + (b * b - 4 * c / m) ** 0.5) / (2 / m)
    return 1 / (1 + max(r, 0.0)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="smol_lab")
    parser.add_argument("--method", default="opd")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="more tropd train overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.batch_sizes:
        overrides = [
            f"experiment={args.experiment}",
            f"method={args.method}",
            f"rollout.batch_size={size}",
            *args.overrides,
        ]
        grads, tokens, seconds = gradients(overrides, args.batches)
        rows.append(
            {
                "experiment": args.experiment,
                "method": args.method,
                "batch_size": size,
                "batches": args.batches,
                "tokens": sum(tokens) / len(tokens),
                "cos_loo": (cos := leave_one_out_cosine(grads)),
                "cos_expected": expected_cosine(cos, len(grads)),
                "s_per_batch": seconds,
                "overrides": args.overrides,
            }
        )
        print(rows[-1], flush=True)
    print(
        "\n| experiment | method | prompts/step | scored tokens/step | cos(one step, mean of the others) "
        "| implied cos(one step, expected gradient) | s/step |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['experiment']} | {r['method']} | {r['batch_size']} | {r['tokens']:.0f} | {r['cos_loo']:.3f} | "
            f"{r['cos_expected']:.3f} | {r['s_per_batch']:.1f} |"
        )
    if args.out_json:
        args.out_json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
