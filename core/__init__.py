"""ntk-sweep's JAX science: data, models, dynamics, attacks, training, evaluation, checkpoints.

Nothing in this package imports Ray or MLflow. Importing it asks XLA for deterministic GPU
operations (``core/determinism.py``), before jax starts: runs are bit-for-bit reproducible on
GPUs too unless ``NTK_SWEEP_GPU_DETERMINISTIC=0``.
"""

from core import determinism

determinism.request()
