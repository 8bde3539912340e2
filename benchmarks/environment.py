"""What a benchmark ran on: the machine and the package versions, recorded next to every result."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pyarrow", "pillow", "pycocotools")


def cpu_model_name() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict:
    # The cores this process may use (a container's CPU set), not the host's count.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model_name(), "cores": cores, "platform": platform.platform()}


def versions(packages=PACKAGES) -> dict:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
