"""Tests of revlearn.data: IDX reader, embedded MNIST, downloader, splits."""

import gzip
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from revlearn import data
from revlearn.data import (
    Dataset,
    DownloadError,
    class_balanced_indices,
    download_file,
    download_mnist,
    encode_idx,
    load_mnist,
    parse_idx,
    read_idx,
    split,
    subtract_mean,
)

SHARED_MNIST = Path(__file__).parents[1] / ".." / "shared" / "data" / "mnist"
EMBEDDED_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-1, 2, -3], dtype=np.int8),
        np.array([[1, -2], [300, 4]], dtype=np.int16),
        np.array([1, -70000], dtype=np.int32),
        np.array([1.5, -2.25], dtype=np.float32),
        np.array([[np.pi]], dtype=np.float64),
    ],
)
def test_idx_round_trip(tmp_path, array, compress):
    path = tmp_path / "a.idx"
    path.write_bytes(encode_idx(array, compress=compress))
    got = read_idx(path)
    assert got.shape == array.shape
    assert got.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, array)


def test_idx_header_is_big_endian():
    raw = encode_idx(np.array([1, 2], dtype=np.int32))
    assert raw[:4] == bytes([0, 0, 0x0C, 1])
    assert raw[4:8] == (2).to_bytes(4, "big")
    assert raw[8:12] == (1).to_bytes(4, "big")
    np.testing.assert_array_equal(parse_idx(raw), [1, 2])
    np.testing.assert_array_equal(parse_idx(gzip.compress(raw)), [1, 2])


def _corrupt_cases():
    good = encode_idx(np.arange(12, dtype=np.uint8).reshape(3, 4))
    gz = gzip.compress(good)
    return {
        "truncated payload": (good[:-1], "truncated"),
        "extra payload": (good + b"\x00", "longer than declared"),
        "bad magic": (b"\x01" + good[1:], "does not start with two zero bytes"),
        "bad dtype": (good[:2] + b"\x42" + good[3:], "dtype code 0x42"),
        "zero dims": (b"\x00\x00\x08\x00", "0 dimensions"),
        "short header": (good[:6], "truncated inside its header"),
        "tiny": (b"\x00\x00", "fewer than the 4-byte magic"),
        "truncated gzip": (gz[: len(gz) // 2], "truncated gzip"),
        "corrupt gzip": (gz[:10] + b"\xff" * 20 + gz[30:], "gzip"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_idx_rejects_corrupt_files(tmp_path, case):
    payload, message = _corrupt_cases()[case]
    path = tmp_path / "bad-file.idx"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "bad-file.idx" in str(info.value)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_idx(tmp_path / "nope")


def test_encode_idx_refuses_unknown_dtype():
    with pytest.raises(ValueError, match="no IDX code"):
        encode_idx(np.array([1], dtype=np.uint16))


# -------------------------------------------------------------- embedded set


@pytest.fixture(scope="module")
def embedded():
    return load_mnist("embedded")


def test_embedded_mnist(embedded):
    assert len(embedded) == 10_000
    assert embedded.images.shape == (10_000, 784)
    assert embedded.images.dtype == np.float32
    assert embedded.labels.dtype == np.int32
    assert embedded.images.min() == 0.0 and embedded.images.max() == 1.0
    assert embedded.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(embedded.labels).tolist() == EMBEDDED_COUNTS
    onehot = embedded.onehot
    assert onehot.shape == (10_000, 10) and onehot.dtype == np.float32
    np.testing.assert_array_equal(onehot.argmax(1), embedded.labels)
    np.testing.assert_array_equal(onehot.sum(1), 1.0)


def test_embedded_files_match_canonical_sha256():
    import importlib.resources

    root = importlib.resources.files("revlearn.data") / "embedded"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        content = gzip.decompress((root / f"{name}.gz").read_bytes())
        assert hashlib.sha256(content).hexdigest() == data.MNIST_SHA256[name]
    readme = (root / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and data.MNIST_SHA256["t10k-images-idx3-ubyte"] in readme


def test_reader_on_shared_mnist_folder(embedded):
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"{SHARED_MNIST} is absent (it exists on developer machines and CI)")
    images = read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, embedded.labels)
    np.testing.assert_array_equal(images.reshape(10_000, -1) / np.float32(255), embedded.images)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        got = data.sha256_uncompressed(SHARED_MNIST / f"{name}.gz")
        assert got == data.MNIST_SHA256[name]


def test_load_mnist_unknown_source():
    with pytest.raises(ValueError, match="source='cifar'.*'embedded'.*'mnist'"):
        load_mnist("cifar")


def test_dataset_validates_shapes():
    with pytest.raises(ValueError, match="labels must have shape \\(3,\\)"):
        Dataset(np.zeros((3, 784)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="images must be \\[n, pixels\\]"):
        Dataset(np.zeros((3, 28, 28)), np.zeros(3, dtype=int))


# --------------------------------------------------------------- downloader


def _tiny_mnist(n_train=6, n_test=4):
    """Four small, valid MNIST-shaped IDX files (gzip), and their sha256."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) + 3) % 10,
    }
    files = {k: encode_idx(v, compress=True) for k, v in arrays.items()}
    sums = {k: hashlib.sha256(encode_idx(v)).hexdigest() for k, v in arrays.items()}
    return arrays, files, sums


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict  # path -> (bytes, declared length or None)

    def do_GET(self):
        entry = self.files.get(self.path.lstrip("/"))
        if entry is None:
            self.send_error(404)
            return
        body, declared = entry
        self.send_response(200)
        self.send_header("Content-Length", str(declared if declared is not None else len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server; set ``server.files[name] = (bytes, declared_len)``."""
    handler = type("Handler", (_Handler,), {"files": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.files = handler.files
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/mnist"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_download_success_and_load(tmp_path, server):
    arrays, files, sums = _tiny_mnist()
    for name, body in files.items():
        server.files[f"mnist/{name}.gz"] = (body, None)
    got = download_file("t10k-labels-idx1-ubyte", tmp_path, sums["t10k-labels-idx1-ubyte"], [server.url])
    assert got == tmp_path / "t10k-labels-idx1-ubyte.gz"
    np.testing.assert_array_equal(read_idx(got), arrays["t10k-labels-idx1-ubyte"])
    assert _leftovers(tmp_path) == ["t10k-labels-idx1-ubyte.gz"]


def test_load_mnist_downloads_once_and_concatenates(tmp_path, server, monkeypatch):
    arrays, files, sums = _tiny_mnist()
    monkeypatch.setattr(data._download, "MNIST_SHA256", sums)
    for name, body in files.items():
        server.files[f"mnist/{name}.gz"] = (body, None)
    folder = tmp_path / "cache" / "mnist"  # does not exist yet: load_mnist creates it
    ds = load_mnist("mnist", data_dir=folder, mirrors=[server.url])
    assert len(ds) == 10
    expected_labels = np.concatenate(
        [arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]]
    )
    np.testing.assert_array_equal(ds.labels, expected_labels)
    np.testing.assert_array_equal(
        ds.images[:6] * 255, arrays["train-images-idx3-ubyte"].reshape(6, -1)
    )
    assert len(_leftovers(folder)) == 4
    # A second load must not touch the network: the server has nothing now.
    server.files.clear()
    again = load_mnist("mnist", data_dir=folder, mirrors=[server.url])
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_load_mnist_uses_env_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("REVLEARN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.mnist_dir() == tmp_path / "xdg" / "revlearn" / "mnist"
    monkeypatch.setenv("REVLEARN_DATA", str(tmp_path / "env"))
    assert data.mnist_dir() == tmp_path / "env"
    assert data.mnist_dir(tmp_path / "arg") == tmp_path / "arg"


def test_load_mnist_without_download_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist("mnist", data_dir=tmp_path, download=False)


def test_download_checksum_mismatch_leaves_nothing(tmp_path, server):
    _, files, _ = _tiny_mnist()
    server.files["mnist/t10k-labels-idx1-ubyte.gz"] = (files["t10k-labels-idx1-ubyte"], None)
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        download_file("t10k-labels-idx1-ubyte", tmp_path, "0" * 64, [server.url])
    assert "expected " + "0" * 64 in str(info.value)
    assert _leftovers(tmp_path) == []


def test_download_truncated_transfer_leaves_nothing(tmp_path, server):
    _, files, sums = _tiny_mnist()
    body = files["t10k-images-idx3-ubyte"]
    # The server declares the full length but sends only half and closes.
    server.files["mnist/t10k-images-idx3-ubyte.gz"] = (body[: len(body) // 2], len(body))
    with pytest.raises(DownloadError, match="t10k-images-idx3-ubyte") as info:
        download_file("t10k-images-idx3-ubyte", tmp_path, sums["t10k-images-idx3-ubyte"], [server.url], timeout=5)
    assert "truncated" in str(info.value).lower() or "IncompleteRead" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_download_truncated_gzip_leaves_nothing(tmp_path, server):
    _, files, sums = _tiny_mnist()
    body = files["t10k-images-idx3-ubyte"]
    server.files["mnist/t10k-images-idx3-ubyte.gz"] = (body[: len(body) // 2], None)
    with pytest.raises(DownloadError, match="truncated gzip"):
        download_file("t10k-images-idx3-ubyte", tmp_path, sums["t10k-images-idx3-ubyte"], [server.url])
    assert _leftovers(tmp_path) == []


def test_download_unreachable_server(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DownloadError, match="every mirror failed") as info:
        download_file("t10k-labels-idx1-ubyte", tmp_path, "0" * 64, [url], timeout=5)
    assert url in str(info.value) and "URLError" in str(info.value)
    assert "load_mnist('embedded')" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_download_falls_back_to_next_mirror(tmp_path, server):
    _, files, sums = _tiny_mnist()
    server.files["mnist/t10k-labels-idx1-ubyte.gz"] = (files["t10k-labels-idx1-ubyte"], None)
    path = download_file(
        "t10k-labels-idx1-ubyte", tmp_path, sums["t10k-labels-idx1-ubyte"],
        [_closed_port_url(), server.url + "/"],
    )
    assert path.is_file() and _leftovers(tmp_path) == ["t10k-labels-idx1-ubyte.gz"]


def test_download_from_file_url_with_real_shared_files(tmp_path):
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"{SHARED_MNIST} is absent")
    got = download_mnist(
        tmp_path, mirrors=[SHARED_MNIST.resolve().as_uri()],
        names=["t10k-labels-idx1-ubyte"],
    )
    assert data.sha256_uncompressed(got["t10k-labels-idx1-ubyte"]) == data.MNIST_SHA256["t10k-labels-idx1-ubyte"]


def test_download_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        download_file("t10k-labels-idx1-ubyte", tmp_path / "absent", "0" * 64, ["http://127.0.0.1:1/"])


def test_download_mnist_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="'cifar', not an MNIST file; choose from"):
        download_mnist(tmp_path, names=["cifar"])


# ------------------------------------------------------------------- splits


def _toy(n=50):
    return Dataset(np.arange(n * 784, dtype=np.float32).reshape(n, 784) / (n * 784), np.arange(n) % 10)


def _ids(ds):
    """Recover each example's original index from its first pixel."""
    return np.rint(ds.images[:, 0] * 50 * 784 / 784).astype(int)


def test_split_deterministic_disjoint_exact_sizes():
    ds = _toy()
    a = split(ds, {"train": 20, "valid": 15, "test": 5}, seed=3)
    b = split(ds, {"train": 20, "valid": 15, "test": 5}, seed=3)
    c = split(ds, {"train": 20, "valid": 15, "test": 5}, seed=4)
    assert list(a) == ["train", "valid", "test"]
    assert [len(a[k]) for k in a] == [20, 15, 5]
    ids = {k: _ids(v) for k, v in a.items()}
    assert len(set(np.concatenate(list(ids.values())))) == 40
    for k in a:
        np.testing.assert_array_equal(a[k].images, b[k].images)
        np.testing.assert_array_equal(ds.labels[ids[k]], a[k].labels)
    assert not np.array_equal(_ids(a["train"]), _ids(c["train"]))


def test_split_sequence_returns_tuple():
    first, second = split(_toy(), [10, 40], seed=0)
    assert (len(first), len(second)) == (10, 40)
    assert set(_ids(first)) | set(_ids(second)) == set(range(50))


def test_split_too_large_says_how_to_fix():
    with pytest.raises(ValueError, match=r"need 60 examples, but the dataset has only 50.*--data mnist"):
        split(_toy(), {"train": 30, "valid": 30}, seed=0)
    with pytest.raises(ValueError, match=r"sizes\['a'\] must be a non-negative int, got -1"):
        split(_toy(), {"a": -1}, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        split(_toy(), [1], seed=1.5)


def test_subtract_mean_uses_train_only():
    splits = split(_toy(), {"train": 10, "valid": 10}, seed=0)
    centred, mean = subtract_mean(splits)
    np.testing.assert_allclose(mean, splits["train"].images.mean(0))
    np.testing.assert_allclose(centred["train"].images.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(centred["valid"].images, splits["valid"].images - mean)
    with pytest.raises(ValueError, match="train='trn' is not a key"):
        subtract_mean(splits, train="trn")


def test_class_balanced_indices(embedded):
    idx = class_balanced_indices(embedded.labels, per_class=3, seed=0)
    assert idx.shape == (30,)
    assert embedded.labels[idx].tolist() == sum([[c] * 3 for c in range(10)], [])
    assert len(set(idx.tolist())) == 30
    np.testing.assert_array_equal(idx, class_balanced_indices(embedded.onehot, 3, seed=0))
    assert not np.array_equal(idx, class_balanced_indices(embedded.labels, 3, seed=1))
    with pytest.raises(ValueError, match="class 5 has 892 examples, fewer than per_class=900"):
        class_balanced_indices(embedded.labels, 900, seed=0)
