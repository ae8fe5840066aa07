"""``tropd ablate`` and sweep summaries: statistics by hand, every grid composes, a 2x2 grid end to end."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tropd_cli.commands.common  # noqa: F401  (registers the schemas and the tropd_* resolvers)
from tropd_cli.ablation import cell_record, final_metrics, markdown_table, summarize, write_summary
from tropd_cli.config import AblateConfig, TrainConfig
from tropd_cli.validate import validate_train

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GRIDS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))


def history(rkl: list[float]) -> list[dict[str, float]]:
    return [{"rkl_estimate": r, "trust_fraction": 0.5, "grad_norm": 1.0, "student_entropy": 2.0} for r in rkl]


def test_final_metrics_average_the_last_steps():
    assert final_metrics(history([9.0, 4.0, 2.0, 3.0]))["train/rkl_estimate"] == pytest.approx(3.0)
    assert final_metrics([{"grad_norm": 2.0}]) == {"train/grad_norm": 2.0}


def test_summary_mean_and_std_over_seeds_by_hand():
    cells = [
        cell_record("b", 0, history([1.0]), {"eval/x": 0.5, "eval/average": 0.5}),
        cell_record("a", 0, history([2.0]), {"eval/x": 0.25, "eval/average": 0.25}),
        cell_record("a", 1, history([4.0]), {"eval/x": 0.75, "eval/average": 0.75}),
    ]
    rows = summarize(cells, order=["a", "b"])
    assert [r["variant"] for r in rows] == ["a", "b"] and rows[0]["seeds"] == [0, 1]
    mean, std, n = rows[0]["train/rkl_estimate"]
    assert (mean, n) == (3.0, 2) and std == pytest.approx(statistics.stdev([2.0, 4.0]))
    assert rows[1]["eval/average"] == (0.5, 0.0, 1)  # one seed: no spread
    table = markdown_table(rows)
    assert "| a | 2 | 50.00 ± 35.36 |" in table  # eval in percent, x before average


def test_every_grid_composes_and_every_variant_is_a_valid_train_config():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for grid in GRIDS:
            cfg = OmegaConf.to_object(compose("ablate", [f"ablation={grid}"]))
            assert isinstance(cfg, AblateConfig) and cfg.ablation.name == grid and cfg.ablation.variants
            for variant, overrides in cfg.ablation.variants.items():
                train_cfg = OmegaConf.to_object(compose("train", [*cfg.ablation.base, *overrides, "seed=1"]))
                assert isinstance(train_cfg, TrainConfig), (grid, variant)
                validate_train(train_cfg)
    assert {"paper_table1", "guidance", "threshold", "topk"} <= set(GRIDS)


def test_paper_table1_has_the_papers_rows():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("ablate", ["ablation=paper_table1"]))
    assert isinstance(cfg, AblateConfig) and cfg.seeds == [0, 1, 2]
    rows = {"opd", "clip_outlier", "mask_outlier", "fkl_outlier", "tropd_clip", "tropd_mask", "tropd_fkl", "fkl_topk"}
    baselines = {"jsd_topk", "eopd", "reopold", "entropy_opd"}
    added = {"rkl_full", "constant_adv", "fkl_topk_k512"}  # full reverse KL, the constant-advantage control, k=512
    assert rows | baselines | added == set(cfg.ablation.variants)
    assert cfg.ablation.variants["rkl_full"] == ["method=gkd", "method.gkd_beta=1.0"]
    assert cfg.ablation.variants["fkl_topk_k512"] == ["method=fkl_topk", "method.top_k=512"]


def test_write_summary_from_cell_files(tmp_path):
    for variant, seed, rkl in (("a", 0, 2.0), ("a", 1, 4.0), ("b", 0, 1.0)):
        cell_dir = tmp_path / variant / f"seed_{seed}"
        cell_dir.mkdir(parents=True)
        cell = cell_record(variant, seed, history([rkl, rkl]), {"eval/t": 0.5, "eval/average": 0.5})
        (cell_dir / "cell.json").write_text(json.dumps(cell))
    rows = write_summary(tmp_path, title="t", order=["b", "a"], expected=4)
    assert [r["variant"] for r in rows] == ["b", "a"]
    assert "3 cells of 4" in (tmp_path / "summary.md").read_text()
    for png in ("curves.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert table[1]["variant"] == "a" and float(table[1]["train/rkl_estimate_mean"]) == 3.0


def reference(role: str, accuracy: float, models: dict | None = None) -> dict:
    return {**cell_record(role, 0, [], {"eval/average": accuracy}), "reference": True, "models": models}


def test_reference_rows_and_gap_closed_by_hand(tmp_path):
    start = {"teacher": {"name": "t"}, "student": {"name": "s"}}
    other = {"teacher": {"name": "t"}, "student": {"name": "bigger"}}
    cells = [
        cell_record("a", 0, history([1.0]), {"eval/average": 0.5}) | {"models": start},
        cell_record("a", 1, history([1.0]), {"eval/average": 0.7}) | {"models": start},
        cell_record("b", 0, history([1.0]), {"eval/average": 0.1}) | {"models": start},
        cell_record("c", 0, history([1.0]), {"eval/average": 0.9}) | {"models": other},  # another starting point
        reference("student_init", 0.2, start),
        reference("teacher", 0.8, start),
    ]
    rows = summarize(cells, order=["a", "b", "c"])
    assert [r["variant"] for r in rows] == ["teacher", "student_init", "a", "b", "c"]
    assert rows[0]["eval/average"] == (0.8, 0.0, 1) and "gap_closed" not in rows[0]
    gaps = [(0.5 - 0.2) / 0.6, (0.7 - 0.2) / 0.6]  # (after - before) / (teacher - before), per seed
    mean, std, n = rows[2]["gap_closed"]
    assert (mean, n) == (pytest.approx(statistics.fmean(gaps)), 2) and std == pytest.approx(statistics.stdev(gaps))
    assert rows[3]["gap_closed"] == (pytest.approx(-1 / 6), 0.0, 1)  # below its start: negative
    assert "gap_closed" not in rows[4]
    table = markdown_table(rows)
    assert "| average (%) | gap closed (%) | train/rkl_estimate |" in table
    assert "| a | 2 | 60.00 ± 14.14 | 66.67 ± 23.57 |" in table and "| teacher | 1 | 80.00 ± 0.00 | - |" in table
    # No gap when the teacher and the untrained student score the same; no reference rows, no gap column.
    even = summarize([*cells[:2], reference("student_init", 0.5), reference("teacher", 0.5)])
    assert all("gap_closed" not in r for r in even)
    assert "gap_closed" not in summarize(cells[:3])[0]

    for i, cell in enumerate(cells):
        where = tmp_path / ("reference" if cell.get("reference") else cell["variant"]) / str(i)
        where.mkdir(parents=True)
        (where / "cell.json").write_text(json.dumps(cell))
    write_summary(tmp_path, title="t", order=["a", "b", "c"], expected=4)
    text = (tmp_path / "summary.md").read_text()
    assert "4 cells of 4" in text and "`teacher` and `student_init` (the student before training)" in text
    table = {row["variant"]: row for row in csv.DictReader((tmp_path / "summary.csv").open())}
    assert list(table) == ["teacher", "student_init", "a", "b", "c"]
    assert float(table["a"]["gap_closed_mean"]) == pytest.approx(statistics.fmean(gaps), rel=1e-5)
    assert table["c"]["gap_closed_mean"] == "nan" and table["teacher"]["n_seeds"] == "1"


# ---------------------------------------------------------------------------------------------
# End to end in a subprocess (tiny random models)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, tropd_in):
    cwd = tmp_path_factory.mktemp("ablate")
    proc = tropd_in(cwd, "ablate", "ablation=tiny", "seeds=[0,1]")
    return proc, cwd, cwd / "outputs" / "ablate" / "tiny"


def test_tiny_grid_runs_every_cell_and_writes_the_summary(tiny_grid):
    proc, _, root = tiny_grid
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted(root.glob("*/seed_*/cell.json"))
    assert [p.parent.relative_to(root).as_posix() for p in cells] == [
        "opd/seed_0",
        "opd/seed_1",
        "tropd/seed_0",
        "tropd/seed_1",
    ]
    for name in ("summary.md", "summary.csv", "curves.png", "accuracy.png"):
        assert (root / name).exists(), name
    # The summary's mean and std are those of the per-cell results.
    table = {row["variant"]: row for row in csv.DictReader((root / "summary.csv").open())}
    for variant in ("opd", "tropd"):
        per_cell = [json.loads(p.read_text())["metrics"] for p in cells if p.parts[-3] == variant]
        for key in ("train/rkl_estimate", "eval/average"):
            values = [m[key] for m in per_cell]
            assert float(table[variant][f"{key}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-5)
            assert float(table[variant][f"{key}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-5, abs=1e-9)
    cell = json.loads(cells[0].read_text())
    assert cell["overrides"][-1] == "seed=0" and "method=opd" in cell["overrides"]
    assert len(cell["curves"]["rkl_estimate"]) == 2  # experiment=tiny trains 2 steps
    assert cell["seconds"]["train"] > 0 and cell["seconds"]["eval"] >= 0  # what the cell cost
    # The reference rows: the grid's teacher and untrained (layer-dropped) student, scored once on the suite.
    for role, model in (("teacher", "tiny-random"), ("student_init", "tiny-random[layers 0,3]")):
        ref = json.loads((root / "reference" / role / "cell.json").read_text())
        assert ref["reference"] and ref["model"] == model and ref["models"] == cell["models"]
        assert "method=opd" not in ref["overrides"] and "experiment=tiny" in ref["overrides"]
        assert float(table[role]["eval/average_mean"]) == pytest.approx(ref["metrics"]["eval/average"], rel=1e-5)
    assert list(table)[:2] == ["teacher", "student_init"]
    # The cells share one held-out set and one measurement of the untrained student: written once, then read.
    assert len(list((root / "reference" / "heldout").iterdir())) == 1
    starts = {json.loads(p.read_text())["metrics"]["heldout/start/rkl"] for p in cells}
    assert len(starts) == 1 and starts.pop() > 0


def test_a_rerun_skips_finished_cells(tiny_grid, tropd_in):
    _, cwd, root = tiny_grid
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/seed_*/cell.json")}
    teacher = root / "reference" / "teacher" / "cell.json"
    scored = teacher.stat().st_mtime_ns
    (root / "reference" / "student_init" / "cell.json").unlink()  # a reference row lost: only it is scored again
    proc = tropd_in(cwd, "ablate", "ablation=tiny", "seeds=[0,1]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("finished earlier, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/seed_*/cell.json")} == before
    assert teacher.stat().st_mtime_ns == scored and "reference student_init" in proc.stderr
    assert (root / "reference" / "student_init" / "cell.json").exists()


def test_gap_closed_on_the_cpu_lab_is_that_of_the_cells(tropd, tmp_path):
    """On the lab (a teacher far above its student) every cell gets a gap closed, from its own score."""
    proc = tropd(
        "ablate",
        "ablation=tiny",
        "ablation.base=[]",
        "experiment=lab",
        "seeds=[0,1]",
        "overrides=['steps=2']",
        "hydra.sweeper.params.variant=opd",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "outputs" / "ablate" / "tiny-lab"
    teacher, before = (
        json.loads((root / "reference" / role / "cell.json").read_text())["metrics"]["eval/average"]
        for role in ("teacher", "student_init")
    )
    assert teacher > before + 0.5  # the lab's teacher (92.5%) and student (21.8%)
    gaps = [
        (json.loads(p.read_text())["metrics"]["eval/average"] - before) / (teacher - before)
        for p in sorted(root.glob("opd/seed_*/cell.json"))
    ]
    table = {row["variant"]: row for row in csv.DictReader((root / "summary.csv").open())}
    assert list(table) == ["teacher", "student_init", "opd"] and len(gaps) == 2
    assert float(table["opd"]["gap_closed_mean"]) == pytest.approx(statistics.fmean(gaps), rel=1e-5, abs=1e-9)
    assert float(table["opd"]["gap_closed_std"]) == pytest.approx(statistics.stdev(gaps), rel=1e-5, abs=1e-9)
    assert "gap closed (%)" in (root / "summary.md").read_text()


def test_train_sweeps_get_a_summary_of_final_metrics(tropd, tmp_path):
    proc = tropd("train", "-m", "experiment=tiny", "method=opd,tropd", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list((tmp_path / "multirun" / "train").glob("*/*"))
    rows = {row["variant"]: row for row in csv.DictReader((sweep / "summary.csv").open())}
    assert set(rows) == {"experiment=tiny method=opd", "experiment=tiny method=tropd"}
    assert all(row["n_seeds"] == "2" for row in rows.values())
    assert "method=tropd" in (sweep / "summary.md").read_text()


def test_paper_claims_are_checked_on_the_summary_numbers():
    from tropd_cli.ablation import paper_claims

    accuracy = {"opd": 0.2, "clip_outlier": 0.3, "mask_outlier": 0.25, "fkl_outlier": 0.4, "tropd_fkl": 0.5}
    accuracy |= {"tropd_clip": 0.35, "tropd_mask": 0.2, "fkl_topk": 0.0}
    cells = [
        cell_record(v, 0, [{"grad_norm": 1.0 if v == "opd" else 0.5, "student_entropy": 1.0}], {"eval/average": a})
        for v, a in accuracy.items()
    ]
    claims = {claim: (held, numbers) for claim, held, numbers in paper_claims(summarize(cells))}
    order = claims["TrOPD >= FKL Outlier >= Clip/Mask Outlier >= OPD (accuracy)"]
    assert order[0] is True and "tropd_fkl 50.00 ± 0.00 vs fkl_outlier 40.00 ± 0.00" in order[1]
    assert claims["top-k FKL alone collapses (below OPD)"][0] is True
    assert claims["outlier handling lowers the gradient norm (vs OPD)"][0] is True
    assert claims["outlier handling keeps the student's entropy higher (vs OPD)"][0] is True  # ties count as held
    assert claims["off-policy guidance helps every outlier variant (accuracy)"][0] is False  # tropd_mask < mask_outlier
    partial = paper_claims(summarize(cells[:2]))
    assert all(held is None for _, held, _ in partial)


def test_experiment_on_the_ablate_command_line_is_every_cells_preset(tropd):
    proc = tropd("ablate", "ablation=threshold", "experiment=lab", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.train_experiment == "lab" and printed.ablation.name == "threshold"


def test_cells_run_in_parallel_through_the_joblib_launcher(tropd, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = tropd(
        "ablate", "ablation=tiny", "seeds=[3]", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "outputs" / "ablate" / "tiny"
    assert sorted(p.parent.parent.name for p in root.glob("*/seed_3/cell.json")) == ["opd", "tropd"]
    assert "| opd | 1 |" in (root / "summary.md").read_text()


def test_a_cell_records_the_held_out_signals_before_and_after():
    from tropd_cli.ablation import cell_record

    first = {
        "rkl_estimate": 1.0,
        **{f"heldout/start/{m}": 0.5 for m in ("rkl", "fkl", "outlier_share", "empty_rate", "response_len")},
    }
    last = {
        "rkl_estimate": 0.2,
        "heldout/prompts": 8,
        **{f"heldout/{m}": 0.1 for m in ("rkl", "fkl", "outlier_share", "empty_rate", "response_len")},
    }
    metrics = cell_record("opd", 0, [first, {"rkl_estimate": 0.5}, last])["metrics"]
    assert metrics["heldout/rkl"] == 0.1 and metrics["heldout/start/rkl"] == 0.5
    assert "heldout/prompts" not in metrics
    assert not any(k.startswith("heldout/") for k in cell_record("opd", 0, [{"rkl_estimate": 1.0}])["metrics"])
