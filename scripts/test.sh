#!/usr/bin/env bash
# The project's test command (README and CI): installs ONNX Runtime if missing, then runs every test.
# No torch, no network beyond PyPI/crates.io: the fixtures and goldens under models/ are committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-ort.sh
# Library, binary, integration tests and examples; benchmarks are compiled (so they cannot rot) but not run here.
cargo test --release --lib --bins --tests --examples "$@"
cargo bench --no-run --quiet
