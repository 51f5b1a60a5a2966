#!/usr/bin/env bash
# Times glide_jax and OpenAI's PyTorch GLIDE on the bench configuration back to back (same
# machine, same load) and prints each figure and the ratio ours / reference.
#
#   TORCH_PYTHON=/tmp/torchenv/bin/python GLIDE_REF=/tmp/glide_ref bash benchmarks/compare.sh
#
# TORCH_PYTHON: a python with torch (+ numpy, regex, ftfy); GLIDE_REF: a checkout of
# openai/glide-text2im. Neither is a glide_jax dependency (see benchmarks/torch_reference.py).
set -euo pipefail
cd "$(dirname "$0")/.."
HPARAMS=${HPARAMS:-../shared/bench/bench_hparams.json}
PY=${PYTHON:-.venv/bin/python}
: "${TORCH_PYTHON:?set TORCH_PYTHON to a python that has torch}"
: "${GLIDE_REF:?set GLIDE_REF to a checkout of openai/glide-text2im}"
OUT=${OUT:-runs/compare}
mkdir -p "$OUT"

"$PY" -m glide_jax.bench sample --hparams "$HPARAMS" --steps 25 --batch 2 --guidance-scale 3 --json \
  | tail -n 1 > "$OUT/jax_sample.json"
# the reference runs with the same malloc tunables glide_jax's tools set for themselves
# (glide_jax/host.py): same host settings on both sides
TUNABLES=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("host", {}).get("glibc_tunables", ""))' \
  "$OUT/jax_sample.json")
export GLIBC_TUNABLES="$TUNABLES"
echo "host settings: GLIBC_TUNABLES=$TUNABLES (both sides)"
PYTHONPATH="$GLIDE_REF" "$TORCH_PYTHON" benchmarks/torch_reference.py sample --hparams "$HPARAMS" \
  --steps 25 --batch 2 --json > "$OUT/torch_sample.json"
"$PY" -m glide_jax.bench train --hparams "$HPARAMS" --batch 8 --steps 5 --json \
  | tail -n 1 > "$OUT/jax_train.json"
PYTHONPATH="$GLIDE_REF" "$TORCH_PYTHON" benchmarks/torch_reference.py train --hparams "$HPARAMS" \
  --batch 8 --steps 5 --json > "$OUT/torch_train.json"

"$PY" - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for mode in ("sample", "train"):
    ours = json.loads((out / f"jax_{mode}.json").read_text())
    ref = json.loads((out / f"torch_{mode}.json").read_text())
    print(f"{mode}: glide_jax {ours['per_step_s']:.3f} s/step, PyTorch reference {ref['per_step_s']:.3f} "
          f"s/step, ratio {ours['per_step_s'] / ref['per_step_s']:.2f} (target <= 0.90); "
          f"glide_jax {ours.get('achieved_gflops', 0):.0f} GFLOP/s of a measured "
          f"{ours.get('peak_gflops', 0):.0f} GFLOP/s matmul peak")
PY
