# ntk-sweep on Ray's official image (Ray 2.60.0, Python 3.12), for KubeRay clusters.
#
#   docker build -t ntk-sweep:cpu .                                   # CPU
#   docker build --build-arg VARIANT=gpu -t ntk-sweep:gpu .           # CUDA 12 (jax[cuda12])
#
# The project and the exact versions of locks/py312.txt (jax 0.12) are installed for the image's
# non-root user `ray` (uid 1000) with uv, byte-compiled so workers start quickly, without
# TensorFlow (locks/overrides.txt) and without the nt extra (not needed to run sweeps). The GPU
# variant takes jax's CUDA 12 wheels, which bundle their CUDA libraries and need an NVIDIA driver
# >= 525 on the node (the `cuda13` extra needs >= 580); Ray's -gpu image adds nothing jax uses
# but keeps the image what KubeRay users expect. Shipped search spaces are in the package; a
# custom one is mounted (see `ntk-sweep k8s render`).
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py312-${VARIANT}
ARG VARIANT

USER ray
WORKDIR /home/ray/ntk-sweep
COPY --chown=ray:ray pyproject.toml README.md ./
COPY --chown=ray:ray locks ./locks
COPY --chown=ray:ray core ./core
COPY --chown=ray:ray sweep ./sweep
COPY --chown=ray:ray search_spaces ./search_spaces
RUN EXTRAS=$([ "$VARIANT" = "gpu" ] && echo "server,cuda" || echo "server") \
 && pip install --no-cache-dir uv==0.13.8 \
 && uv pip install --python "$(command -v python)" --no-cache --compile-bytecode \
      -c locks/py312.txt --override locks/overrides.txt ".[${EXTRAS}]" \
 && python -c "import core, sweep.cli, jax; print('jax', jax.__version__, jax.devices())"

ENV XLA_PYTHON_CLIENT_PREALLOCATE=false \
    TF_CPP_MIN_LOG_LEVEL=3 \
    PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["ntk-sweep", "list"]
