"""Safe checkpoint loading: ``torch.load(weights_only=True)`` with an allow-list.

``torch.load(weights_only=False)`` runs whatever a pickle asks for, so pointing
``paths.checkpoint`` at a file from elsewhere could execute code. Every hawq
reader goes through :func:`safe_load`, which unpickles only tensors, containers,
numbers, strings and the classes listed by :func:`allowed_globals`: the
``nn.Module`` subclasses and data classes of :mod:`hawq.models`,
:mod:`hawq.quant` and :mod:`hawq.integer` (whole integer models are pickled by the
``integer`` stage) and the ``torch.nn`` layers they are built from. Unpickling an
allow-listed class only allocates it and fills its ``__dict__`` (no constructor,
no ``__reduce__`` callables), so nothing outside the list can run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import pickle
import pickletools
import pkgutil
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawq.errors import HawqError

# torch.nn layers the hawq models, fake-quant and integer models are made of.
TORCH_CLASSES: tuple[type, ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.Identity,
    nn.Dropout,
    nn.GELU,
    nn.ReLU,
    nn.Softmax,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Flatten,
    nn.AdaptiveAvgPool2d,
    # float islands of integer graphs (hawq.integer.graph.islands.MODULES)
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Mish,
    nn.ELU,
    nn.LeakyReLU,
)
PACKAGES = ("hawq.models", "hawq.quant", "hawq.integer", "hawq.integer.graph")


def _package_classes(package: str) -> list[type]:
    """Modules and data classes defined in ``package`` and its submodules."""
    pkg = importlib.import_module(package)
    found: list[type] = []
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # optional back-ends (e.g. Triton) absent: nothing to load
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            if issubclass(cls, nn.Module) or dataclasses.is_dataclass(cls):
                found.append(cls)
    return found


@cache
def allowed_globals() -> tuple[type, ...]:
    """Every class a hawq checkpoint may contain beyond torch's own safe types."""
    ours = [cls for package in PACKAGES for cls in _package_classes(package)]
    return TORCH_CLASSES + tuple(sorted(ours, key=lambda c: f"{c.__module__}.{c.__qualname__}"))


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` allowing :func:`allowed_globals`.

    Raises:
        HawqError: one line when the file is missing, corrupt, or asks for anything
            outside the allow-list (a pickle carrying code is refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise HawqError(f"missing checkpoint {path}")
    try:
        with _allowing(list(allowed_globals())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        offender = _offender(str(e)) or _pickled_global(path)
        if offender is not None:
            raise HawqError(
                f"refusing to load {path}: {offender} is not allowed in a "
                "checkpoint (weights_only=True; only hawq models, tensors and "
                "plain data are unpickled)"
            ) from e
        raise HawqError(f"corrupt checkpoint {path}: not a torch checkpoint") from e
    except Exception as e:  # noqa: BLE001 - zip/pickle/storage errors vary
        raise HawqError(f"corrupt checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from e


def _allowing(classes: list[type]) -> Any:
    """``torch.serialization.safe_globals`` (torch >= 2.5), else a global registration."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(classes)
    register = getattr(torch.serialization, "add_safe_globals", None)  # torch 2.4
    if register is not None:
        register(classes)
    return contextlib.nullcontext()


def _offender(message: str) -> str | None:
    """The global a refused pickle asked for (torch's multi-line message), or None when
    the unpickler stopped on bytes that are no pickle at all (a corrupt file)."""
    patterns = (
        r"GLOBAL ([\w.]+)",
        r"Trying to call reduce for ([\w.]+)",
        r"[Uu]nsupported class ([\w.]+)",
    )
    for pattern in patterns:
        m = re.search(pattern, message)
        if m:
            return m.group(1)
    return None


def _pickled_global(path: Path) -> str | None:
    """First class/function a plain pickle file imports, read with :mod:`pickletools`
    (which parses opcodes and executes nothing); None when it names none or is no pickle."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle: corrupt, not refused
        return None
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
