"""The integer graphs trace whole: no data-dependent branch or host read in forward_int.

A host read (``int(tensor)``, ``if tensor.any()``) is a device sync per call on a GPU and a
graph break under ``torch.compile``; the integer models have none, so the whole forward
compiles into one graph (tested with ``torch._dynamo.explain``, which traces without
compiling). Checked on the ``reference`` backend, which is the GPU's graph; the ``cpu``
backend calls opaque C++/oneDNN kernels and is meant to run eagerly."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from hawq.integer import ops
from hawq.integer.convert import convert

from .cases import fake_quant, randomize_bn, tiny_resnet, tiny_vit


@pytest.mark.parametrize("make", [tiny_vit, tiny_resnet], ids=["vit", "resnet"])
def test_forward_int_is_one_graph(make):
    torch.manual_seed(0)
    net = make()
    randomize_bn(net)
    calib = torch.randn(16, 3, 32, 32)
    imodel = convert(fake_quant(net, calib), [(calib,)])
    xq = imodel.quantize_input(torch.randn(4, 3, 32, 32))
    torch._dynamo.reset()
    with torch.no_grad(), ops.backend("reference"):
        ex = torch._dynamo.explain(imodel.forward_int)(xq)
    reasons = [r.reason.splitlines()[0] for r in ex.break_reasons]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, reasons
