#!/usr/bin/env python3
"""Copy a model directory, setting MatMulNBits accuracy_level on the decoder graphs (4 = int8 compute: MLAS's
SQNBit int8 kernels; 0/unset = fp32 compute, which for 8-bit weights falls back to a slow path in ORT 1.31).

    .venv/bin/python onnx/bench/set_accuracy_level.py SRC_DIR DST_DIR [--level 4]
"""
import argparse
import json
import shutil
from pathlib import Path

import onnx

p = argparse.ArgumentParser()
p.add_argument("src", type=Path)
p.add_argument("dst", type=Path)
p.add_argument("--level", type=int, default=4)
a = p.parse_args()
if a.dst.exists():
    shutil.rmtree(a.dst)
shutil.copytree(a.src, a.dst)
man = json.loads((a.dst / "manifest.json").read_text())
for half in ("head", "tail"):
    f = a.dst / man["decoder"][half]["file"]
    m = onnx.load(str(f), load_external_data=False)
    n = 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for at in list(node.attribute):
                if at.name == "accuracy_level":
                    node.attribute.remove(at)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", a.level))
            n += 1
    onnx.save(m, str(f))  # external data file untouched (same location/offsets)
    print(f"{f.name}: accuracy_level={a.level} on {n} MatMulNBits nodes")
