"""CIFAR-10 without torchvision.

Reads either layout from ``root``:

* the official python archive, ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
  (``root`` may be the folder holding it or the folder itself);
* the npz copy kept for offline machines: ``cifar10_train_part*of3.npz`` and
  ``cifar10_test.npz`` with ``x`` uint8 (N, 32, 32, 3) HWC and ``y`` int64.

When neither is found and ``download=True``, fetches the official archive with a
progress bar, checks its md5 and extracts it under ``root``.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hawq.data.dataset import ImageSplit, Splits
from hawq.errors import HawqError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation: a stalled connection fails instead of hanging
OFFLINE_HINT = (
    "offline? copy cifar-10-batches-py (or the npz shards) into a folder and set "
    "HAWQ_DATA=<folder> or data.root=<folder>"
)
MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: Per-channel mean / std of the training images on the [0, 1] scale.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
_BATCH_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _check(x: np.ndarray, y: np.ndarray, source: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] not in ((32, 32, 3), (3, 32, 32)):
        raise HawqError(
            f"{source}: expected uint8 images of shape (N, 32, 32, 3), got {x.dtype} {x.shape}"
        )
    if y.shape != (x.shape[0],):
        raise HawqError(f"{source}: {x.shape[0]} images but labels of shape {y.shape}")
    if x.shape[1:] == (32, 32, 3):
        x = x.transpose(0, 3, 1, 2)  # HWC -> CHW
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise HawqError(f"{source}: labels outside 0..9")
    return torch.from_numpy(np.ascontiguousarray(x)), labels


def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise HawqError(f"cannot read CIFAR-10 batch {path}: {e}") from e
    return x, y


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as d:
            return d["x"], d["y"]
    except Exception as e:  # noqa: BLE001
        raise HawqError(f"cannot read CIFAR-10 npz {path}: {e}") from e


def _find_batches(root: Path, partial: bool = False) -> Path | None:
    """The folder with the python batches: all five train batches + test_batch; with
    ``partial`` any train batch will do (a folder with only some is an error otherwise)."""
    for cand in (root / _BATCH_DIR, root):
        have = [b for b in _TRAIN_BATCHES if (cand / b).is_file()]
        if not (cand / "test_batch").is_file() or not have:
            continue
        if len(have) < len(_TRAIN_BATCHES) and not partial:
            missing = sorted(set(_TRAIN_BATCHES) - set(have))
            raise HawqError(
                f"CIFAR-10 in {cand} is incomplete: {len(have)} of "
                f"{len(_TRAIN_BATCHES)} train batches ({', '.join(missing)} missing); "
                "allowed: all of them, or data.partial=true to train on the "
                "rest"
            )
        return cand
    return None


_PART = re.compile(r"cifar10_train_part(\d+)of(\d+)\.npz$")


def _find_npz(root: Path, partial: bool = False) -> tuple[list[Path], Path] | None:
    """The npz shards: every ``partKofN`` of the N named (all must be there unless
    ``partial``) + ``cifar10_test.npz``."""
    train = sorted(root.glob("cifar10_train_part*of*.npz"))
    test = root / "cifar10_test.npz"
    if not train or not test.is_file():
        return None
    parts = [m for p in train if (m := _PART.search(p.name))]
    n = max((int(m.group(2)) for m in parts), default=len(train))
    missing = sorted(set(range(1, n + 1)) - {int(m.group(1)) for m in parts})
    if missing and not partial:
        names = ", ".join(f"cifar10_train_part{k}of{n}.npz" for k in missing)
        raise HawqError(
            f"CIFAR-10 in {root} is incomplete: {n - len(missing)} of {n} train "
            f"shards ({names} missing); allowed: all of them, or data.partial=true "
            "to train on the rest"
        )
    return train, test


def load_cifar10(root: str | Path, download: bool = False, partial: bool = False) -> Splits:
    """Load CIFAR-10 train and test splits as uint8 (N, 3, 32, 32) tensors.

    Args:
        root: folder with the python batches or the npz shards.
        download: fetch the official archive into ``root`` when nothing is found.
        partial: accept missing train shards/batches (an empty split is always an error).

    Raises:
        HawqError: data missing (and not downloading), unreadable or wrong-shaped.
    """
    root = Path(root).expanduser()
    batches = _find_batches(root, partial)
    if batches is None and (npz := _find_npz(root, partial)) is not None:
        train_files, test_file = npz
        parts = [_read_npz(p) for p in train_files]
        xtr = np.concatenate([p[0] for p in parts])
        ytr = np.concatenate([p[1] for p in parts])
        xte, yte = _read_npz(test_file)
        source = root
    else:
        if batches is None:
            if not download:
                raise HawqError(
                    f"CIFAR-10 not found in {root} (looked for {_BATCH_DIR}/data_batch_1..5 + "
                    "test_batch, or cifar10_train_part*of3.npz + cifar10_test.npz); set "
                    "data.download=true to fetch it, or HAWQ_DATA=<folder> / "
                    "data.root=<folder> to the folder holding it"
                )
            download_cifar10(root)
            batches = root / _BATCH_DIR
        parts = [
            _read_pickle(batches / b)
            for b in _TRAIN_BATCHES
            if (batches / b).is_file() or not partial
        ]
        xtr = np.concatenate([p[0] for p in parts])
        ytr = np.concatenate([p[1] for p in parts])
        xte, yte = _read_pickle(batches / "test_batch")
        source = batches
    train = ImageSplit(*_check(xtr, ytr, source))
    test = ImageSplit(*_check(xte, yte, source))
    for split, data in (("train", train), ("test", test)):
        if len(data) == 0:
            raise HawqError(
                f"CIFAR-10 in {source}: the {split} split has 0 images; allowed: "
                "a data set with images (data.root=<folder holding CIFAR-10>)"
            )
    return Splits(train=train, test=test, classes=CLASSES, mean=MEAN, std=STD)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(
    root: str | Path, url: str = URL, md5: str = MD5, timeout: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Download the official archive into ``root``, verify its md5 and extract it.

    ``timeout`` bounds every socket operation (connect and each read), so a
    dropping network ends in an error instead of hanging; the error names the
    offline way out (``HAWQ_DATA`` / ``data.root``).

    Returns:
        The extracted ``cifar-10-batches-py`` folder.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(url).name
    if not archive.is_file() or _md5(archive) != md5:
        fd, tmp_name = tempfile.mkstemp(dir=root, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(fd, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10", disable=None)
                with bar:
                    for chunk in iter(lambda: resp.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            got = _md5(tmp)
            if got != md5:
                raise HawqError(
                    f"download of {url} is corrupt: md5 {got}, expected {md5}; {OFFLINE_HINT}"
                )
            tmp.replace(archive)
        except OSError as e:  # includes socket timeouts and refused/reset connections
            reason = getattr(e, "reason", None) or e
            msg = f"cannot download CIFAR-10 from {url} ({reason}); {OFFLINE_HINT}"
            raise HawqError(msg) from e
        finally:
            tmp.unlink(missing_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / _BATCH_DIR
