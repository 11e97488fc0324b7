"""The user's own datasets (``data=custom``): splits, sample formats, loaders."""

import pytest
import torch
from torch.utils.data import TensorDataset

from hawq.data.user import UserData
from hawq.errors import HawqError


def _split(x: torch.Tensor, n_classes: int = 3) -> TensorDataset:
    return TensorDataset(x, torch.arange(len(x)) % n_classes)


def test_token_ids_are_inputs_as_they_are():
    data = UserData({"train": _split(torch.randint(0, 50, (10, 7))),
                     "test": _split(torch.randint(0, 50, (4, 7)))}, batch_size=4)  # fmt: skip
    assert data.input_size == (7,) and data.num_classes == 3
    x, y = next(iter(data.train_loader()))
    assert x.dtype == torch.int64 and x.shape == (4, 7) and y.dtype == torch.int64
    assert sum(len(b[1]) for b in data.eval_loader()) == 4


@pytest.mark.parametrize(
    "x", [torch.zeros(6, 3, dtype=torch.bool), torch.zeros(6, 2, dtype=torch.complex64)]
)
def test_inputs_that_are_neither_floats_nor_ids_are_one_line(x):
    data = UserData({"train": _split(x), "test": _split(x)})
    with pytest.raises(HawqError, match="a float tensor .* or an integer one"):
        next(iter(data.train_loader()))


def test_splits_are_checked():
    with pytest.raises(HawqError, match="missing"):
        UserData({"train": _split(torch.randn(4, 2))})
    with pytest.raises(HawqError, match="split 'val'"):
        UserData({"train": _split(torch.randn(4, 2)), "test": _split(torch.randn(4, 2))}
                 ).eval_loader("val")  # fmt: skip
