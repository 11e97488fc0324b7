"""CIFAR-10 packed losslessly (WebP) into parts small enough to travel to a GPU machine.

The device tool carries at most 64 MiB per call (tracked files, wheels and data together). The
npz shards of CIFAR-10 are 47 MB per 16,667 training images (zlib barely compresses pixels:
0.92 of raw), so the 184 MB of raw pixels would need 4 calls. Lossless WebP (``method=4``,
``quality=100``) stores an image in about 0.57 of its 3,072 raw bytes (measured on the test
set: zlib 0.92, lzma 0.76, lzma on row differences 0.71, PNG 0.73, WebP method 6 0.58), so
the whole set is about 105 MB: the 10,000 test images (~17.5 MB) plus about 24,000 training
images fit one call, and everything fits two.

Each part is an uncompressed npz holding ``data`` (the concatenated WebP files, uint8),
``offsets`` (int64, N + 1), ``y`` (int64), ``start`` (index of the first image in its split),
``split`` and ``sha256`` (of the decoded uint8 (N, 32, 32, 3) pixels, checked on unpack):
``cifar10_webp_test.npz`` and ``cifar10_webp_train_<i>of<n>.npz``. :func:`unpack` decodes
every part found in the given folders into the npz shard layout that ``hawq.data`` reads
(``cifar10_train_part<i>of<n>.npz`` + ``cifar10_test.npz``); training uses whichever training
parts are present.

Usage::

    python benchmarks/cifar_pack.py pack --src ../shared/data/cifar10 --out .gpucheck/data
    python benchmarks/cifar_pack.py unpack .gpucheck/data /root/stage --dest /tmp/cifar10
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TEST = "cifar10_webp_test.npz"
TRAIN_RE = re.compile(r"cifar10_webp_train_(\d+)of(\d+)\.npz")


def encode(img: np.ndarray) -> bytes:
    """One (32, 32, 3) uint8 image -> lossless WebP bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "WEBP", lossless=True, quality=100, method=4)
    return buf.getvalue()


def decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _pmap(fn, items: list, workers: int | None = None) -> list:
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as ex:
        return list(ex.map(fn, items, chunksize=256))


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.uint8).tobytes()).hexdigest()


def _write_part(path: Path, blobs: list[bytes], x: np.ndarray, y: np.ndarray, start: int,
                split: str) -> None:  # fmt: skip
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, data=data, offsets=offsets, y=y.astype(np.int64), start=np.int64(start),
             split=np.array(split), sha256=np.array(_digest(x)))  # fmt: skip
    tmp.replace(path)


def pack(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
         out: Path, part_mb: float = 42.0, workers: int | None = None) -> dict:  # fmt: skip
    """Write the test part and training parts of at most ``part_mb`` MB each into ``out``.

    Images are uint8 (N, 32, 32, 3) HWC. Returns the part sizes (bytes) and image counts.
    """
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("cifar10_webp_*.npz"):
        old.unlink()
    _write_part(out / TEST, _pmap(encode, list(x_test), workers), x_test, y_test, 0, "test")
    blobs = _pmap(encode, list(x_train), workers)
    cap, bounds, size, first = part_mb * 1e6, [], 0, 0
    for i, b in enumerate(blobs):
        if size + len(b) > cap and i > first:
            bounds.append((first, i))
            first, size = i, 0
        size += len(b)
    bounds.append((first, len(blobs)))
    for j, (a, e) in enumerate(bounds):
        _write_part(out / f"cifar10_webp_train_{j + 1}of{len(bounds)}.npz", blobs[a:e],
                    x_train[a:e], y_train[a:e], a, "train")  # fmt: skip
    parts = sorted(out.glob("cifar10_webp_*.npz"))
    return {"parts": {p.name: p.stat().st_size for p in parts},
            "raw_bytes": int(x_train.nbytes + x_test.nbytes),
            "packed_bytes": sum(p.stat().st_size for p in parts),
            "train_parts": [e - a for a, e in bounds], "test": len(x_test)}  # fmt: skip


def _read_part(path: Path, workers: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    with np.load(path) as d:
        data, offsets, y = d["data"], d["offsets"], d["y"]
        start, digest = int(d["start"]), str(d["sha256"])
    blobs = [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(y))]
    x = np.stack(_pmap(decode, blobs, workers)) if blobs else np.zeros((0, 32, 32, 3), np.uint8)
    if _digest(x) != digest:
        raise ValueError(f"{path}: decoded pixels do not match the packed sha256")
    return x, y, start


def unpack(sources: list[Path], dest: Path, workers: int | None = None) -> dict:
    """Decode every part found in ``sources`` into npz shards in ``dest`` (hawq.data layout).

    A part name found in several folders is read once. Raises ``FileNotFoundError`` when no
    test part or no training part is found. Returns counts and the parts used/missing.
    """
    found: dict[str, Path] = {}
    for src in sources:
        for p in sorted(Path(src).glob("cifar10_webp_*.npz")):
            found.setdefault(p.name, p)
    train = sorted((n for n in found if TRAIN_RE.fullmatch(n)),
                   key=lambda n: int(TRAIN_RE.fullmatch(n).group(1)))  # fmt: skip
    if TEST not in found or not train:
        where = ", ".join(map(str, sources))
        raise FileNotFoundError(f"need {TEST} and >= 1 cifar10_webp_train_*.npz in {where}; "
                                f"found {sorted(found)}")  # fmt: skip
    total = int(TRAIN_RE.fullmatch(train[0]).group(2))
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("cifar10_*.npz"):
        old.unlink()
    n_train = 0
    for name in train:
        x, y, start = _read_part(found[name], workers)
        i = TRAIN_RE.fullmatch(name).group(1)
        np.savez(dest / f"cifar10_train_part{i}of{total}.npz", x=x, y=y, start=np.int64(start))
        n_train += len(y)
    x, y, _ = _read_part(found[TEST], workers)
    np.savez(dest / "cifar10_test.npz", x=x, y=y)
    missing = [f"cifar10_webp_train_{i}of{total}.npz" for i in range(1, total + 1)
               if f"cifar10_webp_train_{i}of{total}.npz" not in found]  # fmt: skip
    return {"train_images": n_train, "test_images": len(y), "train_parts": train,
            "missing_parts": missing, "dest": str(dest)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="npz shards -> WebP parts")
    repo = Path(__file__).resolve().parents[1]
    p.add_argument("--src", default=os.environ.get("HAWQ_TEST_CIFAR10", str(
        repo.parent / "shared" / "data" / "cifar10")), help="folder with the npz shards")
    p.add_argument("--out", default=".gpucheck/data")
    p.add_argument("--part-mb", type=float, default=42.0)
    u = sub.add_parser("unpack", help="WebP parts -> npz shards")
    u.add_argument("sources", nargs="+")
    u.add_argument("--dest", required=True)
    u.add_argument("--report", default=None, help="also write the JSON summary here")
    args = ap.parse_args()
    if args.cmd == "pack":
        src = Path(args.src)
        shards = sorted(src.glob("cifar10_train_part*of*.npz"))
        if not shards or not (src / "cifar10_test.npz").is_file():
            sys.exit(f"hawq: error: no cifar10_train_part*of*.npz + cifar10_test.npz in {src}")
        tr = [np.load(f) for f in shards]
        te = np.load(src / "cifar10_test.npz")
        res = pack(np.concatenate([d["x"] for d in tr]), np.concatenate([d["y"] for d in tr]),
                   te["x"], te["y"], Path(args.out), args.part_mb)  # fmt: skip
    else:
        res = unpack([Path(s) for s in args.sources], Path(args.dest))
        if args.report:
            Path(args.report).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
