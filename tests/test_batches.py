"""Batches of any structure (``hawq.batches``): what every stage does to one."""

import torch

from hawq.batches import batch_size, call_model, cast_floats, model_inputs, sample_slice


def test_casts_touch_floats_only():
    ids, x, y = torch.arange(6).view(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    for batch in ((x, y), (ids, y), {"input_ids": ids, "pixels": x, "flag": True}):
        out = cast_floats(batch, torch.float64)
        leaves = out.values() if isinstance(out, dict) else out
        src = batch.values() if isinstance(batch, dict) else batch
        for a, b in zip(leaves, src):
            if isinstance(b, torch.Tensor):
                want = torch.float64 if b.is_floating_point() else b.dtype
                assert a.dtype == want and torch.equal(a.to(b.dtype), b)
            else:
                assert a is b


def test_structures_are_read_the_same_way():
    ids, y = torch.arange(8).view(4, 2), torch.tensor([0, 1, 0, 1])
    assert batch_size((ids, y)) == 4 and batch_size({"input_ids": ids}) == 4
    part = sample_slice({"input_ids": ids, "shared": torch.ones(3)}, 1, 3, 4)
    assert torch.equal(part["input_ids"], ids[1:3]) and part["shared"].shape == (3,)
    assert model_inputs((ids, y)) is ids and model_inputs(ids) is ids
    assert torch.equal(call_model(lambda input_ids: input_ids + 1, {"input_ids": ids}), ids + 1)
    assert torch.equal(call_model(lambda t: t * 2, (ids, y)), ids * 2)
