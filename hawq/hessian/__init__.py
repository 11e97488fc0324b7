"""Matrix-free curvature of a loss: per-op traces, top eigenvalues, activation traces, SLQ.

Everything is built from Hessian-vector products (:mod:`hawq.hessian.hvp`) behind a
linear operator that supports ``@`` (:mod:`hawq.hessian.operator`); each estimator
lives in its own module and accepts any such operator.
"""

from hawq.hessian.activation import ActivationHessian, operand_traces
from hawq.hessian.api import (
    activation_traces,
    layer_eigenpairs,
    layer_eigenvalues,
    layer_traces,
    spectral_density,
)
from hawq.hessian.density import SpectralDensity, slq
from hawq.hessian.hutchinson import BlockTraces, TraceEstimate, block_traces
from hawq.hessian.lanczos import lanczos
from hawq.hessian.operator import HessianOperator, hessian_operator, op_blocks
from hawq.hessian.power import EigenResult, power_iteration
from hawq.hessian.report import load_hessian_report, write_hessian_report

__all__ = [
    "ActivationHessian",
    "BlockTraces",
    "EigenResult",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "activation_traces",
    "block_traces",
    "hessian_operator",
    "lanczos",
    "layer_eigenpairs",
    "layer_eigenvalues",
    "layer_traces",
    "load_hessian_report",
    "op_blocks",
    "operand_traces",
    "power_iteration",
    "slq",
    "spectral_density",
    "write_hessian_report",
]
