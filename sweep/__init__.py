"""ntk-sweep's orchestration layer: command line, (later) Ray Tune and MLflow adapters."""
