"""Integer-only inference: dyadic requantization, integer GELU/softmax/LayerNorm, integer
kernels (reached only through :mod:`hawq.integer.ops`), conversion of any fake-quant model
into an integer-only graph (:mod:`hawq.integer.graph`), and export (safetensors + JSON)."""

from hawq.integer.convert import convert
from hawq.integer.dyadic import Requant, dyadic, rshift_round
from hawq.integer.export import export
from hawq.integer.gelu import IntGELU
from hawq.integer.graph.convert import IntegerGraph
from hawq.integer.layernorm import IntLayerNorm, isqrt
from hawq.integer.ops import backend, int_conv2d, int_linear, int_matmul, pack_int4, unpack_int4
from hawq.integer.softmax import IntSoftmax

__all__ = [
    "IntGELU",
    "IntLayerNorm",
    "IntSoftmax",
    "IntegerGraph",
    "Requant",
    "backend",
    "convert",
    "dyadic",
    "export",
    "int_conv2d",
    "int_linear",
    "int_matmul",
    "isqrt",
    "pack_int4",
    "rshift_round",
    "unpack_int4",
]
