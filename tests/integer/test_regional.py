"""Bounded compile of the integer model: blocks compile one at a time within a budget, and
the compiled model is bit-identical to eager (Dynamo with the eager backend: traces, no
Inductor, so the test takes seconds). On the ``reference`` backend, the graph a GPU
compiles: the CPU backend's C++ kernels are opaque calls that break graphs by design."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from hawq.integer import ops
from hawq.integer.convert import convert
from hawq.integer.regional import compile_blocks, regions

from .cases import fake_quant, tiny_vit


@ops.backend("reference")
def test_budget_bounds_compiled_blocks_and_output_is_exact():
    torch.manual_seed(0)
    net = tiny_vit()
    calib = torch.randn(16, 3, 32, 32)
    imodel = convert(fake_quant(net, calib), [(calib,)])
    xq = imodel.quantize_input(torch.randn(4, 3, 32, 32))
    with torch.no_grad():
        ref = imodel.forward_int(xq)
    torch._dynamo.reset()
    info = compile_blocks(imodel, xq, budget_s=0.0, backend="eager")
    steps = regions(imodel)
    assert len(steps) >= 2
    assert info["regions"] == len(steps) and info["compiled"] == 1 and info["graphs"] == 1
    first = steps[0]  # patch_embed: the first step to run
    assert first._compiled_call_impl is not None
    assert all(s._compiled_call_impl is None for s in steps[1:])  # the rest stay eager
    with torch.no_grad():
        assert torch.equal(imodel.forward_int(xq), ref)
    torch._dynamo.reset()


def test_model_without_blocks_is_rejected():
    with pytest.raises(ValueError, match="no regions"):
        compile_blocks(torch.nn.Linear(2, 2), torch.zeros(1, 2))
