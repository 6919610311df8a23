#!/usr/bin/env bash
# The project's test command (README and CI): installs ONNX Runtime if missing, then runs every test.
# No torch, no network beyond PyPI/crates.io: the fixtures and goldens under models/ are committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-ort.sh
cargo test --release --all-targets "$@"
