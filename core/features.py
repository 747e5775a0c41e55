"""NTK eigen-features: images whose parameter gradient points along a kernel eigendirection.

For class c with class-wise kernel K_c = J_c J_c^T on the probe set (J_c [N, P], the Jacobian
of logit c) and a weight vector w [N], the parameter-space direction is v = J_c^T w (one VJP,
J is never formed). Starting from a grey image x_0 = 0.5, ``steps`` signed-gradient steps

    x <- clip(x + lr * sign(grad_x cos(grad_theta f_c(x), v)), 0, 1)

find an input whose gradient aligns with v. The weights are the top-``top`` eigenvectors of
K_c with both signs (+u_i, -u_i) and the kernel-regression weights alpha = (K_c + r I)^-1 y_c
(y_c the centred one-hot column of class c, r = 1e-6 tr(K_c) / N).

Fixed against the reference script: arguments in the right order, eigenvalues taken from
``eigh`` of the symmetrised kernel (no square root of a negative round-off eigenvalue is ever
taken), and every class of the dataset can be drawn (not only 0-9).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.dynamics import ApplyFn


def feature_weights(kernel: np.ndarray, labels: np.ndarray, c: int, top: int = 3) -> np.ndarray:
    """Weights [2 top + 1, N]: +u_1, -u_1, ..., +u_top, -u_top, alpha (see module docstring)."""
    k = (kernel + kernel.T) / 2
    _, vecs = np.linalg.eigh(k.astype(np.float64))
    rows = []
    for i in range(1, top + 1):
        u = vecs[:, -i]
        rows += [u, -u]
    y = (labels == c).astype(np.float64)
    ridge = 1e-6 * np.trace(k) / len(k)
    alpha = np.linalg.solve(k + ridge * np.eye(len(k)), y - y.mean())
    rows.append(alpha / np.linalg.norm(alpha))
    return np.stack(rows).astype(np.float32)


def make_feature_fn(apply: ApplyFn, steps: int = 600, lr: float = 0.001):
    """Returns jitted ``features(params, batch_stats, x_probe, weights [D, N], c) -> [D, ...]``."""

    def logit(params, batch_stats, x, c):
        return apply(None, params, batch_stats, x, False)[0][:, c]

    def features(params, batch_stats, x_probe, weights, c):
        _, vjp = jax.vjp(lambda p: logit(p, batch_stats, x_probe, c), params)
        directions = jax.vmap(lambda w: vjp(w)[0])(weights)

        def cosine(x, v):
            g = jax.grad(lambda p: logit(p, batch_stats, x[None], c)[0])(params)
            dot = sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.vdot(a, b), g, v)))
            sq = lambda t: sum(jnp.vdot(a, a) for a in jax.tree.leaves(t))  # noqa: E731
            return dot / jnp.sqrt(jnp.maximum(sq(g) * sq(v), 1e-30))

        def ascend(v):
            def body(_, x):
                return jnp.clip(x + lr * jnp.sign(jax.grad(cosine)(x, v)), 0.0, 1.0)

            return jax.lax.fori_loop(0, steps, body, jnp.full(x_probe.shape[1:], 0.5))

        return jax.lax.map(ascend, directions)

    return jax.jit(features, static_argnums=4)


COLUMN_TITLES = ("+u1", "-u1", "+u2", "-u2", "+u3", "-u3", "K^-1 y")


def write_grid(images: dict[int, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Writes a PNG grid: one row per class, one column per weight vector; images [D, H, W, C]
    are shown with their own contrast stretched to [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(images)
    cols = len(next(iter(images.values())))
    fig, axes = plt.subplots(len(classes), cols, figsize=(1.4 * cols, 1.4 * len(classes)),
                             squeeze=False)
    for r, c in enumerate(classes):
        for j in range(cols):
            img = np.asarray(images[c][j])
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)  # contrast
            ax = axes[r, j]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and j < len(COLUMN_TITLES):
                ax.set_title(COLUMN_TITLES[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(f"class {c}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eigen_features(
    apply: ApplyFn, params: Any, batch_stats: Any, x_probe: np.ndarray, labels: np.ndarray,
    kernels: np.ndarray, classes: list[int], steps: int = 600, lr: float = 0.001, top: int = 3,
) -> dict[int, np.ndarray]:
    """Feature images {class: [2 top + 1, H, W, C]} from class-wise kernels [O, N, N]."""
    fn = make_feature_fn(apply, steps, lr)
    out = {}
    for c in classes:
        weights = feature_weights(kernels[c], labels, c, top)
        out[c] = np.asarray(fn(params, batch_stats, x_probe, weights, c))
    return out
