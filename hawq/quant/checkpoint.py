"""Quantized checkpoints: model config + plan + quantization options + state.

``load_quantized`` rebuilds the FP model from its config, applies the stored
plan with the stored options (:func:`~hawq.quant.api.quantize_`), and loads the
state (weights, qparams, learned step sizes, bit widths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hawq.checkpoint import build_model
from hawq.errors import HawqError
from hawq.io import load_torch, save_torch
from hawq.quant.api import quantize_
from hawq.quant.plan import Plan

SCHEMA = 1


def save_quantized(
    path: str | Path,
    model: nn.Module,
    model_cfg: DictConfig | dict,
    plan: Plan,
    method: str | None = None,
    fold_bn: bool = True,
    **meta: Any,
) -> Path:
    """Write ``{schema, kind: quantized, model_cfg, plan, method, fold_bn, state_dict, meta}``."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {
        k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()
    }
    return save_torch(
        path,
        {
            "schema": SCHEMA,
            "kind": "quantized",
            "model_cfg": model_cfg,
            "plan": plan.to_dict(),
            "method": method,
            "fold_bn": fold_bn,
            "state_dict": state,
            "meta": meta,
        },
    )


def load_quantized(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; returns ``(model, plan, meta)``."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "quantized":
        raise HawqError(f"{path} is not a hawq quantized checkpoint")
    plan = Plan.from_dict(ckpt["plan"], where=f"{path}:plan")
    model = build_model(ckpt["model_cfg"])
    quantize_(model, plan, ckpt["method"], ckpt["fold_bn"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise HawqError(
            f"{path} does not fit its model config and plan: {str(e).splitlines()[0]}"
        ) from e
    return model.to(device), plan, ckpt.get("meta", {})
