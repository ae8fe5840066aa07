"""Is the Hugging Face hub usable? Asked once, quickly, before a load that would otherwise retry for a minute."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def hub_offline() -> bool:
    """The user said so: HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1 / TRANSFORMERS_OFFLINE=1)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (``$HF_ENDPOINT``), cached for the process."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
