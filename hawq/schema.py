"""Config validation helpers, importing nothing from hawq's libraries.

Each library defines its config group's dataclass beside its code (``hawq/<lib>/config.py``)
and checks ranges in ``__post_init__`` with :func:`require`; :func:`typed` merges a group's
node into its dataclass, turning any failure into one :class:`~hawq.errors.HawqError` line
naming the key, the bad value and what is allowed. ``hawq.config`` gathers the groups.
"""

from __future__ import annotations

from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hawq.errors import HawqError

T = TypeVar("T")


def require(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError('<key>=<value>: <allowed>')`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")


def typed(node: DictConfig | dict | None, schema: type[T], section: str) -> T:
    """Validate ``node`` against dataclass ``schema`` and return the instance.

    Args:
        node: the config group (e.g. ``cfg.train``).
        schema: a dataclass whose fields mirror the group's keys.
        section: the group name used in error messages (``train``).
    """
    try:
        if isinstance(node, DictConfig):  # resolve ${...} against the whole config first
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), node or {})
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:  # wrong type or unknown key (before ValueError: a subclass)
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise HawqError(f"bad config {section}.{key}: {msg}") from e
    except ValueError as e:  # a range check in __post_init__
        raise HawqError(f"bad config: {section}.{e}") from e


def check_target(target: Any, key: str, allowed: str) -> None:
    """``key`` names an importable callable (a Hydra ``_target_``)."""
    import importlib

    parts = str(target or "").split(".")
    for i in range(len(parts) - 1, 0, -1):  # longest importable module prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001, S112 - try a shorter prefix
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        if callable(obj):
            return
        break
    raise HawqError(f"bad config {key}={target!r}: cannot import it; allowed: {allowed}")
