#!/usr/bin/env bash
# Installs the ONNX Runtime shared library the runtime loads at start-up (ort's load-dynamic feature).
# It comes from the PyPI wheel onnxruntime==1.31.1, fetched with pip (no install), checked by sha256,
# and unpacked to third_party/onnxruntime/. Idempotent: does nothing when the library is already there and intact
# (its own sha256; a damaged copy, which would crash the loader, is replaced); the unversioned link is always made.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version=1.31.1
sha=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
lib_sha=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
dest="$root/third_party/onnxruntime"
lib="$dest/libonnxruntime.so.$version"

if [ -f "$lib" ]; then
  if [ "$(sha256sum "$lib" | cut -d' ' -f1)" = "$lib_sha" ]; then
    ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
    echo "onnxruntime $version already at $lib"
    exit 0
  fi
  echo "setup-ort.sh: $lib is damaged (sha256 mismatch); installing it again" >&2
  rm -f "$lib"
fi
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "setup-ort.sh: only Linux x86_64 is automated; set ORT_DYLIB_PATH to your libonnxruntime" >&2; exit 1 ;;
esac
py="${PYTHON:-python3}"
if ! "$py" -m pip --version >/dev/null 2>&1; then
  echo "setup-ort.sh: $py has no pip (install python3-pip), or set ORT_DYLIB_PATH to an ONNX Runtime $version library" >&2
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_28_x86_64 \
  -d "$tmp" "onnxruntime==$version"
got="$(ls "$tmp"/onnxruntime-"$version"-*.whl | head -n 1)"
actual="$(sha256sum "$got" | cut -d' ' -f1)"
if [ "$actual" != "$sha" ]; then
  echo "setup-ort.sh: sha256 mismatch for $(basename "$got"): $actual (expected $sha)" >&2
  exit 1
fi
mkdir -p "$dest"
"$py" - "$got" "$dest" "$version" <<'PY'
import sys, zipfile, os
whl, dest, version = sys.argv[1:]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(whl) as z:
    data = z.read(name)
out = os.path.join(dest, f"libonnxruntime.so.{version}")
with open(out + ".tmp", "wb") as f:
    f.write(data)
os.replace(out + ".tmp", out)
PY
if [ "$(sha256sum "$lib" | cut -d' ' -f1)" != "$lib_sha" ]; then
  echo "setup-ort.sh: $lib unpacked from the checked wheel has an unexpected sha256" >&2
  exit 1
fi
ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
echo "onnxruntime $version installed at $lib"
