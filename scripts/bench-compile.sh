#!/usr/bin/env bash
# How compiling a program for the CPU scales with its length. Programs of size N, trained for 2
# steps with SGD on the MLIR backend, the kernel cache off:
#   params       a model with N unused parameters (`param uI: f32[2] = zeros`);
#   lets         a chain of N lets over a batch (`let aI = aJ * 0.5 + x`);
#   scalar_lets  a chain of N scalar lets (`let sI = sJ * 0.5 + 1.0`) scaling the output.
# Prints the compile and train seconds of `curv run --timings` (train includes compiling the
# update kernels on their first call) and the total per unit of N relative to the smallest N: a
# column near 1.0 all the way down is linear time. Not a test: a measurement.
# Usage: scripts/bench-compile.sh [params|lets|scalar_lets] [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
kind=params
if [ "$#" -gt 0 ] && [[ "$1" =~ ^[a-z_]+$ ]]; then kind="$1"; shift; fi
case "$kind" in
    params|lets|scalar_lets) ;;
    *) echo "unknown kind '$kind' (params, lets or scalar_lets)" >&2; exit 2 ;;
esac
sizes=("$@")
if [ "${#sizes[@]}" -eq 0 ]; then sizes=(100 1000 10000); fi
cargo build --release -q -p curv-cli
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'a,b,label\n0.1,0.9,0\n0.2,0.8,1\n0.3,0.7,0\n0.4,0.6,1\n' > "$work/tiny.csv"
python3 - "$work" "$kind" "${sizes[@]}" <<'PY'
import sys
work, kind, sizes = sys.argv[1], sys.argv[2], [int(size) for size in sys.argv[3:]]
for n in sizes:
    if kind == "params":
        body = "".join(f"param u{i}: f32[2] = zeros\n" for i in range(n)) + "return x @ w\n"
    elif kind == "lets":
        body = "let a0 = x @ w\n" + "".join(f"let a{i} = a{i - 1} * 0.5 + x\n" for i in range(1, n))
        body += f"return a{n - 1}\n"
    else:
        body = "param c: f32 = zeros\nlet s0 = c + 1.0\n"
        body += "".join(f"let s{i} = s{i - 1} * 0.5 + 1.0\n" for i in range(1, n))
        body += f"return (x @ w) * s{n - 1}\n"
    open(f"{work}/{kind}_{n}.curv", "w").write(
        "use std.optimizers.sgd\n"
        'data tiny = csv("tiny.csv", label = "label")\n'
        "model m(x: f32[B, 2]) -> f32[B, 2] {\n"
        f"param w: f32[2, 2] = glorot_uniform\n{body}}}\n"
        "train fit {\nloss cross_entropy(m(tiny.x), tiny.y)\noptimizer sgd\nbatch 2\nsteps 2\n}\n")
PY
curv="$PWD/target/release/curv"
printf '| %s N | compile (s) | train (s) | total per unit, relative to N = %s |\n|---|---|---|---|\n' "$kind" "${sizes[0]}"
base=""
for n in "${sizes[@]}"; do
    timings=$(cd "$work" && CURV_CACHE=off "$curv" run "${kind}_$n.curv" --quiet --timings 2>&1 >/dev/null | grep '^timings:')
    compile=$(sed -E 's/.*compile ([0-9.]+) ms.*/\1/' <<< "$timings")
    train=$(sed -E 's/.*train ([0-9.]+) ms.*/\1/' <<< "$timings")
    total=$(python3 -c "print(($compile + $train) / 1000)")
    if [ -z "$base" ]; then base=$(python3 -c "print($total / $n)"); fi
    python3 -c "print(f'| $n | {$compile / 1000:.2f} | {$train / 1000:.2f} | {($total / $n) / $base:.2f} |')"
done
