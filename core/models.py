"""Flax linen models: MLP, a small CNN for 8x8 digits, and the paper's CIFAR ResNet-18.

Every model maps float32 [B, H, W, C] images to [B, O] logits and is called as
``model.apply({"params": p, "batch_stats": bs}, x, train=...)``. BatchNorm running statistics
are explicit state (``batch_stats``, an empty dict for models without BatchNorm): ``train=True``
normalises with batch statistics and returns updated running statistics, ``train=False`` uses
the running statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
BatchStats = Any

# Reference ResNet-18 BatchNorm: running = 0.9 * running + 0.1 * batch, eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


def _norm(train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS)


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images: widths (256, 256) or (2048, 2048) in
    the paper."""

    num_classes: int
    widths: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (stride 1, 2, 2) with ReLU, then a linear read-out.

    On 8x8 digits with width 32 this is about 60k parameters. ``batchnorm`` adds BatchNorm after
    each convolution (momentum 0.9).
    """

    num_classes: int
    width: int = 32
    batchnorm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for features, stride in ((self.width, 1), (2 * self.width, 2), (2 * self.width, 2)):
            x = nn.Conv(features, (3, 3), strides=stride, use_bias=not self.batchnorm)(x)
            if self.batchnorm:
                x = _norm(train)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and a (projected when needed) shortcut."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.Conv(self.features, (3, 3), self.stride, padding=1, use_bias=False)(x)
        y = nn.relu(_norm(train)(y))
        y = nn.Conv(self.features, (3, 3), 1, padding=1, use_bias=False)(y)
        y = _norm(train)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x)
            x = _norm(train)(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 as in the reference: 3x3 stride-1 stem, no max-pool, stages of two basic
    blocks with widths (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global average pooling and a
    zero-initialised logits layer. ``width`` 64 is the paper's model."""

    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), 1, padding=1, use_bias=False)(x)
        x = nn.relu(_norm(train)(x))
        for stage, stride in enumerate((1, 2, 2, 2)):
            for block in range(2):
                x = BasicBlock(self.width * 2**stage, stride if block == 0 else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(x)


def make_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds ``mlp``, ``cnn`` or ``resnet18`` with model-specific keyword arguments."""
    builders = {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(builders)}")
    return builders[name](num_classes=num_classes, **kwargs)


def init_model(
    model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]
) -> tuple[Params, BatchStats]:
    """Initialises parameters and BatchNorm statistics for inputs of shape [H, W, C].

    One jitted program (per model and shape, process-wide): run eagerly, initialisation was
    about 25 single-operation programs, each lowered and loaded in every new process (issue
    15). The values are the same bits as eager initialisation's on CPU (tested)."""
    variables = _init(model, key, tuple(input_shape))
    return variables["params"], variables.get("batch_stats", {})


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> Any:
    return model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
