"""What the subcommands share: where configs live, config checks, output dirs, logging set-up."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tropd_cli.config import AblateConfig, EvalConfig, TrainConfig
from tropd_cli.errors import UserError

T = TypeVar("T")


def register_configs() -> None:
    """Register the schemas; YAML files extend them through their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="ablate_schema", node=AblateConfig)


def conf_dir() -> str:
    """Configs ship inside the wheel (``tropd_cli/conf``); a source checkout uses the top-level ``conf/``."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "conf"
    if packaged.is_dir():
        return str(packaged)
    source = here.parent.parent / "conf"
    if source.is_dir():
        return str(source)
    raise UserError("tropd's config directory is missing; reinstall the package")


def _csv(node: Any) -> str:
    """``${tropd_csv:${node}}``: a dict's keys or a list's items joined by commas (a sweeper value list)."""
    items = list(node.keys()) if isinstance(node, DictConfig) else list(node)
    return ",".join(str(item) for item in items)


def _tag(value: Any) -> str:
    """``${tropd_tag:${experiment}}``: ``-<value>``, or nothing for null (a directory-name suffix)."""
    return "" if value is None else f"-{value}"


CONF_DIR = conf_dir()
register_configs()
for _name, _fn in (("tropd_csv", _csv), ("tropd_tag", _tag)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _stray_keys(obj: Any, prefix: str = "") -> list[str]:
    """Attributes a dataclass holds that its schema lacks (Hydra's ``+key=value`` bypasses struct mode)."""
    out: list[str] = []
    if dataclasses.is_dataclass(obj):
        names = {f.name for f in dataclasses.fields(obj)}
        for key, value in vars(obj).items():
            out += [prefix + key] if key not in names else _stray_keys(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _stray_keys(value, f"{prefix}{i}.")
    return out


def to_object(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config as its dataclass (types checked by OmegaConf, stray ``+keys`` refused)."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, schema):
        raise UserError(f"config did not compose into {schema.__name__}")
    stray = _stray_keys(obj)
    if stray:
        raise UserError(f"unknown config key(s): {', '.join(stray)}; see `--cfg job` for the valid keys")
    return obj


def hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: silence library progress bars and chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # matplotlib logs "generated new fontManager" at INFO the first time it builds its font cache (a summary plot).
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
