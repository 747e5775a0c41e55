"""ntk-sweep's JAX science: data, models, dynamics, attacks, training, evaluation, checkpoints.

Nothing in this package imports Ray or MLflow.
"""
