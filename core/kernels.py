"""Kernel measures (Fort et al. 2020; Tsilivis & Kempe 2022), vectorised over leading axes.

Every function takes kernels of shape [..., N, N] (a single kernel, a stack of class-wise
kernels [O, N, N], or a trajectory [T, O, N, N]) and reduces the last two axes. With
<A, B>_F = sum_ij A_ij B_ij and ||A||_F = sqrt(<A, A>_F):

* distance       S(K1, K2) = 1 - <K1, K2>_F / (||K1||_F ||K2||_F)         in [0, 2]
* velocity       v(t) = S(k_t, k_{t+dt}) / dt
* alignment      A(K, Y) = <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F),  Y one-hot [N, O]
* centered       A_c(K, Y) = A(H K H, H Y Y^T H) with H = I - 1 1^T / N
* CKA            CKA(K1, K2) = 1 - S(H K1 H, H K2 H)
* top-k mass     sum_{i<=k} lambda_i^2 / sum_i lambda_i^2   (lambda sorted by magnitude)
* effective rank exp(-sum_i p_i log p_i), p_i = |lambda_i| / sum_j |lambda_j|
* conditioning   log10(|lambda|_max / |lambda|_min): how ill-posed kernel regression is
* polar          radius ||K_t - K_0||_F / ||K_T - K_0||_F, angle arccos(1 - S(K_t, K_0))

All are invariant to scaling a kernel by c > 0 except the polar radius' numerator and
denominator, which scale together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import combinations

import numpy as np

_EPS = 1e-30


def inner(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """<A, B>_F over the last two axes: [..., N, N] x [..., N, N] -> [...]."""
    return np.einsum("...ij,...ij->...", a, b)


def norm(a: np.ndarray) -> np.ndarray:
    """||A||_F over the last two axes."""
    return np.sqrt(np.maximum(inner(a, a), 0.0))


def distance(k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """S(K1, K2) = 1 - <K1, K2>_F / (||K1||_F ||K2||_F); 0 for kernels equal up to scale."""
    return 1.0 - inner(k1, k2) / np.maximum(norm(k1) * norm(k2), _EPS)


def trajectory_distances(kernels: np.ndarray, epochs: np.ndarray) -> dict[str, np.ndarray]:
    """Distances along one trajectory of kernels [T, ..., N, N] at increasing ``epochs`` [T].

    Returns, each [T, ...]: ``to_init`` S(k_t, k_0), ``to_final`` S(k_t, k_T), ``to_previous``
    S(k_t, k_{t-1}) (0 at t = 0), and ``velocity`` S(k_{t-1}, k_t) / (e_t - e_{t-1}) (0 at t=0).
    """
    epochs = np.asarray(epochs, np.float64)
    prev = np.concatenate([kernels[:1], kernels[:-1]])
    to_prev = distance(kernels, prev)
    dt = np.diff(epochs, prepend=epochs[0])
    dt = dt.reshape(dt.shape + (1,) * (to_prev.ndim - 1))
    velocity = np.where(dt > 0, to_prev / np.where(dt > 0, dt, 1.0), 0.0)
    return {
        "to_init": distance(kernels, kernels[:1]),
        "to_final": distance(kernels, kernels[-1:]),
        "to_previous": to_prev,
        "velocity": velocity,
    }


def per_kernel(kernels: np.ndarray, output: str) -> np.ndarray:
    """[T, ..., N, N] -> [T, C, N, N]: class-wise stacks stay, single kernels get C = 1."""
    if output == "full":  # [T, N, N, O, O] -> class-wise diagonal blocks [T, O, N, N]
        return np.einsum("tijoo->toij", kernels)
    return kernels if kernels.ndim == 4 else kernels[:, None]


def pairwise_distances(kernels: np.ndarray) -> np.ndarray:
    """[T, T, ...] matrix S(k_s, k_t) for a trajectory [T, ..., N, N] (epoch-by-epoch heatmap)."""
    return distance(kernels[:, None], kernels[None, :])


def cross_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """S(a_t, b_t) at matching epochs of two trajectories [T, ..., N, N] -> [T, ...]."""
    return distance(a, b)


ALL_PAIRS_UP_TO = 16  # trajectories of one phase-1 configuration compared pair by pair
TrajectoryKey = tuple[str, int]  # (data mode, seed)


def pairwise_head(keys: Iterable[TrajectoryKey]) -> list[TrajectoryKey]:
    """The trajectories of the first seeds, as many whole seeds as fit in
    ``ALL_PAIRS_UP_TO`` (every trajectory of most sweeps): those ``trajectory_pairs``
    compares pair by pair. Sorted."""
    by_seed: dict[int, list[TrajectoryKey]] = {}
    for key in keys:
        by_seed.setdefault(key[1], []).append(key)
    head: list[TrajectoryKey] = []
    for seed in sorted(by_seed):
        if len(head) + len(by_seed[seed]) > ALL_PAIRS_UP_TO:
            break
        head += by_seed[seed]
    return sorted(head)


def trajectory_pairs(keys: Iterable[TrajectoryKey]) -> list[tuple[TrajectoryKey, TrajectoryKey]]:
    """Which pairs of one phase-1 configuration's trajectories (data mode, seed) are compared
    (the sweep's cross-trajectory distances, the claims' final-kernel distances): O(n) pairs
    of n trajectories.

    * ``pairwise_head``, the trajectories of the first seeds up to ``ALL_PAIRS_UP_TO`` (every
      trajectory of most sweeps): every pair.
    * Each later seed: its trajectories with each other (one seed, two data modes), and each
      with the trajectory of the same mode of the previous seed that has one (one mode, two
      seeds).

    So a sweep of 10,000 seeds and two data modes compares about 40,000 pairs, not 200
    million, and still every kind of pair the claims read: mode against mode at one seed,
    seed against seed in one mode. Pairs are (a, b) with a < b, each once, in order."""
    keys = set(keys)
    head = pairwise_head(keys)
    pairs = set(combinations(head, 2))
    later: dict[int, list[TrajectoryKey]] = {}
    for key in keys.difference(head):
        later.setdefault(key[1], []).append(key)
    previous = {mode: seed for mode, seed in sorted(head, key=lambda k: k[1])}  # latest seed
    for seed in sorted(later):
        own = sorted(later[seed])
        pairs |= set(combinations(own, 2))
        for mode, _ in own:
            if mode in previous:
                pairs.add(((mode, previous[mode]), (mode, seed)))
            previous[mode] = seed
    return sorted(pairs)


def _centre(k: np.ndarray) -> np.ndarray:
    """H K H with H = I - 1 1^T / N: subtract row and column means, add back the grand mean."""
    return (k - k.mean(axis=-1, keepdims=True) - k.mean(axis=-2, keepdims=True)
            + k.mean(axis=(-2, -1), keepdims=True))


def target_kernel(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Y Y^T [N, N] for one-hot labels: 1 where two inputs share a class, else 0."""
    y = np.eye(num_classes)[labels]
    return y @ y.T


def target_alignment(k: np.ndarray, labels: np.ndarray, num_classes: int,
                     centered: bool = False) -> np.ndarray:
    """Kernel-target alignment A(K, Y) (or its centered form) over the last two axes."""
    target = target_kernel(labels, num_classes)
    if centered:
        k, target = _centre(k), _centre(target)
    return 1.0 - distance(k, target)


def cka(k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """Centered kernel alignment <H K1 H, H K2 H>_F / (||H K1 H||_F ||H K2 H||_F)."""
    return 1.0 - distance(_centre(k1), _centre(k2))


def eigenvalues(k: np.ndarray) -> np.ndarray:
    """Eigenvalues [..., N] of symmetric kernels, sorted by decreasing magnitude."""
    lam = np.linalg.eigvalsh((k + np.swapaxes(k, -1, -2)) / 2)
    order = np.argsort(-np.abs(lam), axis=-1)
    return np.take_along_axis(lam, order, axis=-1)


def top_k_mass(k: np.ndarray, top: int) -> np.ndarray:
    """Share of sum(lambda^2) = ||K||_F^2 carried by the ``top`` largest eigenvalues."""
    sq = eigenvalues(k) ** 2
    return sq[..., :top].sum(-1) / np.maximum(sq.sum(-1), _EPS)


def effective_rank(k: np.ndarray) -> np.ndarray:
    """exp(entropy) of the normalised eigenvalue magnitudes: N for K = I, 1 for rank one."""
    lam = np.abs(eigenvalues(k))
    p = lam / np.maximum(lam.sum(-1, keepdims=True), _EPS)
    logp = np.log(np.where(p > 0, p, 1.0))
    return np.exp(-(p * logp).sum(-1))


def log10_condition(k: np.ndarray) -> np.ndarray:
    """log10 of the condition number |lambda|_max / |lambda|_min. Eigenvalues below
    |lambda|_max x eps of the kernel's dtype are numerically zero: a singular kernel reads
    -log10(eps) (7.2 for float32, 15.7 for float64), never inf."""
    lam = np.abs(eigenvalues(k))
    top = np.maximum(lam[..., 0], _EPS)
    bottom = np.maximum(lam[..., -1], top * np.finfo(lam.dtype).eps)
    return np.log10(top / bottom)


def _project_top(k: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """U U^T K U U^T for an orthonormal basis U [..., N, k]."""
    proj = basis @ np.swapaxes(basis, -1, -2)
    return proj @ k @ proj


def polar(kernels: np.ndarray, top: int | None = None) -> dict[str, np.ndarray]:
    """Polar dynamics of a trajectory [T, ..., N, N] relative to its first and last kernels.

    With ``top``, every kernel is first projected onto the top-``top`` eigenspace of the final
    kernel. Returns ``radius`` ||K_t - K_0|| / ||K_T - K_0|| and ``angle`` (radians), each
    [T, ...].
    """
    if top is not None:
        _, vecs = np.linalg.eigh(kernels[-1])
        kernels = _project_top(kernels, vecs[..., -top:])
    k0, kt = kernels[:1], kernels[-1:]
    radius = norm(kernels - k0) / np.maximum(norm(kt - k0), _EPS)
    angle = np.arccos(np.clip(1.0 - distance(kernels, k0), -1.0, 1.0))
    return {"radius": radius, "angle": angle}


PER_KERNEL: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "alignment": lambda k, labels, c: target_alignment(k, labels, c),
    "centered_alignment": lambda k, labels, c: target_alignment(k, labels, c, centered=True),
    "top10_mass": lambda k, labels, c: top_k_mass(k, 10),
    "top20_mass": lambda k, labels, c: top_k_mass(k, 20),
    "effective_rank": lambda k, labels, c: effective_rank(k),
    "log10_condition": lambda k, labels, c: log10_condition(k),
}
"""The measures of one kernel, f(K [..., N, N], labels [N], number of classes) -> [...]."""

ALONG_TRAJECTORY = ("to_init", "to_previous", "to_final", "velocity")
"""The measures of a kernel within its trajectory (``trajectory_distances``' keys)."""

SWITCH_MEASURES = ("velocity", "to_previous")
"""Those a switch rule may read: known at a checkpoint from the checkpoints before it."""

MEASURES = (*ALONG_TRAJECTORY, *PER_KERNEL)
"""Every measure of a kernel trajectory, in table order: what the sweep logs to MLflow,
``ntk-sweep kernel`` prints and ``kernel_measures.csv`` holds. A new one is added here (and
tested); the others follow."""


def summary(k: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """The per-kernel measures (``PER_KERNEL``) of one kernel or stack."""
    return {name: fn(k, labels, num_classes) for name, fn in PER_KERNEL.items()}
