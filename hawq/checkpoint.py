"""Model checkpoints that carry what rebuilds the model (its config), and training state."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hawq.errors import HawqError
from hawq.io import load_torch, save_torch

SCHEMA = 1


#: key of a user model's config holding :func:`hawq.models.own.prepared`'s options
PREPARE_KEY = "prepare"


def build_model(model_cfg: DictConfig | dict) -> nn.Module:
    """Instantiate a model from its config node (``_target_`` + arguments).

    hawq's own models are built as they are. Any other ``_target_`` (``model=custom
    model._target_=mypkg.MyNet model.width=64``) is the user's model: built, then made
    hawq-ready by :func:`hawq.models.own.prepared` with the options under ``prepare``
    (``input_shape``, ``min_share``, ``input_dtype``, ``vocab_size``, or ``inputs``: keyword
    inputs), so no product of it is left float silently.
    """
    from hawq.models.config import SCHEMAS
    from hawq.models.own import prepared

    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    target = model_cfg.get("_target_")
    if target in SCHEMAS or target == f"{prepared.__module__}.{prepared.__name__}":
        return instantiate(model_cfg)
    options = model_cfg.get(PREPARE_KEY) or {}
    allowed = [k for k in inspect.signature(prepared).parameters if k != "model"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise HawqError(
            f"bad config model.{PREPARE_KEY}.{unknown[0]}: unknown; allowed: " + ", ".join(allowed)
        )
    user = instantiate({k: v for k, v in model_cfg.items() if k != PREPARE_KEY})
    return prepared(user, **options)


def save_model(
    path: str | Path, model: nn.Module, model_cfg: DictConfig | dict, **meta: Any
) -> Path:
    """Write ``{schema, model_cfg, state_dict, meta}`` atomically."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"schema": SCHEMA, "model_cfg": model_cfg, "state_dict": state, "meta": meta}
    return save_torch(path, ckpt)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_model`; returns ``(model, meta)``."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or "model_cfg" not in ckpt or "state_dict" not in ckpt:
        raise HawqError(f"corrupt checkpoint {path}: not a hawq model checkpoint")
    model = build_model(ckpt["model_cfg"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise HawqError(f"checkpoint {path} does not fit its model config: {first}") from e
    return model.to(device), ckpt.get("meta", {})


def restore_state(path: str | Path, state: Any, **objects: Any) -> None:
    """Resume: ``obj.load_state_dict(state[key])`` for each ``key=obj``; a state file of
    another model or recipe (wrong keys or shapes) is one :class:`HawqError` line."""
    if not isinstance(state, dict) or not all(k in state for k in (*objects, "epoch")):
        raise HawqError(
            f"{path} is not a hawq training state; delete it (or force=true) to "
            "start the stage over"
        )
    for key, obj in objects.items():
        try:
            obj.load_state_dict(state[key])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HawqError(
                f"{path} does not fit this run's {key} (another model or recipe?): "
                f"{first}; allowed: the state this config wrote; delete it or "
                "force=true to start over"
            ) from e
