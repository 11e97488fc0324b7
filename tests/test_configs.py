"""Every experiment composes; every model and data option instantiates."""


import pytest
from hydra.utils import instantiate

from hawq.alloc.config import AllocConfig
from hawq.alloc.curve import CurveConfig
from hawq.analysis.config import LandscapeConfig
from hawq.config import DataConfig, TrainConfig, run_config, typed
from hawq.hessian.config import HessianConfig
from hawq.integer.config import IntegerConfig, LatencyConfig
from hawq.models import op_inventory
from hawq.quant.config import QATConfig, QuantConfig
from hawq.run import CONF_DIR

CONF = CONF_DIR
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
#: every group a stage validates, with its schema
TYPED = {"train": TrainConfig, "data": DataConfig, "hessian": HessianConfig, "alloc": AllocConfig,
         "curve": CurveConfig, "quant": QuantConfig, "qat": QATConfig, "integer": IntegerConfig,
         "latency": LatencyConfig, "landscape": LandscapeConfig}  # fmt: skip
OP_COUNTS = {"vit_cifar": 38, "vit_cifar_cpu": 38, "vit_tiny": 14, "resnet20": 20, "resnet_tiny": 8,
             "torch_vit_cifar": 50, "torch_vit_tiny": 18, "custom": None}
#: the custom groups need the user's _target_ (here hawq's own zoo and the worked example)
CUSTOM = {"model": ["model._target_=hawq.models.zoo.SmallCNN", "++model.width=4"],
          "data": ["data.datasets._target_=stripes.datasets", "++data.datasets.n_train=64",
                   "++data.datasets.n_test=32"]}  # fmt: skip


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}")
    assert cfg.name
    run_config(cfg)
    for group, schema in TYPED.items():
        typed(cfg[group], schema, group)


@pytest.mark.parametrize("model", MODELS)
def test_model_group_instantiates(make_cfg, model):
    from hawq.checkpoint import build_model

    cfg = make_cfg(f"model={model}", *(CUSTOM["model"] if model == "custom" else []))
    net = build_model(cfg.model)
    ops = len(op_inventory(net))
    assert ops == OP_COUNTS[model] if model != "custom" else net.hawq_capture.share == 1.0


def test_data_groups_instantiate(make_cfg):
    cfg = make_cfg("data=synthetic", "data.train_subset=64", "data.test_subset=32")
    data = instantiate(cfg.data)
    assert len(data.splits.train) == 64 and data.input_size == (3, 32, 32)
    data = instantiate(make_cfg("data=cifar10", "data.root=/nowhere").data)
    assert data.root == "/nowhere"  # nothing loaded until used


def test_custom_data_group_instantiates(make_cfg, monkeypatch):
    from hawq.config import validate_data

    from .conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "experiments" / "own_model"))
    cfg = make_cfg("data=custom", *CUSTOM["data"])
    validate_data(cfg.data)
    data = instantiate(cfg.data)
    assert data.input_size == (1, 16, 16) and data.num_classes == 4
    x, y = next(iter(data.eval_loader("test", "cpu", 8)))
    assert x.shape == (8, 1, 16, 16) and y.dtype.is_floating_point is False


def test_every_group_option_is_listed_here():
    assert set(OP_COUNTS) == set(MODELS)
    untyped = {"experiment", "hydra", "model", "paths"}  # recipes, Hydra's own, _target_, paths
    groups = {p.name for p in CONF.iterdir() if p.is_dir()} - untyped
    assert groups == set(TYPED)


def test_group_values_may_interpolate_other_groups(make_cfg):
    from hawq.alloc.config import AllocConfig

    cfg = make_cfg("experiment=vit_cifar_hawq", "paths.runs=/somewhere")
    assert typed(cfg.alloc, AllocConfig, "alloc").hessian == "/somewhere/vit_cifar/hessian.json"
