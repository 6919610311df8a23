"""The checkpoint-derived sections of manifest.json: image preprocessing, tokenizer ids, prompt template.

Nothing here is hard-coded per model: the image section is read from the checkpoint's image processor, and the
prompt template is obtained by RENDERING the checkpoint's chat template, then checked against LlavaProcessor.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

_PROMPT_SENTINEL = "NUWAPROMPTSENTINEL"
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def image_section(ip) -> dict:
    """Manifest `image` from a (PIL-backend) LLaVA/CLIP/BitImageProcessor-style image processor."""
    def _get(name, default=None):
        return getattr(ip, name, default)

    crop = _get("crop_size") or {}
    size = _get("size") or {}
    crop = dict(crop) if crop else {}
    size = dict(size) if size else {}
    if _get("do_center_crop") and crop.get("height"):
        height, width = int(crop["height"]), int(crop["width"])
    elif size.get("height"):
        height, width = int(size["height"]), int(size["width"])
    else:
        raise SystemExit(f"cannot determine the model input size from image processor size={size} crop={crop}")
    shortest = size.get("shortest_edge")
    if _get("do_pad"):
        policy = "pad"
    elif shortest and _get("do_center_crop"):
        policy = "crop"
    elif size.get("height") and not _get("do_center_crop"):
        policy = "stretch"
    else:
        raise SystemExit(f"unsupported resize configuration size={size} crop={crop} do_pad={_get('do_pad')}")
    if policy in ("pad", "crop") and shortest and int(shortest) != min(height, width):
        raise SystemExit(f"shortest_edge {shortest} != crop size {height}x{width}: not expressible in the manifest")
    if policy == "pad" and height != width:
        raise SystemExit("pad policy requires a square model input")
    resample = _get("resample")
    resample = int(getattr(resample, "value", resample))
    if resample not in _RESAMPLE:
        raise SystemExit(f"unsupported resample filter {resample}")
    mean = [float(x) for x in _get("image_mean")]
    std = [float(x) for x in _get("image_std")]
    rescale = float(_get("rescale_factor")) if _get("do_rescale") else 1.0
    # The HF LLaVA image processor pads with tuple(int(x * 255) for x in image_mean): truncation, as LLaVA's
    # expand2square does. Record exactly that colour.
    pad_color = [int(x * 255) for x in mean]
    return {"height": height, "width": width, "resize": policy, "interpolation": _RESAMPLE[resample],
            "pad_color": pad_color, "rescale": rescale, "mean": mean, "std": std}


def tokenizer_section(tokenizer, image_token: str, image_token_id: int, eos_extra: list[int] | None = None) -> dict:
    eos = tokenizer.eos_token_id
    eos_ids = [int(eos)] if eos is not None else []
    for e in eos_extra or []:
        if e not in eos_ids:
            eos_ids.append(int(e))
    return {"file": "tokenizer.json", "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": eos_ids,
            "pad_token_id": tokenizer.pad_token_id, "image_token": image_token, "image_token_id": int(image_token_id)}


def derive_prompt(processor, image_token: str) -> dict:
    """Render the chat template for one user turn [image, text] with add_generation_prompt, then turn the text into
    `{prompt}` and the single image placeholder into `{image}`. add_bos is derived from the tokenizer's behaviour."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROMPT_SENTINEL}]}]
    if getattr(processor, "chat_template", None):
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        rendered = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(rendered, list):
        rendered = rendered[0]
    tok = processor.tokenizer
    if rendered.count(image_token) != 1 or rendered.count(_PROMPT_SENTINEL) != 1:
        raise SystemExit(f"chat template must render one image placeholder and the text once: {rendered!r}")
    if "{" in rendered or "}" in rendered:
        raise SystemExit(f"rendered chat template contains braces, cannot be a manifest template: {rendered!r}")
    bos_in_template = tok.bos_token is not None and rendered.startswith(tok.bos_token)
    if bos_in_template:
        rendered = rendered[len(tok.bos_token):]
        add_bos = True
    else:
        probe = tok("a", add_special_tokens=True)["input_ids"]
        add_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id
    template = rendered.replace(image_token, "{image}").replace(_PROMPT_SENTINEL, "{prompt}")
    return {"template": template, "add_bos": bool(add_bos)}


def compact_json(path: Path) -> None:
    """Rewrites a JSON file (a tokenizer.json) without indentation or escaped non-ASCII: the same document, and
    what the runtime parses, in about half the bytes. Fails if the rewrite does not read back equal."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    if json.loads(text) != doc:
        raise SystemExit(f"{path}: compact JSON does not read back equal")
    path.write_text(text, encoding="utf-8")


def runtime_input_ids(tokenizer_json: str, prompt: dict, tok_section: dict, n_image_tokens: int, text: str) -> list[int]:
    """What the Rust runtime will do: fill the template, tokenize whole without special tokens, prepend BOS."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(tokenizer_json)
    filled = prompt["template"].replace("{image}", tok_section["image_token"] * n_image_tokens).replace("{prompt}", text)
    ids = t.encode(filled, add_special_tokens=False).ids
    if prompt["add_bos"]:
        ids = [tok_section["bos_token_id"]] + ids
    return ids


def processor_input_ids(processor, text: str, image: Image.Image) -> tuple[list[int], np.ndarray]:
    """input_ids and pixel_values exactly as LlavaProcessor produces them for the rendered chat prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if getattr(processor, "chat_template", None):
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        rendered = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(text=rendered, images=image, return_tensors="np")
    return [int(x) for x in out["input_ids"][0]], out["pixel_values"].astype(np.float32)


def check_prompt_rule(processor, tokenizer_json: str, prompt: dict, tok_section: dict, n_image_tokens: int,
                      image: Image.Image, texts=("What is in the image?", "Describe  it, please.\nThen stop.")) -> None:
    """Fail loudly unless the runtime rule reproduces LlavaProcessor's input_ids exactly."""
    for text in texts:
        want, _ = processor_input_ids(processor, text, image)
        got = runtime_input_ids(tokenizer_json, prompt, tok_section, n_image_tokens, text)
        if want != got:
            raise SystemExit(f"prompt rule mismatch for {text!r}:\n processor {want}\n runtime   {got}")


# LLaVA-1.5 (llava-hf) chat template, used by the fixtures and the demo model; the demo renders the tokenizer's BOS
# in front of it (the exporter turns a leading BOS into manifest prompt.add_bos = true).
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
