"""Adam whose step-size groups update in log space, so a step size never flips sign.

Why: Adam normalises each gradient by its running RMS, so LSQ's gradient scale
``g = 1/sqrt(N Q_p)`` has no effect and every step moves a parameter by about ``lr``
whatever its magnitude. An 8-bit weight step size is ``s ~ max|w| / 127 ~ 3e-4``; with
``qparam_lr = 1e-3`` a single Adam step is ~3x ``s`` and step sizes cross zero (the
quantizer then runs on ``|s|`` or collapses to ``s_min``).

Fix: for parameters that must stay positive (LSQ step sizes, PACT clips) Adam runs on
``u = log s``::

    g_u = ds/du * dL/ds = s * dL/ds
    m <- b1 m + (1 - b1) g_u,   v <- b2 v + (1 - b2) g_u^2     (bias-corrected m_hat, v_hat)
    s <- max(s * exp(-lr * m_hat / (sqrt(v_hat) + eps)),  min_ratio * s_0)

so each step changes ``s`` by a factor in ``[exp(-~lr), exp(~lr)]`` (Adam's update is
bounded by about ``lr``): the update scales with the step size itself, ``s`` stays
positive for ever, and ``lr`` reads as a relative change per step (1e-3: 0.1%). The
floor ``min_ratio * s_0`` (``s_0`` the value at the parameter's first step or last
re-fit, ``min_ratio = 1e-3``) keeps a long run of same-signed gradients from driving
``s`` into underflow: a step size cannot fall below a thousandth of its fit. The
parameter keeps storing ``s`` (not ``log s``), so checkpoints, the integer converter and
the ONNX export read it unchanged. Other groups are plain Adam (L2 weight decay added to
the gradient, as ``torch.optim.Adam``).

Measured (``python benchmarks/bench_qat_scales.py --steps 150 --threads 1``: tiny ViT
trained FP 300 steps on synthetic data, then 150 QAT steps, LSQ on every op,
``qparam_lr = 1e-3``, weights Adam 1e-5; shared 2-core CPU):

=========  =====  ==============================  ==============  ===============
optimizer  bits   weight step sizes flipped or    min ``s/s_0``   final train
                  collapsed (share of ops)                        loss
=========  =====  ==============================  ==============  ===============
Adam s     8      0.9  (``collapsed_ops``: 9)     -14.6           0.035
Adam log s 8      0.0                             0.94            0.031
SGD s      8      0.4  (3)                        -5.7            0.028
Adam s     4      0.7  (7)                        -0.88           0.070
Adam log s 4      0.0                             0.91            0.073
SGD s      4      0.0                             0.62            0.094
=========  =====  ==============================  ==============  ===============

(8-bit weight step sizes here: median 1.1e-3, the order of ``qparam_lr``.) Adam in log
space is the only one that keeps every step size positive at both widths at an equal
loss; SGD on ``s`` (LSQ's own recipe) still flips 8-bit steps at this lr and would need a
``qparam_lr`` tuned per width and model (its update ``lr g dL/ds`` has ``g`` spanning
orders of magnitude across ops).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Tensor = torch.Tensor


class QATAdam(torch.optim.Optimizer):
    """Adam with per-group ``log_space`` (see the module docstring).

    Args:
        params: parameters or param groups; a group may set ``log_space=True``.
        lr / betas / eps / weight_decay: as :class:`torch.optim.Adam` (no weight decay is
            applied in log-space groups).
        log_space: the default for groups that do not set it.
        min_ratio: log-space floor ``s >= min_ratio * s_0`` (per element).

    The state per parameter (``step``, ``exp_avg``, ``exp_avg_sq``) has Adam's names and
    shapes, so an Adam state dict loads into it.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        log_space: bool = False,
        min_ratio: float = 1e-3,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "log_space": log_space,
            "min_ratio": min_ratio,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            log_space = bool(group.get("log_space", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if log_space:
                    g = g * p  # dL/d(log s) = s dL/ds
                elif wd:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                update = (m / (1 - b1**t)).div_(denom).mul_(lr)
                if log_space:
                    if "floor" not in state:  # first step (or after a re-fit / old state)
                        state["floor"] = p.detach().abs() * group.get("min_ratio", 1e-3)
                    p.mul_(torch.exp(-update))
                    torch.maximum(p, state["floor"], out=p)
                else:
                    p.sub_(update)
        return loss

    def reset_state(self, params: Iterable[Tensor]) -> None:
        """Forget the moments of ``params`` (after their values were re-fitted)."""
        for p in params:
            self.state.pop(p, None)
