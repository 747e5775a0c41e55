"""ntk-sweep's orchestration layer: the command line (``cli``), Ray Tune sweeps (``runner``,
``trial``), MLflow (``tracking``, ``kernel_logging``), the output directory (``layout``),
reading a sweep back (``review``, ``claims``) and Kubernetes manifests (``k8s``)."""
