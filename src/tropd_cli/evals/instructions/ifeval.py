"""IFEval's 25 instructions (google-research ``instruction_following_eval/instructions.py``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from tropd_cli.evals.instructions.common import (
    _arg,
    _checks,
    _compare,
    _count_words,
    _detect_language,
    _int,
    _pattern,
    _sentences,
    _str,
    _word_tokens,
)


@_checks("keywords:existence")
def _keywords_existence(value: str, kw: Mapping[str, Any]) -> bool:
    """Every keyword occurs (case-insensitive)."""
    return all(re.search(_pattern(keyword), value, flags=re.IGNORECASE) for keyword in _arg(kw, "keywords"))


@_checks("keywords:frequency")
def _keywords_frequency(value: str, kw: Mapping[str, Any]) -> bool:
    """The keyword occurs ``relation`` ``frequency`` times (case-insensitive, substrings count)."""
    count = len(re.findall(_pattern(_str(kw, "keyword").strip()), value, flags=re.IGNORECASE))
    return _compare(count, _int(kw, "frequency"), kw.get("relation"))


@_checks("keywords:forbidden_words")
def _forbidden_words(value: str, kw: Mapping[str, Any]) -> bool:
    """No forbidden word occurs as a whole word (case-insensitive)."""
    words = set(_arg(kw, "forbidden_words"))
    return not any(re.search(r"\b" + _pattern(word) + r"\b", value, flags=re.IGNORECASE) for word in words)


@_checks("keywords:letter_frequency")
def _letter_frequency(value: str, kw: Mapping[str, Any]) -> bool:
    """The letter occurs ``let_relation`` ``let_frequency`` times (case-insensitive)."""
    letter = _str(kw, "letter")
    if len(letter) != 1:
        raise ValueError(f"letter must be one character, not {letter!r}")
    return _compare(value.lower().count(letter.lower()), _int(kw, "let_frequency"), kw.get("let_relation"))


@_checks("language:response_language")
def _response_language(value: str, kw: Mapping[str, Any]) -> bool:
    """langdetect finds the ``language`` code (or cannot tell)."""
    detected = _detect_language(value)
    return detected is None or detected == _str(kw, "language")


@_checks("length_constraints:number_sentences")
def _number_sentences(value: str, kw: Mapping[str, Any]) -> bool:
    """The response has ``relation`` ``num_sentences`` sentences (Punkt)."""
    return _compare(len(_sentences(value)), _int(kw, "num_sentences"), kw.get("relation"))


@_checks("length_constraints:number_paragraphs")
def _number_paragraphs(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by ``***``, none of them empty."""
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == _int(kw, "num_paragraphs")


@_checks("length_constraints:number_words")
def _number_words(value: str, kw: Mapping[str, Any]) -> bool:
    """The response has ``relation`` ``num_words`` words (``\\w+`` runs)."""
    return _compare(_count_words(value), _int(kw, "num_words"), kw.get("relation"))


@_checks("length_constraints:nth_paragraph_first_word")
def _nth_paragraph_first_word(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``num_paragraphs`` paragraphs split by blank lines; paragraph ``nth_paragraph`` starts with
    ``first_word`` (case-insensitive, leading quotes and trailing punctuation ignored)."""
    num_paragraphs, nth = _int(kw, "num_paragraphs"), _int(kw, "nth_paragraph")
    if not 0 < nth <= num_paragraphs:
        raise ValueError(f"nth_paragraph {nth} is not within 1..{num_paragraphs}")
    paragraphs = re.split(r"\n\n", value)
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth > count:
        return False
    # Upstream indexes the raw split, empty pieces included, while counting only the non-empty ones.
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first_word = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        first_word += letter.lower()
    return count == num_paragraphs and first_word == _str(kw, "first_word").lower()


@_checks("detectable_content:number_placeholders")
def _number_placeholders(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``num_placeholders`` ``[...]`` placeholders."""
    return len(re.findall(r"\[.*?\]", value)) >= _int(kw, "num_placeholders")


@_checks("detectable_content:postscript")
def _postscript(value: str, kw: Mapping[str, Any]) -> bool:
    """The postscript marker occurs (case-insensitive, anywhere: the pattern is not anchored to a line start;
    ``P.S.`` and ``P.P.S`` allow a space after each period)."""
    marker = _str(kw, "postscript_marker").strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + _pattern(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


@_checks("detectable_format:number_bullet_lists")
def _number_bullet_lists(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``num_bullets`` lines are ``*`` or ``-`` bullets."""
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == _int(kw, "num_bullets")


@_checks("detectable_format:constrained_response")
def _constrained_response(value: str, kw: Mapping[str, Any]) -> bool:
    """The response contains "My answer is yes.", "My answer is no." or "My answer is maybe."."""
    value = value.strip()
    return any(option in value for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


@_checks("detectable_format:number_highlighted_sections")
def _number_highlighted_sections(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``num_highlights`` non-empty ``*highlighted*`` (or ``**bold**``) spans within a line."""
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip())
    count += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h.removeprefix("**").removesuffix("**").strip())
    return count >= _int(kw, "num_highlights")


@_checks("detectable_format:multiple_sections")
def _multiple_sections(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``num_sections`` section markers ``<section_spliter> <number>``."""
    spliter = _str(kw, "section_spliter").strip()
    sections = re.split(r"\s?" + _pattern(spliter) + r"\s?\d+\s?", value)
    return len(sections) - 1 >= _int(kw, "num_sections")


@_checks("detectable_format:json_format")
def _json_format(value: str, kw: Mapping[str, Any]) -> bool:
    """The whole response (markdown fence allowed) parses as JSON."""
    value = (
        value.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


@_checks("detectable_format:title")
def _title(value: str, kw: Mapping[str, Any]) -> bool:
    """A non-empty title in double angular brackets, ``<<like this>>``, on one line."""
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", value))


@_checks("combination:two_responses")
def _two_responses(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly two different non-empty responses separated by ``******``."""
    responses = value.split("******")
    valid = []
    for index, response in enumerate(responses):
        if not response.strip():
            if index not in (0, len(responses) - 1):
                return False
        else:
            valid.append(response)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


@_checks("combination:repeat_prompt")
def _repeat_prompt(value: str, kw: Mapping[str, Any]) -> bool:
    """The response starts with ``prompt_to_repeat`` (case-insensitive, surrounding whitespace ignored)."""
    return value.strip().lower().startswith(_str(kw, "prompt_to_repeat").strip().lower())


@_checks("startend:end_checker")
def _end_checker(value: str, kw: Mapping[str, Any]) -> bool:
    """The response ends with ``end_phrase`` (case-insensitive, surrounding whitespace and quotes ignored)."""
    return value.strip().strip('"').lower().endswith(_str(kw, "end_phrase").strip().lower())


@_checks("change_case:capital_word_frequency")
def _capital_word_frequency(value: str, kw: Mapping[str, Any]) -> bool:
    """``capital_relation`` ``capital_frequency`` all-capital tokens (nltk word tokens, so ``I`` counts)."""
    count = sum(1 for token in _word_tokens(value) if token.isupper())
    return _compare(count, _int(kw, "capital_frequency"), kw.get("capital_relation"))


def _english_in_one_case(value: str, in_case: Callable[[str], bool]) -> bool:
    """Every cased character passes ``in_case`` and langdetect finds English (or cannot tell)."""
    if not in_case(value):
        return False
    detected = _detect_language(value)
    return detected is None or detected == "en"


@_checks("change_case:english_capital")
def _english_capital(value: str, kw: Mapping[str, Any]) -> bool:
    """All cased characters are uppercase, in English."""
    return _english_in_one_case(value, str.isupper)


@_checks("change_case:english_lowercase")
def _english_lowercase(value: str, kw: Mapping[str, Any]) -> bool:
    """All cased characters are lowercase, in English."""
    return _english_in_one_case(value, str.islower)


@_checks("punctuation:no_comma")
def _no_comma(value: str, kw: Mapping[str, Any]) -> bool:
    """No comma anywhere."""
    return "," not in value


@_checks("startend:quotation")
def _quotation(value: str, kw: Mapping[str, Any]) -> bool:
    """The stripped response starts and ends with a double quote."""
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'
