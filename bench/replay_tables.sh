#!/usr/bin/env bash
# Every policy table BENCHMARKS.md cites for one calibration set, each file opening with the
# command that made it, written beside the set (about half an hour on one core; the TPE tables
# take most of it):
#
#   bash bench/replay_tables.sh bench/curves/ml-100k 100,200 10,30   # caps, patiences (default 100, the space's)
#   bash bench/replay_tables.sh --across bench/curves/toys-8k bench/curves/ml-100k   # bench/curves/across-*.md
#
# Across sets (bench/replay_sets.py: each policy ranked by its worst set): 16 and 24 trials on 4
# workers at each patience, 24 on 8 workers (tune's default --max-concurrent), every policy at 48.
#
# A set's files: replay.md (every policy, 48 trials), replay-patience.md (the same at each
# patience), replay-searchers-{16,24}.md (random, TPE, TPE multivariate), replay-workers-{16,24}.md
# (2 workers), replay-patience-{16,24}.md (each patience), replay-hyperband.md (synchronous
# Hyperband beside ASHA) and settings.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# write FILE ARGS...: `python ARGS` in a fenced block, then what it prints
write() {
    local file=$1 shown=python arg; shift
    for arg in "$@"; do [[ $arg =~ [\ \;] ]] && shown+=" \"$arg\"" || shown+=" $arg"; done
    { printf '```\n%s\n```\n' "$shown"; "$PY" "$@"; } > "$file.tmp" && mv "$file.tmp" "$file"
    echo "wrote $file" >&2
}

# policies GRID: the named policies at every cap (and, with the patiences, at every patience but the space's 10)
policies() {
    local grid=$1 out=() cap p name
    for cap in ${CAPS//,/ }; do
        for name in $grid; do
            for p in ${PATIENCE//,/ }; do
                if [ "$p" = 10 ]; then out+=("${name//_/ } cap$cap"); else out+=("${name//_/ } cap$cap p$p"); fi
            done
        done
    done
    local IFS=';'; echo "${out[*]}"
}

GRID="none asha_g3_rf4_b1_m1 asha_g5_rf3_b1_m3 asha_g5_rf2_b1_m3 asha_g10_rf3_b1_m3 asha_g10_rf2_b1_m3 asha_g15_rf2_b1_m3 asha_g20_rf2_b1_m3 asha_g10_rf2_b3_m3"
FEW="none asha_g10_rf2_b1_m3 asha_g20_rf2_b1_m3 asha_g3_rf4_b1_m1 asha_g5_rf2_b1_m3 asha_g10_rf2_b3_m3"
HB="none asha_g10_rf2_b1_m3 asha_g10_rf2_b3_m3 hyperband_rf2 hyperband_rf3 hyperband_rf4"

if [ "${1:-}" = "--across" ]; then
    shift
    CAPS=100 PATIENCE=10,30
    for n in 16 24; do
        write "bench/curves/across-$n.md" bench/replay_sets.py "$@" --space default --caps "$CAPS" \
            --patience "$PATIENCE" --trials "$n" --searchers random,tpe-mv --orders 100 --policies "$(policies "$GRID")"
    done
    PATIENCE=10
    write bench/curves/across-24-8workers.md bench/replay_sets.py "$@" --space default --caps "$CAPS" --trials 24 \
        --workers 8 --searchers random,tpe-mv --orders 100 --policies "$(policies "$GRID")"
    write bench/curves/across-48.md bench/replay_sets.py "$@" --space default --caps "$CAPS"
    exit 0
fi

SET=$1 CAPS=${2:-100} PATIENCE=${3:-10}
BASE=(--space default --caps "$CAPS")
ALL=("${BASE[@]}" --patience "$PATIENCE")
write "$SET/replay.md" bench/replay.py "$SET" "${BASE[@]}"
[ "$PATIENCE" = 10 ] || write "$SET/replay-patience.md" bench/replay.py "$SET" "${ALL[@]}"
for n in 16 24; do
    (PATIENCE=10; write "$SET/replay-searchers-$n.md" bench/replay.py "$SET" "${BASE[@]}" \
        --trials "$n" --searchers random,tpe,tpe-mv --orders 100 --policies "$(policies "$GRID")")
    (PATIENCE=10; write "$SET/replay-workers-$n.md" bench/replay.py "$SET" "${BASE[@]}" \
        --trials "$n" --workers 2 --searchers random,tpe-mv --orders 100 --policies "$(policies "$FEW")")
    [ "$PATIENCE" = 10 ] || write "$SET/replay-patience-$n.md" bench/replay.py "$SET" "${ALL[@]}" \
        --trials "$n" --searchers random,tpe-mv --orders 100 --policies "$(policies "$FEW")"
done
(PATIENCE=10; write "$SET/replay-hyperband.md" bench/replay.py "$SET" "${BASE[@]}" \
    --workers 4 --orders 100 --policies "$(policies "$HB")")
write "$SET/settings.md" bench/settings_effect.py "$SET"
