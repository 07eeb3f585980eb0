#!/usr/bin/env bash
# Installs what curv needs on a Debian or Ubuntu machine, idempotently: the LLVM/MLIR 22
# development packages melior links against, a C toolchain, and a Rust toolchain if there is none.
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(
    build-essential pkg-config git python3 python3-venv python3-pip
    llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev libpolly-22-dev
    libzstd-dev zlib1g-dev libxml2-dev libz3-dev
)

say() { printf '[setup] %s\n' "$*"; }

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    say "this script supports Debian and Ubuntu (apt); install these packages by hand: ${packages[*]}"
    exit 1
fi

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        runner=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        runner=(sudo)
    else
        say "these system packages are missing: ${missing[*]}"
        say "run this script as root (or with passwordless sudo), or install them with:"
        say "  sudo apt-get install ${missing[*]}"
        exit 1
    fi
    say "installing: ${missing[*]}"
    "${runner[@]}" apt-get update -q
    if ! DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -q "${missing[@]}"; then
        say "apt-get could not install: ${missing[*]}"
        say "LLVM/MLIR 22 comes from Debian 12's security updates (1:22.1.x); on other releases enable a"
        say "repository that carries llvm-22-dev, libmlir-22-dev and mlir-22-tools."
        exit 1
    fi
else
    say "system packages: all present"
fi

if [ ! -d /usr/lib/llvm-22 ]; then
    say "/usr/lib/llvm-22 is missing after installing the packages; melior cannot be built"
    exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    elif command -v curl >/dev/null 2>&1; then
        say "no Rust toolchain; installing the stable toolchain with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        say "no Rust toolchain and no curl to fetch rustup; install Rust 1.85 or newer"
        exit 1
    fi
fi
say "rust: $(cargo --version)"
