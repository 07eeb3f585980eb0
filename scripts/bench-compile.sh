#!/usr/bin/env bash
# How compiling a program for the CPU scales with its number of parameters: a model with N unused
# parameters (`param uI: f32[2] = zeros`), trained for 2 steps with SGD on the MLIR backend, the
# kernel cache off. Prints the compile and train seconds of `curv run --timings` (train includes
# compiling the update kernels on their first call) and the total per parameter relative to the
# smallest N: a column near 1.0 all the way down is linear time. Not a test: a measurement.
# Usage: scripts/bench-compile.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
if [ "${#sizes[@]}" -eq 0 ]; then sizes=(100 200 400 1000 4000); fi
cargo build --release -q -p curv-cli
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'a,b,label\n0.1,0.9,0\n0.2,0.8,1\n0.3,0.7,0\n0.4,0.6,1\n' > "$work/tiny.csv"
python3 - "$work" "${sizes[@]}" <<'PY'
import sys
work, sizes = sys.argv[1], [int(size) for size in sys.argv[2:]]
for n in sizes:
    params = "".join(f"param u{i}: f32[2] = zeros\n" for i in range(n))
    open(f"{work}/params_{n}.curv", "w").write(
        "use std.optimizers.sgd\n"
        'data tiny = csv("tiny.csv", label = "label")\n'
        "model m(x: f32[B, 2]) -> f32[B, 2] {\n"
        f"param w: f32[2, 2] = glorot_uniform\n{params}return x @ w\n}}\n"
        "train fit {\nloss cross_entropy(m(tiny.x), tiny.y)\noptimizer sgd\nbatch 2\nsteps 2\n}\n")
PY
curv="$PWD/target/release/curv"
printf '| N | compile (s) | train (s) | total per parameter, relative to N = %s |\n|---|---|---|---|\n' "${sizes[0]}"
base=""
for n in "${sizes[@]}"; do
    timings=$(cd "$work" && CURV_CACHE=off "$curv" run "params_$n.curv" --quiet --timings 2>&1 >/dev/null | grep '^timings:')
    compile=$(sed -E 's/.*compile ([0-9.]+) ms.*/\1/' <<< "$timings")
    train=$(sed -E 's/.*train ([0-9.]+) ms.*/\1/' <<< "$timings")
    total=$(python3 -c "print(($compile + $train) / 1000)")
    if [ -z "$base" ]; then base=$(python3 -c "print($total / $n)"); fi
    python3 -c "print(f'| $n | {$compile / 1000:.2f} | {$train / 1000:.2f} | {($total / $n) / $base:.2f} |')"
done
