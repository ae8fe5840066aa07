"""Keyed randomness: every random draw of a run comes from a seed derived from integer keys (seed, step, stream),
so that the same keys give the same draw on any rank, in any order, after any resume. Imports nothing of tropd."""

from __future__ import annotations

import torch


def seeded(*keys: int) -> int:
    """A 63-bit seed from integer keys such as (seed, step, stream): same keys, same randomness."""
    value = 0x9E3779B97F4A7C15
    for key in keys:
        value = (value ^ (int(key) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def generator(*keys: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seeded(*keys))
    return gen
