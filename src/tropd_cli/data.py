"""Prompts (and gold answers) from reasoning-gym generators, local files or hub datasets."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tropd_cli.config import DatasetConfig
from tropd_cli.errors import UserError, first_line
from tropd_cli.hub import hub_offline, hub_reachable


@dataclass
class Example:
    prompt: str
    answer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    uid: str = ""


def sft_target(example: Example, target_field: str | None) -> str | None:
    """What ``method=sft`` (``sft_source=dataset``) trains on: ``target_field`` of the example's row (or of the
    row's ``metadata``, where reasoning-gym keeps extras such as ``worked_sum``'s solution), else its answer."""
    if not target_field:
        return example.answer
    row = example.metadata
    extra = row.get("metadata")
    nested: dict[str, Any] = extra if isinstance(extra, dict) else {}
    value = row.get(target_field, nested.get(target_field))
    if value is None:
        raise UserError(f"dataset.target_field={target_field!r}: example {example.uid} has no such field")
    return str(value)


def reasoning_gym_examples(name: str, *, size: int, seed: int, kwargs: dict[str, Any]) -> tuple[list[Example], Any]:
    """Examples of a seeded reasoning-gym task; also returns the task object (it holds the scorer)."""
    import reasoning_gym  # lazy, like the task module below: reasoning-gym takes seconds to import

    from tropd_cli.worked_sum import register

    register()  # the real-LM lab's task is a reasoning-gym task too
    try:
        task = reasoning_gym.create_dataset(name, seed=seed, size=size, **dict(kwargs))
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        raise UserError(f"reasoning-gym task {name!r} could not be created: {exc}") from exc
    examples = [
        Example(prompt=e["question"], answer=str(e["answer"]), metadata=dict(e), uid=f"{name}/{i}")
        for i, e in enumerate(task)
    ]
    return examples, task


def read_jsonl(path: str, *, required: Sequence[str] = (), what: str = "row") -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` (or ``.jsonl.gz``) file, one per non-empty line.

    A malformed line, a line that is not an object, or one without a ``required`` field is a
    UserError naming ``path:line`` (``what`` names the kind of line in that message).
    """
    try:
        return _read_jsonl(path, required, what)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); pass a .jsonl file of UTF-8 JSON lines") from exc
    except (gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable gzip file ({first_line(exc)})") from exc


def _read_jsonl(path: str, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg}); fix or remove that line") from exc
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            missing = [name for name in required if name not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: a {what} needs the field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def read_records(path: str, split: str = "train", *, option: str = "dataset.path") -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, read through ``datasets``.

    ``option`` is the config key that set ``path``, named in the error when the file is missing.
    """
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path} (set {option} to an existing .jsonl or .parquet file)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl" and not read_jsonl(path):  # a file:line message before datasets' cryptic one
        raise UserError(f"{path} has no rows; point to a non-empty dataset")
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
    if builder is None:
        raise UserError(f"unsupported data file {path}: use .jsonl, .json, .parquet or .csv")
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files={split: path}, split=split)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise UserError(f"could not read {path}: {first_line(exc)}") from exc
    return [dict(r) for r in ds]


def hub_records(
    name: str, split: str, subset: str | None = None, *, local_option: str = "dataset.source=file dataset.path=FILE"
) -> list[dict[str, Any]]:
    """Rows of a hub dataset; ``local_option`` is the override that points to a local file instead (named
    in the error when the hub cannot be reached)."""
    import datasets

    if not hub_offline() and not hub_reachable():
        raise UserError(
            f"dataset {name!r} needs the Hugging Face hub, which cannot be reached; pass a local file with "
            f"{local_option} (or set HF_HUB_OFFLINE=1 to use a cached copy)"
        )
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:
        raise UserError(
            f"could not load dataset {name!r} (split {split!r}) from the hub: {first_line(exc)}; "
            f"offline, pass a local file with {local_option}"
        ) from exc
    return [dict(r) for r in ds]


def records_to_examples(
    rows: list[dict[str, Any]], *, prompt_field: str, answer_field: str | None, origin: str, limit: int | None = None
) -> list[Example]:
    if not rows:
        raise UserError(f"{origin} has no rows; point to a non-empty dataset")
    if prompt_field not in rows[0]:
        raise UserError(
            f"{origin} has no field {prompt_field!r}; available fields: {', '.join(rows[0])} "
            f"(set prompt_field to one of them)"
        )
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        answer = row.get(answer_field) if answer_field else None
        prompt = row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(
                f"{origin}: row {i} has {'no text' if isinstance(prompt, str) else type(prompt).__name__} in its "
                f"{prompt_field!r} field; every prompt must be a non-empty string (fix or remove that row)"
            )
        out.append(
            Example(
                prompt=prompt,
                answer=None if answer is None else str(answer),
                metadata=row,
                uid=str(row.get("id", row.get("problem_id", f"{origin}/{i}"))),
            )
        )
    return out


def load_examples(
    *,
    source: str,
    name: str | None,
    path: str | None,
    split: str,
    subset: str | None = None,
    prompt_field: str,
    answer_field: str | None,
    size: int,
    seed: int,
    generator_kwargs: dict[str, Any],
) -> list[Example]:
    """The examples a dataset or eval-task config names (shared by ``train`` and ``eval``)."""
    if source in ("reasoning_gym", "hub") and not name:
        raise UserError(f"source={source} needs a name (a reasoning-gym task or a hub dataset id)")
    if source == "reasoning_gym":
        assert name is not None
        return reasoning_gym_examples(name, size=size, seed=seed, kwargs=generator_kwargs)[0]
    if source == "file":
        if not path:
            raise UserError("source=file needs a path (e.g. dataset.path=data/prompts.jsonl)")
        rows = read_records(path, split)
        origin = path
    elif source == "hub":
        assert name is not None
        rows = hub_records(name, split, subset)
        origin = name
    else:
        raise UserError(f"unknown data source {source!r}; choose reasoning_gym, file or hub")
    return records_to_examples(
        rows, prompt_field=prompt_field, answer_field=answer_field, origin=origin, limit=size or None
    )


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    system_prompt: str | None = None,
    suffix: str = "",
    chat_template: bool = True,
) -> str:
    """The prompt string the model sees: chat template applied when the tokenizer has one."""
    text = text + suffix
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": text})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert isinstance(rendered, str)
        return rendered
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def dataset_prompts(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], cfg: DatasetConfig) -> list[str]:
    """The prompt strings a ``dataset`` config's settings (system prompt, suffix, chat template) make of
    ``examples``: what training rollouts and the held-out set both ask."""
    return [
        format_prompt(
            tokenizer,
            ex.prompt,
            system_prompt=cfg.system_prompt,
            suffix=cfg.prompt_suffix,
            chat_template=cfg.chat_template,
        )
        for ex in examples
    ]


def examples_from_config(cfg: DatasetConfig) -> list[Example]:
    """The training prompts a ``dataset`` config names."""
    return load_examples(
        source=cfg.source,
        name=cfg.name,
        path=cfg.path,
        split=cfg.split,
        subset=cfg.subset,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        size=cfg.size,
        seed=cfg.seed,
        generator_kwargs=cfg.generator_kwargs,
    )
