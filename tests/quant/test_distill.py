"""QAT distillation loss: CE at weight 0, KL to the teacher at weight 1, zero when equal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.quant.distill import DistillLoss


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    return student, teacher


def test_weight_zero_is_cross_entropy_and_one_is_kl():
    student, teacher = _pair()
    x, y = torch.randn(7, 3, 4, dtype=torch.float64), torch.randint(0, 5, (7,))
    ce = DistillLoss(student, teacher, weight=0.0)
    out = student(x)
    torch.testing.assert_close(ce(out, y), F.cross_entropy(out, y))
    ce.remove()
    kd = DistillLoss(student, teacher, weight=1.0, temperature=2.0)
    out = student(x)
    p_t = F.softmax(teacher(x) / 2, -1)
    ref = (p_t * (p_t.log() - F.log_softmax(out / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kd(out, y), ref)
    kd.remove()


def test_student_equal_to_teacher_has_zero_kl_and_gradients_reach_only_the_student():
    student, _ = _pair()
    teacher = copy.deepcopy(student)
    kd = DistillLoss(student, teacher, weight=1.0)
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.randint(0, 5, (4,))
    loss = kd(student(x), y)
    assert abs(float(loss.detach())) < 1e-12
    with torch.no_grad():
        student[1].bias.add_(0.5 * torch.randn(5, dtype=torch.float64))
    loss = kd(student(x), y)
    loss.backward()
    assert float(loss.detach()) > 0 and student[1].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_needs_a_student_forward_and_valid_arguments():
    student, teacher = _pair()
    kd = DistillLoss(student, teacher)
    with pytest.raises(RuntimeError, match="no student forward"):
        kd(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        DistillLoss(student, teacher, weight=1.5)
