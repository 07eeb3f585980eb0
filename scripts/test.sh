#!/usr/bin/env bash
# Sets up the machine (see setup.sh) and runs every test: formatting, the whole workspace's tests
# (unit, UI diagnostics, stage snapshots, CLI, the MLIR toolchain check) and a short fuzz smoke
# replay of every fuzz target's seeds when a nightly toolchain with cargo-fuzz is available.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== the standalone runtime library that \`curv build\` links"
cargo build -p curv-standalone

echo "== cargo test --workspace"
# Snapshots are never written by the test run itself: a missing or changed snapshot fails.
INSTA_UPDATE=no cargo test --workspace

echo "== oracle tests against the reference implementations (Python venv in .venv)"
./scripts/python-env.sh
cargo build -p curv-cli
CURV="$PWD/target/debug/curv" .venv/bin/python -m pytest -q tests/oracle

echo "== fuzz targets (build them and replay each seed corpus)"
if cargo +nightly --version >/dev/null 2>&1 && cargo +nightly fuzz --version >/dev/null 2>&1; then
    (
        cd tests/fuzz
        cargo +nightly fuzz build
        for target in front_end csv npy idx png safetensors; do
            cargo +nightly fuzz run "$target" "seeds/$target" -- -runs=0 -rss_limit_mb=2048
        done
    )
else
    echo "skipped: no nightly toolchain with cargo-fuzz (the seed corpus is still checked by cargo test)"
fi
