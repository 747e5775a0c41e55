"""Kernel measures against hand computations, and their invariances."""

from __future__ import annotations

import numpy as np
import pytest

from core import kernels as km
from core.kernel_store import KernelRecord, KernelTrajectory, load_kernel, save_kernel

A = np.array([[2.0, 1.0], [1.0, 2.0]])
B = np.array([[1.0, 0.0], [0.0, 1.0]])


def _psd(seed: int, n: int = 6, stack: tuple[int, ...] = ()) -> np.ndarray:
    g = np.random.default_rng(seed).normal(size=(*stack, n, n))
    return g @ np.swapaxes(g, -1, -2)


def test_distance_by_hand():
    # <A, B> = 4, ||A|| = sqrt(10), ||B|| = sqrt(2): S = 1 - 4 / sqrt(20)
    assert km.distance(A, B) == pytest.approx(1 - 4 / np.sqrt(20))
    assert km.distance(A, A) == pytest.approx(0.0, abs=1e-15)
    assert km.distance(B, -B) == pytest.approx(2.0)


def test_distance_invariances():
    k1, k2 = _psd(0), _psd(1)
    assert km.distance(k1, k2) == pytest.approx(km.distance(k2, k1))
    assert km.distance(3.5 * k1, 0.2 * k2) == pytest.approx(km.distance(k1, k2))
    assert km.distance(k1, 7 * k1) == pytest.approx(0.0, abs=1e-12)


def test_stacks_are_measured_per_kernel():
    stack = _psd(2, stack=(4,))
    other = _psd(3, stack=(4,))
    d = km.distance(stack, other)
    assert d.shape == (4,)
    np.testing.assert_allclose(d, [km.distance(stack[i], other[i]) for i in range(4)])


def test_trajectory_distances_and_velocity_by_hand():
    ks = np.stack([B, A, A])
    out = km.trajectory_distances(ks, np.array([0.0, 0.5, 2.0]))
    s = 1 - 4 / np.sqrt(20)
    np.testing.assert_allclose(out["to_init"], [0, s, s], atol=1e-15)
    np.testing.assert_allclose(out["to_final"], [s, 0, 0], atol=1e-15)
    np.testing.assert_allclose(out["to_previous"], [0, s, 0], atol=1e-15)
    np.testing.assert_allclose(out["velocity"], [0, s / 0.5, 0], atol=1e-15)
    heat = km.pairwise_distances(ks)
    assert heat.shape == (3, 3) and heat[0, 1] == pytest.approx(s)
    np.testing.assert_allclose(heat, heat.T)


def test_target_alignment_by_hand():
    labels = np.array([0, 0, 1])
    target = km.target_kernel(labels, 2)
    np.testing.assert_array_equal(target, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert km.target_alignment(target, labels, 2) == pytest.approx(1.0)
    k = np.eye(3)
    # <I, YY^T> = 3, ||I|| = sqrt(3), ||YY^T|| = sqrt(5)
    assert km.target_alignment(k, labels, 2) == pytest.approx(3 / np.sqrt(15))
    assert km.target_alignment(5 * k, labels, 2) == pytest.approx(3 / np.sqrt(15))
    # Centered: a constant offset (the all-ones kernel) does not change it.
    base = km.target_alignment(k, labels, 2, centered=True)
    assert km.target_alignment(k + 4.0, labels, 2, centered=True) == pytest.approx(base)
    h = np.eye(3) - 1 / 3
    kc, tc = h @ k @ h, h @ target @ h
    assert base == pytest.approx(np.sum(kc * tc) / np.linalg.norm(kc) / np.linalg.norm(tc))


def test_cka():
    k1, k2 = _psd(4), _psd(5)
    assert km.cka(k1, k1 * 3) == pytest.approx(1.0)
    assert km.cka(k1, k2) == pytest.approx(km.cka(k2, k1))
    assert km.cka(k1 + 2.0, k2) == pytest.approx(km.cka(k1, k2))


def test_spectrum_measures_by_hand():
    k = np.diag([3.0, 2.0, 1.0, 0.0])
    assert km.top_k_mass(k, 1) == pytest.approx(9 / 14)
    assert km.top_k_mass(k, 2) == pytest.approx(13 / 14)
    assert km.effective_rank(np.eye(5)) == pytest.approx(5.0)
    assert km.effective_rank(np.ones((5, 5))) == pytest.approx(1.0)
    p = np.array([3, 2, 1]) / 6
    assert km.effective_rank(k) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    r = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0]
    assert km.effective_rank(r @ k @ r.T) == pytest.approx(km.effective_rank(k))
    assert km.top_k_mass(10 * k, 2) == pytest.approx(13 / 14)


def test_polar_dynamics():
    ks = np.stack([B, (A + B) / 2, A])
    out = km.polar(ks)
    np.testing.assert_allclose(out["radius"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(out["angle"][2], np.arccos(4 / np.sqrt(20)))
    assert out["angle"][0] == pytest.approx(0.0, abs=1e-6)
    top = km.polar(np.stack([_psd(6), _psd(7), _psd(8)]), top=2)
    assert top["radius"][-1] == pytest.approx(1.0)


def _record(epoch: float, seed: int, n: int = 4) -> KernelRecord:
    return KernelRecord(_psd(seed, n).astype(np.float32), np.arange(n), np.arange(n) % 2,
                        {"epoch": epoch, "output": "trace", "model": "cnn", "dtype": "float32"})


def test_kernels_round_trip_without_pickle_in_one_file(tmp_path):
    traj = KernelTrajectory(tmp_path / "k.pack")
    for epoch in (0.125, 2.0, 1.0):
        traj.save(_record(epoch, int(epoch * 8)))
    assert [p.name for p in tmp_path.iterdir()] == ["k.pack"]
    assert traj.epochs() == [0.125, 1.0, 2.0]
    epochs, stack = traj.stack()
    assert stack.shape == (3, 4, 4) and stack.dtype == np.float32
    import core.kernel_store as ks

    ks.clear_cache()
    rec = KernelTrajectory(tmp_path / "k.pack").load(1.0)  # another process: from disk
    assert rec.meta["model"] == "cnn" and rec.labels.tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(rec.kernel, _record(1.0, 8).kernel)
    with pytest.raises(FileNotFoundError, match="no kernel of epoch 3"):
        traj.load(3.0)


def test_kernels_of_the_formats_before_are_read_beside_the_pack(tmp_path):
    """An ``.npz`` per checkpoint, then a pack per setting (``kernels/<setting>.pack``, its
    own magic line, records keyed by epoch alone): both read; new kernels go to the
    trajectory's pack, and a damaged record of the former pack is voided there."""
    import core.kernel_store as ks
    from core.pack import Pack, field

    save_kernel(tmp_path / "k" / "epoch_0001.0000.npz", _record(1.0, 3))
    former = Pack(tmp_path / "k.pack", ks.LEGACY_MAGIC, field("epoch"))
    for epoch, seed in ((3.0, 5), (4.0, 6)):
        r = _record(epoch, seed)
        arrays = [r.kernel, r.probe_indices, r.labels]
        former.append({"epoch": epoch, "meta": r.meta, "digest": ks._data_digest(arrays),
                       "leaves": list(ks.LEAVES)}, arrays)
    traj = KernelTrajectory(tmp_path / "trajectory.pack", "s", legacy=tmp_path / "k",
                            legacy_pack=former.path)
    assert traj.exists() and traj.epochs() == [1.0, 3.0, 4.0] and traj.has(3.0)
    traj.save(_record(2.0, 4))
    assert traj.epochs() == [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(traj.load(1.0).kernel, _record(1.0, 3).kernel)
    np.testing.assert_array_equal(traj.load(3.0).kernel, _record(3.0, 5).kernel)
    data = bytearray(former.path.read_bytes())
    data[former.entries()[4.0].data + 1] ^= 0x01
    former.path.write_bytes(bytes(data))
    ks.clear_cache()
    assert traj.verify() == [4.0] and traj.epochs() == [1.0, 2.0, 3.0]
    assert not KernelTrajectory(tmp_path / "none.pack", legacy=tmp_path / "none").exists()


def test_kernels_of_other_settings_share_the_pack_never_their_records(tmp_path):
    a = KernelTrajectory(tmp_path / "trajectory.pack", "classwise-1")
    b = KernelTrajectory(tmp_path / "trajectory.pack", "classwise-2")
    a.save(_record(1.0, 3))
    assert not b.exists() and b.epochs() == []
    b.save(_record(1.0, 4))
    np.testing.assert_array_equal(a.load(1.0).kernel, _record(1.0, 3).kernel)
    np.testing.assert_array_equal(b.load(1.0).kernel, _record(1.0, 4).kernel)
    assert [p.name for p in tmp_path.iterdir()] == ["trajectory.pack"]


def test_a_trajectory_reads_each_kernel_once(tmp_path, monkeypatch):
    """A trial's end reads its trajectories' kernels for the measures, the figures and the
    distances: each record is read once in a process (shared, read-only, also with other
    readers of the same file), and past the cache's bytes the least recently read go."""
    import core.kernel_store as ks

    ks.clear_cache()
    reads = []
    real = ks.KernelTrajectory._read
    monkeypatch.setattr(ks.KernelTrajectory, "_read",
                        lambda self, entry: reads.append(entry.offset) or real(self, entry))
    traj = KernelTrajectory(tmp_path / "k.pack")
    for epoch in (0.0, 1.0, 2.0):
        traj.save(_record(epoch, int(epoch)))
    _, first = traj.stack()
    again = np.stack([traj.load(e).kernel for e in (0.0, 1.0, 2.0)])
    assert len(reads) == 3 and np.array_equal(first, again)
    with pytest.raises(ValueError):
        traj.load(1.0).kernel[0, 0] = 1.0  # shared: read-only
    traj.save(_record(1.0, 7))  # stored: never written twice
    np.testing.assert_array_equal(traj.load(1.0).kernel, _record(1.0, 1).kernel)
    assert KernelTrajectory(tmp_path / "k.pack").stack()[1].shape == (3, 4, 4)  # another reader
    assert len(reads) == 3
    traj.save(_record(3.0, 3))
    traj.stack()
    assert len(reads) == 4
    monkeypatch.setattr(ks, "CACHE_BYTES", 2 * 4 * 4 * 4)  # two kernels: the oldest goes
    ks.clear_cache()
    traj.stack(), traj.stack()
    assert len(reads) == 4 + 4 + 4


def test_flipped_bits_in_a_kernel_pack_are_never_read_as_a_kernel(tmp_path):
    """Every flipped byte of a kernel record either leaves it unlisted (prefix or header:
    computed again) or raises DamagedKernel naming the file and epoch (data), which
    ``verify`` (the lock holder's check) voids; never other numbers."""
    import core.kernel_store as ks
    from core.kernel_store import DamagedKernel

    path = tmp_path / "k.pack"
    KernelTrajectory(path).save(_record(1.0, 5, n=12))
    clean = path.read_bytes()
    data = KernelTrajectory(path).pack.entries()[1.0].data
    outcomes = {"unlisted": [], "refused": [], "same": []}
    for offset in range(0, len(clean), 5):
        flipped = bytearray(clean)
        flipped[offset] ^= 0x10
        path.write_bytes(bytes(flipped))
        ks.clear_cache()
        traj = KernelTrajectory(path)
        if not traj.has(1.0):
            outcomes["unlisted"].append(offset)
            continue
        try:
            record = traj.load(1.0)
        except DamagedKernel as e:
            assert str(e).startswith(f"{path}: the kernel of epoch 1 (bytes 0+)")
            outcomes["refused"].append(offset)
            assert traj.verify() == [1.0] and not KernelTrajectory(path).has(1.0)
            continue
        assert np.array_equal(record.kernel, _record(1.0, 5, n=12).kernel)
        outcomes["same"].append(offset)
    assert outcomes["same"] == []
    assert outcomes["unlisted"] == [o for o in range(0, len(clean), 5) if o < data]
    assert outcomes["refused"] == [o for o in range(0, len(clean), 5) if o >= data]


def test_flipped_bits_in_a_kernel_file_are_a_clear_error_naming_it(tmp_path):
    """Every flipped byte of a kernel file either reads back the same record or raises
    DamagedKernel naming the file (never zipfile's, zlib's or numpy's own errors)."""
    from core.kernel_store import DamagedKernel, KernelRecord, save_kernel

    path = tmp_path / "k.npz"
    kernel = np.random.default_rng(0).random((20, 20))
    save_kernel(path, KernelRecord(kernel, np.arange(20), np.arange(20), {"epoch": 1}))
    data = path.read_bytes()
    outcomes = {"same": 0, "refused": 0}
    for offset in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            record = load_kernel(path)
        except DamagedKernel as e:
            assert str(e).startswith(f"{path}: damaged kernel file")
            outcomes["refused"] += 1
            continue
        if np.array_equal(record.kernel, kernel) and record.meta == {"epoch": 1}:
            outcomes["same"] += 1
    assert outcomes["refused"] > 0.9 * (len(data) // 7)


def test_every_measure_comes_from_the_registry():
    """What is computed is what ``MEASURES`` lists (so the sweep's MLflow metrics, the kernel
    tables and CSV follow it), and a switch rule reads only measures along a trajectory."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2, 6, 6))
    k = a @ a.transpose(0, 1, 3, 2)
    labels = np.arange(6) % 2
    assert set(km.trajectory_distances(k, np.arange(3.0))) == set(km.ALONG_TRAJECTORY)
    assert set(km.summary(k[0], labels, 2)) == set(km.PER_KERNEL)
    assert km.MEASURES == (*km.ALONG_TRAJECTORY, *km.PER_KERNEL)
    assert set(km.SWITCH_MEASURES) <= set(km.ALONG_TRAJECTORY)


def test_log10_condition_against_analytic_spectra():
    """Diagonal kernels have their entries as eigenvalues: log10(max / min); a rank-one
    kernel is singular and reads -log10(eps) of its dtype, not inf; scale does not matter."""
    k = np.diag([1.0, 10.0, 1000.0])
    np.testing.assert_allclose(km.log10_condition(k), 3.0)
    np.testing.assert_allclose(km.log10_condition(7.0 * k), 3.0)
    v = np.arange(1.0, 5.0)[:, None]
    for dtype in (np.float32, np.float64):
        singular = (v @ v.T).astype(dtype)
        np.testing.assert_allclose(km.log10_condition(singular), -np.log10(np.finfo(dtype).eps),
                                   rtol=1e-6)
    stack = np.stack([k, np.eye(3)])
    np.testing.assert_allclose(km.log10_condition(stack), [3.0, 0.0], atol=1e-12)


def test_kernel_files_are_stored_not_deflated_and_old_ones_still_read(tmp_path):
    """Deflating a kernel cost 60x its write time for ~10 % of space: members are stored now;
    a file an earlier version wrote compressed reads the same."""
    import json
    import zipfile

    from core.kernel_store import KernelRecord, save_kernel

    kernel = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    record = KernelRecord(kernel, np.arange(20), np.arange(20) % 3, {"epoch": 2.0})
    save_kernel(tmp_path / "new.npz", record)
    with zipfile.ZipFile(tmp_path / "new.npz") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    with open(tmp_path / "old.npz", "wb") as f:  # as the first release wrote them
        np.savez_compressed(f, kernel=kernel, probe_indices=record.probe_indices,
                            labels=record.labels, meta=np.array(json.dumps(record.meta)))
    for name in ("new.npz", "old.npz"):
        back = load_kernel(tmp_path / name)
        assert np.array_equal(back.kernel, kernel) and back.meta == record.meta
