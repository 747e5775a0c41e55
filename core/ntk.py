"""The empirical neural tangent kernel of any model and dynamics, tiled and sharded over devices.

For a model f_theta: R^{H x W x C} -> R^O with parameters theta (P of them), the empirical NTK
on inputs x_1..x_N is

    K[i, j, o, q] = sum_p  d f_o(x_i) / d theta_p  *  d f_q(x_j) / d theta_p

Output modes (``Output``):

* ``logit``: one logit c, the class-wise N x N kernel K[:, :, c, c] (what the reference uses);
* ``classwise``: all O class-wise kernels at once, [O, N, N], from one Jacobian pass;
* ``trace``: the sum over logits sum_o K[:, :, o, o], [N, N] (the SUM; neural-tangents'
  ``trace_axes=(-1,)`` is the mean, which ``Implementation.NT_*`` paths multiply back by O);
* ``full``: [N, N, O, O].

Implementations (``Implementation``):

* ``blocked`` (default, the project's own): the probe set is cut into blocks of B inputs; the
  Jacobian of each block, [B, O, P] as a tree, is computed once; only blocks (i, j) with i <= j
  are contracted and the lower triangle is mirrored. Blocks are grouped in tiles of D (one per
  device); a tile's row Jacobians are sharded over a ``Mesh`` with ``NamedSharding`` and its
  column Jacobians replicated, so D devices contract D row blocks at once. When all Jacobians
  fit in the memory budget they are kept and reused; otherwise column Jacobians are recomputed
  per row tile (streaming), so memory stays within the budget whatever N is.
* ``nt_jacobian_contraction`` / ``nt_ntk_vector_products``: neural-tangents'
  ``empirical_ntk_fn`` (imported lazily, it imports TensorFlow), one device, no tiling: the
  first wins for narrow outputs and few parameters, the second avoids materialising J.

Parameters derivatives only: BatchNorm statistics and the dynamics' anchor are constants, and
the model runs in inference mode (``apply(..., train=False)``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import enable_x64
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from core.dynamics import ApplyFn


class Output(enum.StrEnum):
    LOGIT = "logit"
    CLASSWISE = "classwise"
    TRACE = "trace"
    FULL = "full"


class Implementation(enum.StrEnum):
    BLOCKED = "blocked"
    NT_JACOBIAN_CONTRACTION = "nt_jacobian_contraction"
    NT_NTK_VECTOR_PRODUCTS = "nt_ntk_vector_products"


DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes per device


def kernel_shape(output: Output | str, n: int, num_classes: int) -> tuple[int, ...]:
    """Shape of the kernel of ``n`` inputs."""
    output = Output(output)
    return {
        Output.LOGIT: (n, n),
        Output.TRACE: (n, n),
        Output.CLASSWISE: (num_classes, n, n),
        Output.FULL: (n, n, num_classes, num_classes),
    }[output]


def _contract(ja: Any, jb: Any, output: Output) -> jax.Array:
    """Kernel block of two Jacobian trees with leaves [Ba, O', ...] and [Bb, O', ...].

    Returns [Ba, Bb] (logit, trace), [O, Ba, Bb] (classwise) or [Ba, Bb, O, O] (full).
    """
    spec = {
        Output.LOGIT: "iop,jop->ij",
        Output.TRACE: "iop,jop->ij",
        Output.CLASSWISE: "iop,jop->oij",
        Output.FULL: "iop,jqp->ijoq",
    }[output]

    def leaf(a, b):
        a = a.reshape(a.shape[0], a.shape[1], -1)
        b = b.reshape(b.shape[0], b.shape[1], -1)
        return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)

    return sum(jax.tree.leaves(jax.tree.map(leaf, ja, jb)))


def _mirror(block: np.ndarray, output: Output) -> np.ndarray:
    """K[j, i] from K[i, j] for one block: transpose rows and columns (and logits if full)."""
    if output is Output.CLASSWISE:
        return block.transpose(0, 2, 1)
    if output is Output.FULL:
        return block.transpose(1, 0, 3, 2)
    return block.T


def _place(k: np.ndarray, block: np.ndarray, rows: slice, cols: slice, output: Output) -> None:
    if output is Output.CLASSWISE:
        k[:, rows, cols] = block
    else:
        k[rows, cols] = block


def jacobian_bytes_per_input(params: Any, outputs: int, itemsize: int) -> int:
    """Bytes of one input's Jacobian: O' x P x itemsize."""
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return outputs * n_params * itemsize


class NtkEngine:
    """Computes empirical NTKs of one model and dynamics; jitted once, reused for every
    checkpoint with the same shapes.

    Args:
      apply: ``apply(anchor, params, batch_stats, x, train) -> (logits, batch_stats)``.
      output: output mode.
      logit: the class c for ``Output.LOGIT``.
      implementation: see the module docstring.
      block_size: inputs per block B; default the largest that keeps two blocks' Jacobians
        within a quarter of the budget.
      memory_budget: bytes per device for Jacobians and kernel blocks.
      dtype: ``float32`` or ``float64`` (computed in float64 under ``enable_x64``).
      devices: devices to shard over; default all of ``jax.devices()``.
    """

    def __init__(
        self,
        apply: ApplyFn,
        output: Output | str = Output.CLASSWISE,
        *,
        logit: int = 0,
        implementation: Implementation | str = Implementation.BLOCKED,
        block_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        dtype: str = "float32",
        devices: list[jax.Device] | None = None,
    ):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.apply, self.output, self.logit = apply, Output(output), logit
        self.implementation = Implementation(implementation)
        self.block_size, self.memory_budget, self.dtype = block_size, memory_budget, dtype
        self.devices = list(devices or jax.devices())
        self.mesh = Mesh(np.array(self.devices), ("d",))
        self.traces = 0  # how many times the blocked programs were traced (tests, benchmarks)
        self._jac = self._contract_tile = None
        self.last_plan: dict[str, Any] = {}

    # --- public ----------------------------------------------------------------------------

    def __call__(self, anchor: Any, params: Any, batch_stats: Any, x: np.ndarray) -> np.ndarray:
        """The kernel of the inputs x [N, H, W, C] as a host array (``kernel_shape``)."""
        if self.dtype == "float64":
            with enable_x64():
                cast = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
                return self._compute(cast(anchor), cast(params), batch_stats,
                                     np.asarray(x, np.float64))
        return self._compute(anchor, params, batch_stats, np.asarray(x, np.float32))

    # --- internals ---------------------------------------------------------------------------

    def _f(self, anchor, batch_stats) -> Callable[[Any, jax.Array], jax.Array]:
        """f(params, x) -> [B, O'] with O' = 1 for one logit."""

        def f(params, x):
            logits = self.apply(anchor, params, batch_stats, x, False)[0]
            if self.output is Output.LOGIT:
                return logits[:, self.logit : self.logit + 1]
            return logits

        return f

    def _compute(self, anchor, params, batch_stats, x) -> np.ndarray:
        if self.implementation is not Implementation.BLOCKED:
            return self._neural_tangents(anchor, params, batch_stats, x)
        return self._blocked(anchor, params, batch_stats, x)

    def _plan(self, params, n: int, outputs: int, itemsize: int) -> tuple[int, bool]:
        """Block size B and whether every block's Jacobian can be kept (cached)."""
        per_input = jacobian_bytes_per_input(params, outputs, itemsize)
        d = len(self.devices)
        if self.block_size is not None:
            b = self.block_size
        else:
            b = max(1, min(n, self.memory_budget // (4 * per_input), 256))
            b = min(b, math.ceil(n / d))  # every device gets a block
        n_blocks = math.ceil(n / b)
        tiles = math.ceil(n_blocks / d)
        # Per device: its share of every block's Jacobian, a replicated column tile and the
        # kernel tile.
        cached = tiles * b * per_input + d * b * per_input
        cache = cached <= self.memory_budget // 2
        return b, cache

    def _build(self) -> None:
        sharded = NamedSharding(self.mesh, PS("d"))
        replicated = NamedSharding(self.mesh, PS())

        def jac(anchor, params, batch_stats, xs):
            """Jacobians of D blocks xs [D, B, ...] -> leaves [D, B, O', ...p]."""
            self.traces += 1
            f = self._f(anchor, batch_stats)
            return jax.vmap(lambda xb: jax.jacrev(f)(params, xb))(xs)

        def tile(j_rows, j_cols):
            """Kernel blocks of D row blocks (sharded) against D column blocks (replicated)."""
            self.traces += 1
            j_rows = jax.lax.with_sharding_constraint(j_rows, sharded)
            j_cols = jax.lax.with_sharding_constraint(j_cols, replicated)  # all-gather
            inner = jax.vmap(lambda jr, jc: _contract(jr, jc, self.output), in_axes=(None, 0))
            return jax.vmap(lambda jr: inner(jr, j_cols))(j_rows)

        self._jac = jax.jit(jac, out_shardings=sharded)
        self._contract_tile = jax.jit(tile, out_shardings=sharded)
        self._sharded, self._replicated = sharded, replicated

    def _blocked(self, anchor, params, batch_stats, x) -> np.ndarray:
        if self._jac is None:
            self._build()
        n, d = x.shape[0], len(self.devices)
        logits = self.apply(anchor, params, batch_stats, x[:1], False)[0]
        num_classes = logits.shape[-1]
        outputs = 1 if self.output is Output.LOGIT else num_classes
        b, cache = self._plan(params, n, outputs, x.dtype.itemsize)
        tiles = math.ceil(math.ceil(n / b) / d)
        padded = np.zeros((tiles * d * b, *x.shape[1:]), x.dtype)
        padded[:n] = x
        blocks = padded.reshape(tiles, d, b, *x.shape[1:])
        self.last_plan = {"block_size": b, "tiles": tiles, "devices": d, "cached": cache}

        params_r = jax.device_put(params, self._replicated)
        anchor_r = jax.device_put(anchor, self._replicated)
        stats_r = jax.device_put(batch_stats, self._replicated)
        kept: dict[int, Any] = {}

        def jacobians(t: int):
            if t in kept:
                return kept[t]
            xs = jax.device_put(blocks[t], self._sharded)
            j = self._jac(anchor_r, params_r, stats_r, xs)
            if cache:
                kept[t] = j
            return j

        k = np.zeros(kernel_shape(self.output, tiles * d * b, num_classes), x.dtype)
        pending = []
        for r in range(tiles):
            j_rows = jacobians(r)
            for c in range(r, tiles):
                pending.append((r, c, self._contract_tile(j_rows, jacobians(c))))
            # Gather a row tile's results before starting the next, bounding device memory.
            for rr, cc, out in pending:
                self._scatter(k, np.asarray(out), rr, cc, b, d)
            pending.clear()
        if self.output is Output.CLASSWISE:
            return k[:, :n, :n]
        return k[:n, :n]

    def _scatter(self, k: np.ndarray, out: np.ndarray, r: int, c: int, b: int, d: int) -> None:
        """Writes tile (r, c), out [D, D, ...block], and mirrors blocks above the diagonal."""
        for i in range(d):
            for j in range(d):
                bi, bj = r * d + i, c * d + j
                if bj < bi:
                    continue
                rows, cols = slice(bi * b, (bi + 1) * b), slice(bj * b, (bj + 1) * b)
                _place(k, out[i, j], rows, cols, self.output)
                if bj != bi:
                    _place(k, _mirror(out[i, j], self.output), cols, rows, self.output)

    def _neural_tangents(self, anchor, params, batch_stats, x) -> np.ndarray:
        import neural_tangents as nt  # lazy: imports TensorFlow

        impl = {
            Implementation.NT_JACOBIAN_CONTRACTION: nt.NtkImplementation.JACOBIAN_CONTRACTION,
            Implementation.NT_NTK_VECTOR_PRODUCTS: nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        }[self.implementation]
        f = self._f(anchor, batch_stats)
        trace_axes = () if self.output in (Output.CLASSWISE, Output.FULL) else (-1,)
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0,
                                         implementation=impl))
        k = np.asarray(fn(x, None, params))
        if self.output is Output.TRACE:
            return k * self._num_classes(anchor, params, batch_stats, x)  # nt gives the mean
        if self.output is Output.CLASSWISE:
            return np.einsum("ijoo->oij", k)
        return k

    def _num_classes(self, anchor, params, batch_stats, x) -> int:
        return int(self.apply(anchor, params, batch_stats, x[:1], False)[0].shape[-1])
