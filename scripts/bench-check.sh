#!/usr/bin/env bash
# How `curv check` scales with the length of a program: a model with N unused parameters (each a
# line `param uI: f32[2] = zeros`, each reported by warning W0001), a chain of N lets, and an
# expression in N parentheses, for N from 5,000 to 100,000. Prints the seconds of each check
# (release build, best of 3) and the time per 1,000 lines relative to the smallest N: a column
# near 1.0 all the way down is linear time. Not a test: a measurement.
# Usage: scripts/bench-check.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
if [ "${#sizes[@]}" -eq 0 ]; then sizes=(5000 10000 20000 40000 100000); fi
cargo build --release -q -p curv-cli
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'a,b,label\n0.1,0.9,0\n0.2,0.8,1\n0.3,0.7,0\n0.4,0.6,1\n' > "$work/tiny.csv"
python3 - "$work" "${sizes[@]}" <<'PY'
import sys
work, sizes = sys.argv[1], [int(size) for size in sys.argv[2:]]
def program(body, result):
    return ("use std.optimizers.sgd\n"
            'data tiny = csv("tiny.csv", label = "label")\n'
            "model m(x: f32[B, 2]) -> f32[B, 2] {\n"
            "param w: f32[2, 2] = glorot_uniform\n"
            f"{body}return {result}\n}}\n"
            "train fit {\nloss cross_entropy(m(tiny.x), tiny.y)\noptimizer sgd\nbatch 2\nsteps 1\n}\n")
for n in sizes:
    params = "".join(f"param u{i}: f32[2] = zeros\n" for i in range(n))
    open(f"{work}/params_{n}.curv", "w").write(program(params, "x @ w"))
    lets = "".join(f"let a{i} = a{i - 1} * 0.5 + x\n" for i in range(n - 1, 0, -1)) + "let a0 = x @ w\n"
    open(f"{work}/lets_{n}.curv", "w").write(program(lets, f"a{n - 1}"))
    open(f"{work}/parentheses_{n}.curv", "w").write(program("", "(" * n + "x @ w" + ")" * n))
PY
curv="$PWD/target/release/curv"
printf '| program | N | check (s) | per 1,000 lines, relative to N = %s |\n|---|---|---|---|\n' "${sizes[0]}"
for kind in params lets parentheses; do
    base=""
    for n in "${sizes[@]}"; do
        best=""
        for _ in 1 2 3; do
            start=$(date +%s.%N)
            (cd "$work" && "$curv" check "${kind}_$n.curv" > /dev/null 2>&1) || true
            end=$(date +%s.%N)
            best=$(python3 -c "import sys; t = $end - $start; b = '$best'; print(t if not b else min(t, float(b)))")
        done
        if [ -z "$base" ]; then base=$(python3 -c "print($best / ${n})"); fi
        python3 -c "print(f'| $kind | $n | {$best:.3f} | {($best / $n) / $base:.2f} |')"
    done
done
