"""Reasoning blocks in completions: which tags open and close them, and what part of a completion is graded.

Reasoning models (DeepSeek-R1 distills, Qwen3, ...) write ``<think>...</think>`` before they answer. With an
eval suite's ``reasoning: strip`` (the default) only what follows the last closed block is graded; a block
that never closes (the completion was cut by ``max_new_tokens`` inside its reasoning) gave no answer: it
scores 0 and is counted as ``truncated_reasoning``. ``reasoning: keep`` grades the raw completion.

Some chat templates open the block themselves (DeepSeek-R1's newer template ends the prompt with
``<think>\\n``): the completion then holds only the closing tag, or no tag at all when it was cut; the
prompt's ending tells which (:func:`opened_by_prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Reasoning-block tags models are known to write: (open, close).
KNOWN_TAGS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),  # DeepSeek-R1 and its distills, Qwen3, QwQ, Phi-4-reasoning, ...
    ("<thinking>", "</thinking>"),
    ("<reasoning>", "</reasoning>"),
    ("<seed:think>", "</seed:think>"),  # Seed-OSS
    ("<|begin_of_thought|>", "<|end_of_thought|>"),  # OpenThinker / Bespoke-Stratos
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),  # Kimi
)
DEFAULT_TAGS: tuple[tuple[str, str], ...] = (KNOWN_TAGS[0],)
REASONING_MODES = ("strip", "keep")


def template_tags(chat_template: str | None) -> list[tuple[str, str]]:
    """The reasoning tags a chat template declares: every known pair whose closing tag the template names."""
    if not chat_template:
        return []
    return [pair for pair in KNOWN_TAGS if pair[1] in chat_template]


def tags_for(chat_template: str | None = None, extra: Sequence[Sequence[str]] = ()) -> tuple[tuple[str, str], ...]:
    """``<think>``/``</think>``, the pairs ``chat_template`` declares and ``extra`` pairs, without repeats."""
    pairs: list[tuple[str, str]] = []
    for pair in [*DEFAULT_TAGS, *template_tags(chat_template), *(tuple(p) for p in extra)]:
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"a reasoning tag pair is [open, close], got {list(pair)}")
        if pair not in pairs:
            pairs.append((str(pair[0]), str(pair[1])))
    return tuple(pairs)


def opened_by_prompt(prompt: str, tags: Sequence[tuple[str, str]]) -> bool:
    """The (chat-formatted) prompt ends inside a reasoning block its template opened."""
    end = prompt.rstrip()
    return any(end.endswith(open_tag) for open_tag, _ in tags)


def graded_text(completion: str, tags: Sequence[tuple[str, str]], *, opened: bool = False) -> str | None:
    """What of ``completion`` is graded: the text after the last closed reasoning block (leading blank space
    removed), the whole completion when it has no block, or None when a block is left open (no answer).

    ``opened``: the prompt already opened a block, so the completion starts inside one.
    """
    end = -1
    for _, close_tag in tags:
        i = completion.rfind(close_tag)
        if i >= 0:
            end = max(end, i + len(close_tag))
    if end >= 0:
        rest = completion[end:]
        if any(open_tag in rest for open_tag, _ in tags):  # a new block started after the last one closed
            return None
        return rest.lstrip()
    if opened or any(open_tag in completion for open_tag, _ in tags):
        return None
    return completion
