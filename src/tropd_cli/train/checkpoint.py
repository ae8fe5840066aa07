"""Resumable training checkpoints: written atomically, verified before use, pruned to the last N.

A checkpoint ``checkpoints/step_NNNNNN/`` is a Hugging Face model directory (loadable as is) plus
``trainer_state.pt`` (optimizer, scheduler, step, metric history, RNG states, config fingerprint) and
``manifest.json`` (size and sha256 of every file). It is written into a temporary directory beside
its final place, every file and the directory are fsynced, and one ``rename`` publishes it: a kill
at any moment leaves either the previous checkpoints or the new one complete, never a half-written
one under a ``step_`` name. At resume, a checkpoint whose manifest is missing or does not match its
files is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tropd_cli import distributed as D
from tropd_cli.config import TrainConfig
from tropd_cli.distributed import SINGLE, Dist
from tropd_cli.errors import UserError, first_line

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
SHARDED = "sharded"  # torch.distributed.checkpoint shards of model + optimizer (multi-rank runs)
#: Config sections whose change makes a resumed run a different run (refused unless resume_force).
FINGERPRINT_KEYS = ("teacher", "student", "dataset", "method", "outlier", "trust_region", "guidance", "rollout", "seed")


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the run that saved the checkpoint."""
    full = asdict(cfg)
    # Where a served teacher lives and how it is asked (url, timeouts, concurrency) is transport, not the run: a
    # run resumes against the same model at another address.
    full["teacher"]["server"] = {"model": full["teacher"]["server"]["model"]}
    return {key: full[key] for key in FINGERPRINT_KEYS}


#: Options added after checkpoints were already being written, and what a checkpoint without them did: a run
#: from before the served teacher had a local one; before the mismatch correction, none was applied.
_BEFORE_THEY_EXISTED: dict[tuple[str, str], Any] = {
    ("teacher", "backend"): "local",
    ("teacher", "server"): {"model": None},
    ("rollout", "is_correction"): "none",
    ("rollout", "is_cap"): 2.0,
}


def with_missing_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved fingerprint with the options it predates filled in as that version behaved (so a checkpoint of an
    older tropd resumes when the run is the same, and is refused when the new default would change it)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (section, key), value in _BEFORE_THEY_EXISTED.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    path: Path,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    dist: Dist = SINGLE,
) -> Path:
    """Write a resumable checkpoint at ``path`` atomically (see the module docstring).

    Multi-rank: every rank writes its shard of the model and optimizer into ``sharded/``
    (``torch.distributed.checkpoint``; loadable at any world size), rank 0 writes the rest, the manifest
    and the final rename; a failure on rank 0 is raised on every rank.
    """
    tmp: Path | None = None
    error: str | None = None
    try:
        if dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    except OSError as exc:
        error = f"{exc.strerror or exc}"
    tmp, error = D.broadcast_object((tmp, error), dist)
    if error is None and tmp is not None:
        try:
            if dist.enabled:
                assert optimizer is not None, "a multi-rank checkpoint needs the optimizer"
                D.save_sharded(str(tmp / SHARDED), model, optimizer)
                D.barrier(dist)
            if dist.is_main:
                if dist.enabled:
                    model.config.save_pretrained(tmp)  # the weights are in sharded/
                else:
                    model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                torch.save(state, tmp / STATE_FILE)
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
                for p in [*files, *(d for d in tmp.rglob("*") if d.is_dir()), tmp / MANIFEST, tmp]:
                    _fsync(p)
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
                _fsync(path.parent)
        except (OSError, RuntimeError) as exc:  # torch.save raises RuntimeError on a full disk
            error = f"{getattr(exc, 'strerror', None) or first_line(exc)}"
        finally:
            if dist.is_main and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        error = D.broadcast_object(error, dist)
    if error is not None:
        raise UserError(
            f"could not write checkpoint {path}: {error}; the previous checkpoints are kept "
            "(free disk space or point hydra.run.dir elsewhere)"
        )
    return path


def problem(path: Path, *, hashes: bool = True) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None when every file matches its manifest.
    ``hashes=False``: sizes only, no hashing (the cheap check pruning uses)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest (an interrupted or foreign write)"
    if not _well_formed(manifest):
        return "a malformed manifest (not a map of file -> bytes and sha256)"
    if STATE_FILE not in manifest:
        return f"no {STATE_FILE} in its manifest"
    for name, want in manifest.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != want["bytes"] or (hashes and _sha256(file) != want["sha256"]):
            return f"{name} is missing or does not match its manifest (corrupted)"
    return None


def _well_formed(manifest: Any) -> bool:
    return isinstance(manifest, dict) and all(
        isinstance(name, str)
        and isinstance(want, dict)
        and isinstance(want.get("bytes"), int)
        and isinstance(want.get("sha256"), str)
        for name, want in manifest.items()
    )


def step_dirs(root: Path) -> list[Path]:
    """``root/checkpoints/step_*`` directories, newest (highest step) first."""
    base = root / "checkpoints"
    found = [p for p in base.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if base.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes :func:`problem`; bad ones are logged and skipped."""
    for path in step_dirs(root):
        why = problem(path)
        if why is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, why)
    return None


def prune(root: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints under ``root`` (0 keeps all); an incomplete or
    corrupted one is not counted, so it never pushes a good one out (it is left for inspection)."""
    if keep_last > 0:
        complete = [path for path in step_dirs(root) if problem(path, hashes=False) is None]
        for path in complete[keep_last:]:
            shutil.rmtree(path, ignore_errors=True)


def clean_temporaries(root: Path) -> list[Path]:
    """Remove what a killed write leaves: ``checkpoints/.step_*`` and ``.checkpoint-*`` temp dirs; returns them."""
    stale = [*root.glob(".checkpoint-*"), *(root / "checkpoints").glob(".step_*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def recover_final(root: Path) -> None:
    """Finish a final-checkpoint swap a kill interrupted: ``checkpoint/`` missing, the old one beside it."""
    final, old = root / "checkpoint", root / ".checkpoint.old"
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def finished(root: Path) -> Path | None:
    """The final checkpoint of a run directory whose training finished, else None."""
    final = root / "checkpoint"
    return final if (final / "config.json").is_file() and (root / "summary.json").is_file() else None


def check_fingerprint(path: Path, cfg: TrainConfig, *, force: bool) -> dict[str, Any]:
    """The trainer state at ``path``, after checking that the run's config matches the one that saved it
    (unless ``force``)."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        saved = state["fingerprint"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(
            f"resume: {path / STATE_FILE} is unreadable ({first_line(exc)}); pass another checkpoint"
        ) from exc
    now = fingerprint(cfg)
    saved = with_missing_keys(saved)
    changed = sorted(k for k in FINGERPRINT_KEYS if saved.get(k) != now.get(k))
    if changed and not force:
        raise UserError(
            f"resume: {path} was saved with different {', '.join(changed)}; resuming would mix two runs "
            "(restore those settings, or pass resume_force=true to resume anyway)"
        )
    return dict(state)


def preflight(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """Everything about the run directory that can refuse the run, checked before anything in it is
    written: stale temp dirs removed, an interrupted final swap finished, and the checkpoint ``resume``
    names resolved and its config compared. Returns that checkpoint (None: a fresh start)."""
    if output_dir.is_dir():
        clean_temporaries(output_dir)
        recover_final(output_dir)
    if not cfg.resume:
        return None
    path = resolve(cfg.resume, output_dir)
    if path is not None:
        check_fingerprint(path, cfg, force=cfg.resume_force)
    return path


@contextlib.contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """One training run per run directory: an exclusive ``flock`` on ``.tropd.lock`` for the run's life."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".tropd.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another tropd train is running in {output_dir} (it holds {output_dir}/.tropd.lock); "
                "wait for it to end or choose another hydra.run.dir"
            ) from None
        yield


def resolve(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``auto`` = the newest valid one of this run directory (None when
    there is none yet: a fresh start); a run directory = its newest valid one; a ``step_*`` directory."""
    if resume == "auto":
        return latest_valid(output_dir)
    path = Path(resume).expanduser()
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        why = problem(path)
        if why is not None:
            raise UserError(f"resume={resume}: not a usable checkpoint ({why}); pass another or resume=auto")
        return path
    if path.is_dir():
        found = latest_valid(path)
        if found is None:
            raise UserError(f"resume={resume}: no valid checkpoint under {path}/checkpoints; train with save_every=N")
        return found
    raise UserError(f"resume={resume}: no such checkpoint or run directory; pass a path, or resume=auto")


def load_state(
    path: Path,
    model: torch.nn.Module,
    cfg: TrainConfig,
    *,
    force: bool,
    optimizer: torch.optim.Optimizer | None = None,
    dist: Dist = SINGLE,
) -> dict[str, Any]:
    """Load the weights at ``path`` into ``model`` and return the trainer state, after checking that
    the run's config matches the one that saved it (unless ``force``).

    A sharded checkpoint (``sharded/``, from a multi-rank run) also restores ``optimizer`` and loads at
    any world size, a single process included; a single-process checkpoint resumes single-process runs.
    """
    state = check_fingerprint(path, cfg, force=force)
    if (path / SHARDED).is_dir():
        if optimizer is None:  # pragma: no cover - the trainer always passes it
            raise UserError(f"resume: {path} is sharded and needs the optimizer to load into")
        D.load_sharded(str(path / SHARDED), model, optimizer)
        return state
    if dist.enabled:
        raise UserError(
            f"resume: {path} was saved by a single process; a multi-rank run cannot take over its optimizer "
            f"state (start from its weights instead: student.name={path})"
        )
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(file))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight")}  # tied to the embeddings
    if set(missing) - tied or unexpected:
        raise UserError(f"resume: {path} does not fit this student (missing {sorted(set(missing) - tied)[:3]})")
    return state
