"""Dataset readers on fixture files in the official CIFAR formats, digits, probe subsets."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest

from core.data import DataError, balanced_subset, load_cifar, load_digits, load_synthetic

N_PER_FILE = 6


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar_binary(root, name: str) -> dict[str, np.ndarray]:
    """Writes the binary layout with N_PER_FILE records a file; returns the test data."""
    if name == "cifar10":
        folder, files, label_bytes, classes = (
            root / "cifar-10-batches-bin",
            [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], 1, 10)
    else:
        folder, files, label_bytes, classes = (
            root / "cifar-100-binary", ["train.bin", "test.bin"], 2, 100)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, f in enumerate(files):
        data = _images(N_PER_FILE, i)
        fine = rng.integers(0, classes, N_PER_FILE, dtype=np.uint8)
        labels = fine[:, None] if label_bytes == 1 else np.stack([fine // 5, fine], axis=1)
        np.concatenate([labels.astype(np.uint8), data], axis=1).tofile(folder / f)
    return {"data": data, "labels": fine, "folder": folder, "files": files}


def write_cifar_python(root, name: str) -> dict[str, np.ndarray]:
    """Writes the python (pickled dict) layout the way the official archive is made."""
    if name == "cifar10":
        folder, files, key, classes = (root / "cifar-10-batches-py",
                                       [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                                       b"labels", 10)
    else:
        folder, files, key, classes = (
            root / "cifar-100-python", ["train", "test"], b"fine_labels", 100)
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        data = _images(N_PER_FILE, i)
        labels = list(np.random.default_rng(i).integers(0, classes, N_PER_FILE).tolist())
        batch = {b"batch_label": b"fixture", key: labels, b"data": data,
                 b"filenames": [b"x.png"] * N_PER_FILE}
        (folder / f).write_bytes(pickle.dumps(batch, protocol=2))
    return {"data": data, "labels": np.array(labels), "folder": folder, "files": files}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("writer", [write_cifar_binary, write_cifar_python])
def test_cifar_readers(tmp_path, name, writer):
    written = writer(tmp_path, name)
    ds = load_cifar(name, tmp_path)
    n_train = N_PER_FILE * (len(written["files"]) - 1)
    assert ds.x_train.shape == (n_train, 32, 32, 3) and ds.x_test.shape == (N_PER_FILE, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.num_classes == (10 if name == "cifar10" else 100)
    np.testing.assert_array_equal(ds.y_test, written["labels"])
    # CHW bytes -> HWC floats: pixel (row 3, col 5) of channel c is byte c*1024 + 3*32 + 5.
    for c in range(3):
        np.testing.assert_allclose(ds.x_test[:, 3, 5, c], written["data"][:, c * 1024 + 101] / 255)
    # The folder itself may be given too.
    assert load_cifar(name, written["folder"]).x_test.shape == ds.x_test.shape


def test_missing_cifar_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-bin/test_batch.bin"):
        load_cifar("cifar10", tmp_path / "nowhere")


def test_truncated_binary_file_is_refused(tmp_path):
    written = write_cifar_binary(tmp_path, "cifar10")
    path = written["folder"] / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3.bin.*not a whole number of 3073-byte"):
        load_cifar("cifar10", tmp_path)


def test_python_batch_with_a_foreign_global_is_refused_without_running_it(tmp_path):
    written = write_cifar_python(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("side effect",))

    (written["folder"] / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch.*print is not allowed"):
        load_cifar("cifar10", tmp_path)


@pytest.mark.parametrize(
    "batch, message",
    [
        ([1, 2, 3], "expected a dict"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "data shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels outside"),
    ],
)
def test_malformed_python_batches(tmp_path, batch, message):
    written = write_cifar_python(tmp_path, "cifar10")
    (written["folder"] / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message):
        load_cifar("cifar10", tmp_path)


class _HugeArray:
    """Pickles as numpy's own array constructor asked for 2**50 bytes: only allowed globals."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (2**50,), b"b"))


@pytest.mark.parametrize("batch", [
    {b"data": _HugeArray(), b"labels": [0]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1, 2]]},
])
def test_crafted_python_batches_are_data_errors_not_crashes(tmp_path, batch):
    """Every failure of reading a batch (MemoryError from a crafted shape, labels that are not
    numbers) is a DataError naming the file."""
    written = write_cifar_python(tmp_path, "cifar10")
    (written["folder"] / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar("cifar10", tmp_path)


def test_truncated_python_batch(tmp_path):
    written = write_cifar_python(tmp_path, "cifar100")
    path = written["folder"] / "train"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="not a readable CIFAR python batch"):
        load_cifar("cifar100", tmp_path)


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = load_digits(), load_digits()
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.x_train.shape[1:] == (8, 8, 1) and len(a.y_train) + len(a.y_test) == 1797
    assert 0.0 == a.x_train.min() and a.x_train.max() == 1.0
    train_share = np.bincount(a.y_train) / len(a.y_train)
    test_share = np.bincount(a.y_test) / len(a.y_test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)


@pytest.mark.parametrize("num_classes, size", [
    (3, 30), pytest.param(10, 25, marks=pytest.mark.slow), (7, 7)])
def test_balanced_subset(num_classes, size):
    ds = load_synthetic(0, n_train=400, num_classes=num_classes)
    idx = balanced_subset(ds.y_train, size, jax.random.PRNGKey(0), num_classes)
    counts = np.bincount(ds.y_train[idx], minlength=num_classes)
    assert len(idx) == size == len(set(idx.tolist())) and counts.max() - counts.min() <= 1
    again = balanced_subset(ds.y_train, size, jax.random.PRNGKey(0), num_classes)
    other = balanced_subset(ds.y_train, size, jax.random.PRNGKey(1), num_classes)
    np.testing.assert_array_equal(idx, again)
    assert not np.array_equal(idx, other)


def test_balanced_subset_refuses_a_class_too_small():
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DataError, match="class 1 has 2 images, 5 requested"):
        balanced_subset(labels, 10, jax.random.PRNGKey(0), 2)
