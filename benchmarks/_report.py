"""What every benchmark script shares: its keys in ``benchmarks/results.json`` and its section of ``docs/benchmarks.md``.

Each script owns some keys of the JSON file and one marked section of the Markdown file; both are
read-modify-write, so the scripts can run in any order without erasing each other's results.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def environment(packages: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``machine`` (CPU model, cores, RAM, whether it runs bf16 natively) and ``versions`` of ``packages``."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text()
        ram = int(next(ln for ln in mem.splitlines() if ln.startswith("MemTotal:")).split()[1]) / 2**20
    except (OSError, StopIteration):
        import psutil

        ram = psutil.virtual_memory().total / 2**30
    machine = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "avx512_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }
    versions: dict[str, Any] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return machine, versions


def update_results(path: Path, keys: dict[str, Any], *, machine: dict[str, Any], versions: dict[str, Any]) -> None:
    """Set ``keys`` in the JSON file at ``path``; ``machine`` and ``versions`` are merged, not replaced."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(keys)
    data["machine"] = {**data.get("machine", {}), **machine}
    data["versions"] = {**data.get("versions", {}), **versions}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text from ``start`` to ``end`` (``section`` includes both markers), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
