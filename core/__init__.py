"""ntk-sweep's JAX science: data, models, dynamics, attacks, training, evaluation, checkpoints.

Nothing in this package imports Ray or MLflow. Importing it sets XLA flags before jax starts
(``core/xla_flags.py``): deterministic GPU operations (``core/determinism.py``), so runs are
bit-for-bit reproducible on GPUs too unless ``NTK_SWEEP_GPU_DETERMINISTIC=0``; and on CPUs
LLVM's level 2 instead of 3 (same bits, faster compiles and programs).
"""

from core import determinism, xla_flags

determinism.request()
xla_flags.request_cpu_opt_level()
