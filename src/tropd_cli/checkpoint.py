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

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tropd_cli.config import TrainConfig
from tropd_cli.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
#: Config sections whose change makes a resumed run a different run (refused unless resume_force).
FINGERPRINT_KEYS = ("teacher", "student", "dataset", "method", "outlier", "trust_region", "guidance", "rollout", "seed")


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the run that saved the checkpoint."""
    full = asdict(cfg)
    return {key: full[key] for key in FINGERPRINT_KEYS}


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


def save(path: Path, model: Any, tokenizer: Any, state: dict[str, Any]) -> Path:
    """Write a resumable checkpoint at ``path`` atomically (see the module docstring)."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in [*files, tmp / MANIFEST, tmp]:
            _fsync(p)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        raise UserError(
            f"could not write checkpoint {path}: {exc.strerror or exc}; the previous checkpoints are kept "
            "(free disk space or point hydra.run.dir elsewhere)"
        ) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest (an interrupted or foreign write)"
    if STATE_FILE not in manifest:
        return f"no {STATE_FILE} in its manifest"
    for name, want in manifest.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != want["bytes"] or _sha256(file) != want["sha256"]:
            return f"{name} is missing or does not match its manifest (corrupted)"
    return None


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
    """Keep the ``keep_last`` newest checkpoints under ``root`` (0 keeps all)."""
    if keep_last > 0:
        for path in step_dirs(root)[keep_last:]:
            shutil.rmtree(path, ignore_errors=True)


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


def load_state(path: Path, model: torch.nn.Module, cfg: TrainConfig, *, force: bool) -> dict[str, Any]:
    """Load the weights at ``path`` into ``model`` and return the trainer state, after checking that
    the run's config matches the one that saved it (unless ``force``)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    saved, now = state["fingerprint"], fingerprint(cfg)
    changed = sorted(k for k in FINGERPRINT_KEYS if saved.get(k) != now.get(k))
    if changed and not force:
        raise UserError(
            f"resume: {path} was saved with different {', '.join(changed)}; resuming would mix two runs "
            "(restore those settings, or pass resume_force=true to resume anyway)"
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
