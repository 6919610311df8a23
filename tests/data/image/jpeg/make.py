"""Writes the small JPEG variants the completeness check is tested on (src/image/tests.rs).

Needs Pillow (libjpeg), which CI does not: the outputs are committed. Run from the repository root:
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
