"""``tropd ablate``: not built yet (tracked by the ablation issue); says so and exits 2."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from tropd_cli.commands.common import CONF_DIR
from tropd_cli.errors import UserError, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="ablate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    raise UserError("tropd ablate is not built yet; meanwhile sweep with `tropd train -m method=opd,tropd seed=0,1,2`")
