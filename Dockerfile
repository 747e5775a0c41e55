# ntk-sweep on Ray's official image (Ray 2.60.0, Python 3.11), for KubeRay clusters.
#
#   docker build -t ntk-sweep:cpu .                                   # CPU
#   docker build --build-arg VARIANT=gpu -t ntk-sweep:gpu .           # CUDA 12 (jax[cuda12])
#
# The project and its pinned dependencies (constraints.txt) are installed for the image's
# non-root user `ray` (uid 1000), byte-compiled so workers start quickly. Shipped search spaces
# are in the package; a custom one is mounted (see `ntk-sweep k8s render`).
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}
ARG VARIANT

USER ray
WORKDIR /home/ray/ntk-sweep
COPY --chown=ray:ray pyproject.toml constraints.txt README.md ./
COPY --chown=ray:ray core ./core
COPY --chown=ray:ray sweep ./sweep
COPY --chown=ray:ray search_spaces ./search_spaces
RUN EXTRAS=$([ "$VARIANT" = "gpu" ] && echo "server,cuda" || echo "server") \
 && pip install --no-cache-dir --compile -c constraints.txt ".[${EXTRAS}]" \
 && python -c "import core, sweep.cli, jax; print('jax', jax.__version__, jax.devices())"

ENV XLA_PYTHON_CLIENT_PREALLOCATE=false \
    TF_CPP_MIN_LOG_LEVEL=3 \
    PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["ntk-sweep", "list"]
