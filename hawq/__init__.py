"""hawq: Hessian-aware mixed-precision quantization for PyTorch."""

__version__ = "0.1.0"
