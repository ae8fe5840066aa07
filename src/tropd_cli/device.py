"""Devices and dtypes: which device a name means, and which dtype ``auto`` picks there. Imports nothing of tropd
but its errors."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tropd_cli.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UserError(f"device={name!r}: tropd runs on auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Does this device run bf16 matmuls natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)?"""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device, *, frozen: bool) -> torch.dtype:
    """``auto``: bf16 for a frozen model (teacher, sampling copy) where bf16 is fast, fp32 otherwise.

    A trained student stays fp32 under ``auto``: its optimizer needs full-precision weights.
    """
    if name == "auto":
        return torch.bfloat16 if frozen and fast_bf16(device.type) else torch.float32
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]
