import hashlib
import http.server
import pickle
import tarfile
import threading
import time

import numpy as np
import pytest
import torch

from hawq.data import load_cifar10
from hawq.data.cifar10 import download_cifar10
from hawq.errors import HawqError


def write_python_layout(folder, images: np.ndarray, labels: np.ndarray) -> None:
    """The official cifar-10-batches-py layout: 5 train pickles + test_batch."""
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(labels)), 6)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, idx in zip(names, chunks):
        d = {b"data": images[idx].reshape(len(idx), -1), b"labels": labels[idx].tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)


def test_real_npz_layout(cifar10_dir):
    s = load_cifar10(cifar10_dir)
    assert s.train.images.shape == (50000, 3, 32, 32) and s.train.images.dtype == torch.uint8
    assert s.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(s.train.labels).tolist() == [5000] * 10
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    means = s.train.images.float().mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([125.307, 122.950, 113.865]), atol=0.01)


def test_python_layout_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 60)
    write_python_layout(tmp_path / "cifar-10-batches-py", images, labels)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        s = load_cifar10(root)
        assert len(s.train) == 50 and len(s.test) == 10
        assert torch.equal(s.train.images, torch.from_numpy(images[:50]))
        assert s.test.labels.tolist() == labels[50:].tolist()


def test_download_checks_md5_and_extracts(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    write_python_layout(src / "cifar-10-batches-py", rng.integers(0, 256, (12, 3, 32, 32),
                        dtype=np.uint8), rng.integers(0, 10, 12))  # fmt: skip
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    url = archive.as_uri()

    with pytest.raises(HawqError, match="md5"):
        download_cifar10(tmp_path / "bad", url=url, md5="0" * 32)
    assert not list((tmp_path / "bad").glob("*.part")), "no half-written download left behind"

    out = download_cifar10(tmp_path / "root", url=url, md5=md5)
    assert (out / "test_batch").is_file()
    assert len(load_cifar10(tmp_path / "root").train) == 10


def test_missing_data_says_what_was_looked_for(tmp_path):
    with pytest.raises(HawqError, match="CIFAR-10 not found in .*data.download=true"):
        load_cifar10(tmp_path)


def test_wrong_shape_and_unreadable_data(tmp_path):
    np.savez(tmp_path / "cifar10_train_part1of1.npz", x=np.zeros((4, 28, 28), np.uint8),
             y=np.zeros(4, np.int64))  # fmt: skip
    np.savez(tmp_path / "cifar10_test.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4))
    with pytest.raises(HawqError, match="expected uint8 images of shape"):
        load_cifar10(tmp_path)
    (tmp_path / "cifar10_train_part1of1.npz").write_bytes(b"not an npz")
    with pytest.raises(HawqError, match="cannot read CIFAR-10 npz"):
        load_cifar10(tmp_path)


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    """Sends headers and a few bytes, then stalls: a dropping network."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"0" * 100)
        self.wfile.flush()
        time.sleep(5)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("kind", ["stall", "refused"])
def test_download_times_out_and_names_the_offline_way_out(tmp_path, kind):
    """A stalled or refused download fails within the timeout, naming HAWQ_DATA / data.root."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingHandler)
    port = server.server_address[1]
    if kind == "stall":
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()  # nothing listens on the port any more
    try:
        start = time.perf_counter()
        with pytest.raises(HawqError) as info:
            download_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/c.tar.gz", md5="0" * 32,
                             timeout=0.5)  # fmt: skip
        assert time.perf_counter() - start < 4.5, "the download hung past its timeout"
    finally:
        if kind == "stall":
            server.shutdown()
            server.server_close()
    msg = str(info.value)
    assert "\n" not in msg and "HAWQ_DATA" in msg and "data.root" in msg
    assert not list(tmp_path.glob("*.part")), "no half-written download left behind"


def test_missing_data_without_download_names_hawq_data(tmp_path):
    with pytest.raises(HawqError, match="HAWQ_DATA=<folder> / data.root=<folder>"):
        load_cifar10(tmp_path, download=False)
