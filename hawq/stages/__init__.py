"""Pipeline stages, one module each (see :mod:`hawq.pipeline` for the protocol)."""
