"""Tie groups from a traced forward pass and their transitive merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawq.alloc import merge_groups, shared_input_groups
from hawq.errors import HawqError
from hawq.models import ResNet

from .cases import tiny_vit


def test_vit_ties_qk_with_av_in_every_block():
    assert shared_input_groups(tiny_vit(), (3, 32, 32)) == [
        ["blocks.0.attn.qk", "blocks.0.attn.av"], ["blocks.1.attn.qk", "blocks.1.attn.av"]]


def test_option_a_resnet_has_no_shared_inputs():
    assert shared_input_groups(ResNet(depth=8), (3, 32, 32)) == []


class TwoHeads(nn.Module):
    """A conv shortcut reading the block input like conv1 does (HAWQ-V3 residual rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x)
        return self.fc(y.mean((2, 3)))


def test_conv_shortcut_is_tied_with_conv1():
    assert shared_input_groups(TwoHeads(), (3, 8, 8)) == [["conv1", "shortcut"]]


def test_merge_is_transitive_and_ordered():
    order = ["a", "b", "c", "d", "e"]
    assert merge_groups([["c", "a"], ["d", "c"], ["e"]], order) == [["a", "c", "d"]]
    with pytest.raises(HawqError, match="unknown op"):
        merge_groups([["a", "zz"]], order)
