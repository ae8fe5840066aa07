"""Instruction-following checkers for IFEval (google/IFEval) and IFBench (allenai/IFBench_test).

Each checker re-implements one instruction of the reference code, with its comparison relations, splitting rules
and kwargs names: IFEval is google-research ``instruction_following_eval/instructions.py`` (all 25 ids), IFBench
is allenai/IFBench ``instructions.py`` pinned at commit 1d62c1d6dc4f6608938d22424c46edef6ce50671 (word indices,
end included, for ``repeat:repeat_span``; word trigrams for ``ratio:overlap``; the all-different-words check of
``ratio:sentence_words``; curly quotes not normalised in ``format:quote_unquote``). Where that revision raises
on an edge input (``sentence:increment``, ``custom:csv_quotes``), the instruction is not followed here.
tests/evals/test_instruction_parity.py holds the revision's verdicts on the IFBench sample outputs. Strict and loose
scores follow the two harnesses' ``evaluation_lib``: an empty (all-whitespace) response follows nothing, and
loose accepts an instruction when it holds on any of eight variants of the response (as is, without its first
line, without its last line, without both, and each of those with every ``*`` removed).

Sentences and words are nltk's, as in the references: ``nltk.sent_tokenize`` (Punkt with NLTK's English
``punkt_tab`` model, shipped in the package so nothing is downloaded) and ``nltk.word_tokenize``.

Not supported (left out of :data:`SUPPORTED`, so callers can refuse them): ``words:start_verb`` needs nltk's
part-of-speech tagger and ``words:odd_even_syllables`` needs syllapy's pronunciation dictionary.

Modules: ``common`` (the registry, kwargs helpers, tokenizers), ``ifeval`` and ``ifbench`` (one checker per
instruction id, registered on import); this module holds the public API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tropd_cli.evals.instructions import ifbench, ifeval  # noqa: F401  (each registers its checkers)
from tropd_cli.evals.instructions.common import _CHECKERS

__all__ = ["SUPPORTED", "check_following", "unsupported"]


SUPPORTED: frozenset[str] = frozenset(_CHECKERS)


def unsupported(instruction_ids: Iterable[str]) -> list[str]:
    """The ids this module cannot check, in order of first appearance, without duplicates."""
    return list(dict.fromkeys(i for i in instruction_ids if i not in _CHECKERS))


def _loose_variants(response: str) -> list[str]:
    """The harnesses' loose variants: as is, ``*`` removed, first/last/both lines dropped, and those with ``*``
    removed."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    variants = [response, response.replace("*", ""), without_first, without_last, without_both]
    return variants + [v.replace("*", "") for v in (without_first, without_last, without_both)]


def check_following(
    response: str,
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
    prompt: str,
) -> tuple[list[bool], list[bool]]:
    """Whether ``response`` follows each instruction: ``(strict, loose)``, one bool per instruction.

    ``kwargs`` holds one mapping (or None) per instruction, as in the datasets; None values are unused keys and
    are ignored. ``prompt`` is the row's prompt: the harnesses pass it only to instructions with a ``prompt``
    argument and none has one (repeat instructions read ``prompt_to_repeat`` from kwargs), so it is accepted for
    callers' convenience and not read. Raises KeyError naming the first id not in :data:`SUPPORTED`, and
    ValueError for kwargs an instruction needs but lacks.
    """
    del prompt
    if len(kwargs) != len(instruction_ids):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
    missing = unsupported(instruction_ids)
    if missing:
        raise KeyError(missing[0])
    variants = _loose_variants(response)
    strict: list[bool] = []
    loose: list[bool] = []
    for instruction_id, raw in zip(instruction_ids, kwargs, strict=True):
        checker = _CHECKERS[instruction_id]
        kw = {key: value for key, value in (raw or {}).items() if value is not None}
        strict.append(bool(response.strip()) and checker(response, kw))
        loose.append(any(variant.strip() and checker(variant, kw) for variant in variants))
    return strict, loose
