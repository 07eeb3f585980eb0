#!/usr/bin/env bash
# The GPU check, in one short call on a machine with an NVIDIA GPU, its driver, Python with numpy
# and PyTorch, and no Rust or LLVM. Its inputs come from scripts/gpu-prepare.sh, run beforehand on
# the development machine and carried in gpu-check/ (ignored by git):
#
#   ./scripts/gpu-prepare.sh                       # here: trainers, manifest, tolerances
#   run(command="./scripts/gpu-check.sh", carry=["gpu-check"], timeout_s=540)
#
# 1. every example and optimizer preset, 20 steps on the GPU (the trainer's default) and on the
#    CPU (the same trainer with --interpret), final loss and parameters compared within the
#    tolerance gpu-prepare measured; and the optimizer step of a library built with
#    `curv build --lib --device cuda` on CUDA tensors against torch.optim.Adam;
# 2. the fused Adam update's achieved bandwidth on a 4.2M-element parameter against a
#    device-to-device copy of as many bytes, and train-step time of the digits MLP and the SIREN with Adam against
#    PyTorch CUDA eager and torch.compile, in the same run, for curv with resident steps and
#    launches that do not wait for their kernels (the default), with every launch waiting
#    (CURV_CUDA_SYNC=each), with small inputs written by the CPU (CURV_CUDA_SMALL_INPUTS=cpu)
#    and with every tensor staged through the host (CURV_RESIDENT=off); and the digits MLP's step
#    with Muon, Shampoo, SOAP and K-FAC, resident against staged;
# 3. where the host's time went in the two step benchmarks (CURV_CUDA_PROFILE), then a short
#    table last. Exit status 1 when a comparison fails. When $OUT names a folder (the device
#    tool's), the logs and metrics go there as gpu-check-logs.tar.gz.
#
# DRY_RUN=1 runs the "GPU" side with --interpret too: a check of the script itself on a machine
# without a GPU (every comparison must then pass).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-20}
gpu_flag=()
[ "${DRY_RUN:-0}" = 1 ] && gpu_flag=(--interpret)
if [ ! -f gpu-check/trainers.tar.xz ]; then
    echo "gpu-check/trainers.tar.xz is missing: run scripts/gpu-prepare.sh first and carry gpu-check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cuBLAS from the Python `nvidia-*` packages, when the system has none on the loader path.
libraries=$("$PYTHON" - <<'PY'
import importlib, os
paths = []
for name in ("nvidia.cublas", "nvidia.cuda_runtime"):
    try:
        module = importlib.import_module(name)
        paths += [os.path.join(path, "lib") for path in module.__path__]
    except Exception:
        pass
print(":".join(path for path in paths if os.path.isdir(path)))
PY
)
work=$(mktemp -d)
# Where the caller collects files (the device tool's $OUT), the logs and metrics go there too.
save_logs() {
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        tar -C "$work" -czf "$OUT/gpu-check-logs.tar.gz" --exclude='bin' --exclude='lib' --exclude='*.safetensors' . 2>/dev/null || true
    fi
}
# The runtime opens cuBLAS by the names CUDA 12 and earlier give it (libcublas.so, .so.12, ...);
# CUDA 13's packages ship libcublas.so.13 alone, so a link under the plain name is made for it.
mkdir -p "$work/lib"
for folder in ${libraries//:/ }; do
    for library in "$folder"/libcublas.so.*; do
        [ -e "$library" ] && [ ! -e "$work/lib/libcublas.so" ] && ln -s "$library" "$work/lib/libcublas.so"
    done
done
export LD_LIBRARY_PATH="$work/lib:${libraries}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
tar -C "$work" -xJf gpu-check/trainers.tar.xz
results="$work/results.txt"
: > "$results"
failures=0
gpu_failures=0
checked=0
stopped=0
echo "[gpu-check] $(date +%T) correctness: $(wc -l < gpu-check/manifest.tsv) trainers"
while IFS=$'\t' read -r name data_dir; do
    checked=$((checked + 1))
    trainer="$work/bin/$name"
    gpu_out="$work/$name-gpu"
    cpu_out="$work/$name-cpu"
    started=$(date +%s%N)
    if ! timeout 60 "$trainer" "${gpu_flag[@]}" --steps "$STEPS" --quiet --data-dir "$data_dir" --out "$gpu_out" \
            --metrics "$gpu_out/metrics.jsonl" > "$work/$name-gpu.log" 2>&1; then
        printf '%-14s FAILED on the GPU: %s\n' "$name" "$(tail -2 "$work/$name-gpu.log" | tr '\n' ' ')" | tee -a "$results"
        failures=$((failures + 1))
        gpu_failures=$((gpu_failures + 1))
        # The same failure on the first three trainers is the runtime's, not the trainers': stop
        # here rather than spend the GPU's time on the rest, and show the whole log of the first.
        if [ "$gpu_failures" -ge 3 ] && [ "$gpu_failures" -eq "$checked" ]; then
            echo "[gpu-check] the first three trainers failed on the GPU; the rest are not run. First log:"
            cat "$work/$(head -1 gpu-check/manifest.tsv | cut -f1)-gpu.log"
            stopped=1
            break
        fi
        continue
    fi
    gpu_seconds=$(( ($(date +%s%N) - started) / 1000000000 ))
    if ! timeout 300 "$trainer" --steps "$STEPS" --quiet --interpret --data-dir "$data_dir" --out "$cpu_out" \
            --metrics "$cpu_out/metrics.jsonl" > "$work/$name-cpu.log" 2>&1; then
        printf '%-14s FAILED on the CPU: %s\n' "$name" "$(tail -2 "$work/$name-cpu.log" | tr '\n' ' ')" | tee -a "$results"
        failures=$((failures + 1))
        continue
    fi
    if ! line=$("$PYTHON" scripts/gpu_check.py compare "$name" "$gpu_out" "$cpu_out" gpu-check/tolerances.json 2>&1); then
        failures=$((failures + 1))
    fi
    printf '%s (gpu run %s s)\n' "$(echo "$line" | tail -1)" "$gpu_seconds" | tee -a "$results"
done < gpu-check/manifest.tsv
if [ "$stopped" = 0 ]; then
    if ! line=$("$PYTHON" scripts/gpu_check.py library "$work/bin/library" 2>&1); then
        failures=$((failures + 1))
    fi
    echo "$line" | tail -1 | tee -a "$results"
fi
grep -q MISMATCH "$results" && failures=$((failures + 1))

if [ "$stopped" = 1 ]; then
    cat "$results"
    save_logs
    rm -rf "$work"
    exit 1
fi

echo "[gpu-check] $(date +%T) benchmarks"
# Train-step time: curv's trainers (their median step) against PyTorch, same run.
step_ms() {
    local profile="$work/bench-$1${CURV_RESIDENT:+-resident-$CURV_RESIDENT}${CURV_CUDA_SYNC:+-sync-$CURV_CUDA_SYNC}${CURV_CUDA_SMALL_INPUTS:+-inputs-$CURV_CUDA_SMALL_INPUTS}.profile"
    CURV_CUDA_PROFILE=1 "$work/bin/$1" "${gpu_flag[@]}" --steps "$2" --data-dir "$3" --out "$work/bench-$1" 2>"$profile" | sed -n 's/.*median step \([0-9.]*\) ms.*/\1/p'
}
# The fused Adam update of a 4.2M-element parameter on buffers already on the GPU, against a
# device-to-device copy of the same size.
update=$("$work/bin/update_4m" "${gpu_flag[@]}" --bench-update 200 --data-dir examples/bench 2>"$work/update.log" || echo '{}')
[ "$update" = '{}' ] && echo "update_4m: $(tail -1 "$work/update.log")"
digits_ms=$(step_ms adam 200 examples/optimizers)
siren_ms=$(step_ms siren 60 examples)
# The same with every tensor staged through the host at each call (no resident steps): what
# keeping parameters, states, gradients and data on the device saves.
digits_host_ms=$(CURV_RESIDENT=off step_ms adam 200 examples/optimizers)
siren_host_ms=$(CURV_RESIDENT=off step_ms siren 60 examples)
# Resident, but every launch and matrix product waiting for the device: what launching back to
# back saves.
digits_wait_ms=$(CURV_CUDA_SYNC=each step_ms adam 200 examples/optimizers)
siren_wait_ms=$(CURV_CUDA_SYNC=each step_ms siren 60 examples)
# Resident, with small inputs (scalar hyperparameters, read by the host side of the updates)
# written into their staging buffers by the CPU instead of the driver: whether reading them on
# the host moved their pages.
digits_cpu_inputs_ms=$(CURV_CUDA_SMALL_INPUTS=cpu step_ms adam 200 examples/optimizers)
siren_cpu_inputs_ms=$(CURV_CUDA_SMALL_INPUTS=cpu step_ms siren 60 examples)
# The matrix structures' steps on the digits MLP: resident (their per-step work as generated
# kernels and cuBLAS products, the roots, bases and inverses on the host at refresh steps)
# against staged (CURV_RESIDENT=off: their work in the runtime on the CPU, every tensor through
# the host).
structures=""
for name in muon shampoo soap kfac; do
    [ -x "$work/bin/$name" ] || continue
    resident_ms=$(step_ms "$name" 100 examples/optimizers)
    staged_ms=$(CURV_RESIDENT=off step_ms "$name" 100 examples/optimizers)
    structures="$structures$name ${resident_ms:-nan} ${staged_ms:-nan};"
done
peers=$("$PYTHON" scripts/gpu_check.py bench 2>"$work/bench.log" || echo '{}')
for problem in adam siren; do
    for profile in "$work/bench-$problem.profile" "$work/bench-$problem-sync-each.profile" "$work/bench-$problem-resident-off.profile"; do
        echo "host time of the $problem step benchmark by part of the CUDA runtime (CURV_CUDA_PROFILE, $(basename "$profile")):"
        grep ' calls ' "$profile" || echo "  (none: $(tail -1 "$profile"))"
    done
done
echo
echo "=== GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) ==="
echo "correctness ($STEPS steps, GPU against the same trainer on the CPU):"
cat "$results"
"$PYTHON" - "$digits_ms" "$siren_ms" "$peers" "$update" "$digits_host_ms" "$siren_host_ms" "$digits_wait_ms" "$siren_wait_ms" "$digits_cpu_inputs_ms" "$siren_cpu_inputs_ms" "$structures" <<'PY'
import json, sys
digits, siren, peers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3] or "{}")
update = json.loads(sys.argv[4] or "{}")
staged = {"digits": sys.argv[5], "siren": sys.argv[6]}
waiting = {"digits": sys.argv[7], "siren": sys.argv[8]}
cpu_inputs = {"digits": sys.argv[9], "siren": sys.argv[10]}
def number(text):
    try:
        return float(text)
    except ValueError:
        return float("nan")
print()
print(f"{'problem':<8}{'curv ms':>10}{'waiting ms':>12}{'staged ms':>11}{'eager ms':>10}{'compile ms':>12}{'curv/eager':>12}{'curv/compile':>14}")
for problem, ours in (("digits", number(digits)), ("siren", number(siren))):
    eager = peers.get(f"{problem}_eager_ms") or float("nan")
    compiled = peers.get(f"{problem}_compile_ms") or float("nan")
    host, wait = number(staged[problem]), number(waiting[problem])
    print(f"{problem:<8}{ours:>10.3f}{wait:>12.3f}{host:>11.3f}{eager:>10.3f}{compiled:>12.3f}{ours / eager:>12.2f}{ours / compiled:>14.2f}")
print("(curv: resident steps, launches back to back, the default; waiting: CURV_CUDA_SYNC=each, every launch waits;")
print(" staged: CURV_RESIDENT=off, every tensor through the host at each call)")
print("with small inputs written by the CPU (CURV_CUDA_SMALL_INPUTS=cpu): " + ", ".join(
    f"{problem} {number(cpu_inputs[problem]):.3f} ms" for problem in ("digits", "siren")))
structures = [entry.split() for entry in sys.argv[11].split(";") if entry.strip()]
if structures:
    print("matrix structures on the digits MLP, median step (resident / staged through the host): " + ", ".join(
        f"{name} {number(resident):.3f} / {number(staged):.3f} ms" for name, resident, staged in structures))
copy = peers.get("copy_gbytes_per_second")
print(f"device-to-device copy (PyTorch): {copy:.0f} GB/s" if copy else "device-to-device copy (PyTorch): not measured")
if update.get("update_gbytes_per_second"):
    ratio = update["update_gbytes_per_second"] / update["copy_gbytes_per_second"]
    print(f"fused {update['rule']} update of {update['elements']} elements on {update['device']}: "
          f"{update['update_gbytes_per_second']:.0f} GB/s, copy {update['copy_gbytes_per_second']:.0f} GB/s, ratio {ratio:.2f} (target >= 0.80)")
else:
    print("fused update bandwidth: not measured (see the update_4m trainer's error above)")
PY
save_logs
rm -rf "$work"
[ "$failures" -eq 0 ]
