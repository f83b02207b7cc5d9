#!/usr/bin/env bash
# The searches BENCHMARKS.md plans over the shipped spaces (encoder, optimiser, SASRec-CE and
# SimDiffRec in one search) on Toys and Beauty: tune 24 trials, finalize the top 2 with 3 seeds
# (the starting points and SASRec-CE at the defaults with them), and keep every per-epoch row in
# bench/curves/<dataset>24 and <dataset>24-final.  Resumable: run it again and each step goes on
# where it stopped.
#
#   bash bench/amazon_searches.sh                      # CPU: two trials at once, one core each
#   FLAGS="--gpu auto --trials-per-gpu 4" bash bench/amazon_searches.sh   # on a GPU machine
#
# DATASETS (default "toys beauty"), RUNS (default runs/) and FLAGS (default the CPU's) override.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
FLAGS=${FLAGS:---gpu never --max-concurrent 2 --cpus-per-trial 1}
declare -A FILE=([toys]=../shared/data/Toys_and_Games.txt [beauty]=../shared/data/Beauty.txt)

for name in ${DATASETS:-toys beauty}; do
    out="$RUNS/${name}24"
    tune=(simdiffrec tune --data "${FILE[$name]}" --space "$name" --num-samples 24 --seed 0 $FLAGS --out "$out")
    finalize=(simdiffrec finalize "$out/experiment" --seeds 3 --top 2 $FLAGS)
    if [ -f "$out/search.yaml" ]; then "${tune[@]}" --resume; else "${tune[@]}"; fi  # a finished one only exports again
    python bench/keep_curves.py "$out" "${name}24" --command "${tune[*]}"
    if [ -d "$out/final" ]; then "${finalize[@]}" --resume; else "${finalize[@]}"; fi
    python bench/keep_curves.py "$out/final" "${name}24-final" --command "${finalize[*]}"
done
