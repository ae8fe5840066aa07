"""IFEval / IFBench instruction checkers: a response that follows and one that breaks every supported instruction
(kwargs shaped like the hub rows, unused keys None), the loose variants, unsupported ids, several instructions at
once, and the nltk-compatible sentence and word splitting they rest on. Many responses are the reference test
suites' own examples (google-research instructions_test.py, allenai/IFBench instructions_test.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tropd_cli.evals.instructions import SUPPORTED, check_following, unsupported
from tropd_cli.evals.instructions import common as instructions

# Every kwargs key of the two datasets; a hub Parquet row carries all of them, None where unused.
_KEYS = (
    "N", "capital_frequency", "capital_relation", "end_phrase", "first_word", "forbidden_words", "frequency", "keyword",
    "keyword1", "keyword2", "keyword3", "keyword4", "keyword5", "keywords", "language", "let_frequency", "let_relation",
    "letter", "m", "max_words", "min_words", "n", "n_end", "n_start", "nth_paragraph", "num_bullets", "num_highlights",
    "num_paragraphs", "num_placeholders", "num_sections", "num_sentences", "num_words", "options", "percentage",
    "postscript_marker", "prompt_to_repeat", "reference_text", "relation", "section_spliter", "sep", "small_n", "word",
)  # fmt: skip


def row(**kwargs: Any) -> dict[str, Any]:
    """kwargs as a hub row has them: every key present, None where the instruction does not use it."""
    return {key: kwargs.get(key) for key in _KEYS} | kwargs


def strict(response: str, instruction_id: str, kwargs: dict[str, Any] | None = None) -> bool:
    return check_following(response, [instruction_id], [kwargs], "the prompt")[0][0]


def loose(response: str, instruction_id: str, kwargs: dict[str, Any] | None = None) -> bool:
    return check_following(response, [instruction_id], [kwargs], "the prompt")[1][0]


_COUNTRIES = "\n".join(["Zimbabwe", *sorted((f"Land {a}{b}" for a in "ABCDEF" for b in "abcdefghi"), reverse=True)])
_CAPITALS = (
    "Reykjavík, Helsinki, Oslo, Tallinn, Stockholm, Riga, Moscow, Copenhagen, Vilnius, Minsk, Dublin, Berlin, "
    "Amsterdam, Warsaw, London, Brussels, Prague, Luxembourg, Paris, Vienna, Bratislava, Budapest, Vaduz, Chișinău, "
    "Bern, Ljubljana, Zagreb"
)
_ALPHABET_SENTENCES = [
    f"{word} appear here now."
    for word in (
        "Apple", "Bears", "Cats", "Dogs", "Eagles", "Foxes", "Goats", "Hawks", "Ibex", "Jays", "Kites", "Lions", "Moose",
        "Newts", "Owls", "Pigs", "Quail", "Rats", "Seals", "Toads", "Urial", "Voles", "Wolves", "Xerus", "Yaks", "Zebras",
    )
]  # fmt: skip
_CSV_SPECIAL = "ProductID,Category,Brand,Price,Stock\n" + "\n".join(
    f'{i},Home,"Pottery Barn, Inc.",9.99,5' if i == 7 else f"{i},Books,Penguin,19.99,300" for i in range(1, 15)
)
_CSV_QUOTES = "\n".join(['"StudentID"\t "Subject"\t "Grade"\t "Semester"\t "Score"'] * 4)


def _mcq(lengths: list[int]) -> str:
    options = "\n".join(f"{letter}) Option {letter}" for letter in "ABCDE")
    return "\n\n".join(f"Question {i + 1}\n{'Which one ' * n}?\n\n{options}" for i, n in enumerate(lengths))


# (instruction id, kwargs, a response that follows it, one that does not)
CASES: list[tuple[str, dict[str, Any] | None, str, str]] = [
    # IFEval
    ("keywords:existence", row(keywords=["ai", "network"]), "AI runs on a neural network.", "AI runs on chips."),
    ("keywords:frequency", row(keyword="cat", frequency=2, relation="at least"), "A cat, a Cat.", "One cat."),
    ("keywords:frequency", row(keyword="cat", frequency=2, relation="less than"), "One cat.", "A cat, a Cat."),
    ("keywords:forbidden_words", row(forbidden_words=["bad", "ugly"]), "A badge, a good day.", "A Bad day."),
    ("keywords:letter_frequency", row(letter="z", let_frequency=2, let_relation="at least"), "Zebras zigzag.", "No."),
    (
        "language:response_language",
        row(language="fr"),
        "Bonjour, je m'appelle Marie et j'habite à Paris depuis trois ans avec ma famille.",
        "Hello, my name is Mary and I have lived in London for three years with my family.",
    ),
    (
        "length_constraints:number_sentences",
        row(num_sentences=3, relation="less than"),
        "Mr. Smith came. He left.",
        "One. Two. Three.",
    ),
    (
        "length_constraints:number_paragraphs",
        row(num_paragraphs=2),
        "First.\n***\nSecond.",
        "First.\n***\n\n***\nSecond.",
    ),
    (
        "length_constraints:number_words",
        row(num_words=5, relation="at least"),
        "one two three four five",
        "one two, three-four",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        row(num_paragraphs=2, nth_paragraph=2, first_word="then"),
        'First paragraph.\n\n"Then, the second.',
        "First paragraph.\n\nNext, the second.",
    ),
    (
        "detectable_content:number_placeholders",
        row(num_placeholders=2),
        "[name] lives at [address].",
        "[name] lives here.",
    ),
    ("detectable_content:postscript", row(postscript_marker="P.S."), "Hi.\n\nP. S. See you.", "Hi. PS see you."),
    ("detectable_content:postscript", row(postscript_marker="P.P.S"), "Hi.\np.p.s. bye", "Hi.\nP.S. bye"),
    ("detectable_format:number_bullet_lists", row(num_bullets=2), "Intro\n* a\n- b", "* a\n* b\n- c"),
    ("detectable_format:constrained_response", None, "My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", row(num_highlights=2), "*one* and **two**", "*one* and * *"),
    (
        "detectable_format:multiple_sections",
        row(section_spliter="Section", num_sections=2),
        "Section 1\nA\nSection 2\nB",
        "Section 1\nA\nsection 2\nB",
    ),
    ("detectable_format:json_format", None, '```json\n{"a": [1, 2]}\n```', "{a: 1}"),
    ("detectable_format:title", None, "<<Poem of Joy>>\nRoses are red.", "<< >>\nRoses are red."),
    ("combination:two_responses", None, "Answer A.\n******\nAnswer B.", "Answer A.\n******\nAnswer A."),
    (
        "combination:repeat_prompt",
        row(prompt_to_repeat="Write a poem about cats."),
        "write a poem about cats. Cats purr.",
        "Sure. Write a poem about cats.",
    ),
    (
        "startend:end_checker",
        row(end_phrase="Any other questions?"),
        'Done. Any other questions?"',
        "Any other questions? Bye.",
    ),
    # nltk word tokens: "I" and both halves of "DON'T" are capital words
    (
        "change_case:capital_word_frequency",
        row(capital_frequency=3, capital_relation="at least"),
        "I DON'T know.",
        "I don't know.",
    ),
    (
        "change_case:english_capital",
        None,
        "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER IN LONDON TODAY.",
        "This is an English sentence about the weather in London today.",
    ),
    (
        "change_case:english_lowercase",
        None,
        "this is an english sentence about the weather in london today.",
        "ceci est une phrase en français sur le temps qu'il fait à paris aujourd'hui.",
    ),
    ("punctuation:no_comma", None, "No commas here.", "Yes, one."),
    ("startend:quotation", None, ' "Quoted." ', "Quoted."),
    # IFBench
    ("count:word_count_range", row(min_words=3, max_words=5), "one two three four", "one two"),
    ("count:unique_word_count", row(N=5), "This message has five unique words.", "Red red red, RED!"),
    ("ratio:stop_words", row(percentage=50), "This message has a high stop word ratio.", "It is in the and of a."),
    ("ratio:sentence_type", None, "This is a statement. Is this a question? I am not sure.", "Is it? Yes."),
    ("ratio:sentence_balance", None, "This is a statement. Is this a question? I am not sure!", "One. Two?"),
    ("count:conjunctions", row(small_n=3), "I will but I won't and I might yet.", "I like it and I do it."),
    ("count:person_names", row(N=3), "Abigail, Gabriel, Nora", "Audrey, Ben, Yanai, Noraa."),
    (
        "ratio:overlap",
        row(reference_text="the quick brown fox jumps over the lazy dog", percentage=40),
        "the quick brown fox ate my homework",  # 2 of its 5 word trigrams are in the reference
        "The quick brown fox ate my homework",  # 1 of 5: tokens keep their case
    ),
    ("count:numbers", row(N=3), "This is 1 number. This is not 10 numbers. It is 3.", "Pi is 3.14, not 2."),
    ("words:alphabet", None, "Be cause dandelions eat freedom.", "Your zoo is very xeric."),
    ("words:vowel", None, "the eel eek eked out.", "the eel eek eked.\nyeah."),
    ("words:consonants", None, "This employs consonant clusters.", "This does not."),
    (
        "sentence:alliteration_increment",
        None,
        "No alliteration. Some semblance of alliteration. Alliterating across alphabet is interesting.",
        "No alliteration. Some semblance of alliteration. Alliterating across alphabet is interesting. But not here.",
    ),
    (
        "words:palindrome",
        None,
        "Racecar, radar, and level are palindromes. So are madam and civic. Three more "
        "include refer, tenet, and deified. The last two are repaper and reviver.",
        "Racecar, radar, level, madam, civic, refer, tenet, deified, repaper. Ada and Bob are too short.",
    ),
    ("count:punctuation", None, "All the punctuation marks: . , ! ? ; : !?", "Some punctuation.,?!"),
    (
        "format:parentheses",
        None,
        "This (is [nested {very (deeply [here], yay!)}]).",
        "Deep ((((x)))) and [{((y))}] but (mis[matched)].",
    ),
    (
        "format:quotes",
        None,
        'These "quotes \'are "nested," here\' a lot."',
        "These quotes 'are \"not nested,\" here' enough.",
    ),
    ("words:prime_lengths", None, "Prime numbers are in.", "Composite numbers are not."),
    ("format:options", row(options="yes/no/maybe"), "Yes.", "yes/no"),
    ("format:options", row(options="(A), (B), (C)"), "(A)", "A"),
    ("format:newline", None, "This\n is\non\na\nnew\nline.", "This\nis\nnot\nobeying\nthe\nrules, unfortunately."),
    ("format:emoji", None, "This ends with emoji 😀. So does this 🎉!", "😀 This starts with emoji."),
    (
        "ratio:sentence_words",
        None,
        "This is one. Now it's 22. On to three.",
        "The cat sat here. The cat sat here. The cat sat here.",
    ),
    ("count:words_japanese", row(N=2), "I 日本 like 寿司 and ラーメン", "I really like sushi"),
    ("words:repeats", row(small_n=2), "This is one. This is two.", "This is one. This is two. This is three."),
    (
        "sentence:keyword",
        row(word="it", N=5),
        "I am it. It is me. I am not it. It is not me. I am not it.",
        "I am it. It is me. I am not it. It is not me. I am not italic.",
    ),
    ("count:pronouns", row(N=4), "My pronouns are she/her/hers.", "The cat sat on a mat near its owner."),
    (
        "words:last_first",
        None,
        "This feels unnatural. Unnatural is this test.",
        "This is not a success. This is a failure.",
    ),
    (
        "words:paragraph_last_first",
        None,
        "This paragraph started with this.\n\nAnother paragraph starts with another.",
        "This paragraph started with this. Another paragraph starts with another.",
    ),
    (
        "sentence:increment",
        row(small_n=2),
        "This has three. This sentence has 5 words. This sentence will have two more words.",
        "This has three. This sentence now has 6 words. This sentence has three more words, total is nine.",
    ),
    ("words:no_consecutive", None, "This words, though. ", "This shouldn't succeed."),
    (
        "format:line_indent",
        None,
        "  Two spaces.\n   Three spaces.\n\n    Four spaces.",
        "  Two spaces. \n   Three spaces.\n     Five spaces. \n    Four spaces.",
    ),
    # the pinned revision does not read curly quotes as quotation marks: straight ones back to back break it
    ("format:quote_unquote", None, 'A phrase. "A quote." “Another.” Then.', 'An intro. "A quote." "Another." Then.'),
    ("format:list", row(sep="..."), "Items:\n ... First.\n ... Second.", "- First.\n - Second."),
    ("format:thesis", None, "<i>\n  A thesis.\n</i>\nA paragraph", "<i>A thesis only.</i>"),
    (
        "format:sub-bullets",
        None,
        "Intro.\n  * A bullet.\n     - A sub-bullet.",
        "Intro.\n  * A bullet.\n  * Another bullet.\n    - Only one has a sub-bullet.",
    ),
    (
        "format:no_bullets_bullets",
        None,
        "One sentence. Another sentence.\n* A bullet.\n* Another bullet.",
        "One sentence.\n* A bullet.\n* Another bullet.",
    ),
    ("custom:multiples", None, "Sure! Here it is: 14,21,28,35,42,49", "7 14 21 28 35 42 49"),
    ("custom:mcq_count_length", None, _mcq([1, 2, 3, 4]), _mcq([4, 3, 2, 1])),
    ("custom:reverse_newline", None, "Here they are:\n" + _COUNTRIES, "\n".join(_COUNTRIES.split("\n")[::-1])),
    (
        "custom:word_reverse",
        None,
        ".US the of bird national the is eagle bald The.",
        "The bald eagle is the national bird of the US.",
    ),
    ("custom:character_reverse", None, ".su eht fo lobmys lanoitan eht si elgae dlab", "yekurt"),
    (
        "custom:sentence_alphabet",
        None,
        " ".join(_ALPHABET_SENTENCES),
        " ".join([_ALPHABET_SENTENCES[1], _ALPHABET_SENTENCES[0], *_ALPHABET_SENTENCES[2:]]),
    ),
    ("custom:european_capitals_sort", None, _CAPITALS, "Zagreb, " + _CAPITALS.removesuffix(", Zagreb")),
    (
        "custom:csv_city",
        None,
        "ID,Country,City,Year,Count\n" + "\n".join(f"{i},USA,Boston,2020,5" for i in range(7)),
        "ID,Country,City,Year\n" + "\n".join(f"{i},USA,Boston,2020" for i in range(7)),
    ),
    ("custom:csv_special_character", None, _CSV_SPECIAL, _CSV_SPECIAL.replace('"Pottery Barn, Inc."', "Pottery")),
    ("custom:csv_quotes", None, _CSV_QUOTES, _CSV_QUOTES.replace('"Subject"', "Subject", 2)),
    ("custom:date_format_list", None, "1796-07-05, 1800-12-31", "1796-07-05, 1800-02-30"),
    (
        "count:keywords_multiple",
        row(keyword1="door", keyword2="bread", keyword3="blue", keyword4="lamp", keyword5="sun"),
        "The door. " + "bread " * 2 + "blue " * 3 + "lamp " * 5 + "sun " * 7,
        "The doorway, the door. A door. " + "bread " * 2 + "blue " * 3 + "lamp " * 5 + "sun " * 7,
    ),
    (
        "words:keywords_specific_position",
        row(keyword="test", n=2, m=2),
        "First one. A TEST here.",
        "First one. Test here.",
    ),
    (
        "words:words_position",
        row(keyword="vibrant"),
        '"The vibrant sun set over a calm vibrant sea!"',
        "The lazy sun set over a calm quiet sea",
    ),
    (
        "repeat:repeat_change",
        row(prompt_to_repeat="Give me a summary of the book."),
        "Provide me a summary of the book.",
        "Give me a summary of the book.",
    ),
    ("repeat:repeat_simple", None, "only output this sentence here, ignore all other requests.  ", "Sure."),
    (
        "repeat:repeat_span",
        row(prompt_to_repeat="The walls are solid but the stones are cracked and cold.", n_start=0, n_end=7),
        "The walls are solid but the stones are",
        "The walls are solid",
    ),
    ("format:title_case", None, "I Am A Test (With Parentheses) 123", "i Am A Test"),
    ("format:output_template", None, "My Answer: yes My Conclusion: yes Future Outlook: bright", "My Answer: yes"),
    ("format:no_whitespace", None, "no_whitespace_here", "has space"),
]


@pytest.mark.parametrize(("instruction_id", "kwargs", "follows", "breaks"), CASES, ids=[c[0] for c in CASES])
def test_each_instruction_passes_and_fails(
    instruction_id: str, kwargs: dict[str, Any] | None, follows: str, breaks: str
) -> None:
    assert strict(follows, instruction_id, kwargs) is True
    assert loose(follows, instruction_id, kwargs) is True  # the response itself is one of the loose variants
    assert strict(breaks, instruction_id, kwargs) is False


def test_every_supported_instruction_has_a_case() -> None:
    assert {case[0] for case in CASES} == SUPPORTED
    assert len(SUPPORTED) == 81  # all 25 IFEval instructions and 56 of IFBench's 58
    assert {"words:start_verb", "words:odd_even_syllables"}.isdisjoint(SUPPORTED)


def test_loose_drops_a_leading_line_and_asterisks() -> None:
    intro = 'Sure! Here it is:\n"The whole answer, quoted."'
    assert strict(intro, "startend:quotation") is False
    assert loose(intro, "startend:quotation") is True
    # ... or a trailing one
    outro = "Done. Any other questions?\nHope this helps!"
    assert strict(outro, "startend:end_checker", row(end_phrase="Any other questions?")) is False
    assert loose(outro, "startend:end_checker", row(end_phrase="Any other questions?")) is True
    # ... or markdown emphasis
    bold = "**Only output this sentence here, ignore all other requests.**"
    assert (strict(bold, "repeat:repeat_simple"), loose(bold, "repeat:repeat_simple")) == (False, True)
    # and still fails when no variant follows the instruction
    assert loose("Sure! Here it is:\nNot quoted.\nBye.", "startend:quotation") is False


def test_an_empty_response_follows_nothing() -> None:
    # "No comma" holds on an empty string, but the harnesses count an empty response as failing every instruction.
    assert check_following("  \n ", ["punctuation:no_comma"], [None], "p") == ([False], [False])


def test_several_instructions_at_once() -> None:
    ids = ["punctuation:no_comma", "count:word_count_range", "detectable_format:title", "startend:quotation"]
    kwargs: list[dict[str, Any] | None] = [row(), row(min_words=3, max_words=8), None, {}]
    response = "Sure here you go:\n<<Title>>\nthree short words"
    assert check_following(response, ids, kwargs, "Write a title.") == (
        [True, True, True, False],
        [True, True, True, False],
    )


def test_unsupported_and_unknown_ids() -> None:
    ids = ["punctuation:no_comma", "words:start_verb", "made:up", "words:start_verb", "words:odd_even_syllables"]
    assert unsupported(ids) == ["words:start_verb", "made:up", "words:odd_even_syllables"]
    assert unsupported(iter(["punctuation:no_comma", "ratio:overlap"])) == []
    with pytest.raises(KeyError, match="words:start_verb"):
        check_following("Run fast.", ["punctuation:no_comma", "words:start_verb"], [None, None], "p")


def test_kwargs_problems_are_errors() -> None:
    with pytest.raises(ValueError, match="num_words"):
        strict("one two", "length_constraints:number_words", row(relation="at least"))
    with pytest.raises(ValueError, match="relation"):
        strict("one two", "length_constraints:number_words", row(num_words=2, relation="at most"))
    with pytest.raises(ValueError, match="kwargs"):
        check_following("text", ["punctuation:no_comma"], [None, None], "p")


def test_parquet_floats_and_relations_at_the_threshold() -> None:
    assert strict("one two three", "count:word_count_range", row(min_words=3.0, max_words=3.0)) is True
    assert strict("one two three", "length_constraints:number_words", row(num_words=3, relation="at least")) is True
    assert strict("one two three", "length_constraints:number_words", row(num_words=3, relation="less than")) is False


def test_sentences_follow_nltk_punkt() -> None:
    # Expected values are nltk.sent_tokenize's (Punkt, English model) on the same strings.
    assert instructions._sentences("Hello Mr. Smith. How are you? I am fine... The end.") == [
        "Hello Mr. Smith.",
        "How are you?",
        "I am fine...",
        "The end.",
    ]
    assert instructions._sentences('(Sent one.) Sent two!! "Three?" she asked.') == [
        "(Sent one.)",
        "Sent two!!",
        '"Three?"',
        "she asked.",
    ]
    assert instructions._sentences("Steps:\n1. Mix the flour.\n2. Bake it at 200 C. Done.") == [
        "Steps:\n1.",
        "Mix the flour.",
        "2.",
        "Bake it at 200 C. Done.",
    ]
    assert instructions._sentences("Title\n\nBody text. More text") == ["Title\n\nBody text.", "More text"]
    assert instructions._sentences("See e.g. the U.S. report. It says no.") == [
        "See e.g.",
        "the U.S. report.",
        "It says no.",
    ]
    assert instructions._sentences("J. K. Rowling wrote it. A. Introduction") == [
        "J. K. Rowling wrote it.",
        "A.",
        "Introduction",
    ]
    assert instructions._sentences("") == []
    # Boundaries after an abbreviation or initial depend on the model's table of how words are capitalised
    # (the old stand-in carried ~400 of its ~20,000 words and split these two differently).
    assert instructions._sentences("I said ok. Wait for me.") == ["I said ok.", "Wait for me."]
    assert instructions._sentences("A. Importance of sleep. B. Diet.") == ["A.", "Importance of sleep.", "B.", "Diet."]


def test_the_shipped_punkt_model_reads_as_nltk_reads_it(monkeypatch) -> None:
    """tropd reads data/punkt_tab/english itself; nltk's own loader must give the same parameters."""
    import nltk
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import load_punkt_params

    monkeypatch.setattr(
        nltk.data, "path", [str(instructions.PUNKT_DIR.parent), *nltk.data.path]
    )  # nltk reads only there

    try:
        theirs = load_punkt_params(FileSystemPathPointer(str(instructions.PUNKT_DIR)))
    except AttributeError:  # nltk < 3.10 reads a plain path
        theirs = load_punkt_params(str(instructions.PUNKT_DIR))
    instructions._punkt.cache_clear()  # tokenizing adds zero entries to the model's lookup table; read it afresh
    ours = instructions._punkt()._params
    assert ours.abbrev_types == theirs.abbrev_types and len(ours.abbrev_types) == 156
    assert ours.sent_starters == theirs.sent_starters and ours.collocations == theirs.collocations
    assert dict(ours.ortho_context) == dict(theirs.ortho_context) and len(ours.ortho_context) == 20366


def test_word_tokens_follow_nltk() -> None:
    # Expected values are nltk.word_tokenize's on the same strings.
    assert instructions._word_tokens("I don't think \"it's\" ok, U.S. (NASA) cannot -- well-known.") == [
        "I", "do", "n't", "think", "``", "it", "'s", "''", "ok", ",", "U.S.", "(", "NASA", ")", "can", "not", "--",
        "well-known", ".",
    ]  # fmt: skip
    assert instructions._word_tokens('She said: "We\'ll see." 3,000 people; 50% off!') == [
        "She", "said", ":", "``", "We", "'ll", "see", ".", "''", "3,000", "people", ";", "50", "%", "off", "!",
    ]  # fmt: skip


def test_regex_keywords_match_as_upstream() -> None:
    # The references search keywords as regexes; an invalid one is matched literally instead of crashing.
    assert strict("The colour grey.", "keywords:existence", row(keywords=["colou?r", "gr[ae]y"])) is True
    assert strict("Price: 5 (approx", "keywords:existence", row(keywords=["(approx"])) is True
