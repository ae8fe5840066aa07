"""IFBench parity with its upstream code at the pinned revision (tests/data/ifbench/README.md): every instruction
of IFBench's sample outputs, plus cases that tell the revisions apart, gets upstream's strict and loose verdict.
Source of truth: allenai/IFBench at commit 1d62c1d6."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tropd_cli.evals.instructions import check_following, unsupported

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "ifbench" / "upstream_verdicts.jsonl.gz"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_the_fixture_covers_the_samples_and_the_revision_markers(rows):
    samples = [r for r in rows if not str(r["key"]).startswith("syn")]
    assert len(samples) == 294 and len(rows) == 320
    ids = {i for r in rows for i in r["instruction_id_list"]}
    assert {"ratio:overlap", "repeat:repeat_span", "format:quote_unquote"} <= ids


def test_every_checked_instruction_agrees_with_upstream(rows):
    checked = 0
    for r in rows:
        if unsupported(r["instruction_id_list"]):
            assert all(str(v).startswith("error") for v in r["upstream_strict"]) or unsupported(
                r["instruction_id_list"]
            )
            continue
        strict, loose = check_following(r["response"], r["instruction_id_list"], r["kwargs"], r["prompt"])
        assert strict == r["upstream_strict"], (r["key"], r["instruction_id_list"])
        assert loose == r["upstream_loose"], (r["key"], r["instruction_id_list"])
        checked += len(strict)
    assert checked >= 300
