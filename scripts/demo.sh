#!/usr/bin/env bash
# The main job: installs ONNX Runtime if missing, builds nuwa, and answers a question about an image with the
# committed fixture model (or MODEL=models/<id>), with Nüwa pruning, and draws the kept tokens. Extra arguments go
# to `nuwa run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-ort.sh >&2
cargo build --release --quiet
model="${MODEL:-models/tiny-llava-clip}"
image="${IMAGE:-examples/coco-000000000139.jpg}"
prompt="${PROMPT:-Please provide the bounding box coordinate of the region this sentence describes: the person.}"
mkdir -p out
# Nüwa pruning at budget 64 (PRUNE="--prune none" to switch it off); the kept tokens are drawn to out/demo-viz.png.
# shellcheck disable=SC2086
exec target/release/nuwa run --model "$model" --image "$image" --prompt "$prompt" ${PRUNE:---prune nuwa --budget 64} \
  --viz out/demo-viz.png "$@"
