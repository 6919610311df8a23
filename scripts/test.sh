#!/usr/bin/env bash
# The project's test command (README and CI): installs ONNX Runtime if missing, then runs every test.
# No torch, no network beyond PyPI/crates.io: the fixtures and goldens under models/ are committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-ort.sh
# Library, binary, integration tests and examples; benchmarks are compiled (so they cannot rot) but not run here.
cargo test --release --lib --bins --tests --examples "$@"
cargo bench --no-run --quiet
# A CPU-only build (no CUDA/CoreML provider features, as a minimal mobile binary would use) must compile cleanly.
cpu_only=$(cargo check --release --no-default-features --all-targets 2>&1) || { echo "$cpu_only"; exit 1; }
if grep -q '^warning' <<<"$cpu_only"; then echo "$cpu_only"; echo "warnings in the --no-default-features build" >&2; exit 1; fi
