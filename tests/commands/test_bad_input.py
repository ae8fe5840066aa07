"""Bad input is one line and exit 2, never a traceback or a silent surprise (issue 15, items 9 and 10)."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from test_cli import assert_one_line_error
from tropd_cli.commands.evaluate import read_generations, suites_for_rescoring
from tropd_cli.data import read_jsonl, records_to_examples
from tropd_cli.errors import UserError
from tropd_cli.train.loop import train
from tropd_cli.validate import validate_train


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("seed", 10**20, "seed=100000000000000000000 must be in [0, 2**63)"),
        ("seed", -1, "seed=-1 must be in"),
        ("threads", -1, "threads=-1 must be at least 1"),
        ("device", "tpu", "device='tpu': tropd runs on auto, cpu, cuda or cuda:N"),
        ("teacher_device", "cuda:x", "teacher_device='cuda:x'"),
    ],
)
def test_bad_top_level_settings(make_config, key, value, needle):
    cfg = make_config(steps=1)
    setattr(cfg, key, value)
    with pytest.raises(UserError) as err:
        validate_train(cfg)
    assert needle in str(err.value)


def test_bad_section_settings(make_config):
    cfg = make_config(steps=1)
    cfg.dataset.max_prompt_tokens = 0
    with pytest.raises(UserError, match="dataset.max_prompt_tokens=0 must be >= 1"):
        validate_train(cfg)
    cfg = make_config(steps=1)
    cfg.rollout.scoring_temperature = -1.0
    with pytest.raises(UserError, match="rollout.scoring_temperature=-1.0 must be > 0"):
        validate_train(cfg)


def test_device_typos_are_one_line_on_the_command_line(tropd):
    assert_one_line_error(tropd("train", "experiment=tiny", "device=tpu"), "device='tpu'")
    assert_one_line_error(tropd("eval", "experiment=tiny", "models=[teacher]", "device=tpu"), "device='tpu'")


@pytest.mark.parametrize("prompt", [None, ["a", "list"], 7, "   "])
def test_every_prompt_must_be_text(prompt):
    rows = [{"prompt": "fine"}, {"prompt": prompt}]
    with pytest.raises(UserError, match=r"data.jsonl: row 1 has .* 'prompt' field; every prompt must be a non-empty"):
        records_to_examples(rows, prompt_field="prompt", answer_field=None, origin="data.jsonl")


def test_binary_and_non_utf8_files_are_one_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_jsonl(str(latin))
    fake_gz = tmp_path / "data.jsonl.gz"
    fake_gz.write_bytes(b"\x00\x01binary, not gzip")
    with pytest.raises(UserError, match="not a readable gzip file"):
        read_jsonl(str(fake_gz))
    with gzip.open(tmp_path / "ok.jsonl.gz", "wt") as fh:
        fh.write('{"prompt": "x"}\n')
    assert read_jsonl(str(tmp_path / "ok.jsonl.gz")) == [{"prompt": "x"}]


def generations(tmp_path, *lines):
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


LINE = {"suite": "s", "task": "t", "problem_id": "p1", "completion": "42"}


@pytest.mark.parametrize(
    ("idx", "needle"), [("1", "sample_idx='1'"), (None, "sample_idx=None"), (1.5, "1.5"), (-1, "-1")]
)
def test_generations_need_integer_sample_indices(tmp_path, idx, needle):
    with pytest.raises(UserError, match="it must be an integer >= 0") as err:
        read_generations(generations(tmp_path, {**LINE, "sample_idx": idx}))
    assert needle in str(err.value)


def test_duplicate_generations_are_refused_not_collapsed(tmp_path):
    path = generations(tmp_path, {**LINE, "sample_idx": 0}, {**LINE, "sample_idx": 1}, {**LINE, "sample_idx": 0})
    with pytest.raises(UserError, match="generations 1 and 3 are both sample 0 of problem 'p1'"):
        read_generations(path)
    assert len(read_generations(generations(tmp_path, {**LINE, "sample_idx": 0}, {**LINE, "sample_idx": 1}))) == 2


def test_a_corrupt_results_file_beside_generations_is_one_line(tmp_path):
    path = generations(tmp_path, LINE)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="results.json .* is not a results file"):
        suites_for_rescoring(path, {})


def test_an_empty_variants_override_does_not_run_the_whole_grid(tropd):
    proc = tropd("ablate", "ablation=tiny", "ablation.variants={}")
    assert_one_line_error(proc, "does not empty the grid", "hydra.sweeper.params.variant")


def test_sequences_beyond_the_models_positions_are_warned_about(make_config, tmp_path, caplog):
    cfg = make_config(steps=1)
    cfg.dataset.max_prompt_tokens, cfg.rollout.max_new_tokens = 2040, 16  # the tiny model has 2048 positions
    with caplog.at_level(logging.WARNING):
        train(cfg, output_dir=tmp_path)
    assert "beyond the student's 2048 positions" in caplog.text


def test_eval_that_cannot_write_its_outputs_still_shows_its_scores(tropd, tmp_path):
    """A full disk (here: results.json taken by a directory) is one line and a non-zero exit, after the table."""
    run = tmp_path / "evalrun"
    (run / "results.json").mkdir(parents=True)
    proc = tropd("eval", "experiment=tiny", "models=[teacher]", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: could not write the results to") and "(results.json: Is a directory)" in last
    assert "not saved" in last and "average" in proc.stdout


def test_run_files_that_cannot_be_written_are_one_line(tmp_path):
    from tropd_cli.loggers import ConfigFile, MetricsFile

    with pytest.raises(UserError, match="could not write .*config.yaml"):
        ConfigFile(tmp_path / "missing" / "config.yaml", "x: 1\n").on_start({})
    with pytest.raises(UserError, match="could not write .*metrics.jsonl.*the lines before are kept"):
        MetricsFile(tmp_path / "missing" / "metrics.jsonl").on_step(0, {"loss": 1.0})
