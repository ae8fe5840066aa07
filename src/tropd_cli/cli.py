"""The ``tropd`` dispatcher: ``tropd train|eval|ablate|plan [hydra overrides...]``.

Each subcommand is its own ``@hydra.main`` app, so ``-m``, ``--cfg job``, ``--help``, sweepers and
launchers work unchanged. This module only picks the app and turns bad input into one line + exit 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from tropd_cli import __version__
from tropd_cli.errors import TRACE_ENV, UserError, first_line

SUBCOMMANDS = {
    "train": ("tropd_cli.commands.train", "distill a teacher into a student (TrOPD, OPD, SFT, ...)"),
    "eval": ("tropd_cli.commands.evaluate", "score models on math and code suites"),
    "evaluate": ("tropd_cli.commands.evaluate", "alias of eval"),
    "ablate": ("tropd_cli.commands.ablate", "run an ablation grid with seeds and summarise it"),
    "plan": ("tropd_cli.commands.plan", "per-GPU memory plan and step-time estimate of a train config"),
}

USAGE = """usage: tropd <command> [hydra overrides ...]

Trust Region On-Policy Distillation for LLMs.

commands:
{commands}

examples:
  tropd train                              # SmolLM2-135M -> 16-layer student with TrOPD
  tropd train +outlier=mask                # another outlier strategy (clip | mask | fkl)
  tropd train -m trust_region.tau=-1,0,1   # a sweep over trust-region thresholds
  tropd eval                               # the last trained student next to its teacher
  tropd train --cfg job                    # print the composed config and exit
  tropd plan experiment=paper/ds_r1_1p5b_from_skywork_math7b world_size=8 gpu=h100   # GPU memory plan

options:
  -h, --help       show this message (`tropd <command> --help` shows the command's config groups)
  -V, --version    print the version
"""


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name.ljust(width)}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def _one_line(exc: BaseException) -> str:
    """A compact message from a Hydra/OmegaConf error: its first line plus its cause's first line."""
    parts = []
    for err in (exc, exc.__cause__):
        if err is None:
            continue
        first = first_line(err).rstrip(".")
        if first and first not in parts:
            parts.append(first)
    return ": ".join(parts)


def _hint(message: str, command: str) -> str:
    if "is not in struct" in message or "No match in the defaults list" in message or "Key '" in message:
        return f" (see `tropd {command} --cfg job` for valid keys, docs/configs.md for groups)"
    return ""


def _ranked(command: str, rest: list[str]) -> list[str]:
    """Under torchrun (WORLD_SIZE > 1) only rank 0 keeps Hydra's run directory and logs; the other ranks
    get a private scratch one and learn rank 0's directory from it once the process group is up."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world <= 1:
        return rest
    if command != "train":
        sys.stderr.write(f"error: `tropd {command}` runs in one process; launch only `tropd train` with torchrun\n")
        sys.exit(2)
    if any(a in ("-m", "--multirun") for a in rest):
        sys.stderr.write("error: -m sweeps launch their own jobs; run them without torchrun (see docs/cluster.md)\n")
        sys.exit(2)
    if rank == 0:
        return rest
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"tropd-rank{rank}-")
    return [*rest, f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled"]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    if args[0] in ("-V", "--version"):
        print(f"tropd {__version__}")
        sys.exit(0)
    command = args[0]
    if command not in SUBCOMMANDS:
        sys.stderr.write(f"error: unknown command {command!r}; choose one of: train, eval, ablate, plan\n")
        sys.exit(2)

    # We report errors ourselves: one line and exit 2 for bad input, a full trace for bugs.
    user_wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[TRACE_ENV] = "1" if user_wants_trace else "0"
    module = importlib.import_module(SUBCOMMANDS[command][0])
    rest = args[1:]
    if command == "ablate" and any(
        a.replace(" ", "") in ("ablation.variants={}", "ablation.variants=null") for a in rest
    ):
        # Hydra merges a dict override into the grid's variants, so `{}` would silently run the whole grid.
        sys.stderr.write(
            "error: ablation.variants={} does not empty the grid (Hydra merges dicts); to run some variants, pass "
            "\"hydra.sweeper.params.variant='NAME,NAME'\" (quoted: a comma would start a sweep)\n"
        )
        sys.exit(2)
    if command in ("ablate", "eval", "evaluate"):
        # `experiment` names a config group, so Hydra would read `experiment=lab` as selecting one for the
        # ablate or eval config itself; there it means a train preset (every cell's; the models' and suite's).
        rest = [f"train_experiment={a.split('=', 1)[1]}" if a.startswith("experiment=") else a for a in rest]
    rest = _ranked(command, rest)
    sys.argv = [f"tropd-{'eval' if command == 'evaluate' else command}", *rest]

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        module.main()
    except UserError as exc:  # raised outside a job (a job exits itself, see exit_on_user_error)
        if user_wants_trace:
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as exc:
        if user_wants_trace:
            raise
        message = _one_line(exc)
        sys.stderr.write(f"error: {message}{_hint(message, command)}\n")
        sys.exit(2)
    except ValueError as exc:
        if user_wants_trace or "can be specified" not in str(exc):
            raise
        sys.stderr.write(f"error: {exc}\n")  # Hydra's own flag conflicts (e.g. -m with --cfg)
        sys.exit(2)
    except OSError as exc:
        # The run directory Hydra creates before the job starts, or a file the job could not write.
        if user_wants_trace or not exc.filename:
            raise
        sys.stderr.write(
            f"error: {exc.strerror or type(exc).__name__}: {exc.filename} (point hydra.run.dir / hydra.sweep.dir "
            "to a writable directory with free space)\n"
        )
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
