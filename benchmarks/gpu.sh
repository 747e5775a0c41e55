#!/bin/sh
# The GPU check on a machine that has Python, jax with CUDA, flax, optax, orbax-checkpoint, numpy,
# scikit-learn, pyyaml and rich, but no network (benchmarks/gpu.py covers core/ only, so Ray and
# MLflow are not needed).
#
#   sh benchmarks/gpu.sh --download [PYVER]   # here, with network: the few small wheels core/
#                                             # needs beyond that, into .gpu-wheels/ (~3 MiB)
#   sh benchmarks/gpu.sh [gpu.py options]     # there: installs them to a temporary folder, runs
#
# Versions are the lock's (locks/py312.txt by default), so the GPU runs what CI tested.
set -eu
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-.gpu-wheels}
PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions
          neural-tangents frozendict flatbuffers"

if [ "${1:-}" = "--download" ]; then
    PYVER=${2:-3.12}
    LOCK=locks/py$(echo "$PYVER" | tr -d .).txt
    PINS=$(for p in $PACKAGES; do grep -i "^$p==" "$LOCK" | cut -d' ' -f1; done)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" $PINS
    ls "$WHEELS"
    exit 0
fi

[ -d "$WHEELS" ] || { echo "no $WHEELS/: run 'make gpu-wheels' where there is network" >&2; exit 2; }
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py "$@"
