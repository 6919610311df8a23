#!/usr/bin/env bash
# Decode-speed comparison: nuwa bench on each export vs the PyTorch reference, interleaved rounds, load logged.
#   bash onnx/bench/run_all.sh [ROUNDS] [THREADS...]   (from the repository root, after cargo build --release)
set -u
ROUNDS=${1:-2}; shift || true
THREADS=${@:-2 1}
MODELS=${MODELS:-"smol-llava-fp32 smol-llava-fp32-v2 smol-llava-int8-v2 smol-llava-int8-v3"}
for r in $(seq 1 "$ROUNDS"); do
  for t in $THREADS; do
    for m in $MODELS; do
      echo "== round $r threads $t nuwa $m load $(cut -d' ' -f1 /proc/loadavg)"
      target/release/nuwa bench --model .cache/models/$m --contexts 64,1024 --steps 32 --threads $t 2>&1 | grep "^context"
    done
    echo "== round $r threads $t torch load $(cut -d' ' -f1 /proc/loadavg)"
    .venv/bin/python onnx/bench/torch_decode.py --checkpoint .cache/smol-llava --contexts 64,1024 --steps 32 --threads $t 2>&1 | grep "^torch"
  done
done
