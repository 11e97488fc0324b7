"""Plan validation (issue 15 item 11): every malformed value ends in one HawqError line
naming the key, never a TypeError/AttributeError from deep inside torch."""

from __future__ import annotations

import pytest
import torch

from hawq.errors import HawqError
from hawq.quant import quantize_
from hawq.quant.plan import OpSetting, Plan, load_plan

from .cases import tiny_vit

BOOL_KEYS = ("symmetric", "a_symmetric", "dynamic")
BAD_BOOLS = ("false", "true", "yes", "no", 0, 1, None, 0.0, [])


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", BAD_BOOLS)
def test_non_boolean_flags_are_rejected_naming_the_key(key, value):
    for where, d in (("plan._default", {"_default": {key: value}}),
                     ("plan.patch_embed", {"patch_embed": {key: value}})):  # fmt: skip
        with pytest.raises(HawqError) as e:
            Plan.from_dict(d)
        msg = str(e.value)
        assert "\n" not in msg and where in msg and key in msg, msg
    with pytest.raises(HawqError, match=key):
        OpSetting(**{key: value})


@pytest.mark.parametrize("entry", [4, "w4a4", [4, 4], 4.0, True])
def test_op_entry_that_is_not_a_mapping_names_the_op(entry):
    with pytest.raises(HawqError) as e:
        Plan.from_dict({"_default": {"w_bits": 8}, "patch_embed": entry})
    assert "plan.patch_embed" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HawqError, match="_default"):
        Plan.from_dict({"_default": entry})


@pytest.mark.parametrize("key,value", [("group_size", True), ("group_size", "64"),
                                       ("w_format", 4), ("calibrator", ["mse"]),
                                       ("granularity", None)])  # fmt: skip
def test_wrong_types_name_the_key(key, value):
    with pytest.raises(HawqError, match=key):
        Plan.from_dict({"blocks.0.attn.qkv": {key: value}})


def test_plan_objects_with_wrong_entries_and_dicts_for_plans():
    with pytest.raises(HawqError, match="patch_embed"):
        Plan(OpSetting(), {"patch_embed": 4})
    with pytest.raises(HawqError, match="_default"):
        Plan({"w_bits": 4})
    model = tiny_vit()
    with pytest.raises(HawqError, match="not a Plan"):
        quantize_(model, {"_default": {"w_bits": 4, "a_bits": 4}})


def test_yaml_strings_for_booleans_are_rejected(tmp_path):
    path = tmp_path / "bits.yaml"
    path.write_text("plan:\n  _default: {w_bits: 8, a_bits: 8}\n"
                    "  patch_embed: {symmetric: 'false'}\n")  # fmt: skip
    with pytest.raises(HawqError, match=r"patch_embed.*symmetric='false'"):
        load_plan(path)
    path.write_text("plan:\n  _default: {dynamic: 'yes'}\n")
    with pytest.raises(HawqError, match="dynamic='yes'"):
        load_plan(path)


def test_valid_plans_still_work():
    p = Plan.from_dict({"_default": {"w_bits": 8, "symmetric": False, "dynamic": True},
                        "patch_embed": {"w_bits": 4}})  # fmt: skip
    assert p.setting("patch_embed").w_bits == 4 and p.setting("patch_embed").dynamic is True
    model = quantize_(tiny_vit(), p)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
