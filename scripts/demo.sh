#!/usr/bin/env bash
# The main job: installs ONNX Runtime if missing, builds nuwa, and answers a question about an image with the
# committed fixture model (or MODEL=models/<id>). Extra arguments go to `nuwa run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-ort.sh >&2
cargo build --release --quiet
model="${MODEL:-models/tiny-llava-clip}"
image="${IMAGE:-examples/coco-000000000139.jpg}"
prompt="${PROMPT:-Please provide the bounding box coordinate of the region this sentence describes: the person.}"
exec target/release/nuwa run --model "$model" --image "$image" --prompt "$prompt" "$@"
