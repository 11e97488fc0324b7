"""Integer-only conversion driven by the model's graph (see hawq/integer/README.md).

``trace`` (fx with example values) -> ``analyze`` (kinds and demands) -> calibration of the
formats the fake-quant model leaves in float -> ``lower`` / ``materialize`` / ``attention``
(integer steps, fusions) -> ``program`` (the graph as plain records); ``islands`` leaves
allow-listed float ops between a dequantize and a quantize when asked. The entry point is
:func:`hawq.integer.convert` (:func:`hawq.integer.graph.convert.convert_graph`).
"""
