"""Per-input Jacobian *factors*: what the blocked NTK engine contracts.

A dense layer y = a W + b contributes to the Jacobian of logit o the outer product
d f_o / d W = a (x) delta_o, with a [d_in] the layer's input and delta_o = d f_o / d y [d_out],
and d f_o / d b = delta_o. Its kernel contribution therefore never needs W's Jacobian:

    K_dense[i, j, o, q] = (a_i . a_j + 1) (delta_io . delta_jq)

which costs O(d_in + d_out) per pair instead of O(d_in d_out). Every other parameter (convolutions,
BatchNorm scales, ...) keeps its explicit Jacobian [O', ...]. Dense layers are found with a flax
method interceptor that records each ``nn.Dense`` input (``sow``) and adds a zero perturbation
to its output (``perturb``), whose gradient is delta.

The generic form (``structured=False`` or models that are not flax modules) has no dense factors:
the whole parameter tree is a Jacobian.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Factors = dict[str, Any]
"""{"dense": {path: (a [..., d_in], delta [..., O', d_out])}, "jac": {path: [..., O', ...]}
(the Jacobians of the non-dense parameters)}; ``output_major`` lays blocks of them out for
``contract_factors`` ("jac" becomes one array [..., O', P, B], or None when every parameter is
a dense layer's)."""


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and context.method_name == "__call__" and args[0].ndim == 2:
        module.sow("intermediates", "dense_input", args[0])
        return module.perturb("dense_output", next_fun(*args, **kwargs))
    return next_fun(*args, **kwargs)


def dense_layers(
    model: nn.Module | None, params: Any, batch_stats: Any, x: jax.Array
) -> tuple[frozenset[tuple], frozenset[str]]:
    """Module paths of the dense layers with 2-D inputs (those that get factors), and the
    joined paths of those with a bias. Shapes only; call once outside jit."""
    if model is None:
        return frozenset(), frozenset()
    with nn.intercept_methods(_intercept):
        _, state = jax.eval_shape(
            lambda p: model.apply({"params": p, "batch_stats": batch_stats}, x, train=False,
                                  mutable=["intermediates", "perturbations"]), params)
    dense = frozenset(path[:-1] for path in traverse_util.flatten_dict(state.get(
        "perturbations", {})))
    flat_params = traverse_util.flatten_dict(params)
    biased = frozenset("/".join(p) for p in dense if (*p, "bias") in flat_params)
    return dense, biased


def make_factor_fn(
    model: nn.Module | None, f: Callable[[Any, jax.Array], jax.Array], select: Callable,
    batch_stats: Any, dense: frozenset[tuple],
) -> Callable[[Any, jax.Array], Factors]:
    """Returns ``factors(params, x [1, ...]) -> Factors`` of one input.

    Args:
      model: the flax module (used only when ``dense`` is not empty).
      f: f(params, x) -> logits [1, O'] (O' = 1 for one logit): the generic path.
      select: logits [1, O] -> [1, O'] (picks the logit for output mode ``logit``).
      batch_stats: BatchNorm statistics (inference mode).
      dense: the paths from ``dense_layers`` (empty: every parameter gets a Jacobian).
    """
    if not dense:
        def generic(p, x):
            jac = traverse_util.flatten_dict(jax.jacrev(f)(p, x))
            return {"dense": {}, "jac": {"/".join(k): v[0] for k, v in jac.items()}}

        return generic

    def factors(p, x):
        flat = traverse_util.flatten_dict(p)
        is_dense = {k: k[:-1] in dense and k[-1] in ("kernel", "bias") for k in flat}
        rest = {k: v for k, v in flat.items() if not is_dense[k]}
        fixed = {k: v for k, v in flat.items() if is_dense[k]}

        def logits(rest_params, perturbations):
            full = traverse_util.unflatten_dict({**fixed, **rest_params})
            variables = {"params": full, "batch_stats": batch_stats,
                         "perturbations": perturbations}
            with nn.intercept_methods(_intercept):
                out, state = model.apply(variables, x, train=False, mutable=["intermediates"])
            return select(out), state["intermediates"]

        with nn.intercept_methods(_intercept):
            _, shapes = model.apply({"params": p, "batch_stats": batch_stats}, x, train=False,
                                    mutable=["perturbations"])
        zeros = jax.tree.map(jnp.zeros_like, shapes["perturbations"])
        (jac_rest, jac_pert), inputs = jax.jacrev(logits, argnums=(0, 1), has_aux=True)(
            rest, zeros)  # the layer inputs come out of the same forward pass
        inputs = traverse_util.flatten_dict(inputs)
        deltas = traverse_util.flatten_dict(jac_pert)
        out: Factors = {"dense": {}, "jac": {"/".join(k): v[0] for k, v in jac_rest.items()}}
        for path in sorted(dense):  # not the set's order: it follows PYTHONHASHSEED
            a = inputs[(*path, "dense_input")][0][0]  # sow keeps a tuple; batch of one
            delta = deltas[(*path, "dense_output")][0, :, 0]  # [O', d_out]
            out["dense"]["/".join(path)] = (a, delta)
        return out

    return factors


def output_major(factors: Factors) -> Factors:
    """Blocks of factors with leaves [D, B, O', ...] -> the layout the contraction wants.

    The Jacobians of the non-dense parameters become ONE array [D, O', P, B] (P of them in
    all, leaves flattened and concatenated in the tree's order, P-major): the kernel is then
    one batched product over O' contracting the leading axis of both operands, which XLA's
    CPU dot runs near the plain matmul's rate: for the digits CNN's [10, 55744, 250] blocks,
    140 GFLOP/s against 105 for [O', B, P] operands and about 70 for one product per leaf
    (2 cores; the transpose costs about a quarter of the Jacobian pass). Dense deltas
    become [D, O', B, d_out]; the dense inputs a stay [D, B, d_in].
    """
    swap = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
    leaves = jax.tree.leaves(factors["jac"])
    jac = None
    if leaves:
        d, b, o = leaves[0].shape[:3]
        jac = jnp.concatenate([jnp.transpose(t.reshape(d, b, o, -1), (0, 2, 3, 1))
                               for t in leaves], axis=2)
    return {"jac": jac, "dense": {k: (a, swap(d)) for k, (a, d) in factors["dense"].items()}}


def contract_factors(fa: Factors, fb: Factors, output: str, biased: frozenset[str]) -> jax.Array:
    """Kernel block of two blocks of factors laid out by ``output_major`` (one block's
    Jacobians [O', P, Ba], the other's [O', P, Bb]).

    Computes the class-wise blocks K[o, i, j] (or the full K[i, j, o, q]); output ``logit``
    keeps the only one, ``trace`` sums over o. A dense layer adds (a_i . a_j + 1) times the
    same contraction of its deltas. Matrix products run at the precision of the enclosing
    ``jax.default_matmul_precision`` (``NtkEngine`` sets it; float32 by default).
    """
    spec = "oip,qjp->ijoq" if output == "full" else "oip,ojp->oij"
    total = 0.0
    if fa["jac"] is not None:  # [O', P, Ba] x [O', P, Bb]
        total = jnp.einsum("opi,qpj->ijoq" if output == "full" else "opi,opj->oij",
                           fa["jac"], fb["jac"])
    for path, (a_in, d_a) in fa["dense"].items():
        b_in, d_b = fb["dense"][path]
        gram = jnp.einsum("ik,jk->ij", a_in, b_in) + (path in biased)
        dd = jnp.einsum(spec, d_a, d_b)
        total = total + (gram[:, :, None, None] if output == "full" else gram[None]) * dd
    if output == "logit":
        return total[0]
    if output == "trace":
        return total.sum(0)
    return total
