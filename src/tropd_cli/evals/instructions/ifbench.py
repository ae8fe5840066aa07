"""IFBench's instructions (allenai/IFBench ``instructions.py`` at commit 1d62c1d6dc4f6608938d22424c46edef6ce50671)."""

from __future__ import annotations

import csv
import io
import re
import string
from collections import Counter
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from tropd_cli.evals.instructions.common import (
    _DROP_PUNCT,
    _EMOJI,
    _PUNCT,
    _STRIP,
    _arg,
    _ascii_fold,
    _checks,
    _count_words,
    _int,
    _sentences,
    _split_words,
    _str,
    _word_tokens,
    _wordlist,
    _wordset,
)


@_checks("count:word_count_range")
def _word_count_range(value: str, kw: Mapping[str, Any]) -> bool:
    """Between ``min_words`` and ``max_words`` words, both included."""
    return _int(kw, "min_words") <= _count_words(value) <= _int(kw, "max_words")


@_checks("count:unique_word_count")
def _unique_word_count(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``N`` distinct lowercased whitespace words, punctuation stripped from their ends."""
    return len({word.strip(_STRIP) for word in value.lower().split()}) >= _int(kw, "N")


# nltk's English stop words; the ones with an apostrophe never equal a \w+ token, so they are left out.
_STOP_WORDS = _wordset(
    """a about above after again against ain all am an and any are aren as at be because been before being below
    between both but by can couldn d did didn do does doesn doing don down during each few for from further had hadn
    has hasn have haven having he her here hers herself him himself his how i if in into is isn it its itself just
    ll m ma me mightn more most mustn my myself needn no nor not now o of off on once only or other our ours
    ourselves out over own re s same shan she should shouldn so some such t than that the their theirs them
    themselves then there these they this those through to too under until up ve very was wasn we were weren what
    when where which while who whom why will with won wouldn y you your yours yourself yourselves"""
)


@_checks("ratio:stop_words")
def _stop_words(value: str, kw: Mapping[str, Any]) -> bool:
    """Stop words are at most ``percentage`` % of the ``\\w+`` words (an empty response fails)."""
    words = re.findall(r"\w+", value)
    if not words:
        return False
    stop = sum(1 for word in words if word.lower() in _STOP_WORDS)
    return stop / len(words) * 100 <= float(_arg(kw, "percentage"))


@_checks("ratio:sentence_type")
def _sentence_type(value: str, kw: Mapping[str, Any]) -> bool:
    """Sentences ending in ``.`` are exactly twice those ending in ``?``."""
    sentences = _sentences(value)
    return sum(s.endswith(".") for s in sentences) == 2 * sum(s.endswith("?") for s in sentences)


@_checks("ratio:sentence_balance")
def _sentence_balance(value: str, kw: Mapping[str, Any]) -> bool:
    """As many sentences end in ``.`` as in ``?`` as in ``!``."""
    sentences = _sentences(value)
    return (
        sum(s.endswith(".") for s in sentences)
        == sum(s.endswith("?") for s in sentences)
        == sum(s.endswith("!") for s in sentences)
    )


@_checks("count:conjunctions")
def _conjunctions(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``small_n`` different coordinating conjunctions.

    Upstream collects the words as written, so ``and``, ``And`` and ``and,`` count as three different ones."""
    fanboys = {"and", "but", "for", "nor", "or", "so", "yet"}
    found = {word for word in value.split() if word.strip(_STRIP).lower() in fanboys}
    return len(found) >= _int(kw, "small_n")


_PERSON_NAMES = _wordlist(
    """Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander Amelia Benjamin
    Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel Ella Jacob Scarlett Nathan Victoria
    Elijah Layla Nicholas Audrey David Hannah Christopher Penelope Thomas Nora Andrew Aria Joseph Claire Ryan Stella
    Jonathan"""
)


@_checks("count:person_names")
def _person_names(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``N`` different names from IFBench's list of 50 occur as whole words (case-sensitive)."""
    found = sum(1 for name in _PERSON_NAMES if re.search(r"\b" + re.escape(name) + r"\b", value))
    return found >= _int(kw, "N")


@_checks("ratio:overlap")
def _overlap(value: str, kw: Mapping[str, Any]) -> bool:
    """The share of the response's distinct word trigrams found in ``reference_text`` is ``percentage`` +-2 %."""

    def trigrams(text: str) -> set[tuple[str, ...]]:
        tokens = _word_tokens(text)
        return set(zip(tokens, tokens[1:], tokens[2:], strict=False))

    ngrams = trigrams(value)
    if not ngrams:
        return False
    overlap = len(ngrams & trigrams(_str(kw, "reference_text"))) / len(ngrams) * 100
    percentage = float(_arg(kw, "percentage"))
    return percentage - 2 <= overlap <= percentage + 2


@_checks("count:numbers")
def _numbers(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``N`` digit runs once punctuation is removed (``3.14`` and ``100,000`` are one number each)."""
    return len(re.findall(r"\d+", value.translate(_DROP_PUNCT))) == _int(kw, "N")


@_checks("words:alphabet")
def _alphabet(value: str, kw: Mapping[str, Any]) -> bool:
    """Each word starts with the letter after the previous word's, ``z`` wrapping to ``a``."""
    words = value.translate(_DROP_PUNCT).strip(_STRIP).split()
    if not words:
        return False
    letter = words[0][0].lower()
    if letter not in string.ascii_lowercase:
        return False
    for word in words[1:]:
        word = word.strip(_STRIP).lower()
        if not word:
            continue
        letter = string.ascii_lowercase[(string.ascii_lowercase.index(letter) + 1) % 26]
        if word[0] != letter:
            return False
    return True


@_checks("words:vowel")
def _vowel(value: str, kw: Mapping[str, Any]) -> bool:
    """One line of text using at most three of the vowels a, e, i, o, u."""
    paragraphs = value.strip().split("\n")
    return len(paragraphs) == 1 and len(set(paragraphs[0].lower()) & set("aeiou")) <= 3


@_checks("words:consonants")
def _consonants(value: str, kw: Mapping[str, Any]) -> bool:
    """Every whitespace word has two consonants in a row."""
    consonants = set("bcdfghjklmnpqrstvwxyz")
    return all(
        any(a in consonants and b in consonants for a, b in pairwise(word)) for word in value.lower().strip().split()
    )


@_checks("sentence:alliteration_increment")
def _alliteration_increment(value: str, kw: Mapping[str, Any]) -> bool:
    """Each sentence has more alliterating words (consecutive words sharing a first letter) than the one before."""
    previous = -1
    for sentence in _sentences(value):
        words = [w.lstrip(_STRIP) for w in sentence.lower().split()]
        words = [w for w in words if w]
        count = 0
        in_run = False
        for a, b in pairwise(words):
            if a[0] == b[0]:
                count += 1 if in_run else 2
                in_run = True
            else:
                in_run = False
        if count <= previous:
            return False
        previous = count
    return True


@_checks("words:palindrome")
def _palindrome(value: str, kw: Mapping[str, Any]) -> bool:
    """At least 10 palindromic words of 5 or more characters (repeats count)."""
    words = value.translate(_DROP_PUNCT).lower().split()
    return sum(1 for word in words if word == word[::-1] and len(word) >= 5) >= 10


@_checks("count:punctuation")
def _punctuation(value: str, kw: Mapping[str, Any]) -> bool:
    """An interrobang (``?!``, ``!?`` or ``‽``) plus each of ``. , ! ? ; :`` outside the first interrobang."""
    if not ("!?" in value or "?!" in value or "‽" in value):
        return False
    rest = value.replace("?!", "", 1)
    if len(rest) == len(value):
        rest = value.replace("!?", "", 1)
    return {".", ",", "!", "?", ";", ":"} <= set(rest)


@_checks("format:parentheses")
def _parentheses(value: str, kw: Mapping[str, Any]) -> bool:
    """Some correctly closed group of ``()``, ``[]`` and ``{}`` nests at least 5 deep (a mismatch starts over)."""
    levels: list[str] = []
    max_depth = 0
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in value:
        if char in "([{":
            levels.append(char)
            max_depth = max(max_depth, len(levels))
        elif char in pairs:
            if levels and levels[-1] == pairs[char]:
                levels.pop()
                if max_depth >= 5 and len(levels) < max_depth:
                    return True
            else:
                levels = []
                max_depth = 0
    return False


@_checks("format:quotes")
def _quotes(value: str, kw: Mapping[str, Any]) -> bool:
    """Quotes nest at least 3 deep, alternating between ``"`` and ``'``."""
    levels: list[str] = []
    reached = depth = 0
    for char in value:
        if levels and char == levels[-1]:
            levels.pop()
            depth -= 1
            if reached - depth >= 3:
                return True
        elif char in "\"'":
            levels.append(char)
            depth += 1
            reached = max(reached, depth)
    return False


_PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97}


@_checks("words:prime_lengths")
def _prime_lengths(value: str, kw: Mapping[str, Any]) -> bool:
    """Every word, punctuation removed, has a prime number of characters."""
    return all(len(word) in _PRIMES for word in value.translate(_DROP_PUNCT).split())


@_checks("format:options")
def _options(value: str, kw: Mapping[str, Any]) -> bool:
    """The response is one of ``options`` (split on ``/``, else ``or``, else ``,``): exactly for lettered options
    like "(A), (B), (C)", otherwise ignoring case and surrounding punctuation."""
    options = _str(kw, "options")
    separator = "/" if "/" in options else "or" if "or" in options else ","
    choices = [option.strip() for option in options.split(separator)]
    if re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", options):
        return value in choices
    answer = value.strip(_STRIP).lower()
    return any(choice.strip(_STRIP).lower() == answer for choice in choices)


@_checks("format:newline")
def _newline(value: str, kw: Mapping[str, Any]) -> bool:
    """One word per line: as many non-empty lines as words, once punctuation is removed."""
    value = value.translate(_DROP_PUNCT).strip()
    return len([line for line in value.split("\n") if line != ""]) == len(value.split())


@_checks("format:emoji")
def _emoji(value: str, kw: Mapping[str, Any]) -> bool:
    """Every sentence ends with an emoji (in its last two characters once punctuation is removed), or the next
    sentence starts with one (Punkt can put a trailing emoji at the start of the next sentence)."""
    sentences = [s.translate(_DROP_PUNCT).strip() for s in _sentences(value)]
    for i, stripped in enumerate(sentences):
        if not stripped:
            return False
        if stripped[-1] in _EMOJI or (len(stripped) > 1 and stripped[-2] in _EMOJI):
            continue
        if i + 1 == len(sentences) or not sentences[i + 1] or sentences[i + 1][0] not in _EMOJI:
            return False
    return True


@_checks("ratio:sentence_words")
def _sentence_words(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly three sentences of equal length (in characters), no word used twice."""
    sentences = _sentences(value)
    if len(sentences) != 3 or len({len(s.strip()) for s in sentences}) != 1:
        return False
    words = _split_words(" ".join(sentences))
    return len(words) == len(set(words))


@_checks("count:words_japanese")
def _words_japanese(value: str, kw: Mapping[str, Any]) -> bool:
    """Every ``N``-th whitespace word (numbers and bare punctuation exempt) contains kana or kanji."""
    n = _int(kw, "N")
    for i, word in enumerate(value.split()):
        word = word.strip(_STRIP)
        if (i + 1) % n == 0 and word and not word.isdigit() and not re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", word):
            return False
    return True


@_checks("words:repeats")
def _repeats(value: str, kw: Mapping[str, Any]) -> bool:
    """No word (lowercased, punctuation removed) occurs more than ``small_n`` times."""
    limit = _int(kw, "small_n")
    return all(count <= limit for count in Counter(_split_words(value)).values())


@_checks("sentence:keyword")
def _sentence_keyword(value: str, kw: Mapping[str, Any]) -> bool:
    """Sentence ``N`` contains ``word`` as a whole word (case-insensitive)."""
    sentences = _sentences(value)
    n = _int(kw, "N")
    if len(sentences) < n:
        return False
    return bool(re.search(r"\b" + re.escape(_str(kw, "word")) + r"\b", sentences[n - 1], re.IGNORECASE))


_PRONOUNS = _wordset(
    """i me we us you he him she her it they them my mine our ours your yours his hers its their theirs myself
    ourselves yourself yourselves himself herself itself themselves this that these those who whom whose which what
    whoever whomever whatever whichever anybody anyone anything everybody everyone everything nobody nothing
    somebody someone something each either neither both all some any none"""
)


@_checks("count:pronouns")
def _pronouns(value: str, kw: Mapping[str, Any]) -> bool:
    """At least ``N`` pronoun tokens (nltk word tokens of the lowercased text, ``/`` read as a space)."""
    tokens = _word_tokens(value.replace("/", " ").lower())
    return sum(1 for token in tokens if token in _PRONOUNS) >= _int(kw, "N")


@_checks("words:last_first")
def _last_first(value: str, kw: Mapping[str, Any]) -> bool:
    """Each sentence starts with the word the previous one ended with (case-insensitive)."""
    sentences = _sentences(value)
    for current, following in pairwise(sentences):
        last = current.rstrip(_STRIP).split()
        first = following.lstrip(_STRIP).split()
        if not last or not first or last[-1].lower() != first[0].lower():
            return False
    return True


@_checks("words:paragraph_last_first")
def _paragraph_last_first(value: str, kw: Mapping[str, Any]) -> bool:
    """Each non-empty line starts and ends with the same word (case-insensitive)."""
    for paragraph in value.split("\n"):
        words = paragraph.strip().lower().strip(_STRIP).split()
        if words and words[0] != words[-1]:
            return False
    return True


@_checks("sentence:increment")
def _sentence_increment(value: str, kw: Mapping[str, Any]) -> bool:
    """Each sentence has exactly ``small_n`` more words than the one before (punctuation removed)."""
    counts = [len(s.translate(_DROP_PUNCT).split()) for s in _sentences(value)]
    if not counts:
        return False  # upstream raises IndexError here
    step = _int(kw, "small_n")
    return all(b == a + step for a, b in pairwise(counts))


@_checks("words:no_consecutive")
def _no_consecutive(value: str, kw: Mapping[str, Any]) -> bool:
    """No two consecutive words (lowercased, punctuation removed) share their first letter."""
    words = _split_words(value)
    return all(a[0] != b[0] for a, b in pairwise(words))


@_checks("format:line_indent")
def _line_indent(value: str, kw: Mapping[str, Any]) -> bool:
    """Each line is indented by more spaces than the one before (blank lines skipped)."""
    lines = value.split("\n")
    # Upstream removes blank lines from the list it is iterating over, so the line after each removed one is not
    # looked at (of two blank lines in a row one stays); this walk does the same, so scores match.
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            lines.remove(lines[i])
        i += 1
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    return all(b > a for a, b in pairwise(indents))


@_checks("format:quote_unquote")
def _quote_unquote(value: str, kw: Mapping[str, Any]) -> bool:
    """No two quotations back to back and the response does not end with one: every quote is followed by an
    explanation."""
    # As the pinned revision: its replace of curly quotes by straight ones is a no-op (the curly characters were lost
    # in an edit), so “ and ” are not quotation marks here (older revisions replaced them).
    value = value.replace("'\"'", "")
    value = "".join(value.split())
    if '""' in value:
        return False
    stripped = value.strip(string.digits + _PUNCT.replace('"', ""))
    return not (stripped and stripped[-1] == '"')


@_checks("format:list")
def _list(value: str, kw: Mapping[str, Any]) -> bool:
    """The custom bullet marker ``sep`` occurs at least twice."""
    return len(re.findall(re.escape(_str(kw, "sep")), value)) >= 2


@_checks("format:thesis")
def _thesis(value: str, kw: Mapping[str, Any]) -> bool:
    """Some non-empty ``<i>``/``<em>`` span is followed by more text."""
    index = value.find("<i>")
    if index == -1:
        index = value.find("<em>")
        if index == -1:
            return False
    value = value[index:]
    end = value.find("</i>")
    if end == -1:
        end = value.find("</em>")
        if end == -1:
            return False
    # Upstream's offsets are those of <i> and </i>, also for <em> (so "m>" counts as thesis text).
    return bool(value[3:end].strip()) and bool(value[end + 4 :].strip())


@_checks("format:sub-bullets")
def _sub_bullets(value: str, kw: Mapping[str, Any]) -> bool:
    """Every ``*`` is followed by a ``-`` before the next ``*``."""
    return all("-" in bullet for bullet in value.split("*")[1:])


@_checks("format:no_bullets_bullets")
def _no_bullets_bullets(value: str, kw: Mapping[str, Any]) -> bool:
    """At least two sentences, then at least two ``*`` bullet lines and nothing else after them."""
    in_sentences: Any = True
    sentences = bullets = 0
    for line in value.split("\n"):
        if line.strip().startswith("*"):
            in_sentences = False
            if sentences < 2:
                return False
            bullets += 1
        elif in_sentences:
            # Upstream reuses its flag for the sentence list, so a blank line before the bullets ends the text part.
            in_sentences = _sentences(line.strip())
            sentences += len(in_sentences)
        else:
            return False
    return bullets >= 2


@_checks("custom:multiples")
def _multiples(value: str, kw: Mapping[str, Any]) -> bool:
    """The numbers in the response are exactly 14, 21, 28, 35, 42, 49."""
    return re.findall(r"\d+", value.replace(",", ", ")) == [str(i) for i in range(14, 51, 7)]


@_checks("custom:mcq_count_length")
def _mcq_count_length(value: str, kw: Mapping[str, Any]) -> bool:
    """Starts with "Question"; four "Question N" blocks with five A-E options each, each question longer than the
    one before."""
    if not value.startswith("Question"):
        return False
    questions = re.split(r"\n*(?:Question \d+[\.|\):;]?\s*)", value)
    if questions[0] == "":
        questions = questions[1:]
    questions = [q.strip() for q in questions if q.strip()]
    if len(questions) != 4:
        return False
    lengths = []
    for question in questions:
        text = ""
        options = 0
        in_options = False
        for line in question.split("\n"):
            if re.match(r"^[A-Ea-e][\.|\)]\s*\w+", line.strip()):
                options += 1
                in_options = True
            elif not in_options:
                text += " " + line.strip()
        if options != 5:
            return False
        lengths.append(len(text.strip()))
    return all(a < b for a, b in pairwise(lengths))


@_checks("custom:reverse_newline")
def _reverse_newline(value: str, kw: Mapping[str, Any]) -> bool:
    """From the first line naming Zimbabwe on, at least 52 non-empty lines in reverse alphabetical order."""
    lines = [line.strip(_STRIP) for line in value.split("\n") if line.strip(_STRIP)]
    start = next((i for i, line in enumerate(lines) if "Zimbabwe" in line), None)
    if start is None or len(lines) - start < 52:
        return False
    folded = [_ascii_fold(line) for line in lines[start:]]
    return folded == sorted(folded, reverse=True)


@_checks("custom:word_reverse")
def _word_reverse(value: str, kw: Mapping[str, Any]) -> bool:
    """Read backwards word by word, the response says "bald eagle"."""
    words = value.lower().strip().translate(_DROP_PUNCT).split()
    reversed_text = " ".join(words[::-1])
    return "bald eagle" in reversed_text and reversed_text in _sentences(reversed_text)


@_checks("custom:character_reverse")
def _character_reverse(value: str, kw: Mapping[str, Any]) -> bool:
    """Contains "bald eagle" spelled backwards (case-insensitive)."""
    return "elgae dlab" in value.lower()


@_checks("custom:sentence_alphabet")
def _sentence_alphabet(value: str, kw: Mapping[str, Any]) -> bool:
    """26 sentences whose first letters (leading punctuation skipped) run a to z."""
    sentences = _sentences(value)
    if len(sentences) != 26:
        return False
    for i, sentence in enumerate(sentences):
        stripped = sentence.lstrip(_PUNCT + string.whitespace)
        if not stripped or stripped[0].lower() != chr(ord("a") + i):
            return False
    return True


_CAPITALS_BY_LATITUDE = _wordlist(
    """Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk Dublin Berlin Amsterdam Warsaw
    London Brussels Prague Luxembourg Paris Vienna Bratislava Budapest Vaduz Chisinau Bern Ljubljana Zagreb"""
)


@_checks("custom:european_capitals_sort")
def _european_capitals_sort(value: str, kw: Mapping[str, Any]) -> bool:
    """Exactly the 27 European capitals north of 45 degrees, comma-separated, north to south (accents ignored)."""
    capitals = [capital.strip() for capital in _ascii_fold(value).split(",") if capital.strip()]
    return capitals == _CAPITALS_BY_LATITUDE


@_checks("custom:csv_city")
def _csv_city(value: str, kw: Mapping[str, Any]) -> bool:
    """CSV with header ID,Country,City,Year,Count and 7 rows of 5 fields."""
    rows = list(csv.reader(io.StringIO(value)))
    return (
        len(rows) == 8
        and rows[0] == ["ID", "Country", "City", "Year", "Count"]
        and all(len(row) == 5 for row in rows[1:])
    )


@_checks("custom:csv_special_character")
def _csv_special_character(value: str, kw: Mapping[str, Any]) -> bool:
    """CSV with header ProductID,Category,Brand,Price,Stock and 14 rows; some row, with every row before it of 5
    fields, has a double-quoted field holding a special character."""
    header = value.split("\n")[0].strip()
    if not re.match(
        r'^(ProductID|"ProductID"),[ \t]*(Category|"Category"),[ \t]*(Brand|"Brand"),[ \t]*(Price|"Price"),'
        r'[ \t]*(Stock|"Stock")$',
        header,
    ):
        return False
    # Tripling the quotes makes the csv module keep them in the fields, where the regex below looks for them.
    rows = list(csv.reader(io.StringIO(value.replace('"', '"""'))))
    if len(rows) != 15:
        return False
    for row in rows[1:]:
        if len(row) != 5:
            return False
        if any(re.match(r'".*[^\d\w\s].*"', field) for field in row):
            return True
    return False


@_checks("custom:csv_quotes")
def _csv_quotes(value: str, kw: Mapping[str, Any]) -> bool:
    """Tab-separated, header StudentID/Subject/Grade/Semester/Score, 3 rows, every field in double quotes."""
    header = value.split("\n")[0].strip()
    if not re.match(
        r'^(StudentID|"StudentID")\t *(Subject|"Subject")\t *(Grade|"Grade")\t *(Semester|"Semester")\t *'
        r'(Score|"Score")$',
        header,
    ):
        return False
    rows = list(csv.reader(io.StringIO(value.replace('"', '"""')), delimiter="\t"))
    if len(rows) != 4:
        return False
    for row in rows:
        if len(row) != 5:
            return False
        fields = [field.strip() for field in row]
        if not all(field and field[0] == '"' and field[-1] == '"' for field in fields):
            return False  # an empty field fails here; upstream raises IndexError
    return True


@_checks("custom:date_format_list")
def _date_format_list(value: str, kw: Mapping[str, Any]) -> bool:
    """Comma-separated YYYY-MM-DD dates between 1769 and 1821, with plausible months and days."""
    for date in value.strip().split(","):
        date = date.strip()
        if not re.match(r"^\d{4}-\d{2}-\d{2}$", date):
            return False
        year, month, day = (int(part) for part in date.split("-"))
        if not 1769 <= year <= 1821 or month > 12:
            return False
        if (
            (month in (1, 3, 5, 7, 8, 10, 12) and day > 31)
            or (month in (4, 6, 9, 11) and day > 30)
            or (month == 2 and day > 29)
        ):
            return False
    return True


@_checks("count:keywords_multiple")
def _keywords_multiple(value: str, kw: Mapping[str, Any]) -> bool:
    """``keyword1``..``keyword5`` occur as whole words exactly 1, 2, 3, 5 and 7 times (case-insensitive)."""
    for name, count in (("keyword1", 1), ("keyword2", 2), ("keyword3", 3), ("keyword4", 5), ("keyword5", 7)):
        pattern = r"\b" + re.escape(_str(kw, name).strip()) + r"\b"
        if len(re.findall(pattern, value, flags=re.IGNORECASE)) != count:
            return False
    return True


def _word_tokens_without_punctuation(text: str) -> list[str]:
    return [token for token in _word_tokens(text) if any(ch.isalnum() for ch in token)]


@_checks("words:keywords_specific_position")
def _keywords_specific_position(value: str, kw: Mapping[str, Any]) -> bool:
    """Word ``m`` of sentence ``n`` (nltk word tokens, punctuation skipped) is ``keyword`` (case-insensitive)."""
    n, m = _int(kw, "n"), _int(kw, "m")
    sentences = _sentences(value)
    if len(sentences) < n:
        return False
    words = _word_tokens_without_punctuation(sentences[n - 1])
    return len(words) >= m and words[m - 1].lower() == _str(kw, "keyword").strip().lower()


@_checks("words:words_position")
def _words_position(value: str, kw: Mapping[str, Any]) -> bool:
    """The second and the second-to-last words (punctuation skipped) are both ``keyword`` (case-insensitive)."""
    words = _word_tokens_without_punctuation(value)
    keyword = _str(kw, "keyword").strip().lower()
    return len(words) >= 2 and words[1].lower() == words[-2].lower() == keyword


@_checks("repeat:repeat_change")
def _repeat_change(value: str, kw: Mapping[str, Any]) -> bool:
    """The response is ``prompt_to_repeat`` with a different first word (whitespace words compared)."""
    prompt = _str(kw, "prompt_to_repeat")
    return prompt != value and prompt.split()[1:] == value.split()[1:]


@_checks("repeat:repeat_simple")
def _repeat_simple(value: str, kw: Mapping[str, Any]) -> bool:
    """The response is the instruction sentence itself (case-insensitive)."""
    return value.strip().lower() == "only output this sentence here, ignore all other requests."


@_checks("repeat:repeat_span")
def _repeat_span(value: str, kw: Mapping[str, Any]) -> bool:
    """The response is words ``n_start``..``n_end`` (0-based, inclusive, whitespace-split) of ``prompt_to_repeat``
    (case-insensitive)."""
    words = _str(kw, "prompt_to_repeat").split()
    span = " ".join(words[_int(kw, "n_start") : _int(kw, "n_end") + 1])
    return value.strip().lower() == span.strip().lower()


@_checks("format:title_case")
def _title_case(value: str, kw: Mapping[str, Any]) -> bool:
    """No word token (nltk) is all lowercase, lowercase-then-uppercase, or a lone lowercase letter."""
    for word in _word_tokens(value):
        if not word[0].isalpha():
            continue
        if len(word) == 1:
            if word.islower():
                return False
        elif word[0].islower() and (word[1:].isupper() or word[1:].islower()):
            return False
    return True


@_checks("format:output_template")
def _output_template(value: str, kw: Mapping[str, Any]) -> bool:
    """Contains "My Answer:", "My Conclusion:" and "Future Outlook:"."""
    return all(part in value for part in ("My Answer:", "My Conclusion:", "Future Outlook:"))


@_checks("format:no_whitespace")
def _no_whitespace(value: str, kw: Mapping[str, Any]) -> bool:
    """No whitespace character at all."""
    return not any(char.isspace() for char in value)
