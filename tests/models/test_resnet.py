import pytest
import torch

from hawq.models import ResNet, op_inventory


def test_resnet20_parameter_count_and_ops():
    model = ResNet(depth=20)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # the paper's "0.27M"
    inv = op_inventory(model)
    assert len(inv) == 20 and inv[0].name == "conv1" and inv[-1].name == "fc"
    assert inv[0].macs == 32 * 32 * 16 * 27
    assert inv[-1].macs == 64 * 10


def test_resnet_shapes_and_bad_depth():
    out = ResNet(depth=8, width=8)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(depth=10)
