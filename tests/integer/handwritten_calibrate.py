"""Ranges the integer graph needs beyond the fake-quant model's own quantizers.

The fake-quant model keeps the residual stream, the GELU input and the logits in
floating point; the integer graph gives each a fixed-point format. Their ranges are the
largest magnitudes seen on calibration batches (forward hooks on the fake-quant model,
named by module), widened by a margin; values beyond are clamped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from hawq.engine import forward_batches
from hawq.errors import HawqError

Tensor = torch.Tensor


@torch.no_grad()
def observe_absmax(
    model: nn.Module,
    batches: Iterable,
    points: dict[str, tuple[str, str]],
    max_batches: int = 4,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Largest ``|value|`` at named points of ``model`` over up to ``max_batches`` batches.

    Args:
        model: the fake-quant model (run in eval mode).
        batches: ``(x, y)`` pairs or tensors.
        points: key -> ``(module name, "input" | "output")``; several keys may share one
            module. Keys ending in ``*`` are not allowed: list each point.
        max_batches: batches to run.
        device: where to put the inputs (default: leave them).

    Returns:
        key -> max |value| (float).
    """
    mods = dict(model.named_modules())
    found: dict[str, float] = defaultdict(float)
    handles = []

    def make(key: str, where: str) -> Callable:
        def hook(_m, inputs, output=None):
            t = inputs[0] if where == "input" else output
            found[key] = max(found[key], float(t.detach().abs().max()))

        return hook

    for key, (name, where) in points.items():
        if name not in mods:
            raise HawqError(f"calibration point {key}: no module {name!r} in the model")
        m = mods[name]
        h = m.register_forward_pre_hook(make(key, where)) if where == "input" else \
            m.register_forward_hook(make(key, where))  # fmt: skip
        handles.append(h)
    try:
        n = forward_batches(model, batches, max_batches, device)
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise HawqError("integer conversion needs at least one calibration batch")
    return dict(found)
