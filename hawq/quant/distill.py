"""Knowledge distillation for QAT: the FP model teaches its quantized copy.

``loss = (1 - w) CE(out, y) + w T^2 KL(softmax(t / T) || softmax(out / T))`` with ``t`` the
logits of the frozen FP teacher on the same batch. The training loop only hands a loss
function ``(out, y)``; the batch reaches the teacher through a forward pre-hook on the student
(it fires for DDP / compiled wrappers of it too). The teacher runs under the loop's autocast
(bf16 on CPUs with AMX) and ``no_grad``: about one extra forward per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class DistillLoss(nn.Module):
    """CE + KL to a frozen teacher (see the module docstring).

    Args:
        student: the model being trained (its forward inputs are captured).
        teacher: the FP model (set to eval, gradients off).
        weight: ``w`` in [0, 1] (1: pure distillation).
        temperature: ``T`` > 0.
        label_smoothing: of the CE term.
        label_loss: the label term instead of cross-entropy (a loss hook ``fn(out, y)``).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        weight: float = 1.0,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
        label_loss=None,
    ) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0 or temperature <= 0:
            raise ValueError(
                f"DistillLoss: weight in [0, 1] and temperature > 0, got {weight}, {temperature}"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature
        ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.ce = label_loss if label_loss is not None else ce
        self._x: Tensor | None = None
        self._handle = student.register_forward_pre_hook(self._grab)

    def _grab(self, _module: nn.Module, inputs: tuple) -> None:
        self._x = inputs[0]

    def remove(self) -> None:
        """Detach from the student (drops the captured batch)."""
        self._handle.remove()
        self._x = None

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        if self._x is None:
            raise RuntimeError("DistillLoss: no student forward seen before the loss")
        loss = self.ce(out, y) if self.weight < 1.0 else out.new_zeros(())
        if self.weight > 0.0:
            with torch.no_grad():
                t = self.teacher(self._x).to(out.dtype)
            T = self.temperature
            kl = (
                F.kl_div(
                    F.log_softmax(out / T, dim=-1),
                    F.log_softmax(t / T, dim=-1),
                    log_target=True,
                    reduction="batchmean",
                )
                * T
                * T
            )
            loss = (1.0 - self.weight) * loss + self.weight * kl
        return loss
