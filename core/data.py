"""Datasets as NHWC float32 arrays in [0, 1], and class-balanced probe subsets.

Three sources:

* ``digits``: scikit-learn's shipped 8x8 handwritten digits (1797 images, 10 classes), the embedded
  default. Pixels are divided by 16. The train/test split is fixed and stratified without any
  randomness: within each class (in file order) every fifth image is a test image.
* ``cifar10`` / ``cifar100``: read from a local directory holding the official archives, either
  the binary version (``cifar-10-batches-bin``, ``cifar-100-binary``) or the python version
  (``cifar-10-batches-py``, ``cifar-100-python``). The python version is read by a restricted
  unpickler that can build only dicts, lists, strings, bytes, numbers and numpy uint8 arrays.
* ``synthetic``: Gaussian class clusters of any image shape, for tests.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from core.config import DataError

if TYPE_CHECKING:
    from core.config import DatasetSpec


class Dataset(NamedTuple):
    """A labelled image dataset.

    Attributes:
      x_train: float32 [N_train, H, W, C], values in [0, 1].
      y_train: int32 [N_train], values in [0, num_classes).
      x_test: float32 [N_test, H, W, C].
      y_test: int32 [N_test].
      num_classes: number of classes O.
      name: dataset name.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits as [N, 8, 8, 1] in [0, 1] with the fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        is_test[idx[::5]] = True
    return Dataset(x[~is_test], y[~is_test], x[is_test], y[is_test], 10, "digits")


def load_synthetic(
    seed: int,
    n_train: int = 256,
    n_test: int = 128,
    shape: tuple[int, ...] = (8, 8, 1),
    num_classes: int = 10,
    noise: float = 0.15,
) -> Dataset:
    """Gaussian clusters around random class means, clipped to [0, 1].

    x = clip(mu_y + noise * z, 0, 1) with mu_c ~ U[0.2, 0.8]^shape and z ~ N(0, I).
    """
    key = jax.random.PRNGKey(seed)
    k_mu, k_train, k_test = jax.random.split(key, 3)
    means = jax.random.uniform(k_mu, (num_classes, *shape), minval=0.2, maxval=0.8)

    def draw(k: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
        k_y, k_z = jax.random.split(k)
        y = jax.random.randint(k_y, (n,), 0, num_classes)
        x = jnp.clip(means[y] + noise * jax.random.normal(k_z, (n, *shape)), 0.0, 1.0)
        return np.asarray(x, np.float32), np.asarray(y, np.int32)

    x_train, y_train = draw(k_train, n_train)
    x_test, y_test = draw(k_test, n_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes, "synthetic")


# --- CIFAR -------------------------------------------------------------------------------------

_CIFAR_IMAGE_BYTES = 32 * 32 * 3
_CIFAR_LAYOUT = {
    # name: (classes, binary dir, binary train files, binary test file, label bytes,
    #        python dir, python train files, python test file, python label key)
    "cifar10": (
        10,
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test_batch.bin",
        1,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        b"labels",
    ),
    "cifar100": (
        100,
        "cifar-100-binary",
        ["train.bin"],
        "test.bin",
        2,
        "cifar-100-python",
        ["train"],
        "test",
        b"fine_labels",
    ),
}

_MAX_BATCH_BYTES = 1 << 30  # the largest official file (CIFAR-100 train) is 155 MB

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writers (protocol 2) encode byte strings as _codecs.encode(str, "latin1").
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except what a numpy array needs."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_python_batch(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one python-format CIFAR batch: a dict with b'data' uint8 [n, 3072] and labels.

    Every failure, a crafted file's included (a MemoryError from an array shape of 2^50, labels
    that are not numbers), is a DataError naming the file."""
    if (size := path.stat().st_size) > _MAX_BATCH_BYTES:
        raise DataError(f"{path}: {size} bytes, larger than any CIFAR batch")
    try:
        batch = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise DataError(f"{path}: expected a dict with keys b'data' and {label_key!r}")
        data, labels = batch[b"data"], np.asarray(batch[label_key])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{path}: b'data' must be a uint8 array [n, {_CIFAR_IMAGE_BYTES}]")
        if data.shape[1] != _CIFAR_IMAGE_BYTES or labels.shape != (data.shape[0],):
            raise DataError(
                f"{path}: data shape {data.shape} and {labels.shape[0]} labels; "
                f"expected [n, {_CIFAR_IMAGE_BYTES}] and n labels"
            )
        return data, _check_labels(path, labels, num_classes)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged or crafted file raises
        raise DataError(f"{path}: not a readable CIFAR python batch "
                        f"({type(e).__name__}: {str(e)[:200]})") from e


def _read_binary_batch(
    path: Path, label_bytes: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one binary CIFAR file: records of label byte(s) then 3072 pixel bytes (CHW order).

    CIFAR-100 records carry (coarse, fine); the fine label (the second byte) is used.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _CIFAR_IMAGE_BYTES
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte records "
            "(truncated or not a CIFAR binary file)"
        )
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:], _check_labels(path, rows[:, label_bytes - 1], num_classes)


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes})")
    return labels.astype(np.int32)


def _to_nhwc(data: np.ndarray) -> np.ndarray:
    """uint8 [n, 3072] in CHW order -> float32 [n, 32, 32, 3] in [0, 1]."""
    return (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0).astype(np.float32)


def load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """Loads CIFAR-10 or CIFAR-100 from ``data_dir`` (binary or python archive, extracted).

    Raises:
      DataError: the directory or a file is missing, truncated or malformed; the message names
        the file and says where the files are expected.
    """
    classes, bin_dir, bin_train, bin_test, label_bytes, py_dir, py_train, py_test, key = (
        _CIFAR_LAYOUT[name]
    )
    root = Path(data_dir).expanduser()
    candidates = [(root / bin_dir, "bin"), (root / py_dir, "py")]
    candidates += [(root, "bin"), (root, "py")]
    for folder, fmt in candidates:
        files = [*bin_train, bin_test] if fmt == "bin" else [*py_train, py_test]
        if all((folder / f).is_file() for f in files):
            break
    else:
        raise DataError(
            f"{name}: no dataset files under {root}. Download the official archive and extract "
            f"it there, so that {root / bin_dir}/{bin_test} (binary version) or "
            f"{root / py_dir}/{py_test} (python version) exists."
        )

    def read(f: str) -> tuple[np.ndarray, np.ndarray]:
        if fmt == "bin":
            return _read_binary_batch(folder / f, label_bytes, classes)
        return _read_python_batch(folder / f, key, classes)

    train = [read(f) for f in (bin_train if fmt == "bin" else py_train)]
    x_test, y_test = read(bin_test if fmt == "bin" else py_test)
    x_train = np.concatenate([d for d, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return Dataset(_to_nhwc(x_train), y_train, _to_nhwc(x_test), y_test, classes, name)


def load_dataset(
    name: str, data_dir: str | Path | None = None, seed: int = 0, **synthetic_kwargs
) -> Dataset:
    """Loads a dataset by name: ``digits``, ``cifar10``, ``cifar100`` or ``synthetic``."""
    if name == "digits":
        return load_digits()
    if name in _CIFAR_LAYOUT:
        if data_dir is None:
            raise DataError(f"{name}: dataset.data_dir is required (a directory with the archive)")
        return load_cifar(name, data_dir)
    if name == "synthetic":
        return load_synthetic(seed, **synthetic_kwargs)
    raise DataError(f"unknown dataset {name!r}; expected digits, cifar10, cifar100 or synthetic")


def balanced_subset(labels: np.ndarray, size: int, key: jax.Array, num_classes: int) -> np.ndarray:
    """Indices of a class-balanced random subset, sorted by class then index.

    ``size`` is split as evenly as possible: each class gets size // O images and the first
    size % O classes one more. Class c's images are drawn with ``fold_in(key, c)``.

    Args:
      labels: int [N] class labels.
      size: number of indices to return.
      key: PRNG key.
      num_classes: O.

    Returns:
      int64 [size] indices into ``labels``.

    Raises:
      DataError: a class has fewer images than its share.
    """
    per_class = [size // num_classes + (c < size % num_classes) for c in range(num_classes)]
    chosen = []
    for c, k in enumerate(per_class):
        idx = np.flatnonzero(labels == c)
        if idx.size < k:
            raise DataError(f"probe subset: class {c} has {idx.size} images, {k} requested")
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, c), idx.size))
        chosen.append(np.sort(idx[perm[:k]]))
    return np.concatenate(chosen).astype(np.int64)


def dataset_of(spec: DatasetSpec) -> Dataset:
    """The dataset a config's ``DatasetSpec`` names (synthetic data is drawn from seed 0)."""
    return load_dataset(spec.name, spec.data_dir, seed=0, **spec.synthetic.model_dump())
