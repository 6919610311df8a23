"""Regenerates the preprocessing goldens used by src/image.rs tests (PIL reference, transformers' PIL backend).

Run from the repo root with the project venv:  .venv/bin/python tests/data/image/make_golden.py
Writes two small PNGs, one raw little-endian f32 [3, H, W] file per case, and golden.json describing them.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

HERE = Path(__file__).resolve().parent
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
RESCALE = 1 / 255
PAD = [int(m * 255) for m in MEAN]  # LLaVA: tuple(int(x * 255) for x in image_mean) = (122, 116, 104)
SIDE = 32


def make_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), ((x + y) % 9) * 28], axis=-1)
    img[h // 3: h // 2, w // 4: w // 2] = [250, 20, 90]  # a sharp-edged block
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def expand2square(img, color):  # LLaVA's, verbatim
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), tuple(color))
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), tuple(color))
    result.paste(img, ((height - width) // 2, 0))
    return result


RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def run(img, resize, interpolation):
    if resize == "stretch":
        p = CLIPImageProcessorPil(size={"height": SIDE, "width": SIDE}, do_center_crop=False,
                                  resample=RESAMPLE[interpolation], image_mean=MEAN, image_std=STD)
    else:
        p = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                  resample=RESAMPLE[interpolation], image_mean=MEAN, image_std=STD)
        if resize == "pad":
            img = expand2square(img, PAD)
    out = p(images=img, return_tensors="np")["pixel_values"][0]
    assert out.shape == (3, SIDE, SIDE), out.shape
    return out.astype("<f4")


def main():
    cases = []
    images = {"landscape.png": make_image(61, 47, 1), "portrait.png": make_image(40, 70, 2)}
    for name, img in images.items():
        img.save(HERE / name)
    plan = [("landscape.png", r, i) for r in ("crop", "pad", "stretch") for i in ("bicubic", "bilinear", "nearest")]
    plan += [("portrait.png", r, "bicubic") for r in ("crop", "pad")]
    for name, resize, interpolation in plan:
        out = run(images[name], resize, interpolation)
        expected = f"{name[:-4]}_{resize}_{interpolation}.f32"
        (HERE / expected).write_bytes(out.tobytes())
        cases.append({
            "image": name, "expected": expected,
            "config": {"height": SIDE, "width": SIDE, "resize": resize, "interpolation": interpolation,
                       "pad_color": PAD, "rescale": RESCALE, "mean": MEAN, "std": STD},
        })
    (HERE / "golden.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
