"""Convert a fake-quant model (``hawq.quant``) into an integer-only graph.

``convert(qmodel, batches)`` works on any model whose ops ``hawq.quant`` quantized (hawq's
ViT and ResNet, or the user's own after :func:`hawq.models.prepare`): it traces the model,
reads every quantized op through :mod:`hawq.integer.adapter` (int8 / int4 weight codes,
per-channel scales, BN folded, the calibrated activation grids), sizes the formats the
fake-quant model leaves in float (residual stream, GELU inputs, logits) on a few
calibration batches and lowers the graph to integer steps that run through
:mod:`hawq.integer.ops` (:mod:`hawq.integer.graph`). A node with no integer form ends the
conversion with one line naming it and where it sits.
"""

from hawq.integer.graph.convert import IntegerGraph
from hawq.integer.graph.convert import convert_graph as convert

__all__ = ["IntegerGraph", "convert"]
