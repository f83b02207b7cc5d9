#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md asks for, in one call on a lent GPU machine (its image has torch,
# pandas, pyarrow; not ray/optuna, which travel as wheels).  Prepare here, in the project root:
#
#   mkdir -p .devdata && cp ../shared/data/Beauty.txt .devdata/      # /.devdata/ is git-ignored
#   bash ../shared/tools/device-wheels.sh && echo /.whl/ >> .git/info/exclude
#
# then run it with carry [".devdata", ".whl"] and a timeout that leaves room for a rerun:
#
#   bash bench/device_run.sh            # tables on stdout, logs under $OUT
#
# Sections: training/evaluation speed (bench/epoch.py, full epochs; random vs token batching,
# eager vs torch.compile, with compile warm-up and graph counts), packing (bench/packing.py with
# 1, 2, 4, 8 trials, without and with NVIDIA MPS; MPS=off skips the MPS rounds), and a SimDiffRec accuracy run (at most ACCURACY_EPOCHS epochs, default
# 100, cut at ACCURACY_MINUTES, default 4; the per-epoch valid lines survive a cut).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "## speed"
python3 bench/epoch.py --data .devdata/Beauty.txt --repeats 3 --batching random,tokens --compile off,on \
    --variants 0,1 2>&1 | tee "$OUT/epoch.log"

echo "## packing"
python3 bench/packing.py --data .devdata/Beauty.txt --trials 1,2,4,8 --mps "${MPS:-both}" 2>&1 | tee "$OUT/packing.log"

echo "## accuracy (SimDiffRec, the paper's Beauty settings)"
timeout "$(( ${ACCURACY_MINUTES:-4} * 60 ))" python3 -m simdiffrec.cli train --data .devdata/Beauty.txt \
    --out /tmp/beauty-simdiffrec --alpha 0.4 --beta 0.4 --epochs "${ACCURACY_EPOCHS:-100}" --quiet 2>&1 \
    | tee "$OUT/accuracy.log"
cp /tmp/beauty-simdiffrec/metrics.json "$OUT/accuracy-metrics.json" 2>/dev/null || true
