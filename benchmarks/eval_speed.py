"""Eval throughput: batched generation (length-sorted vs arrival order) and parallel scoring.

Three measurements on this machine, each written to ``benchmarks/results.json`` (key ``eval_speed``)
and the ``eval-speed`` section of ``docs/benchmarks.md``:

* generation: the default ``math`` suite's 100 prompts on SmolLM2-135M-Instruct (greedy, 96 new
  tokens, batch 16), jobs sorted by prompt length (what ``tropd eval`` does) vs in arrival order;
  problems/s and the share of padding tokens in the prompt batches;
* math scoring: math-verify equivalence checks (answers that need math-verify, not the quick exact or
  numeric path) with 1 worker process vs 2;
* code scoring: the 164 HumanEval canonical solutions in the sandbox, 1 worker vs 2.

    python benchmarks/eval_speed.py            # about 3 minutes on 2 cores
    python benchmarks/eval_speed.py --quick --out-json /tmp/r.json --out-md /tmp/b.md   # tiny model, seconds (tests)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from _report import environment, update_results, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results.json"
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
MD_START, MD_END = "<!-- eval-speed:start -->", "<!-- eval-speed:end -->"

# Answers that reach math-verify (quick_equal returns None for each): fractions vs decimals, LaTeX forms.
MATH_PAIRS = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("[1,2)", "[1,2]"),
    ("10^{3}", "1000"),
    ("5\\text{ cm}", "5"),
    ("\\frac{\\pi}{2}", "1.5707963"),
]


def generation(model_name: str, quick: bool) -> dict[str, Any]:
    import torch

    from tropd_cli.config import EvalSuiteConfig, EvalTaskConfig, ModelConfig
    from tropd_cli.data import format_prompt
    from tropd_cli.evals.engine import generate, load_suites
    from tropd_cli.models import default_cache_dir, load_model

    kwargs = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
    size = 8 if quick else 50
    tasks = [
        EvalTaskConfig(name=name, benchmark="reasoning_gym", size=size, seed=2024, generator_kwargs=kwargs)
        for name in ("chain_sum", "basic_arithmetic")
    ]
    suite = EvalSuiteConfig(tasks=tasks, max_new_tokens=8 if quick else 96, batch_size=16)
    loaded = load_model(
        ModelConfig(name=model_name, tiny_layers=2),
        device=torch.device("cpu"),
        cache_dir=default_cache_dir(),
        frozen=True,
    )
    (suite_tasks,) = load_suites({"math": suite})
    # Arrival order: the same prompts, each task's problems interleaved by length rank reversed, so that
    # a batch mixes short and long prompts the way unsorted jobs do.
    out: dict[str, Any] = {"model": model_name, "problems": sum(len(t.examples) for t in suite_tasks.tasks)}
    for order in ("sorted", "arrival"):
        seconds, padding = 0.0, []
        for task in suite_tasks.tasks:
            lengths = [
                len(loaded.tokenizer(format_prompt(loaded.tokenizer, p), add_special_tokens=False)["input_ids"])
                for p in task.prompts
            ]
            if order == "arrival":  # defeat the sort: generate() sorts by length, so hand it one batch at a time
                batches = [list(range(i, min(i + suite.batch_size, len(lengths)))) for i in range(0, len(lengths), 16)]
            else:
                ranked = sorted(range(len(lengths)), key=lambda i: -lengths[i])
                batches = [ranked[i : i + suite.batch_size] for i in range(0, len(ranked), suite.batch_size)]
            for batch in batches:
                width = max(lengths[i] for i in batch)
                padding.append(sum(width - lengths[i] for i in batch) / (width * len(batch)))
            t0 = time.perf_counter()
            for batch in batches:
                sub = type(task)(
                    task.name,
                    task.kind,
                    [task.examples[i] for i in batch],
                    [task.prompts[i] for i in batch],
                    task.grade,
                )
                generate(loaded.model, loaded.tokenizer, sub, suite, seed=0)
            seconds += time.perf_counter() - t0
        out[order] = {
            "seconds": seconds,
            "problems_per_s": out["problems"] / seconds,
            "padding_fraction": sum(padding) / len(padding),
        }
    out["speedup_sorted"] = out["arrival"]["seconds"] / out["sorted"]["seconds"]
    return out


def math_scoring(quick: bool) -> dict[str, Any]:
    from tropd_cli.evals.answers import MathJudge

    pairs = MATH_PAIRS * (1 if quick else 12)
    out: dict[str, Any] = {"pairs": len(pairs)}
    for workers in (1, 2):
        judge = MathJudge(workers=workers)
        judge.equal(pairs[:workers])  # start the workers (spawn + import) outside the timing
        t0 = time.perf_counter()
        judge.equal(pairs)
        seconds = time.perf_counter() - t0
        judge.close()
        out[f"workers_{workers}"] = {"seconds": seconds, "pairs_per_s": len(pairs) / seconds}
    out["speedup_2_workers"] = out["workers_1"]["seconds"] / out["workers_2"]["seconds"]
    return out


def code_scoring(quick: bool) -> dict[str, Any]:
    from tropd_cli.evals.code import load_humaneval, score_humaneval

    examples = load_humaneval()[: 16 if quick else None]
    completions = [ex.metadata["canonical_solution"] for ex in examples]
    out: dict[str, Any] = {"samples": len(examples)}
    for workers in (1, 2):
        t0 = time.perf_counter()
        scores = score_humaneval(examples, completions, workers=workers)
        seconds = time.perf_counter() - t0
        out[f"workers_{workers}"] = {
            "seconds": seconds,
            "samples_per_s": len(examples) / seconds,
            "passed": sum(scores),
        }
    out["speedup_2_workers"] = out["workers_1"]["seconds"] / out["workers_2"]["seconds"]
    return out


def markdown_section(result: dict[str, Any]) -> str:
    gen, math, code = result["generation"], result["math_scoring"], result["code_scoring"]
    return "\n".join(
        [
            MD_START,
            "## `eval_speed.py`: eval generation and scoring throughput",
            "",
            f"Measured with `python benchmarks/eval_speed.py{' --quick' if result['quick'] else ''}` on "
            f"{result['machine']['cpu']} ({result['machine']['cores']} cores), CPU only.",
            "",
            "| what | setting | time | throughput |",
            "|---|---|---|---|",
            f"| generation, {gen['problems']} math-suite prompts on `{gen['model']}` | jobs sorted by prompt length "
            f"(what `tropd eval` does; padding {100 * gen['sorted']['padding_fraction']:.1f}% of prompt tokens) | "
            f"{gen['sorted']['seconds']:.1f} s | {gen['sorted']['problems_per_s']:.2f} problems/s |",
            f"| | arrival order (padding {100 * gen['arrival']['padding_fraction']:.1f}%) | "
            f"{gen['arrival']['seconds']:.1f} s | {gen['arrival']['problems_per_s']:.2f} problems/s |",
            f"| math-verify checks, {math['pairs']} pairs | 1 worker process | {math['workers_1']['seconds']:.2f} s | "
            f"{math['workers_1']['pairs_per_s']:.0f} pairs/s |",
            f"| | 2 worker processes | {math['workers_2']['seconds']:.2f} s | {math['workers_2']['pairs_per_s']:.0f} pairs/s |",
            f"| HumanEval canonical solutions in the sandbox, {code['samples']} samples | 1 worker | "
            f"{code['workers_1']['seconds']:.1f} s | {code['workers_1']['samples_per_s']:.1f} samples/s |",
            f"| | 2 workers | {code['workers_2']['seconds']:.1f} s | {code['workers_2']['samples_per_s']:.1f} samples/s |",
            "",
            f"Length sorting: {gen['speedup_sorted']:.2f}x; two scoring workers: {math['speedup_2_workers']:.2f}x "
            f"(math-verify), {code['speedup_2_workers']:.2f}x (sandbox). Wall-clock on a shared machine: rough. "
            "Worker start-up (spawn and import of math-verify, about a second per worker) is outside the timing.",
            MD_END,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model and few samples (seconds; for tests)")
    p.add_argument("--out-json", type=Path, default=RESULTS_JSON)
    p.add_argument("--out-md", type=Path, default=BENCHMARKS_MD)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine, versions = environment(("torch", "transformers", "math-verify"))
    result = {
        "quick": args.quick,
        "machine": machine,
        "generation": generation("tiny-random" if args.quick else "smollm2-135m-instruct", args.quick),
        "math_scoring": math_scoring(args.quick),
        "code_scoring": code_scoring(args.quick),
    }
    update_results(args.out_json, {"eval_speed": result}, machine=machine, versions=versions)
    write_section(args.out_md, markdown_section(result), MD_START, MD_END)
    print(markdown_section(result))


if __name__ == "__main__":
    main()
