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


class _Keyword(torch.utils.data.Dataset):
    """``({"input_ids", "attention_mask"}, label)`` samples (a ``transformers`` model's)."""

    def __init__(self, n: int, bad: object = None) -> None:
        self.ids, self.bad = torch.randint(1, 50, (n, 7)), bad
        self.mask = (torch.arange(7)[None] < torch.randint(3, 8, (n, 1))).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        x = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        return ({**x, "extra": self.bad} if self.bad is not None else x), i % 3


def test_dict_inputs_are_batched_entry_by_entry():
    data = UserData({"train": _Keyword(10), "test": _Keyword(5)}, batch_size=4)
    assert data.input_size == (7,) and data.num_classes == 3
    x, y = next(iter(data.train_loader()))
    assert set(x) == {"input_ids", "attention_mask"} and y.shape == (4,)
    assert x["input_ids"].shape == (4, 7) and x["attention_mask"].dtype == torch.int64
    batches = list(data.eval_loader())
    assert [len(b[1]) for b in batches] == [5] and batches[0][0]["input_ids"].shape == (5, 7)


@pytest.mark.parametrize("bad", ["text", torch.zeros(7, dtype=torch.bool)], ids=["str", "bool"])
def test_a_dict_entry_that_is_not_a_tensor_of_numbers_is_named(bad):
    data = UserData({"train": _Keyword(4, bad), "test": _Keyword(4, bad)})
    with pytest.raises(HawqError, match="sample's 'extra' is a (str|Tensor of torch.bool)"):
        next(iter(data.train_loader()))


def test_splits_are_checked():
    with pytest.raises(HawqError, match="missing"):
        UserData({"train": _split(torch.randn(4, 2))})
    with pytest.raises(HawqError, match="split 'val'"):
        UserData({"train": _split(torch.randn(4, 2)), "test": _split(torch.randn(4, 2))}
                 ).eval_loader("val")  # fmt: skip


CALLS = {"n": 0}


def counting_loss(logits, labels):
    """A loss hook for the tests: cross-entropy plus a visible trace of every call."""
    CALLS["n"] += 1
    return torch.nn.functional.cross_entropy(logits, labels) + 0.0 * logits.sum()


class Focal(torch.nn.Module):
    def forward(self, logits, labels):
        p = torch.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
        return ((1 - p) ** 2 * -torch.log(p.clamp_min(1e-8))).mean()


def test_loss_hooks_resolve_to_callables_or_are_one_line():
    from hawq.data.user import build_loss

    assert build_loss(f"{__name__}.counting_loss") is counting_loss
    assert isinstance(build_loss(f"{__name__}.Focal"), Focal)
    for bad, match in (("tests.nowhere.loss", "cannot import"),
                       (f"{__name__}.CALLS", "not callable"),
                       ("pathlib.Path", "not an nn.Module")):  # fmt: skip
        with pytest.raises(HawqError, match=match):
            build_loss(bad)


def test_the_loss_hook_trains_and_ranks_through_the_cli_stages(make_cfg, monkeypatch):
    """data.loss replaces cross-entropy in training and in the curvature the ops are
    ranked by (every call reaches the hook); a different hook changes the record."""
    from hawq.pipeline import run_pipeline

    from ..conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "experiments" / "own_model"))
    args = ("model=custom", "model._target_=tokenmix.TokenMix", "++model.dim=16", "++model.depth=1",
            "model.prepare.input_shape=[1,16,16]", "data=custom",
            "data.datasets._target_=stripes.datasets", "++data.datasets.n_train=256",
            "++data.datasets.n_test=64", f"data.loss={__name__}.counting_loss", "train.epochs=1",
            "hessian.max_samples=4", "hessian.min_samples=2", "hessian.top_k=0",
            "hessian.density=false")  # fmt: skip
    CALLS["n"] = 0
    run_pipeline(make_cfg(*args, "stages=[train]"))
    assert CALLS["n"] == 2  # 256 images, batch 128: every training step's loss is the hook's
    res = run_pipeline(make_cfg(*args, "stages=[train,hessian]"))  # train: done, skipped
    assert CALLS["n"] > 2 and "hessian" in res["stages"]  # the curvature's loss too
    other = make_cfg(*args, f"data.loss={__name__}.Focal", "stages=[train]")
    with pytest.raises(HawqError, match="data.loss"):  # trained weights: refused, not redone
        run_pipeline(other)
