#!/usr/bin/env bash
# The main job: installs ONNX Runtime if missing, builds nuwa, and asks the committed demo model (models/nuwa-demo,
# or MODEL=models/<id>) for the box of a shape in an example photo no training image used, with Nüwa pruning at
# budget 64; prints the answer and the box in original-image pixels and draws the kept tokens and the box to
# out/demo-viz.png. IMAGE / PROMPT / PRUNE override the defaults (paths relative to the repository root); extra
# arguments go to `nuwa run`, and a single-valued option there (`--budget 128`, `--viz other.png`) takes its last
# value, so they win over the script's own; another method or --keep1/--keep2 go through PRUNE=.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-ort.sh >&2
model="${MODEL:-models/nuwa-demo}"
image="${IMAGE:-examples/shapes-red-blue-stars.jpg}"
prompt="${PROMPT:-Please provide the bounding box coordinate of the region this sentence describes: the blue star.}"
mkdir -p out
# Nüwa pruning at budget 64 (PRUNE="--prune none", or PRUNE= empty, to switch it off).
# `cargo run` builds and runs the binary wherever the target directory is (CARGO_TARGET_DIR, build.target-dir)
# and sets ORT_DYLIB_PATH from .cargo/config.toml.
# shellcheck disable=SC2086
exec cargo run --release --quiet --bin nuwa -- run --model "$model" --image "$image" --prompt "$prompt" \
  ${PRUNE---prune nuwa --budget 64} --viz out/demo-viz.png "$@"
