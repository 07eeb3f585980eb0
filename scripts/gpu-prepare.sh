#!/usr/bin/env bash
# Builds the inputs of scripts/gpu-check.sh on the development machine (which has Rust and LLVM;
# the GPU machine has neither): a `curv build --device cuda` trainer for every example and every
# optimizer preset that executes (PTX for sm_90 embedded, stripped, about 12 MB each, packed with
# xz), the trainer of examples/bench/update_4m.curv for the update-bandwidth benchmark, a manifest
# naming each trainer's data directory, and the tolerance of each comparison
# (1e-3 relative, or three times the distance between the f32 and f64 interpreter runs when that
# is larger: the f32 rounding noise of the optimizer itself, as the CPU differential test
# measures it). Everything goes to gpu-check/ (ignored by git), which the GPU call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-20}
cargo build --release -p curv-cli -p curv-standalone
CURV="$PWD/target/release/curv"
rm -rf gpu-check
mkdir -p gpu-check/bin gpu-check/reference
manifest=gpu-check/manifest.tsv
: > "$manifest"
for file in examples/*.curv examples/optimizers/*.curv; do
    name=$(basename "$file" .curv)
    [ -e "gpu-check/bin/$name" ] && name="$(basename "$(dirname "$file")")_$name"
    if ! "$CURV" build "$file" --device cuda --gpu sm_90 -o "gpu-check/bin/$name" > /dev/null 2> "gpu-check/$name.build.log"; then
        echo "[gpu-prepare] $name: not built ($(tail -1 "gpu-check/$name.build.log"))"
        continue
    fi
    strip "gpu-check/bin/$name"
    # The f32 and f64 interpreter runs that set the tolerance.
    for precision in f32 f64; do
        "$CURV" run "$file" --backend interp --precision "$precision" --steps "$STEPS" --quiet \
            --out "gpu-check/reference/$name-$precision" --metrics "gpu-check/reference/$name-$precision/metrics.jsonl"
    done
    printf '%s\t%s\n' "$name" "$(dirname "$file")" >> "$manifest"
    echo "[gpu-prepare] $name: built"
done
# The update-bandwidth benchmark's trainer (a 4.2M-element parameter under Adam); not compared.
"$CURV" build examples/bench/update_4m.curv --device cuda --gpu sm_90 -o gpu-check/bin/update_4m > /dev/null
strip gpu-check/bin/update_4m
# A library built for CUDA (its optimizer step on CUDA tensors, against torch.optim.Adam).
"$CURV" build --lib --device cuda --gpu sm_90 examples/optimizers/adam.curv -o gpu-check/bin/library > /dev/null
strip --strip-unneeded gpu-check/bin/library/libadam.so
.venv/bin/python scripts/gpu_check.py tolerances gpu-check
rm -rf gpu-check/reference gpu-check/*.build.log
# xz -9's 64 MiB window spans several trainers, which share most of their code: about 12 MB
# packed, against 68 MB with the default window.
tar -C gpu-check -cf - bin | xz -9 -T1 > gpu-check/trainers.tar.xz
rm -rf gpu-check/bin
du -sh gpu-check
size=$(du -sm gpu-check | cut -f1)
if [ "$size" -gt 60 ]; then
    echo "[gpu-prepare] gpu-check/ is ${size} MiB, more than the 64 MiB a GPU call carries" >&2
    exit 1
fi
