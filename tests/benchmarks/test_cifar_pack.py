"""CIFAR-10 WebP packing for the GPU machine: lossless, split by size, staged from several
folders, checked by sha256, and read back by hawq.data as ordinary npz shards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hawq.data.cifar10 import load_cifar10
from hawq.errors import HawqError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("PIL.WebPImagePlugin")
import cifar_pack  # noqa: E402


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    x[0] = 0  # flat extremes
    x[1] = 255
    x[2] = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8)  # smooth
    return x, g.integers(0, 10, n).astype(np.int64)


def test_pack_unpack_bit_exact_across_parts_and_folders(tmp_path):
    xtr, ytr = _images(60, 0)
    xte, yte = _images(20, 1)
    info = cifar_pack.pack(xtr, ytr, xte, yte, tmp_path / "a", part_mb=0.07, workers=2)
    parts = sorted(p for p in info["parts"] if "train" in p)
    assert len(parts) >= 3 and sum(info["train_parts"]) == 60
    # the parts travel in two folders (two device calls); one part is found in both
    (tmp_path / "b").mkdir()
    for name in parts[1:]:
        (tmp_path / "a" / name).rename(tmp_path / "b" / name)
    (tmp_path / "b" / parts[0]).write_bytes((tmp_path / "a" / parts[0]).read_bytes())
    res = cifar_pack.unpack([tmp_path / "a", tmp_path / "b"], tmp_path / "npz", workers=2)
    assert res["train_images"] == 60 and res["test_images"] == 20 and not res["missing_parts"]
    splits = load_cifar10(tmp_path / "npz")  # the loader's own layout, (N, 3, 32, 32)
    hwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert np.array_equal(hwc(splits.train.images), xtr)
    assert np.array_equal(splits.train.labels.numpy(), ytr)
    assert np.array_equal(hwc(splits.test.images), xte)
    assert np.array_equal(splits.test.labels.numpy(), yte)


def test_missing_part_is_reported_and_the_rest_is_used(tmp_path):
    xtr, ytr = _images(40, 2)
    xte, yte = _images(10, 3)
    info = cifar_pack.pack(xtr, ytr, xte, yte, tmp_path / "a", part_mb=0.07, workers=2)
    parts = sorted(p for p in info["parts"] if "train" in p)
    (tmp_path / "a" / parts[-1]).unlink()  # the machine went cold between two calls
    res = cifar_pack.unpack([tmp_path / "a"], tmp_path / "npz", workers=2)
    assert res["missing_parts"] == [parts[-1]]
    assert res["train_images"] == 40 - info["train_parts"][-1]
    with pytest.raises(HawqError, match="incomplete"):  # a partial set is an error unless asked
        load_cifar10(tmp_path / "npz")
    assert len(load_cifar10(tmp_path / "npz", partial=True).train) == res["train_images"]


def test_corrupt_part_and_absent_test_part_fail(tmp_path):
    xtr, ytr = _images(8, 4)
    cifar_pack.pack(xtr, ytr, xtr, ytr, tmp_path, part_mb=100, workers=1)
    part = tmp_path / "cifar10_webp_train_1of1.npz"
    with np.load(part) as d:
        fields = {k: d[k] for k in d.files}
    fields["sha256"] = np.array("0" * 64)
    np.savez(part, **fields)
    with pytest.raises(ValueError, match="sha256"):
        cifar_pack.unpack([tmp_path], tmp_path / "npz")
    (tmp_path / cifar_pack.TEST).unlink()
    with pytest.raises(FileNotFoundError, match="cifar10_webp_test"):
        cifar_pack.unpack([tmp_path], tmp_path / "npz")
