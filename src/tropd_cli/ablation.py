"""Summaries of sweeps and ablation grids: mean and spread over seeds, tables and plots.

Engine code: no Hydra. Each ablation cell leaves a ``cell.json`` (its variant, seed, final training
metrics, eval scores and per-step curves); :func:`summarize` groups cells by variant and
:func:`write_summary` writes ``summary.csv``, ``summary.md`` and the PNG plots. Reference cells
(``"reference": true``: the teacher and the untrained student, scored once on the same suite) become the
``teacher`` and ``student_init`` rows, and give every variant its ``gap_closed``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Training metrics summarised at the end of a run (mean over its last steps) and drawn as curves.
CURVES = ("rkl_estimate", "trust_fraction", "grad_norm", "student_entropy")
FINAL_WINDOW = 3  # steps averaged for a run's final training metrics
#: The reference rows of an ablation summary: the teacher and the student before training.
REFERENCES = ("teacher", "student_init")
ACCURACY = "eval/average"
#: (after - before) / (teacher - before) per cell; before = student_init's accuracy, after = the cell's.
GAP_CLOSED = "gap_closed"
#: The fields of a model spec that decide which weights are loaded (not how: dtype, attention kernel, ...).
MODEL_IDENTITY = ("name", "from_teacher", "keep_layers", "revision", "tiny_layers", "tiny_hidden", "tiny_seed")


def final_metrics(history: Sequence[dict[str, float]], keys: Sequence[str] = CURVES) -> dict[str, float]:
    """Mean of each key over the last :data:`FINAL_WINDOW` steps that have it (``train/<key>``)."""
    out = {}
    for key in keys:
        values = [h[key] for h in history if key in h][-FINAL_WINDOW:]
        if values:
            out[f"train/{key}"] = sum(values) / len(values)
    return out


def final_heldout(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The held-out signals of the run's last measurement (``heldout/rkl``, ...; after the last step), and their
    values before the first step as ``heldout/start/*``: evidence on prompts the run never trained on."""
    from tropd_cli.train.heldout import METRICS  # lazy: the summary needs no torch

    end = next((h for h in reversed(history) if "heldout/rkl" in h), None)
    if end is None:
        return {}
    out = {f"heldout/{m}": float(end[f"heldout/{m}"]) for m in METRICS}
    first = history[0] if history else {}
    out.update(
        {f"heldout/start/{m}": float(first[f"heldout/start/{m}"]) for m in METRICS if f"heldout/start/{m}" in first}
    )
    return out


def cell_record(
    variant: str, seed: int, history: Sequence[dict[str, float]], scores: dict[str, float] | None = None
) -> dict[str, Any]:
    """What a summary needs of one run: final training metrics, eval scores (the ``eval/*`` keys of
    ``scores``) and per-step curves."""
    evals = {k: v for k, v in (scores or {}).items() if k.startswith("eval/")}
    return {
        "variant": variant,
        "seed": seed,
        "metrics": {**final_metrics(history), **final_heldout(history), **evals},
        "curves": {key: [h[key] for h in history if key in h] for key in CURVES},
    }


def model_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What of a model spec (``dataclasses.asdict(ModelConfig)``) decides its weights: two cells whose
    teacher and student agree on these started from the same models."""
    return {key: spec.get(key) for key in MODEL_IDENTITY}


def models_record(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A cell's ``models`` entry: the identity of the teacher and the student it was trained or scored with."""
    return {"teacher": model_identity(teacher), "student": model_identity(student)}


def gap_closed(after: float, before: float, teacher: float) -> float | None:
    """The share of the teacher-student gap a run closed: (after - before) / (teacher - before); None when
    the teacher and the untrained student score the same (no gap to close)."""
    span = teacher - before
    return (after - before) / span if span else None


def read_cells(root: Path) -> list[dict[str, Any]]:
    """Every finished cell (``cell.json``) under ``root``, in path order."""
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/cell.json"))]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(cells: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per variant: ``variant``, ``seeds`` and, for every metric, ``<metric>`` = (mean, std, n).

    Variants come in ``order`` first (the grid's order), then any others by name. A metric a cell
    lacks (e.g. a run that logged no outlier loss) is summarised over the cells that have it.

    Reference cells (``"reference": true``) come first, as the rows ``teacher`` and ``student_init``.
    With both scored, each variant also gets ``gap_closed`` = (mean, std, n) over its seeds of
    :func:`gap_closed` on ``eval/average``, from the cells that started from the reference's models.
    """
    references = [c for c in cells if c.get("reference")]
    runs = [c for c in cells if not c.get("reference")]
    rows = _rows(references, REFERENCES) + _rows(runs, order)
    by_role = {str(c["variant"]): c for c in references}
    if all(role in by_role and ACCURACY in by_role[role]["metrics"] for role in REFERENCES):
        teacher, before = (float(by_role[role]["metrics"][ACCURACY]) for role in REFERENCES)
        models = by_role["student_init"].get("models")
        for row in rows[len(references) :]:
            gaps = [
                gap
                for c in runs
                if c["variant"] == row["variant"]
                and ACCURACY in c["metrics"]
                # A variant that trains other models (a grid over keep_layers, say) has another starting point.
                and (models is None or c.get("models") in (None, models))
                and (gap := gap_closed(float(c["metrics"][ACCURACY]), before, teacher)) is not None
            ]
            if gaps:
                row[GAP_CLOSED] = (*mean_std(gaps), len(gaps))
    return rows


def _rows(cells: Sequence[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        by_variant.setdefault(str(cell["variant"]), []).append(cell)
    names = [v for v in order if v in by_variant] + sorted(v for v in by_variant if v not in order)
    rows = []
    for name in names:
        group = by_variant[name]
        metrics: dict[str, list[float]] = {}
        for cell in group:
            for key, value in cell["metrics"].items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    metrics.setdefault(key, []).append(float(value))
        row: dict[str, Any] = {"variant": name, "seeds": sorted(int(c["seed"]) for c in group)}
        for key, values in metrics.items():
            row[key] = (*mean_std(values), len(values))
        rows.append(row)
    return rows


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Eval metrics first (``eval/...``, average last), then gap closed, then training metrics, as they first
    appear."""
    seen: list[str] = []
    for row in rows:
        seen += [k for k in row if k not in ("variant", "seeds") and k not in seen]
    evals = sorted((k for k in seen if k.startswith("eval/")), key=lambda k: (k == ACCURACY, k))
    gap = [GAP_CLOSED] if GAP_CLOSED in seen else []
    return evals + gap + [k for k in seen if not k.startswith("eval/") and k != GAP_CLOSED]


def _in_percent(column: str) -> bool:
    return column.startswith("eval/") or column == GAP_CLOSED


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = metric_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "n_seeds", *(f"{c}_{s}" for c in columns for s in ("mean", "std"))])
        for row in rows:
            cells = []
            for c in columns:
                mean, std, _ = row.get(c, (math.nan, math.nan, 0))
                cells += [f"{mean:.6g}", f"{std:.6g}"]
            writer.writerow([row["variant"], len(row["seeds"]), *cells])


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean +- std over seeds; eval scores and gap closed in percent."""
    columns = metric_columns(rows)
    names = {GAP_CLOSED: "gap closed"}
    head = [
        "variant",
        "seeds",
        *(names.get(c, c.removeprefix("eval/")) + (" (%)" if _in_percent(c) else "") for c in columns),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for c in columns:
            if c not in row:
                cells.append("-")
                continue
            mean, std, _ = row[c]
            scale = 100.0 if _in_percent(c) else 1.0
            cells.append(f"{scale * mean:.2f} ± {scale * std:.2f}")
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    cells: Sequence[dict[str, Any]], order: Sequence[str], path: Path, keys: Sequence[str] = CURVES
) -> None:
    """One panel per training metric: per variant the mean over seeds per step, with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in order if any(c["variant"] == v for c in cells)]
    palette = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")  # one colour per variant
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for n, variant in enumerate(variants):
            runs = [c["curves"].get(key, []) for c in cells if c["variant"] == variant]
            runs = [r for r in runs if r]
            if not runs:
                continue
            steps = min(len(r) for r in runs)
            mean = [statistics.fmean(r[s] for r in runs) for s in range(steps)]
            (line,) = ax.plot(range(1, steps + 1), mean, label=variant, linewidth=1.3, color=palette(n % palette.N))
            if len(runs) > 1:
                lo = [min(r[s] for r in runs) for s in range(steps)]
                hi = [max(r[s] for r in runs) for s in range(steps)]
                ax.fill_between(range(1, steps + 1), lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 6 else 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, key: str = "eval/average") -> None:
    """Bars of the final eval score per variant (mean over seeds, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.8))
    means = [100 * r[key][0] for r in rows]
    stds = [100 * r[key][1] for r in rows]
    colors = ["#999999" if r["variant"] in REFERENCES else "#4C72B0" for r in rows]  # reference rows in grey
    ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=colors)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{key.removeprefix('eval/')} (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cmp(rows: dict[str, dict[str, Any]], a: str, b: str, key: str, higher: bool = True) -> tuple[bool, str] | None:
    """Whether variant ``a`` beats ``b`` on ``key`` (mean; ``higher`` or lower is better), with the numbers."""
    if a not in rows or b not in rows or key not in rows[a] or key not in rows[b]:
        return None
    (ma, sa, _), (mb, sb, _) = rows[a][key], rows[b][key]
    held = ma >= mb if higher else ma <= mb
    scale = 100.0 if key.startswith("eval/") else 1.0
    clear = abs(ma - mb) > sa + sb  # the gap exceeds the two spreads together
    text = f"{a} {scale * ma:.2f} ± {scale * sa:.2f} vs {b} {scale * mb:.2f} ± {scale * sb:.2f}"
    return held, text + ("" if clear else " (within the spread over seeds)")


def paper_claims(rows: Sequence[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The TrOPD paper's ablation claims, checked on a ``paper_table1`` summary: (claim, held?, numbers).

    ``held`` is None when the grid lacks a variant the claim needs. Accuracy is ``eval/average``.
    """
    by = {r["variant"]: r for r in rows}
    acc = "eval/average"
    checks: list[tuple[str, list[tuple[str, str, str, bool]]]] = [
        (
            "TrOPD >= FKL Outlier >= Clip/Mask Outlier >= OPD (accuracy)",
            [
                ("tropd_fkl", "fkl_outlier", acc, True),
                ("fkl_outlier", "clip_outlier", acc, True),
                ("fkl_outlier", "mask_outlier", acc, True),
                ("clip_outlier", "opd", acc, True),
                ("mask_outlier", "opd", acc, True),
            ],
        ),
        ("top-k FKL alone collapses (below OPD)", [("fkl_topk", "opd", acc, False)]),
        (
            "outlier handling lowers the gradient norm (vs OPD)",
            [(v, "opd", "train/grad_norm", False) for v in ("clip_outlier", "mask_outlier", "fkl_outlier")],
        ),
        (
            "outlier handling keeps the student's entropy higher (vs OPD)",
            [(v, "opd", "train/student_entropy", True) for v in ("clip_outlier", "mask_outlier", "fkl_outlier")],
        ),
        (
            "off-policy guidance helps every outlier variant (accuracy)",
            [
                ("tropd_clip", "clip_outlier", acc, True),
                ("tropd_mask", "mask_outlier", acc, True),
                ("tropd_fkl", "fkl_outlier", acc, True),
            ],
        ),
    ]
    out: list[tuple[str, bool | None, str]] = []
    for claim, comparisons in checks:
        results = [_cmp(by, a, b, key, higher) for a, b, key, higher in comparisons]
        if any(r is None for r in results):
            out.append((claim, None, "not measured (a variant is missing)"))
            continue
        done = [r for r in results if r is not None]
        out.append((claim, all(held for held, _ in done), "; ".join(text for _, text in done)))
    return out


def claims_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| claim of the paper | held here? | numbers (mean ± std over seeds) |", "|---|---|---|"]
    for claim, held, numbers in paper_claims(rows):
        verdict = "n/a" if held is None else ("yes" if held else "no")
        lines.append(f"| {claim} | {verdict} | {numbers} |")
    return "\n".join(lines)


def write_summary(
    root: Path,
    *,
    title: str,
    order: Sequence[str] = (),
    expected: int | None = None,
    cells: Sequence[dict[str, Any]] | None = None,
) -> list[dict]:
    """Summarise ``cells`` (default: the ``cell.json`` files under ``root``) into ``summary.csv``,
    ``summary.md``, ``curves.png`` and ``accuracy.png`` in ``root``; returns the summary rows (empty
    when no cell has finished)."""
    cells = read_cells(root) if cells is None else cells
    runs = [c for c in cells if not c.get("reference")]
    rows = summarize(cells, order)
    if not runs:
        return []
    write_csv(rows, root / "summary.csv")
    have_curves = any(c.get("curves") for c in runs)
    have_eval = any(ACCURACY in r for r in rows)
    if have_curves:
        plot_curves(runs, [r["variant"] for r in rows], root / "curves.png")
    if have_eval:
        plot_accuracy(rows, root / "accuracy.png")
    done = f"{len(runs)} cells" + (f" of {expected}" if expected else "")
    parts = [
        f"# {title}",
        "",
        f"{done}; mean ± sample std over seeds. Training metrics: mean of the last {FINAL_WINDOW} steps.",
    ]
    roles = [role for role in REFERENCES if any(c.get("reference") and c["variant"] == role for c in cells)]
    if roles:
        parts.append(
            f"Reference rows, each scored once on the same eval suite: {' and '.join(f'`{r}`' for r in roles)}"
            + (" (the student before training)." if "student_init" in roles else ".")
        )
    if any(GAP_CLOSED in r for r in rows):
        parts.append(
            "Gap closed: (after - before) / (teacher - before) on the eval average, per seed, where before is "
            "`student_init`'s and after the trained student's."
        )
    elif len(roles) == len(REFERENCES) and have_eval:
        parts.append("Gap closed: not defined here, the teacher and `student_init` score the same.")
    parts += ["", markdown_table(rows), ""]
    if {"opd", "fkl_outlier", "tropd_fkl"} <= {r["variant"] for r in rows} and have_eval:
        parts += ["## The paper's claims", "", claims_markdown(rows), ""]
    if have_eval:
        parts += ["![final eval score per variant](accuracy.png)", ""]
    if have_curves:
        parts += ["![training curves, mean over seeds with min-max band](curves.png)", ""]
    (root / "summary.md").write_text("\n".join(parts))
    return rows
