"""Analyses of trained and quantized models: loss landscapes around the weights."""

from hawq.analysis.landscape import (
    Direction,
    EigenDirections,
    LossProbe,
    eigen_directions,
    filter_normalized,
    op_parameters,
    op_quant_rise,
    project,
    quant_offset,
    quant_point,
    second_order,
    shifted,
    spearman,
    surface_1d,
    surface_2d,
)

__all__ = [
    "Direction",
    "EigenDirections",
    "LossProbe",
    "eigen_directions",
    "filter_normalized",
    "op_parameters",
    "op_quant_rise",
    "project",
    "quant_offset",
    "quant_point",
    "second_order",
    "shifted",
    "spearman",
    "surface_1d",
    "surface_2d",
]
