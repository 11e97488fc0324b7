"""Quantization: primitives, calibrators, quantized modules, plans, PTQ and QAT."""
