#!/usr/bin/env bash
# Trains examples/digits_mlp.curv (2000 steps, batch 128) with Adam and with every preset of the
# low-rank and matrix-free family (docs/language.md section 12.9, and SINGD of section 12.7), and
# prints a table of the final test accuracy, the median step and the whole run's time per step. Not
# a test: a measurement, with Adam measured in the same run as the baseline. EGN, whose steps cost
# 2 b c model passes, runs 20 steps (its row says so).
# Usage: scripts/bench-lowrank.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-2000}"
cargo build --release -q -p curv-cli
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '| preset | steps | test accuracy | median step (ms) | wall time per step incl. startup and refreshes (ms) |\n|---|---|---|---|---|\n'
for preset in adam mfac natural_galore psgd_lra fosi lazy_newton singd egn; do
    run_steps="$steps"
    if [ "$preset" = egn ]; then run_steps=20; fi
    sed -e "s|data/digits.csv|$PWD/examples/data/digits.csv|" \
        -e "s|use std.optimizers.adam|use std.optimizers.$preset|" \
        -e "s|optimizer adam|optimizer $preset|" examples/digits_mlp.curv > "$work/$preset.curv"
    start=$(date +%s.%N)
    ./target/release/curv run "$work/$preset.curv" --steps "$run_steps" --quiet \
        --metrics "$work/$preset.jsonl" --out "$work/$preset" > /dev/null
    end=$(date +%s.%N)
    python3 - "$work/$preset.jsonl" "$preset" "$start" "$end" "$run_steps" <<'PY'
import json, sys
path, preset, start, end, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
last = [json.loads(line) for line in open(path)][-1]
print(f"| {preset} | {steps} | {last['test_accuracy']:.4f} | {last['step_ms_median']:.2f} | {(end - start) * 1000 / steps:.2f} |")
PY
done
