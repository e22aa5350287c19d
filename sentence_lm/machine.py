"""The machine and library versions a measurement ran on, for the records that benchmark and
example scripts write beside their figures (:func:`machine_info`)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

__all__ = ["machine_info"]


def machine_info(device: torch.device | str | None = None, packages: Sequence[str] = ()) -> dict:
    """The machine a measurement runs on, as a flat dict.

    ``platform``, ``python``, ``cpu`` (the model name in ``/proc/cpuinfo``, else the processor),
    ``cpu_count``, ``torch_threads``, ``omp_wait_policy`` (the environment variable), ``device``
    (``device``, default ``cuda`` when available, else ``cpu``) and ``gpu`` (its name) on CUDA,
    ``load_average_at_start``, ``memory_gb`` (with ``psutil``), the versions of ``torch``,
    ``transformers`` and of each of ``packages`` (``None`` when not installed), and ``git_commit``:
    the short commit of the checkout this package is in (``""`` outside one)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        device=str(device),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    with contextlib.suppress(Exception):
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    for name in packages:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        info["git_commit"] = ""
    return info
