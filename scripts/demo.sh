#!/usr/bin/env bash
# Sets up the machine (see setup.sh), builds curv and runs the main demo on the bundled data:
# the digits MLP is checked (parameters, optimizer state, FLOPs) and trained to >= 95% test
# accuracy, then the SIREN coordinate network learns the 64x64 camera image with Adam, and Adam is
# compared with the Kronecker-factored presets on the time to 30 dB PSNR; metrics, plots,
# parameters and the reconstructed image land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p curv-cli -p curv-standalone
curv=./target/release/curv
echo
echo "== curv check examples/digits_mlp.curv"
"$curv" check examples/digits_mlp.curv
echo
echo "== curv run examples/digits_mlp.curv"
"$curv" run examples/digits_mlp.curv --out out/digits --metrics out/digits/metrics.jsonl
echo
echo "== curv run examples/siren.curv --steps 200"
"$curv" run examples/siren.curv --steps 200 --out out/siren --metrics out/siren/metrics.jsonl
echo
echo "== curv compare examples/siren.curv: Adam against Kronecker-factored curvature, to 30 dB PSNR"
"$curv" compare examples/siren.curv --optimizers adam,shampoo,kfac,soap,muon --target psnr=30 --stop-at-target --steps 300 --quiet
echo
echo "== curv compare examples/digits_cnn.curv: a strided CNN, K-FAC on its convolution kernels against Adam"
"$curv" compare examples/digits_cnn.curv --optimizers cnn_kfac,adam --quiet
echo
echo "== curv build examples/digits_mlp.curv -o out/digits-trainer (a standalone trainer, no LLVM inside)"
"$curv" build examples/digits_mlp.curv -o out/digits-trainer
./out/digits-trainer --steps 300
echo
echo "== a file with mistakes: every error is reported in one run"
"$curv" check tests/ui/several_syntax_errors.curv || echo "(curv exited with $? as it should for a user error)"
echo
echo "Outputs are in out/digits and out/siren (final.safetensors, metric plots as SVG, out/siren/reconstruction.png)."
