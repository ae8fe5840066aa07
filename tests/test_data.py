"""Prompt sources (local files, reasoning-gym, hub) and the tokenizer compatibility check."""

from __future__ import annotations

import json

import pytest

from tropd_cli.data import format_prompt, load_examples
from tropd_cli.errors import UserError
from tropd_cli.models import char_tokenizer, check_tokenizers


def _load(**kwargs):
    args = dict(
        source="file",
        name=None,
        path=None,
        split="train",
        prompt_field="prompt",
        answer_field="answer",
        size=0,
        seed=0,
        generator_kwargs={},
    )
    args.update(kwargs)
    return load_examples(**args)


def test_jsonl_file_gives_prompts_and_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"What is {i}+1?", "answer": i + 1}) for i in range(5)) + "\n")
    examples = _load(path=str(path))
    assert [e.prompt for e in examples] == [f"What is {i}+1?" for i in range(5)]
    assert [e.answer for e in examples] == [str(i + 1) for i in range(5)]
    assert len(_load(path=str(path), size=2)) == 2


def test_parquet_file_and_custom_fields(tmp_path):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"question": ["a?", "b?"], "solution": ["1", "2"]}).to_parquet(str(path))
    examples = _load(path=str(path), prompt_field="question", answer_field="solution")
    assert [(e.prompt, e.answer) for e in examples] == [("a?", "1"), ("b?", "2")]


def test_malformed_jsonl_line_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        _load(path=str(path))


def test_missing_prompt_field_lists_the_available_fields(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match=r"no field 'prompt'; available fields: question, answer"):
        _load(path=str(path))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        _load(path=str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError):
        _load(path=str(empty))


def test_reasoning_gym_is_seeded_and_unknown_task_is_a_user_error():
    kwargs = dict(source="reasoning_gym", name="chain_sum", size=4, seed=7, generator_kwargs={"min_terms": 2})
    first, again = _load(**kwargs), _load(**kwargs)
    assert [e.prompt for e in first] == [e.prompt for e in again] and all(e.answer for e in first)
    with pytest.raises(UserError, match="no_such_task"):
        _load(source="reasoning_gym", name="no_such_task", size=2)


def test_hub_dataset_offline_is_a_user_error_naming_the_fix(monkeypatch):
    """Without a reachable hub (this machine) the error comes at once, not after a minute of retries."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="dataset.source=file dataset.path=FILE"):
        _load(source="hub", name="someorg/some-dataset-that-is-not-cached", split="train")


def test_chat_template_is_applied_when_the_tokenizer_has_one():
    tok = char_tokenizer()
    text = format_prompt(tok, "2+2?", system_prompt="Be brief.", suffix=" Answer:")
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2? Answer:<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(tok, "2+2?", chat_template=False) == "2+2?"


def test_tokenizer_mismatch_is_refused_with_a_clear_message():
    teacher = char_tokenizer()
    check_tokenizers(teacher, char_tokenizer())  # same vocabulary: fine
    other = char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="tokenizers differ"):
        check_tokenizers(teacher, other)
