"""Quantization: primitives, float formats, calibrators, quantized modules, plans, PTQ and QAT.

The one verb is :func:`quantize_` ``(model, plan)``; the maths are pure functions
(:func:`choose_qparams`, :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`)
kept apart from the modules that hold quantizer state. :func:`reconstruct_` refines a
calibrated PTQ model block by block (AdaRound rounding, learned activation steps).
"""

from hawq.quant.api import (
    calibrate,
    check_ready,
    collapsed_ops,
    freeze_bn_,
    quant_ops,
    quantize_,
    quantizers,
    set_bits_,
    summary,
)
from hawq.quant.bn_fold import find_conv_bn_pairs, fold_conv_bn, fold_weight_bias
from hawq.quant.calibrators import CALIBRATORS, make_calibrator, mse_range
from hawq.quant.checkpoint import load_quantized, save_quantized
from hawq.quant.formats import (
    FORMAT_BITS,
    format_fake_quantize,
    fp8_fake_quantize,
    mx_fake_quantize,
    nf4_fake_quantize,
    nf4_levels,
)
from hawq.quant.learnable import lsq_fake_quantize, lsqplus_fake_quantize, pact_fake_quantize
from hawq.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from hawq.quant.onnx_export import export_onnx
from hawq.quant.plan import OpSetting, Plan, load_plan, save_plan
from hawq.quant.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_tensor,
    qrange,
    quantize,
    reduce_range,
)
from hawq.quant.quantizer import Quantizer
from hawq.quant.reconstruct import ReconstructSettings, reconstruct_

__all__ = [
    "CALIBRATORS",
    "FORMAT_BITS",
    "OpSetting",
    "Plan",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "Quantizer",
    "ReconstructSettings",
    "calibrate",
    "check_ready",
    "choose_qparams",
    "collapsed_ops",
    "dequantize",
    "export_onnx",
    "fake_quantize",
    "fake_quantize_tensor",
    "find_conv_bn_pairs",
    "fold_conv_bn",
    "fold_weight_bias",
    "format_fake_quantize",
    "fp8_fake_quantize",
    "freeze_bn_",
    "load_plan",
    "load_quantized",
    "lsq_fake_quantize",
    "lsqplus_fake_quantize",
    "make_calibrator",
    "mse_range",
    "mx_fake_quantize",
    "nf4_fake_quantize",
    "nf4_levels",
    "pact_fake_quantize",
    "qrange",
    "quant_ops",
    "quantize",
    "quantize_",
    "quantizers",
    "reconstruct_",
    "reduce_range",
    "save_plan",
    "save_quantized",
    "set_bits_",
    "summary",
]
