"""Writes the small JPEG variants the completeness check is tested on (src/image/tests.rs).

Needs Pillow (libjpeg) and jpegtran (Debian: libjpeg-turbo-progs), which CI does not: the outputs are committed.
Run from the repository root (it rewrites the same bytes):
    python3 tests/data/image/jpeg/make.py
"""
from pathlib import Path

from PIL import Image

out = Path(__file__).parent
src = Image.open("examples/shapes-tennis.jpg").convert("RGB").crop((180, 200, 276, 272))  # 96x72
src.save(out / "rst-blocks-420.jpg", quality=85, subsampling=2, restart_marker_blocks=2)
src.save(out / "rst-rows-444.jpg", quality=85, subsampling=0, restart_marker_rows=1)
src.convert("L").save(out / "gray-rst.jpg", quality=85, restart_marker_blocks=3)
src.convert("CMYK").save(out / "cmyk.jpg", quality=85)
src.resize((37, 23)).save(out / "odd-422-optimized.jpg", quality=85, subsampling=1, optimize=True)
src.save(out / "progressive.jpg", quality=85, progressive=True)

# Sequential, one scan per component (non-interleaved), with and without restart markers: libjpeg's jpegtran
# (Debian: libjpeg-turbo-progs) with a scan script.
import subprocess
import tempfile

with tempfile.NamedTemporaryFile("w", suffix=".txt") as script:
    script.write("0: 0 63 0 0;\n1: 0 63 0 0;\n2: 0 63 0 0;\n")
    script.flush()
    src.resize((37, 23)).save(out / "tmp-420.jpg", quality=85, subsampling=2)
    for name, extra in [("noninterleaved-422.jpg", []), ("noninterleaved-420-rst.jpg", ["-restart", "1"])]:
        given = out / ("odd-422-optimized.jpg" if "422" in name else "tmp-420.jpg")
        with open(out / name, "wb") as f:
            subprocess.run(["jpegtran", "-scans", script.name, *extra, str(given)], stdout=f, check=True)
    (out / "tmp-420.jpg").unlink()
