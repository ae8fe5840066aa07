"""The real-LM lab: SmolLM2-135M-Instruct taught worked arithmetic, distilled into a layer-dropped copy of itself.

``experiment=smol_lab`` runs on SmolLM2's real tokenizer (49,152 tokens) and chat template, offline:

- **teacher** ``smol-lab-teacher``: SmolLM2-135M-Instruct (30 layers) with a LoRA adapter trained by
  ``tropd train method=sft`` on worked solutions of :mod:`tropd_cli.worked_sum` problems (train split).
- **student** ``smol-lab-student``: that teacher cut to 12 of its 30 layers (the compression use case; the
  cut alone writes no arithmetic), then given a short LoRA SFT on other worked solutions of the train split,
  so that it writes the format but gets most sums wrong: a student that starts clearly below its teacher.
- **task**: worked chain sums, 3-4 terms of 1-2 digits, about 30-40 response tokens. Training prompts come
  from the ``train`` split, every eval suite draws from the ``eval`` split: disjoint by construction.

Both adapters ship inside the package (``lab_models/smol/{teacher,student}_adapter``, bf16, a few MB); the
first use merges them into the cached SmolLM2 weights (seconds) and caches the results. Rebuild them
(deterministic for a given CPU kind; the teacher takes about 30 minutes on 2 cores, the student a few)::

    python -m tropd_cli.smol_lab             # both: tropd train experiment=smol_lab_teacher, then _student
    python -m tropd_cli.smol_lab student     # the student only (from the shipped teacher)

Each is the same run as ``tropd train experiment=smol_lab_<role>`` followed by copying its
``checkpoint/adapter`` (in bf16) to ``src/tropd_cli/lab_models/smol/<role>_adapter``.
"""

from __future__ import annotations

from tropd_cli.commands.smol_lab import main

if __name__ == "__main__":
    main()
