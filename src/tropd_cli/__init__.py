"""tropd: Trust Region On-Policy Distillation (arXiv:2606.01249) for LLM post-training and compression."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tropd")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
