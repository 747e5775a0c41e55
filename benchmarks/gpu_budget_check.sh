#!/bin/sh
# One-off device check (issue 15): the machine-derived NTK memory budget on a real GPU, and the
# NTK rows of the GPU check with that default budget. Writes $OUT/budget.json, $OUT/gpu-ntk.json.
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu-wheels/*.whl
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 - > "$OUT/budget.json" <<'PY'
import json, jax
from core import ntk
d = jax.devices()[0]
s = d.memory_stats()
b = ntk.machine_memory_budget()
want = int(ntk.DEVICE_MEMORY_SHARE * (s["bytes_limit"] - s.get("bytes_in_use", 0)))
print(json.dumps({"device": d.device_kind, "bytes_limit": s["bytes_limit"],
                  "bytes_in_use": s.get("bytes_in_use"), "budget": b, "expected": want,
                  "ok": abs(b - want) <= 2**20}))
PY
cat "$OUT/budget.json"
timeout 420 python3 benchmarks/gpu.py --sections ntk --ntk-models cnn:32,resnet18:16 --budget-s 300 --out "$OUT/gpu-ntk.json" 2>&1 | tail -20
