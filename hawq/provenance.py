"""Where a result came from: package versions, git commit, hardware."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_PACKAGES = ("hawq", "torch", "numpy", "scipy", "hydra-core", "omegaconf", "pyhessian")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_hash(src: Path | None = None) -> str:
    """Commit of the hawq source tree, with ``+dirty`` when tracked files of the package itself
    (code and packaged configs, ``hawq/``) differ from it; edits elsewhere in the repository
    (docs, experiment rows) do not change what a run computes and do not count."""
    src = Path(__file__).resolve().parent if src is None else Path(src)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def provenance(device: torch.device) -> dict:
    return {"versions": versions(), "git": git_hash(), "hardware": hardware(device)}
