#!/usr/bin/env bash
# Re-steering and textual inversion at SD1.5 and SDXL size on a lent GPU (an H200), in one
# prepared run that fits the device tool's 10-minute limit: bench/sd15.py with bf16
# autocast and TF32, 35 re-steering steps (ours, and the original loop at equal steps) and
# 100 TI steps per size, batch 4, after one warm-up step each. Reports seconds per concept,
# peak GPU memory and achieved TFLOP/s; writes bench/results/gpu.json (+ .md) and a copy
# under $OUT when the device tool sets it.
#
# The device machine has torch but not diffusers (nor pydantic, which fmn imports). Here,
# once: `bash bench/fetch_wheels.sh` (fills the git-ignored bench/wheels/, ~23 MB). Then:
#   run(command="bash bench/gpu.sh", carry=["bench/wheels"], timeout_s=600)
# Dry run on CPU at toy size (seconds):  DEVICE=cpu STEPS=1 bash bench/gpu.sh
#
# Environment: DEVICE (cuda), STEPS (35), TI_STEPS (100), BATCH (4), SIZES ("sd15 sdxl";
# tiny sizes when DEVICE=cpu), IMPLS ("ours ti original"), PYTHON (python3, or .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-35}
TI_STEPS=${TI_STEPS:-100}
BATCH=${BATCH:-4}
IMPLS=${IMPLS:-ours ti original}
if [ "$DEVICE" = cpu ]; then
    SIZES=${SIZES:-tiny tinyxl}
    TI_STEPS=${TI_STEPS_CPU:-$STEPS}
    PYTHON=${PYTHON:-.venv/bin/python}
    RESULT=${RESULT:-/tmp/fmn-gpu-dry.json}
else
    SIZES=${SIZES:-sd15 sdxl}
    PYTHON=${PYTHON:-python3}
    RESULT=${RESULT:-bench/results/gpu.json}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" != cpu ]; then
    if ! "$PYTHON" -c "import diffusers, pydantic" 2>/dev/null; then
        ls bench/wheels/*.whl >/dev/null 2>&1 || {
            echo "no diffusers here and no bench/wheels: run bench/fetch_wheels.sh and carry bench/wheels" >&2
            exit 2
        }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site bench/wheels/*.whl
        export PYTHONPATH="$PWD:/tmp/site"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

status=0
for size in $SIZES; do  # one process per size: a failure at SDXL keeps the SD1.5 rows
    # shellcheck disable=SC2086
    "$PYTHON" bench/sd15.py --device "$DEVICE" --size "$size" --impls $IMPLS \
        --steps "$STEPS" --ti-steps "$TI_STEPS" --warmup 1 --batch "$BATCH" --bf16 \
        --threads "${THREADS:-1}" --out "${RESULT%.json}-$size.json" || status=$?
done
"$PYTHON" - "$RESULT" $SIZES <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.common import markdown_table, write_results
out, sizes = Path(sys.argv[1]), sys.argv[2:]
parts = [json.loads(p.read_text()) for s in sizes if (p := out.with_name(f"{out.stem}-{s}.json")).exists()]
if not parts:
    sys.exit("no results")
rows = [r for p in parts for r in p["rows"]]
for r in rows:
    r["seconds_per_concept"] = r["seconds"]
result = {**parts[0], "rows": rows, "sizes": sizes}
cols = ["size", "impl", "bf16", "batch", "steps", "seconds_per_concept", "seconds_per_step",
        "gflop_per_step", "tflops", "peak_gpu_mb"]
write_results(out, result, markdown_table(rows, cols), "Re-steering and TI at SD sizes on the GPU")
print(markdown_table(rows, cols))
PY
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$RESULT" "${RESULT%.json}.md" "$OUT"/ 2>/dev/null || true
fi
exit $status
