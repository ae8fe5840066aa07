"""What the IFEval and IFBench checkers share: the checker registry, kwargs helpers, nltk's tokenizers
(with the English Punkt model shipped in the package) and text utilities."""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tropd_cli.errors import UserError

Checker = Callable[[str, Mapping[str, Any]], bool]
_CHECKERS: dict[str, Checker] = {}


def _checks(instruction_id: str) -> Callable[[Checker], Checker]:
    def register(fn: Checker) -> Checker:
        _CHECKERS[instruction_id] = fn
        return fn

    return register


# --- kwargs -----------------------------------------------------------------------------------------------------


def _arg(kw: Mapping[str, Any], name: str) -> Any:
    value = kw.get(name)
    if value is None:
        raise ValueError(f"instruction kwargs lack {name!r}")
    return value


def _int(kw: Mapping[str, Any], name: str) -> int:
    return int(_arg(kw, name))  # Parquet rows can carry ints as floats (3.0)


def _str(kw: Mapping[str, Any], name: str) -> str:
    return str(_arg(kw, name))


def _wordlist(text: str) -> list[str]:
    return text.split()


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_RELATIONS = ("less than", "at least")


def _compare(actual: int, threshold: int, relation: Any) -> bool:
    """IFEval's two relations: ``less than`` is ``<``, ``at least`` is ``>=``."""
    if relation == "less than":
        return actual < threshold
    if relation == "at least":
        return actual >= threshold
    raise ValueError(f"relation must be one of {_RELATIONS}, not {relation!r}")


def _pattern(text: str) -> str:
    """``text`` as a regex, as the references use keywords and markers; one that is not a valid pattern (which
    would crash them) is taken literally."""
    try:
        re.compile(text)
    except re.error:
        return re.escape(text)
    return text


# --- nltk's tokenizers, with the English Punkt model shipped in the package ------------------------------------

#: NLTK's ``punkt_tab/english`` model (the data ``nltk.download("punkt_tab")`` installs), shipped as package data:
#: see data/punkt_tab/README.md for its origin and licence.
PUNKT_DIR = Path(__file__).resolve().parents[2] / "data" / "punkt_tab" / "english"


@functools.cache
def _punkt() -> Any:
    """nltk's Punkt sentence tokenizer with the shipped model, read as nltk's ``load_punkt_params`` reads it."""
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as exc:
        raise UserError("instruction following needs nltk: pip install 'tropd[eval]'") from exc

    def lines(name: str) -> list[str]:
        return (PUNKT_DIR / name).read_text(encoding="utf-8").split("\n")[:-1]  # each line ends with "\n"

    params = PunktParameters()
    params.abbrev_types = set(lines("abbrev_types.txt"))
    params.sent_starters = set(lines("sent_starters.txt"))
    params.collocations = {tuple(line.split("\t")) for line in lines("collocations.tab")}
    params.ortho_context = defaultdict(
        int, {k: int(v) for k, v in (line.split("\t") for line in lines("ortho_context.tab"))}
    )
    return PunktSentenceTokenizer(params)


@functools.cache
def _treebank() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def _sentences(text: str) -> list[str]:
    """``nltk.sent_tokenize(text)`` (``language="english"``), with the shipped English model."""
    return list(_punkt().tokenize(text))


def _word_tokens(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: the sentences of :func:`_sentences`, each through nltk's Treebank tokenizer."""
    return [tok for sentence in _sentences(text) for tok in _treebank().tokenize(sentence)]


def _count_words(text: str) -> int:
    """The references' word count: ``nltk.tokenize.RegexpTokenizer(r"\\w+")``."""
    return len(re.findall(r"\w+", text))


# --- shared pieces ----------------------------------------------------------------------------------------------

_PUNCT = string.punctuation
_STRIP = string.punctuation + " "
_DROP_PUNCT = str.maketrans("", "", string.punctuation)


def _split_words(text: str) -> list[str]:
    """IFBench's ``_split_words``: lowercase, drop ASCII punctuation, split on whitespace."""
    return text.lower().translate(_DROP_PUNCT).split()


def _detect_language(text: str) -> str | None:
    """langdetect's language code, or None where it cannot tell (the references then count the instruction met)."""
    import langdetect
    from langdetect.lang_detect_exception import LangDetectException

    # langdetect samples at random; a fixed seed makes a response score the same on every run.
    langdetect.DetectorFactory.seed = 0
    try:
        return str(langdetect.detect(text))
    except LangDetectException:
        return None


def _ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


# Single code points that the ``emoji`` package (2.x) calls an emoji, as ranges of hex code points.
_EMOJI_RANGES = """A9 AE 203C 2049 2122 2139 2194-2199 21A9-21AA 231A-231B 2328 23CF 23E9-23F3 23F8-23FA 24C2 25AA-25AB
25B6 25C0 25FB-25FE 2600-2604 260E 2611 2614-2615 2618 261D 2620 2622-2623 2626 262A 262E-262F 2638-263A 2640 2642
2648-2653 265F-2660 2663 2665-2666 2668 267B 267E-267F 2692-2697 2699 269B-269C 26A0-26A1 26A7 26AA-26AB 26B0-26B1
26BD-26BE 26C4-26C5 26C8 26CE-26CF 26D1 26D3-26D4 26E9-26EA 26F0-26F5 26F7-26FA 26FD 2702 2705 2708-270D 270F 2712
2714 2716 271D 2721 2728 2733-2734 2744 2747 274C 274E 2753-2755 2757 2763-2764 2795-2797 27A1 27B0 27BF 2934-2935
2B05-2B07 2B1B-2B1C 2B50 2B55 3030 303D 3297 3299 1F004 1F0CF 1F170-1F171 1F17E-1F17F 1F18E 1F191-1F19A 1F201-1F202
1F21A 1F22F 1F232-1F23A 1F250-1F251 1F300-1F321 1F324-1F393 1F396-1F397 1F399-1F39B 1F39E-1F3F0 1F3F3-1F3F5
1F3F7-1F4FD 1F4FF-1F53D 1F549-1F54E 1F550-1F567 1F56F-1F570 1F573-1F57A 1F587 1F58A-1F58D 1F590 1F595-1F596
1F5A4-1F5A5 1F5A8 1F5B1-1F5B2 1F5BC 1F5C2-1F5C4 1F5D1-1F5D3 1F5DC-1F5DE 1F5E1 1F5E3 1F5E8 1F5EF 1F5F3 1F5FA-1F64F
1F680-1F6C5 1F6CB-1F6D2 1F6D5-1F6D9 1F6DC-1F6E5 1F6E9 1F6EB-1F6EC 1F6F0 1F6F3-1F6FC 1F7E0-1F7EB 1F7F0 1F90C-1F93A
1F93C-1F945 1F947-1F9FF 1FA70-1FA7C 1FA80-1FAC6 1FAC8 1FACC-1FADD 1FADF-1FAEB 1FAEF-1FAFA"""


def _code_points(ranges: str) -> frozenset[str]:
    chars: set[str] = set()
    for span in ranges.split():
        lo, _, hi = span.partition("-")
        chars.update(chr(code) for code in range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(chars)


_EMOJI = _code_points(_EMOJI_RANGES)
