"""Models whose matrix products are named, swappable modules."""

from hawq.models.capture import CaptureReport, prepare
from hawq.models.ops import MatMul, OpInfo, op_inventory, quantizable_ops
from hawq.models.resnet import ResNet
from hawq.models.vit import ViT

__all__ = [
    "CaptureReport",
    "MatMul",
    "OpInfo",
    "ResNet",
    "ViT",
    "op_inventory",
    "prepare",
    "quantizable_ops",
]
