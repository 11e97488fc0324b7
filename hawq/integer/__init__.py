"""Integer-only inference: dyadic requantization, integer GELU/softmax/LayerNorm, integer
kernels (reached only through :mod:`hawq.integer.ops`), conversion of a fake-quant model
into an integer ViT/ResNet, and export (safetensors + JSON)."""

from hawq.integer.convert import convert
from hawq.integer.dyadic import Requant, dyadic, rshift_round
from hawq.integer.export import export
from hawq.integer.gelu import IntGELU
from hawq.integer.layernorm import IntLayerNorm, isqrt
from hawq.integer.ops import backend, int_conv2d, int_linear, int_matmul, pack_int4, unpack_int4
from hawq.integer.resnet import IntegerResNet
from hawq.integer.softmax import IntSoftmax
from hawq.integer.vit import IntegerViT

__all__ = [
    "IntGELU", "IntLayerNorm", "IntSoftmax", "IntegerResNet", "IntegerViT", "Requant", "backend",
    "convert", "dyadic", "export", "int_conv2d", "int_linear", "int_matmul", "isqrt",
    "pack_int4", "rshift_round", "unpack_int4",
]
