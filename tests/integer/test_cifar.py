"""Integer vs fake-quant argmax agreement >= 99% on real CIFAR-10 test images (tiny models)."""

from __future__ import annotations

import pytest
import torch

from hawq.data.module import ImageData
from hawq.integer.convert import convert
from hawq.stages.integer import compare
from tests.integer.cases import fake_quant, tiny_resnet, tiny_vit, train_tiny


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit], ids=["resnet8", "vit_tiny"])
def test_integer_agrees_with_fake_quant_on_cifar10(cifar10_dir, make):
    data = ImageData(root=str(cifar10_dir), batch_size=128, eval_batch_size=500,
                     train_subset=8192, test_subset=5000)  # fmt: skip
    torch.manual_seed(0)
    model = train_tiny(make(), data.train_loader(seed=0), epochs=4)
    calib = next(iter(data.eval_loader("train", batch_size=256)))[0]
    q = fake_quant(model, calib)
    im = convert(q, data.eval_loader("train", batch_size=256), max_batches=2)
    res = compare(q, im, data.eval_loader("test"), torch.device("cpu"))
    assert res["fake_quant_acc"] > 30.0  # the model learned something: margins are real
    assert res["agreement"] >= 99.0
    assert abs(res["fake_quant_acc"] - res["integer_acc"]) <= 1.0
