"""Train the demo VLM's projector + decoder on cached DINOv2 features (prepare_train.py).

  .venv/bin/python onnx/demo/train.py --data .cache/demo-train --out .cache/demo-ckpt --hours 2
  .venv/bin/python onnx/demo/train.py --data .cache/demo-train --out .cache/demo-ckpt --resume   # continue

Modules are transformers' own (LlavaMultiModalProjector + LlamaForCausalLM from demo_common.llava_config), so the
state_dicts load 1:1 into LlavaForConditionalGeneration (assemble.py). The vision tower is frozen and not run here:
its `features` output was computed once per image with the exported ONNX graph.

Sequence = EXACTLY the runtime's prompt: BOS + "USER: " + <image> x 576 + "\\n{prompt} ASSISTANT:" (tokenized whole,
no special tokens, demo_common.PromptRule = nuwa_export.manifest.runtime_input_ids), positions 0..L-1, the 576
image-token embeddings replaced by the projected features; then the answer (" " + answer) and EOS, teacher-forced.
Loss (cross-entropy) and logits only at the answer positions (lm_head on those rows only); VQA answer tokens x
--vqa-weight, and --item-weight scales chosen kinds of item (by make_data's qtype, optionally its answer), so rare
or hard ones (superlatives, counts of 3-4) weigh more without changing the data order.

Shared-prefix batching (mathematically identical to one full sequence per item; `--check` verifies it): every item
of an image has the same first P = 580 tokens (BOS, "USER: ", 576 image tokens), so a step runs the decoder once over
the B images' prefixes [B, P] (use_cache), gathers the KV cache to the M items of those images, and runs the items'
suffixes [M, S] (prompt text + answer, right-padded: causal attention never looks at the padding) on top of it, with
positions P..P+S-1. One backward through both. Measured: ~0.09 s/item against 0.18-0.3 s/item for full 616-token
sequences at batch 4.

Data order: per epoch a seeded permutation of the images (seed, epoch); a step takes --batch-images images with all
their items. Optimiser AdamW (no weight decay on norms / biases / embeddings), linear warmup, cosine to
--min-lr-ratio. The cosine horizon (total steps) is fixed at the start: from --max-samples / --max-steps, or, with
--hours, from the measured speed of the first --calib-steps steps; it is stored in the checkpoint, so --resume
continues the same schedule. Checkpoint (OUT/last.pt: model, optimiser, step, epoch, position, RNG states, elapsed
time) every --ckpt-minutes and on SIGTERM / SIGINT, written atomically; --resume continues bit-exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo_common as dc  # noqa: E402
import make_data  # noqa: E402


# ------------------------------------------------------------------------------------------------------------ data
class Data:
    """The shards of one or more prepare_train.py outputs; `repeats[r]` lists root r's images that many times per
    epoch (oversampling a small curriculum set)."""

    def __init__(self, roots: list[Path], rule: dc.PromptRule, limit_images: int | None = None,
                 repeats: list[int] | None = None, kinds: tuple[str, ...] = ("grounding", "vqa")):
        self.kinds = kinds
        self.feats, self.labels, self.instances, self.images = [], [], [], []  # images: (shard, local, [item ids])
        # (suffix ids, answer ids, kind, target shape index or -1, normalised box or None, VQA selector or None,
        #  [(suffix position, "shape" | "colour", index)] of the shape and colour words the prompt says)
        self.items = []
        self.qtypes = []  # per item: make_data's qtype (attr, position, ..., exist, color, count)
        self.vqa_answers = []  # per item: a VQA item's answer text, None for grounding
        # per item: the head noun alone decides the answer (existence, count, "What color is the <shape>?"), so
        # --head-readout may ask it of the head noun's state (a qualifier after the noun is not visible there)
        self.head_decides = []
        self.words = {}  # token id -> ("shape" | "colour", index), singular and plural shape words
        for k, name in enumerate(make_data.SHAPES):
            for w in (name, make_data.PLURAL[name]):
                self.words[word_id(rule, w)] = ("shape", k)
        for c, name in enumerate(make_data.COLORS):
            self.words[word_id(rule, name)] = ("colour", c)
        for z, name in enumerate(SIZE_WORDS):  # superlatives; only --phrase-size reads them
            self.words[word_id(rule, name)] = ("size", z)
        self.dot_id = rule.tk.encode(".", add_special_tokens=False).ids[0]
        # per item: the suffix position of a position qualifier's last word ("the circle at the >bottom<", "What
        # color is the star on the >left<?"), -1 without one; --qual-attn supervises it
        self.qual_at = []
        self.qual_ids = {word_id(rule, w) for w in QUAL_WORDS}
        self.prefix = None
        for r, root in enumerate(roots):
            first = len(self.images)
            self._load(root, rule, limit_images)
            self.images += self.images[first:] * ((repeats[r] if repeats else 1) - 1)
        if not self.images:
            raise SystemExit(f"no {' or '.join(kinds)} items in a finished shard under {roots}: run prepare_train.py")
        n_items = sum(len(x[2]) for x in self.images)
        self.items_per_image = n_items / len(self.images)
        print(f"[data] {len(self.images)} images, {n_items} items ({self.items_per_image:.2f}/image), prefix "
              f"{len(self.prefix)} tokens, max suffix {max(len(a) + len(b) for a, b, *_ in self.items)} tokens")

    def _load(self, root: Path, rule: dc.PromptRule, limit_images: int | None) -> None:
        meta = json.loads((root / "meta.json").read_text())
        S = meta["shard_size"]
        prefix, base, first = self.prefix, len(self.feats), len(self.images)
        for k in range(10 ** 6):
            d = root / f"shard-{k:04d}"
            if not (d / "DONE").exists():
                break
            self.feats.append(np.load(d / "features.f16.npy", mmap_mode="r"))
            self.labels.append(np.load(d / "labels.u8.npy") if (d / "labels.u8.npy").exists() else None)
            self.instances.append(np.load(d / "instances.u8.npy") if (d / "instances.u8.npy").exists() else None)
            by_img: dict[int, list[int]] = {}
            for line in (d / "items.jsonl").read_text().splitlines():
                it = json.loads(line)
                if it["kind"] not in self.kinds:
                    continue
                ids = self._ids(rule, it["prompt"])
                if prefix is None:
                    last = max(i for i, t in enumerate(ids) if t == rule.image_token_id)
                    prefix = ids[:last + 1]
                if ids[:len(prefix)] != prefix:
                    raise SystemExit(f"item {it} does not share the image prefix")
                by_img.setdefault(it["local"], []).append(len(self.items))
                self.qtypes.append(it.get("qtype"))
                self.vqa_answers.append(it["answer"] if it["kind"] == "vqa" else None)
                plain_colour = re.fullmatch(r"What color is the \w+\?.*", it["prompt"]) is not None
                self.head_decides.append(it.get("qtype") in ("exist", "count")
                                         or (it.get("qtype") == "color" and plain_colour))
                g = it["kind"] == "grounding"
                suffix = ids[len(prefix):]
                self.qual_at.append(max((t for t, x in enumerate(suffix) if x in self.qual_ids), default=-1)
                                    if QUAL_RE.search(it["prompt"]) else -1)
                self.items.append((suffix, self._answer_ids(rule, it["answer"]), it["kind"],
                                   it.get("target", -1) if g else -1, json.loads(it["answer"]) if g else None,
                                   None if g else vqa_selector(it),
                                   [(t, *self.words[x]) for t, x in enumerate(suffix) if x in self.words]))
            for local in sorted(by_img):
                self.images.append((base + k, local, by_img[local]))
            if limit_images and len(self.images) - first >= limit_images:
                del self.images[first + limit_images:]
                break
            if len(self.feats[-1]) != S and (root / f"shard-{k + 1:04d}" / "DONE").exists():
                raise SystemExit(f"{d}: partial shard followed by more shards")
        self.prefix = prefix

    def _ids(self, rule: dc.PromptRule, prompt: str) -> list[int]:
        """rule.ids(prompt), remembered: the generator repeats its phrasings, and tokenising ~100k prompts one by
        one is most of the loading time."""
        memo = self.__dict__.setdefault("_prompt_ids", {})
        if prompt not in memo:
            memo[prompt] = rule.ids(prompt)
        return memo[prompt]

    def _answer_ids(self, rule: dc.PromptRule, answer: str) -> list[int]:
        memo = self.__dict__.setdefault("_answer_memo", {})
        if answer not in memo:
            memo[answer] = rule.answer_ids(answer)
        return memo[answer]

    def item_weights(self, spec: list[str]) -> np.ndarray:
        """Per-item weights of the answer loss from `QTYPE=W` / `QTYPE:ANSWER=W` entries (the more specific wins;
        everything else 1)."""
        table = {}
        for entry in spec:
            key, _, w = entry.partition("=")
            try:
                table[key] = float(w)
            except ValueError:
                raise SystemExit(f"--item-weight {entry!r}: expected QTYPE=W or QTYPE:ANSWER=W") from None
            if not (math.isfinite(table[key]) and table[key] >= 0):
                raise SystemExit(f"--item-weight {entry!r}: the weight must be finite and >= 0")
        known = set(self.qtypes)
        answers = {f"{q}:{a}" for q, a in zip(self.qtypes, self.vqa_answers) if a is not None}
        for key in table:
            if key.split(":")[0] not in known:
                raise SystemExit(f"--item-weight {key!r}: no item has qtype {key.split(':')[0]!r} "
                                 f"(the data has {sorted(q for q in known if q)})")
            if ":" in key and key not in answers:
                raise SystemExit(f"--item-weight {key!r}: no {key.split(':')[0]} item has that answer")
        return np.array([table.get(f"{q}:{a}", table.get(q, 1.0)) for q, a in zip(self.qtypes, self.vqa_answers)],
                        dtype=np.float32)

    def image_items(self, img_ids) -> list[int]:
        """The item ids of these images, in the order batch() lays them out."""
        return [j for i in img_ids for j in self.images[i][2]]

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.images))

    def batch(self, img_ids, pad_id: int, vqa_targets: bool = False, word_targets: bool = False,
              phrase_targets: bool = False, phrase_sink: bool = False, phrase_size: bool = False):
        with torch.device("cpu"):  # many small per-item tensors: made on the host, moved in one go (to_device)
            return self._batch(img_ids, pad_id, vqa_targets, word_targets, phrase_targets, phrase_sink, phrase_size)

    def _batch(self, img_ids, pad_id, vqa_targets, word_targets, phrase_targets, phrase_sink, phrase_size):
        feats = torch.from_numpy(np.stack([self.feats[self.images[i][0]][self.images[i][1]] for i in img_ids])
                                 .astype(np.float32))
        labs = [self.labels[self.images[i][0]] for i in img_ids]
        patch_labels = (torch.from_numpy(np.stack([l[self.images[i][1]] for l, i in zip(labs, img_ids)]).astype(np.int64))
                        if all(l is not None for l in labs) else None)
        insts = [self.instances[self.images[i][0]] for i in img_ids]
        inst = (torch.from_numpy(np.stack([a[self.images[i][1]] for a, i in zip(insts, img_ids)]).astype(np.int64))
                if all(a is not None for a in insts) else None)
        owner, seqs, tgts, kinds, targets, boxes, vsels, said, decides, q_at = [], [], [], [], [], [], [], [], [], []
        for b, i in enumerate(img_ids):
            for j in self.images[i][2]:  # the order of image_items()
                suf, ans, kind, target, box, vsel, spoken = self.items[j]
                decides.append(self.head_decides[j])
                q_at.append(self.qual_at[j])
                vsels.append(vsel)
                said.append(spoken)
                boxes.append(box if box is not None else [0.0] * 4)
                targets.append(target)
                owner.append(b)
                seqs.append(suf + ans[:-1])
                tgts.append((len(suf) - 1, ans))
                kinds.append(kind)
        S = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
        rows, cols, labels, lk, row_box, early = [], [], [], [], [], []
        for m, (s, (start, ans)) in enumerate(zip(seqs, tgts)):
            ids[m, :len(s)] = torch.tensor(s)
            # the positions whose context holds no coordinate yet: a box's " [", "0", "." and the one predicting
            # its first digit (teacher forcing shows every later position where the box is); a VQA answer: all
            last_early = ans.index(self.dot_id) + 1 if kinds[m] == "grounding" and self.dot_id in ans else len(ans)
            for t, a in enumerate(ans):
                rows.append(m)
                cols.append(start + t)
                early.append(t <= last_early)
                labels.append(a)
                lk.append(1 if kinds[m] == "grounding" else 0)
                row_box.append(boxes[m])
        # each item's patch labels decoded into colour and shape index (valid where lab > 0): [M, 576]
        lab = colour = shape = None
        if patch_labels is not None and (vqa_targets or word_targets or phrase_targets):
            lab = patch_labels[torch.tensor(owner)]
            colour, shape = (lab - 1) // len(make_data.SHAPES), (lab - 1) % len(make_data.SHAPES)
        # each item's instance map (0 = background, k + 1 = shape k): [M, 576]
        item_inst = inst[torch.tensor(owner)] if inst is not None else None
        # target patches per item (grounding items whose shard has instance maps): [M, 576] bool
        target_mask = None
        if item_inst is not None:
            t = torch.tensor(targets)
            target_mask = (item_inst == (t + 1)[:, None]) & (t >= 0)[:, None]
            if lab is not None and vqa_targets:  # VQA items: the patches of the shapes asked about
                for m, vsel in enumerate(vsels):
                    if vsel is not None:
                        c, k = vsel
                        target_mask[m] = (lab[m] > 0) & (shape[m] == k) & ((colour[m] == c) if c >= 0 else True)
        # word alignment in the decoder: every shape / colour word of a prompt and the patches it names (every shape
        # of that kind, every shape of that colour); words naming nothing in the image are left out
        words = word_patches(said, lab, shape, colour, phrases=False) if lab is not None and word_targets else None
        # noun phrases: every shape word and the patches of the shapes its phrase names, with the colour word just
        # before it ("the red square" -> the red squares); the item's head noun (its first shape word), which the
        # answer should read the referent from
        phrases = (word_patches(said, lab, shape, colour, phrases=True, sink=phrase_sink,
                                inst=item_inst if phrase_size else None)
                   if lab is not None and phrase_targets else None)
        heads = torch.tensor([min((t for t, what, _ in w if what == "shape"), default=-1) for w in said])
        sets = phrase_sets(phrases, colour, item_inst) if phrases is not None and item_inst is not None else None
        # position qualifiers (--qual-attn): the qualifier's last word and its referent's patches (a grounding item's
        # target; a colour question's named shapes in the answer's colour), for the items that have both
        quals = None
        if target_mask is not None:
            sel = [m for m, t in enumerate(q_at) if t >= 0 and bool(target_mask[m].any())]
            if sel:
                r = torch.tensor(sel)
                q_sets = (phrase_sets((r, None, target_mask[r], None), colour, item_inst)
                          if colour is not None and item_inst is not None else None)
                quals = (r, torch.tensor([q_at[m] for m in sel]), target_mask[r], q_sets)
        return (feats, torch.tensor(owner), ids, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels),
                torch.tensor(lk, dtype=torch.bool), len(seqs)), (patch_labels, target_mask, torch.tensor(row_box),
                                                                 words, torch.tensor(early), phrases,
                                                                 heads if phrase_targets else None, heads,
                                                                 torch.tensor(decides, dtype=torch.bool), sets,
                                                                 quals)


def on_device(a: np.ndarray) -> torch.Tensor:
    """`a` as a tensor on torch's default device (main() sets it to --device; numpy arrays always start on the CPU)."""
    return torch.from_numpy(a).to(torch.get_default_device())


def to_device(x):
    """Data.batch()'s nested tuples with every tensor moved to torch's default device."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.get_default_device(), non_blocking=True)
    if isinstance(x, tuple):
        return tuple(to_device(v) for v in x)
    return x


def word_patches(said, lab, shape, colour, phrases: bool, sink: bool = False, inst=None):
    """(item rows, suffix positions, [n, 576] patch masks, [n] bool: the word names nothing and should attend to the
    BOS token instead) of the prompt words that name something in the image, or None. Per word (phrases=False): a
    shape word names every shape of its kind, a colour word every shape of its colour. Per noun phrase
    (phrases=True): shape words only, narrowed by the colour word just before them; with `sink`, a phrase that names
    nothing ("Is there a red circle?" without one) is kept with an empty mask, so "found nothing" becomes a state
    the answer can read (attention on BOS) rather than attention spread over whatever matches best. With the items'
    instance maps `inst` ([M, 576]: 0 = background, k + 1 = shape k; --phrase-size), a superlative just before the
    shape word ("the largest square") narrows the phrase to the shape of that kind with the most / fewest patches,
    so the phrase's state has to hold which one is meant (make_data names a superlative only where the areas differ
    by >= 1.6x)."""
    rows, cols, masks, empty = [], [], [], []
    for m, item_words in enumerate(said):
        colour_at = {t: idx for t, what, idx in item_words if what == "colour"}
        size_at = {t: idx for t, what, idx in item_words if what == "size"}
        for t, what, idx in item_words:
            if what == "shape":
                mask = (lab[m] > 0) & (shape[m] == idx)
                if phrases and t - 1 in colour_at:
                    mask &= colour[m] == colour_at[t - 1]
                if phrases and inst is not None and t - 1 in size_at:
                    ids, n = torch.unique(inst[m][mask & (inst[m] > 0)], return_counts=True)
                    if len(ids) >= 2:
                        pick = n.argmax() if SIZE_WORDS[size_at[t - 1]] == "largest" else n.argmin()
                        mask &= inst[m] == ids[pick]
            elif phrases or what == "size":
                continue
            else:
                mask = (lab[m] > 0) & (colour[m] == idx)
            found = bool(mask.any())
            if found or (phrases and sink):
                rows.append(m)
                cols.append(t)
                masks.append(mask)
                empty.append(not found)
    return (torch.tensor(rows), torch.tensor(cols), torch.stack(masks), torch.tensor(empty)) if rows else None


def phrase_sets(phrases, colour, inst) -> tuple[torch.Tensor, torch.Tensor]:
    """What each noun phrase of `word_patches(..., phrases=True)` names, as --phrase-readout's targets: the colours
    among its shapes ([n, colours] bool; none for a phrase naming nothing) and how many shapes it names ([n], from the
    items' instance maps `inst` [M, 576]: 0 = background, k + 1 = shape k)."""
    rows, _, masks, _ = phrases
    named = F.one_hot(colour[rows].clamp(min=0), len(make_data.COLORS)).bool() & masks[..., None]
    shapes = F.one_hot(inst[rows], int(inst.max()) + 1).bool() & masks[..., None]
    return named.any(1), shapes[..., 1:].any(1).sum(1)


SIZE_WORDS = ("largest", "smallest")  # make_data's superlatives
QUAL_WORDS = ("bottom", "top", "left", "right")  # the last words of make_data's position qualifiers
QUAL_RE = re.compile(r"\b(at the (bottom|top)|on the (left|right))[.?]")  # not "left of" (a relation)


def word_id(rule: dc.PromptRule, word: str) -> int:
    """The token id of " word" (every colour and shape word, singular or plural, is one token)."""
    return rule.tk.encode(" " + word, add_special_tokens=False).ids[0]


def check_phrase_size(data: Data, pad_id: int, n_images: int = 200) -> None:
    """--check --phrase-size: on the first images, every superlative grounding item's head-noun phrase must name
    exactly its target's patches (make_data picks the target by the shapes' drawn areas, --phrase-size by their
    patches in the instance maps; they agree unless overlaps hide most of a shape)."""
    same = n = 0
    for lo in range(0, min(n_images, len(data.images)), 8):
        ids = list(range(lo, min(lo + 8, n_images, len(data.images))))
        _, extra = data.batch(ids, pad_id, phrase_targets=True, phrase_size=True)
        target_mask, phrases, head_at = extra[1], extra[5], extra[7]
        for m, j in enumerate(data.image_items(ids)):
            if data.qtypes[j] == "superl" and phrases is not None and target_mask is not None:
                sel = (phrases[0] == m) & (phrases[1] == head_at[m])
                n += 1
                same += int(sel.sum()) == 1 and torch.equal(phrases[2][sel][0], target_mask[m])
    print(f"[check] --phrase-size: {same} of {n} superlative expressions in the first {n_images} images name "
          f"exactly their target")
    if n == 0 or same < n:
        raise SystemExit("--phrase-size does not narrow every superlative phrase to its target on this data")


def vqa_selector(it: dict) -> tuple[int, int] | None:
    """(colour index or -1, shape index) of the shapes a VQA item asks about, for the attention supervision: the
    named shape in the answer's colour for "What color is the square on the right?", the named colour and shape for
    an existence question answered yes, every shape of the kind for a count; None for "no" (nothing to look at)."""
    q, qt, ans = it["prompt"].lower(), it["qtype"], it["answer"]
    kinds = [(q.find(w), k) for k, name in enumerate(make_data.SHAPES)
             for w in (make_data.PLURAL[name], name) if q.find(w) >= 0]
    if not kinds:
        return None
    shape = min(kinds)[1]  # the first shape word names the shape asked about ("the triangle left of the red star")
    colours = list(make_data.COLORS)
    if qt == "color":
        return (colours.index(ans), shape) if ans in colours else None
    if qt == "exist":
        named = [c for c in colours if re.search(rf"\b{c}\b", q)]
        return (colours.index(named[0]), shape) if ans == "yes" and named else None
    if qt == "count":
        return (-1, shape)
    return None


# ----------------------------------------------------------------------------------------------------------- model
def build(processor, **text):
    from transformers import LlamaForCausalLM
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = dc.llava_config(processor, **text)
    proj = LlavaMultiModalProjector(cfg)
    lm = LlamaForCausalLM(cfg.text_config)
    lm.tie_weights()
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    lm.config._attn_implementation = "sdpa"
    return cfg, proj, lm


class AuxHead(torch.nn.Module):
    """Training-only auxiliary targets on the projected image tokens (nothing of it is exported).

    A decoder trained from scratch first learns the language prior and only much later to look things up among the
    576 image tokens (measured: grounding token accuracy flat at ~0.72, coordinates at chance, for 15k items). Two
    terms make the projector's output usable from the start:
    * a linear readout of each patch's colour and shape (or background; object patches weighted `obj_weight`, as
      they are ~7% of all) and of its own grid position;
    * word alignment: on object patches, the decoder's own output layer (final norm + tied lm_head) must read the
      colour word and the shape word (" red", " circle"), so a patch of a red circle lies near the embeddings of the
      words a prompt uses to name it - LLaVA's stage-1 alignment of image features to the word space, in miniature.
    """

    def __init__(self, hidden: int, colour_ids: list[int], shape_ids: list[int], grid: int = 24,
                 obj_weight: float = 5.0, words: float = 1.0):
        super().__init__()
        self.nc, self.ns, self.obj_weight, self.words = len(colour_ids), len(shape_ids), obj_weight, words
        self.out = torch.nn.Linear(hidden, (self.nc + 1) + (self.ns + 1) + 2)
        self.register_buffer("colour_ids", torch.tensor(colour_ids), persistent=False)
        self.register_buffer("shape_ids", torch.tensor(shape_ids), persistent=False)
        r = torch.arange(grid * grid)
        self.register_buffer("pos", torch.stack([r % grid, r // grid], 1).float() / (grid - 1), persistent=False)

    def loss(self, img: torch.Tensor, labels: torch.Tensor, lm) -> tuple[torch.Tensor, float]:
        y = self.out(img)  # [B, 576, 9 + 5 + 2]
        obj = labels > 0
        colour = torch.where(obj, (labels - 1) // self.ns + 1, 0)
        shape = torch.where(obj, (labels - 1) % self.ns + 1, 0)
        w = torch.where(obj, self.obj_weight, 1.0).flatten()
        w = w / w.sum()
        lc = (F.cross_entropy(y[..., :self.nc + 1].flatten(0, 1), colour.flatten(), reduction="none") * w).sum()
        ls = (F.cross_entropy(y[..., self.nc + 1:self.nc + self.ns + 2].flatten(0, 1), shape.flatten(),
                              reduction="none") * w).sum()
        lp = F.mse_loss(y[..., -2:], self.pos.expand_as(y[..., -2:])) * 10
        lw = torch.zeros(())
        if obj.any() and self.words > 0:
            logits = lm.lm_head(lm.model.norm(img[obj]))  # [n_obj, vocab]
            lw = 0.5 * self.words * (F.cross_entropy(logits, self.colour_ids[colour[obj] - 1])
                        + F.cross_entropy(logits, self.shape_ids[shape[obj] - 1]))
        with torch.no_grad():
            pc = y[..., :self.nc + 1].argmax(-1)
            acc = (pc[obj] == colour[obj]).float().mean().item() if obj.any() else 0.0
        return lc + ls + lp + lw, acc


def sincos_2d(grid: int, dim: int, scale: float) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position code in raster order (half the channels for the column, half
    for the row; MAE's construction), times `scale`: the starting value of the learned vision position table."""
    q = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float64) / q))
    r = torch.arange(grid * grid)
    parts = []
    for coord in (r % grid, r // grid):
        a = coord[:, None].double() * freq[None] * 2 * math.pi / grid * 4
        parts += [torch.sin(a), torch.cos(a)]
    return (torch.cat(parts, 1) * scale).float()


# checkpoint keys of the training-only heads (state dict or None each): the patch readout ("aux") and the heads of
# main()'s heads_by_key; recover_checkpoint.py carries them between machines
TRAINING_HEADS = ("aux", "box", "readout", "head_readout", "phrase_readout", "attn_readout")


# the decoder's size; every entry can grow from an --init checkpoint without changing its function: the layers in
# load_weights (deepen), the rest in widen
RESHAPABLE = ("num_hidden_layers",)
WIDENABLE = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
SHAPE = RESHAPABLE + WIDENABLE


def shape_of(s: dict) -> dict:
    """SHAPE of checkpoint `s`'s decoder (from its saved config; checkpoints from before session 21 saved none and
    have TEXT_CONFIG's)."""
    saved = s.get("config", {}).get("text_config", {})
    return {k: saved.get(k, dc.TEXT_CONFIG[k]) for k in SHAPE}


def deepen(sd: dict, fresh: dict, n_from: int, n_to: int) -> dict:
    """Decoder state dict `sd` with `n_from` layers -> `n_to` layers computing the same function: the new layers
    n_from.. are copies of the last one with o_proj and down_proj zeroed (LLaMA Pro's block expansion), so each adds
    nothing to the residual stream until training moves those two projections; `fresh` supplies the key set (a
    state dict of the deeper model)."""
    if n_to < n_from:
        raise SystemExit(f"decoder layers {n_from} -> {n_to}: a checkpoint cannot be made shallower")
    out = dict(sd)
    last = f"model.layers.{n_from - 1}."
    for k in fresh:
        if not k.startswith("model.layers.") or k in sd:
            continue
        rest = k.split(".", 3)[3]
        w = sd[last + rest].clone()
        if rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w.zero_()
        out[k] = w
    return out


def widen(s: dict, want: dict, std: float, seed: int) -> dict:
    """Checkpoint `s` (projector, decoder, training-only heads) grown to the decoder SHAPE `want` (hidden size,
    attention heads, key-value heads, MLP width; the layers stay: deepen() adds those) computing the same function.

    The residual stream keeps its old coordinates and gains new ones that start at zero: every weight that writes
    into the stream (the embedding table, the projector's output, o_proj, down_proj) gets zero rows there, and every
    weight that reads (q/k/v, gate/up, the projector's hidden units, the new heads and MLP units) gets new rows and
    columns drawn N(0, `std`), which multiply zeros at first, so gradients reach both sides from the first step (the
    zero-writer / random-reader split of LoRA's B = 0, A random). RMSNorm divides by the root mean square over all
    coordinates, sqrt(old / new) of the old one, so the norms' old weights shrink by that factor (exact but for the
    norm's epsilon, which now weighs D / d times more against the mean square: y -> 384 wide moves its answer logits
    by 0.028 of 58.9); their new weights start at the old ones' mean. New query heads append; key-value head j of the result copies the old key-value head its old query heads
    read (Llama's repeat_kv grouping), or is new. The head dimension must stay (RoPE is built on it). The tied
    table's new columns are zero, so the logits do not change. The training-only heads read hidden states: their new
    input columns are zero."""
    have = shape_of(s)
    d, D = have["hidden_size"], want["hidden_size"]
    h0, h1 = have["num_attention_heads"], want["num_attention_heads"]
    kv0, kv1 = have["num_key_value_heads"], want["num_key_value_heads"]
    i0, i1 = have["intermediate_size"], want["intermediate_size"]
    hd = d // h0
    if D < d or h1 < h0 or i1 < i0 or kv1 < kv0:
        raise SystemExit(f"decoder {d} wide, {h0} heads, {kv0} key-value heads, MLP {i0} -> {D}, {h1}, {kv1}, {i1}: a "
                         f"trained decoder can only grow")
    if D != h1 * hd:
        raise SystemExit(f"--hidden {D} / --heads {h1}: head dimension {D / h1:g}, the checkpoint's is {hd} (RoPE "
                         f"is built on it; grow the heads with the width)")
    if h1 % kv1:
        raise SystemExit(f"--heads {h1} / --kv-heads {kv1}: the heads must be a multiple of the key-value heads")
    g = torch.Generator().manual_seed(seed)

    def grown(w: torch.Tensor, shape: tuple[int, ...], fill: str) -> torch.Tensor:
        """`w` in the top-left corner of a tensor of `shape` filled with zeros or N(0, std)."""
        out = torch.zeros(shape) if fill == "zero" else torch.randn(shape, generator=g) * std
        out[tuple(slice(0, n) for n in w.shape)] = w
        return out

    def writer(w: torch.Tensor, cols: int) -> torch.Tensor:  # rows: residual coordinates; new rows and columns zero
        return grown(w, (D, cols), "zero")

    def reader(w: torch.Tensor, rows: int) -> torch.Tensor:  # columns: residual coordinates
        return grown(w, (rows, D), "random")

    def norm(w: torch.Tensor) -> torch.Tensor:
        w = w * math.sqrt(d / D)
        return torch.cat([w, w.mean().expand(D - d)])

    # key-value head j of the result: the old one its old query heads read, or None (only new query heads read it)
    kv_src = []
    for j in range(kv1):
        olds = {h // (h0 // kv0) for h in range(h0) if h // (h1 // kv1) == j}
        if len(olds) > 1:
            raise SystemExit(f"{h0} heads / {kv0} key-value heads -> {h1} / {kv1}: query heads that read different "
                             f"key-value heads would share one (pick --kv-heads so that each old group stays within a "
                             f"new one)")
        kv_src.append(olds.pop() if olds else None)

    def kv_rows(w: torch.Tensor) -> torch.Tensor:
        old = w.view(kv0, hd, d)
        fresh = (torch.randn((kv1 * hd, D), generator=g) * std).view(kv1, hd, D)
        for j, c in enumerate(kv_src):
            if c is not None:
                fresh[j, :, :d] = old[c]
        return fresh.reshape(kv1 * hd, D)

    lm = {}
    for k, w in s["language_model"].items():
        w = w.float()
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            lm[k] = grown(w, (w.shape[0], D), "zero")
        elif k.endswith("norm.weight"):
            lm[k] = norm(w)
        elif k.endswith("self_attn.q_proj.weight"):
            lm[k] = reader(w, h1 * hd)
        elif k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            lm[k] = kv_rows(w)
        elif k.endswith("self_attn.o_proj.weight"):
            lm[k] = writer(w, h1 * hd)
        elif k.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            lm[k] = reader(w, i1)
        elif k.endswith("mlp.down_proj.weight"):
            lm[k] = writer(w, i1)
        elif k.endswith("rotary_emb.inv_freq"):
            lm[k] = w
        else:
            raise SystemExit(f"widen: no rule for decoder tensor {k} {tuple(w.shape)}")
    lm["lm_head.weight"] = lm["model.embed_tokens.weight"]
    p = {k: v.float() for k, v in s["projector"].items()}
    proj = {"linear_1.weight": grown(p["linear_1.weight"], (D, p["linear_1.weight"].shape[1]), "random"),
            "linear_1.bias": grown(p["linear_1.bias"], (D,), "zero"),
            "linear_2.weight": grown(p["linear_2.weight"], (D, D), "zero"),
            "linear_2.bias": grown(p["linear_2.bias"], (D,), "zero")}
    if set(proj) != set(p):
        raise SystemExit(f"widen: projector tensors {sorted(p)}, expected {sorted(proj)}")
    out = dict(s, language_model=lm, projector=proj)
    for key in TRAINING_HEADS:  # Linear(hidden, n) each (ModuleDicts of them): zero input columns
        if s.get(key) is not None:
            bad = [k for k, v in s[key].items() if v.ndim == 2 and v.shape[1] != d]
            if bad:
                raise SystemExit(f"widen: training-only head {key} tensors {bad} do not read {d}-wide states")
            out[key] = {k: grown(v.float(), (v.shape[0], D), "zero") if v.ndim == 2 else v.float()
                        for k, v in s[key].items()}
    cfg = copy.deepcopy(s.get("config", {}))
    cfg.setdefault("text_config", {}).update(hidden_size=D, num_attention_heads=h1, num_key_value_heads=kv1,
                                             intermediate_size=i1, head_dim=hd)
    out["config"] = cfg
    return out


def check_widened(narrow: dict, proj, lm, vision_pos, processor, prefix_ids, image_mask, batch) -> None:
    """Stops unless the widened decoder `proj` + `lm` gives checkpoint `narrow`'s answer logits on `batch` (host
    batch; the widened model on torch's default device) to 2e-3 of their range."""
    _, proj0, lm0 = build(processor, **shape_of(narrow))
    load_weights(narrow, proj0, lm0)
    vpos0 = narrow.get("vision_pos")
    b = to_device(batch)
    with torch.no_grad():
        ref, *_ = forward(proj0.to(torch.get_default_device()), lm0.to(torch.get_default_device()), prefix_ids,
                          image_mask, b, vision_pos=None if vpos0 is None else vpos0.to(torch.get_default_device()))
        got, *_ = forward(proj, lm, prefix_ids, image_mask, b, vision_pos=vision_pos)
    err, span = (got - ref).abs().max().item(), (ref.max() - ref.min()).item()
    print(f"[widen] answer logits of {ref.shape[0]} positions, widened vs the checkpoint: max abs diff {err:.3g} "
          f"(range {span:.3g})")
    if not err <= 2e-3 * span:  # RMSNorm epsilon: y -> 384 wide moves them by 0.028 of 58.9
        raise SystemExit("widen changed the decoder's function: see [widen] above")


def load_weights(s: dict, proj, lm, aux=None) -> None:
    """Projector, decoder (lm_head re-tied) and, when given and saved, the aux head of checkpoint `s`; a decoder
    with more layers than `s` starts as `s`'s function (deepen; a wider one is widen's, before this)."""
    proj.load_state_dict(s["projector"])
    sd, have = s["language_model"], shape_of(s)
    if lm.config.num_hidden_layers != have["num_hidden_layers"]:
        sd = deepen(sd, lm.state_dict(), have["num_hidden_layers"], lm.config.num_hidden_layers)
    lm.load_state_dict(sd)
    lm.tie_weights()
    if aux is not None and s.get("aux") is not None:
        aux.load_state_dict(s["aux"])


def load_for_eval(ckpt: Path, processor):
    """(config, projector, decoder, vision position table or None) of checkpoint `ckpt`, in eval mode: what the
    probes run."""
    s = torch.load(ckpt, weights_only=False)
    cfg, proj, lm = build(processor, **shape_of(s))
    load_weights(s, proj, lm)
    proj.eval()
    lm.eval()
    return cfg, proj, lm, s.get("vision_pos")


def image_prefix(proj, lm, prefix_ids: torch.Tensor, image_mask: torch.Tensor, feats: torch.Tensor,
                 vision_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings of the shared prefix for each image [B, P, H], projected image tokens [B, 576, H])."""
    img = proj(feats if vision_pos is None else feats + vision_pos)
    pre = lm.model.embed_tokens(prefix_ids).unsqueeze(0).expand(feats.shape[0], -1, -1).clone()
    pre[:, image_mask] = img
    return pre, img


@contextlib.contextmanager
def attention_probs(lm, layers: tuple[int, ...]):
    """Inside the block the decoder runs eager attention and the yielded dict collects {layer: probabilities
    [batch, heads, queries, keys]} of every forward pass through `layers` (the last pass wins); with no layers,
    nothing changes."""
    grabbed, hooks = {}, []
    if layers:
        lm.config._attn_implementation = "eager"
        for layer in layers:
            hooks.append(lm.model.layers[layer].self_attn.register_forward_hook(
                lambda _m, _i, out, layer=layer: grabbed.__setitem__(layer, out[1])))
    try:
        yield grabbed
    finally:
        for hook in hooks:
            hook.remove()
        if layers:
            lm.config._attn_implementation = "sdpa"


@contextlib.contextmanager
def attention_outputs(lm, layers: tuple[int, ...]):
    """Inside the block the yielded dict collects {layer: self-attention output after o_proj [batch, queries,
    hidden]} of every forward pass through `layers` (the last pass wins: forward()'s suffix pass)."""
    grabbed = {}
    hooks = [lm.model.layers[layer].self_attn.register_forward_hook(
        lambda _m, _i, out, layer=layer: grabbed.__setitem__(layer, out[0])) for layer in layers]
    try:
        yield grabbed
    finally:
        for hook in hooks:
            hook.remove()


def forward(proj, lm, prefix_ids: torch.Tensor, image_mask: torch.Tensor, batch, attn_layers: tuple[int, ...] = (),
            vision_pos: torch.Tensor | None = None, hidden_layers: tuple[int, ...] = ()):
    """Returns (logits at answer positions [T, V], labels [T], grounding mask [T], n_items, projected image tokens,
    {layer: attention probabilities of the suffix queries [M, heads, S, P + S]} for `attn_layers`, final normed
    hidden states at the answer positions [T, H]); with `hidden_layers`, an eighth element
    {l: hidden_states[l] of the suffix [M, S, H]} (hidden_states[l] = the output of layer l - 1)."""
    feats, owner, ids, rows, cols, labels, lk, n = batch
    B, P = feats.shape[0], prefix_ids.shape[0]
    pre, img = image_prefix(proj, lm, prefix_ids, image_mask, feats, vision_pos)
    out = lm.model(inputs_embeds=pre, position_ids=torch.arange(P).unsqueeze(0).expand(B, -1), use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    S = ids.shape[1]
    with attention_probs(lm, attn_layers) as grabbed:  # eager attention for the suffix pass only
        o = lm.model(inputs_embeds=lm.model.embed_tokens(ids), past_key_values=cache,
                     output_hidden_states=bool(hidden_layers),
                     position_ids=(P + torch.arange(S)).unsqueeze(0).expand(ids.shape[0], -1))
    hs = o.last_hidden_state[rows, cols]
    logits = lm.lm_head(hs)
    if hidden_layers:
        return logits, labels, lk, n, img, grabbed, hs, {l: o.hidden_states[l] for l in hidden_layers}
    return logits, labels, lk, n, img, grabbed, hs


def full_forward(proj, lm, prefix_ids, image_mask, batch, vision_pos=None):
    """Reference: one full sequence per item (no prefix sharing), for --check."""
    feats, owner, ids, rows, cols, labels, lk, n = batch
    img = proj(feats if vision_pos is None else feats + vision_pos)
    P = prefix_ids.shape[0]
    out = []
    for m in range(ids.shape[0]):
        x = torch.cat([prefix_ids, ids[m]])
        e = lm.model.embed_tokens(x).clone()
        e[:P][image_mask] = img[owner[m]]
        h = lm.model(inputs_embeds=e[None], position_ids=torch.arange(len(x))[None]).last_hidden_state[0]
        sel = cols[rows == m] + P
        out.append(lm.lm_head(h[sel]))
    return torch.cat(out), labels, lk, n


# ------------------------------------------------------------------------------------------------------- schedule
def answer_readout(heads, states: dict, batch, lk: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy, hits, count) of the per-layer readout `heads` ({str(layer): Linear}) of the VQA answer
    classes `cls` from `states` ({layer: [M, S, H]}, un-normed: RMS-normalised here) at the VQA answer positions."""
    loss, hit = torch.zeros(()), 0
    for l, head in heads.items():
        h = states[int(l)][batch[3], batch[4]][~lk]
        z = head(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        loss = loss + F.cross_entropy(z, cls) / len(heads)
        hit += int((z.argmax(-1) == cls).sum())
    return loss, hit, len(cls) * len(heads)


def lr_at(step: int, total: int, args) -> float:
    warm = max(1, min(args.warmup, total // 10))
    if step < warm:
        return args.lr * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, nargs="+", default=[dc.CACHE / "demo-train"],
                   help="prepare_train.py outputs (several: their images are pooled)")
    p.add_argument("--repeat", type=int, nargs="+", help="per --data: times its images appear per epoch (default 1)")
    p.add_argument("--out", type=Path, default=dc.CACHE / "demo-ckpt")
    p.add_argument("--hours", type=float, help="wall-clock budget (over all resumed runs)")
    p.add_argument("--max-samples", type=int, help="stop after this many items (sets the cosine horizon)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--batch-images", type=int, default=4, help="images per step (each with all its items)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=8, help="steps timed to fix the horizon under --hours")
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init", type=Path, help="start from the weights of this checkpoint (new optimiser / schedule)")
    p.add_argument("--kv-heads", type=int,
                   help="key-value heads of the decoder (default: the --init / --resume checkpoint's, else "
                        "demo_common.TEXT_CONFIG's); more than --init's grows it without changing its function "
                        "(widen: each old key-value head repeated for the query heads that shared it)")
    p.add_argument("--layers", type=int,
                   help="decoder layers (default: the --init / --resume checkpoint's, else demo_common.TEXT_CONFIG's); "
                        "more than --init's appends layers that start as identities (deepen)")
    p.add_argument("--hidden", type=int,
                   help="decoder width (default: the --init / --resume checkpoint's, else TEXT_CONFIG's); wider than "
                        "--init's grows it without changing its function (widen; give --heads for the same head "
                        "dimension)")
    p.add_argument("--heads", type=int, help="attention heads (default as --hidden; more than --init's: widen)")
    p.add_argument("--intermediate", type=int, help="MLP width (default as --hidden; more than --init's: widen)")
    p.add_argument("--device", default="cpu",
                   help="torch device to train on (cuda: one GPU, TF32 matmuls; the data stays in host memory)")
    p.add_argument("--vision-pos-in-features", action="store_true",
                   help="with --init: the features were made by a tower that already adds the checkpoint's vision "
                        "position table (gpu_train.sh's features come from the shipped vision.int8.onnx, which bakes "
                        "in the shipped model's table), so the run drops the checkpoint's table instead of adding it "
                        "twice; pack_checkpoint.py unpack --vision-offset-from gives it back to the result")
    p.add_argument("--init-aux", action="store_true",
                   help="with --init, also take the training-only heads (patch, box, VQA, head-noun and phrase "
                        "readouts) from the checkpoint where it has them, instead of starting them afresh (a checkpoint "
                        "recover_checkpoint.py read back from a shipped model has them when given --heads)")
    p.add_argument("--projector-lr-mult", type=float, default=1.0, help="lr multiplier of the projector (+ aux head)")
    p.add_argument("--aux", type=float, default=0.5, help="weight of the auxiliary patch loss (0: off)")
    p.add_argument("--aux-obj-weight", type=float, default=5.0, help="weight of object patches in the readout")
    p.add_argument("--aux-words", type=float, default=1.0, help="weight of the word-alignment term (0: off)")
    p.add_argument("--attn-sup", type=float, default=0.0,
                   help="weight of the attention supervision: grounding answer tokens' head-mean attention at "
                        "--attn-layer should lie on the target shape's patches (0: off)")
    p.add_argument("--attn-sup-vqa", action="store_true",
                   help="extend --attn-sup to VQA answers: onto the named shape (colour questions, existence answered "
                        "yes) or every shape of the kind (counts); see vqa_selector")
    p.add_argument("--attn-per-item", action="store_true",
                   help="--attn-sup averages each item's answer positions first, then the items: a VQA answer (1-2 "
                        "tokens) and a box (25) count alike, and so does the last prompt token, which is the position "
                        "Stage 2 / FastV select with (default: every answer position counts once)")
    p.add_argument("--attn-early", action="store_true",
                   help="--attn-sup only at the answer positions whose context holds no coordinate yet (a box's ' [', "
                        "'0', '.' and the position predicting its first digit; every VQA answer position): later box "
                        "positions can find the target from the digits already given, which the teacher-forced "
                        "loss shows them, instead of from the expression")
    p.add_argument("--attn-layer", type=int, nargs="+", default=[5],
                   help="decoder layer(s) of --attn-sup (default: the last; several: the loss is their mean)")
    p.add_argument("--box-aux", type=float, default=0.0,
                   help="weight of the box readout: a linear head on the final hidden state of every grounding answer "
                        "position regresses the target box (L1, normalised coordinates; training only, 0: off)")
    p.add_argument("--vision-pos", type=float, default=0.0,
                   help="learned vision position table [576, 384] added to the tower's features before the projector "
                        "(exported into the vision graph), started as a 2-D sine-cosine code of this amplitude "
                        "(0: none, unless the --init / --resume checkpoint has one)")
    p.add_argument("--vqa-weight", type=float, default=1.0,
                   help="weight of a VQA answer token against a grounding one in the token loss (a VQA answer is 1-2 "
                        "tokens, a box 25, so at 1 VQA gets ~1/10 of the gradient per item)")
    p.add_argument("--vqa-readout", type=float, default=0.0,
                   help="weight of a training-only readout of every VQA answer token from the intermediate hidden "
                        "states at --readout-layers (a linear head per layer over the VQA answer tokens): makes the "
                        "layers whose attention finds the asked-about shape carry its colour / count onward")
    p.add_argument("--readout-layers", type=int, nargs="+", default=[3, 5],
                   help="hidden_states indices for --vqa-readout (l = the output of decoder layer l - 1)")
    p.add_argument("--readout-init", choices=["zero", "random"], default="zero",
                   help="--vqa-readout heads start at zero (phase i) or at PyTorch's default random init: a zero head "
                        "sends no answer-dependent gradient into the decoder until it has learned from what the "
                        "hidden state already carries, a random one does from the first step")
    p.add_argument("--head-readout", type=float, default=0.0,
                   help="weight of a training-only readout of a VQA answer's first token from the question's head "
                        "noun (its first shape word) at hidden_states --head-readout-layer, for the questions the "
                        "head noun alone decides (existence, count, 'What color is the <shape>?'): the value the "
                        "read-out hop (--copy-attn) copies to the answer must carry the answer, not only the place")
    p.add_argument("--head-readout-layer", type=int, default=3,
                   help="hidden_states index for --head-readout (3: the input of the copy layer 3)")
    p.add_argument("--phrase-readout", type=float, default=0.0,
                   help="weight of a training-only readout at every noun phrase's shape word (' square' of 'the red "
                        "square', of 'What color is the square?', of 'Is there a red square?') at hidden_states "
                        "--phrase-readout-layer: which colours the shapes its phrase names have (8 independent yes/no) "
                        "and how many shapes it names (0-4). Every item has such a word, so the value the phrase hop "
                        "(--phrase-attn) gathers is asked to carry colour and number on every item, where "
                        "--head-readout asks it on the few VQA items the noun alone decides (needs --phrase-attn)")
    p.add_argument("--phrase-readout-layer", type=int, default=3,
                   help="hidden_states index for --phrase-readout (3: the input of the copy layer 3)")
    p.add_argument("--word-attn", type=float, default=0.0,
                   help="weight of word-to-patch attention supervision: at --word-attn-layer, head --word-attn-head "
                        "of every shape / colour word of a prompt (' triangle', ' red') should attend to the patches "
                        "of the shapes it names, so the decoder learns to match words to appearance (0: off)")
    p.add_argument("--word-attn-layer", type=int, nargs="+", default=[0, 1])
    p.add_argument("--word-attn-head", type=int, default=0)
    p.add_argument("--phrase-attn", type=float, default=0.0,
                   help="weight of noun-phrase attention supervision: at --phrase-layer, head --phrase-head of every "
                        "shape word of a prompt should attend to the patches of the shapes its phrase names, the "
                        "colour word before it included (' red square' -> the red squares), so the head noun holds "
                        "its referent (0: off)")
    p.add_argument("--phrase-sink", action="store_true",
                   help="with --phrase-attn, a noun phrase that names no shape in the image (an existence question "
                        "answered no) should attend to the BOS token (prompt position 0) instead")
    p.add_argument("--phrase-size", action="store_true",
                   help="noun phrases with a superlative (\"the largest square\") name only that shape (the one of "
                        "its kind with the most / fewest patches) for --phrase-attn, --copy-attn and --phrase-readout; "
                        "without it they name every shape of the kind")
    p.add_argument("--phrase-layer", type=int, default=1)
    p.add_argument("--phrase-head", type=int, default=0)
    p.add_argument("--copy-attn", type=float, default=0.0,
                   help="weight of read-out supervision: at --copy-layer, head --copy-head of the answer positions "
                        "that hold no coordinate yet (see --attn-early) should attend to the item's head noun (its "
                        "first shape word), from which --phrase-attn makes the referent readable (0: off)")
    p.add_argument("--copy-layer", type=int, default=3)
    p.add_argument("--copy-head", type=int, default=0)
    p.add_argument("--qual-attn", type=float, default=0.0,
                   help="weight of position-qualifier supervision (grounding and colour questions whose expression "
                        "ends in 'at the bottom / top', 'on the left / right'): at --phrase-layer, head --qual-head of "
                        "the qualifier's last word should attend to the referent's patches, so that word holds which "
                        "shape of the noun phrase is meant (the head noun before it cannot); at --copy-layer, the "
                        "same head of the early answer positions should attend to that word; with --phrase-readout "
                        "the word's state is also asked its referent's colour and count (1) (0: off)")
    p.add_argument("--qual-head", type=int, default=1)
    p.add_argument("--qual-copy", action="store_true",
                   help="with --qual-attn and --copy-attn, the copy head of a qualified item's early answer positions "
                        "reads the qualifier word instead of the head noun (whose state holds every shape of the kind "
                        "and their colours, the other shape's included)")
    p.add_argument("--attn-readout", type=float, default=0.0,
                   help="weight of a training-only readout of every VQA answer token from the self-attention output "
                        "(after o_proj, before it joins the residual stream) of --attn-readout-layers at the answer "
                        "position: what the answer's heads bring back through their values must carry the answer "
                        "(a colour the shape's tokens hold at 0.87 was read at the answer at 0.55; session 20) "
                        "(0: off)")
    p.add_argument("--attn-readout-layers", type=int, nargs="+", default=[4, 5])
    p.add_argument("--item-weight", nargs="+", default=[], metavar="QTYPE[:ANSWER]=W",
                   help="weight of these items' answer loss, e.g. superl=3 count:4=3 (rare or hard kinds of item)")
    p.add_argument("--kinds", nargs="+", choices=["grounding", "vqa"], default=["grounding", "vqa"],
                   help="train on these item kinds only (default both; one kind isolates a task for a diagnosis)")
    p.add_argument("--stop-step", type=int, help="checkpoint and stop at this step (the schedule keeps its horizon)")
    p.add_argument("--limit-images", type=int, help="use only the first N images (smoke tests)")
    p.add_argument("--check", action="store_true", help="verify shared-prefix == full-sequence logits, then exit")
    args = p.parse_args(argv)
    if (args.init_aux or args.vision_pos_in_features) and not args.init:
        p.error("--init-aux and --vision-pos-in-features go with --init (a --resume run takes everything from its own "
                "checkpoint)")
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "last.pt"
    if ckpt.exists() and not args.resume and not args.check:
        raise SystemExit(f"{ckpt} exists: pass --resume to continue it, or use another --out")

    processor = dc.load_processor(args.data[0] / "processor")
    if not (out / "processor").exists():
        shutil.copytree(args.data[0] / "processor", out / "processor")
    rule = dc.PromptRule(processor)
    data = Data(args.data, rule, args.limit_images, args.repeat, tuple(args.kinds))
    item_w = data.item_weights(args.item_weight) if args.item_weight else None
    if item_w is not None:
        print(f"[data] --item-weight: {int((item_w != 1).sum())} items reweighted, mean weight {item_w.mean():.3f}")
    src, narrow = None, None  # narrow: the --init checkpoint before widen, for the check below
    if args.resume and ckpt.exists():
        src = torch.load(ckpt, weights_only=False)
    elif args.init and not args.resume:
        src = torch.load(args.init, weights_only=False)
        if args.vision_pos_in_features:
            src["vision_pos"] = None
    asked = {"num_key_value_heads": ("--kv-heads", args.kv_heads), "num_hidden_layers": ("--layers", args.layers),
             "hidden_size": ("--hidden", args.hidden), "num_attention_heads": ("--heads", args.heads),
             "intermediate_size": ("--intermediate", args.intermediate)}
    shape = {k: want for k, (_, want) in asked.items()}
    if src is not None:  # a resumed run keeps its own shape; an --init run its source's unless told
        have = shape_of(src)
        for k, (flag, want) in asked.items():
            if args.resume and want and want != have[k]:
                raise SystemExit(f"{flag} {want}: {ckpt} has {have[k]} (a resumed run keeps its shape)")
            if args.resume or not want:
                shape[k] = have[k]
        if not args.resume and any(shape[k] != have[k] for k in WIDENABLE):
            narrow = src
            # grown here, not in load_weights: the training-only heads and the projector grow with the width
            src = widen(src, shape, dc.TEXT_CONFIG["initializer_range"], args.seed)
            print(f"[init] {args.init} widened from {have['hidden_size']} x {have['num_attention_heads']} heads "
                  f"({have['num_key_value_heads']} key-value), MLP {have['intermediate_size']} to "
                  f"{shape['hidden_size']} x {shape['num_attention_heads']} ({shape['num_key_value_heads']}), "
                  f"MLP {shape['intermediate_size']}, computing the same function (widen)")
    hidden, heads = shape["hidden_size"] or dc.TEXT_CONFIG["hidden_size"], shape["num_attention_heads"] or \
        dc.TEXT_CONFIG["num_attention_heads"]
    kv = shape["num_key_value_heads"] or dc.TEXT_CONFIG["num_key_value_heads"]
    if hidden % heads or heads % kv:
        raise SystemExit(f"decoder width {hidden}, {heads} heads, {kv} key-value heads: the width must be a multiple "
                         f"of the heads, and the heads of the key-value heads")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"--device {args.device}: {e}") from None
    torch.set_default_device(device)  # the model, the batches and every tensor made below live there
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    cfg, proj, lm = build(processor, **shape)
    prefix_ids = torch.tensor(data.prefix)
    image_mask = prefix_ids == rule.image_token_id
    pad_id = processor.tokenizer.pad_token_id
    n_params = sum(p.numel() for p in list(proj.parameters()) + list(lm.parameters()))
    print(f"[model] projector + Llama {cfg.text_config.num_hidden_layers}x{cfg.text_config.hidden_size} "
          f"({cfg.text_config.num_attention_heads} heads, {cfg.text_config.num_key_value_heads} key-value heads; "
          f"vocab {cfg.text_config.vocab_size}, tied): {n_params / 1e6:.2f} M trainable parameters")

    if args.check:
        b, _ = to_device(data.batch(list(range(min(2, len(data.images)))), pad_id))
        with torch.no_grad():
            a, *_ = forward(proj, lm, prefix_ids, image_mask, b, attn_layers=(lm.config.num_hidden_layers - 1,))
            r, *_ = full_forward(proj, lm, prefix_ids, image_mask, b)
        err = (a - r).abs().max().item()
        print(f"[check] shared-prefix vs full-sequence logits over {a.shape[0]} answer positions: max abs {err:.3g}")
        if err > 1e-4:
            raise SystemExit("shared-prefix forward differs from the full sequence")
        if args.phrase_size:
            check_phrase_size(data, pad_id)
        return

    bad = [l for l in args.attn_layer if not 0 <= l < cfg.text_config.num_hidden_layers]
    if bad:
        raise SystemExit(f"--attn-layer {bad}: the decoder has layers 0..{cfg.text_config.num_hidden_layers - 1}")
    bad = [l for l in args.word_attn_layer if not 0 <= l < cfg.text_config.num_hidden_layers]
    if bad:
        raise SystemExit(f"--word-attn-layer {bad}: the decoder has layers 0..{cfg.text_config.num_hidden_layers - 1}")
    for name in ("word_attn_head", "phrase_head", "copy_head", "qual_head"):
        if not 0 <= getattr(args, name) < cfg.text_config.num_attention_heads:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: the decoder has heads "
                             f"0..{cfg.text_config.num_attention_heads - 1}")
    for name in ("phrase_layer", "copy_layer"):
        if not 0 <= getattr(args, name) < cfg.text_config.num_hidden_layers:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: the decoder has layers "
                             f"0..{cfg.text_config.num_hidden_layers - 1}")
    if args.phrase_readout > 0 and args.phrase_attn <= 0:
        raise SystemExit("--phrase-readout reads the noun phrases of --phrase-attn: give --phrase-attn too")
    if args.phrase_readout > 0 and not 1 <= args.phrase_readout_layer <= cfg.text_config.num_hidden_layers:
        raise SystemExit(f"--phrase-readout-layer {args.phrase_readout_layer}: hidden_states "
                         f"1..{cfg.text_config.num_hidden_layers}")
    if args.phrase_readout > 0 and any(a is None for a in data.instances):
        raise SystemExit("--phrase-readout counts shapes from instances.u8.npy: some shard lacks it "
                         "(prepare_train.py --relabel writes it)")
    if args.phrase_sink and data.prefix[0] != rule.bos_id:
        raise SystemExit("--phrase-sink needs the prompt to start with BOS (the sink key)")
    if args.phrase_size and not (args.phrase_attn > 0 or args.copy_attn > 0):
        raise SystemExit("--phrase-size narrows the noun phrases of --phrase-attn / --copy-attn: give one of them")
    if args.qual_attn > 0 and (any(a is None for a in data.instances) or not args.attn_sup_vqa):
        raise SystemExit("--qual-attn takes the referent from instances.u8.npy (prepare_train.py --relabel) and a "
                         "colour question's from --attn-sup-vqa: some shard lacks the first, or the flag is missing")
    if args.qual_copy and not (args.qual_attn > 0 and args.copy_attn > 0):
        raise SystemExit("--qual-copy moves --copy-attn's target onto --qual-attn's qualifier word: give both")
    if args.qual_attn > 0 and args.copy_attn > 0 and args.qual_head == args.copy_head:
        raise SystemExit(f"--qual-head {args.qual_head} is --copy-head too: the same head of a qualified item's answer "
                         f"would be asked to read both the head noun and the qualifier (--qual-copy does that on "
                         f"purpose); pick another --qual-head")
    if args.phrase_size and any(a is None for a in data.instances):
        raise SystemExit("--phrase-size finds the largest / smallest shape in instances.u8.npy: some shard lacks it "
                         "(prepare_train.py --relabel writes it)")
    aux = None
    if args.aux > 0:
        aux = AuxHead(cfg.text_config.hidden_size, [word_id(rule, c) for c in make_data.COLORS],
                      [word_id(rule, k) for k in make_data.SHAPES], obj_weight=args.aux_obj_weight,
                      words=args.aux_words)
    if aux is not None and any(l is None for l in data.labels):
        raise SystemExit(f"--aux needs labels.u8.npy in every shard: run prepare_train.py --relabel")
    vision_pos = None
    if src is not None and src.get("vision_pos") is not None:
        vision_pos = torch.nn.Parameter(src["vision_pos"].clone())
    elif args.vision_pos > 0:
        n_tok = data.feats[0].shape[1]
        grid = math.isqrt(n_tok)
        if grid * grid != n_tok:
            raise SystemExit(f"--vision-pos needs a square token grid, the cached features have {n_tok} tokens")
        vision_pos = torch.nn.Parameter(sincos_2d(grid, cfg.vision_config.hidden_size, args.vision_pos))
    named = list(proj.named_parameters()) + list(lm.named_parameters())
    if vision_pos is not None:
        named.append(("linear_vision_pos", vision_pos))  # the projector's lr group, no weight decay (below)
    if aux is not None:
        named += [("aux." + n, p) for n, p in aux.named_parameters()]
    box_head = torch.nn.Linear(cfg.text_config.hidden_size, 4) if args.box_aux > 0 else None
    if box_head is not None:
        named += [("aux.box." + n, p) for n, p in box_head.named_parameters()]
    readout, readout_class, head_readout, attn_readout = None, None, None, None
    if args.vqa_readout > 0 or args.head_readout > 0 or args.attn_readout > 0:
        if "vqa" not in args.kinds:
            raise SystemExit("--vqa-readout / --head-readout / --attn-readout read VQA answers: they need --kinds to "
                             "include vqa")
        vocab = sorted({t for _, ans, kind, *_ in data.items if kind != "grounding" for t in ans})
        readout_class = torch.full((cfg.text_config.vocab_size,), -100, dtype=torch.long)
        readout_class[torch.tensor(vocab)] = torch.arange(len(vocab))
    if args.head_readout > 0:
        if not 1 <= args.head_readout_layer <= cfg.text_config.num_hidden_layers:
            raise SystemExit(f"--head-readout-layer {args.head_readout_layer}: hidden_states "
                             f"1..{cfg.text_config.num_hidden_layers}")
        head_readout = torch.nn.Linear(cfg.text_config.hidden_size, len(vocab))
        named += [("aux.head_readout." + n, p) for n, p in head_readout.named_parameters()]
        print(f"[head-readout] VQA answers ({len(vocab)} classes) read from the head noun at hidden_states "
              f"{args.head_readout_layer}")
    if args.vqa_readout > 0:
        bad = [l for l in args.readout_layers if not 1 <= l <= cfg.text_config.num_hidden_layers]
        if bad:
            raise SystemExit(f"--readout-layers {bad}: hidden_states 1..{cfg.text_config.num_hidden_layers}")
        readout = torch.nn.ModuleDict({str(l): torch.nn.Linear(cfg.text_config.hidden_size, len(vocab))
                                       for l in args.readout_layers})
        if args.readout_init == "zero":  # starts at the uniform guess: no kick to the decoder on step 1
            for head in readout.values():
                torch.nn.init.zeros_(head.weight)
                torch.nn.init.zeros_(head.bias)
        named += [("aux.readout." + n, p) for n, p in readout.named_parameters()]
        print(f"[readout] VQA answer tokens ({len(vocab)} classes) read from hidden_states {args.readout_layers}")
    if args.attn_readout > 0:
        bad = [l for l in args.attn_readout_layers if not 0 <= l < cfg.text_config.num_hidden_layers]
        if bad:
            raise SystemExit(f"--attn-readout-layers {bad}: the decoder has layers "
                             f"0..{cfg.text_config.num_hidden_layers - 1}")
        attn_readout = torch.nn.ModuleDict({str(l): torch.nn.Linear(cfg.text_config.hidden_size, len(vocab))
                                            for l in args.attn_readout_layers})
        named += [("aux.attn_readout." + n, p) for n, p in attn_readout.named_parameters()]
        print(f"[attn-readout] VQA answer tokens ({len(vocab)} classes) read from the attention output of layers "
              f"{args.attn_readout_layers}")
    phrase_readout = None
    if args.phrase_readout > 0:  # colours (multi-label) + count classes 0..max shapes per image
        n_count = max(make_data.SHAPES_PER_IMAGE) + 1
        phrase_readout = torch.nn.Linear(cfg.text_config.hidden_size, len(make_data.COLORS) + n_count)
        named += [("aux.phrase_readout." + n, p) for n, p in phrase_readout.named_parameters()]
        print(f"[phrase-readout] colours and count (0..{n_count - 1}) of every noun phrase's shapes, read at its "
              f"shape word at hidden_states {args.phrase_readout_layer}")
    fast = lambda n: n.startswith("linear_") or n.startswith("aux.")  # noqa: E731 (projector + aux head)
    groups = []
    for is_fast in (False, True):
        sel = [(n, p) for n, p in named if fast(n) == is_fast]
        decays = lambda n, p: p.ndim == 2 and "embed_tokens" not in n and n != "linear_vision_pos"  # noqa: E731
        groups += [{"params": [p for n, p in sel if decays(n, p)],
                    "weight_decay": args.weight_decay, "lr_mult": args.projector_lr_mult if is_fast else 1.0},
                   {"params": [p for n, p in sel if not decays(n, p)],
                    "weight_decay": 0.0, "lr_mult": args.projector_lr_mult if is_fast else 1.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    st = {"step": 0, "epoch": 0, "pos": 0, "samples": 0, "elapsed": 0.0, "total_steps": None}
    # the training-only heads besides `aux`, by their checkpoint key
    heads_by_key = {"box": box_head, "readout": readout, "head_readout": head_readout, "phrase_readout": phrase_readout,
                    "attn_readout": attn_readout}
    assert ("aux", *heads_by_key) == TRAINING_HEADS, "TRAINING_HEADS out of step with the heads saved here"

    def load_heads(s: dict) -> list[str]:
        """Loads every head this run has and checkpoint `s` saved; returns their keys."""
        taken = [k for k, h in heads_by_key.items() if h is not None and s.get(k) is not None]
        for k in taken:
            heads_by_key[k].load_state_dict(s[k])
        return taken

    if args.resume and ckpt.exists():
        s = src
        load_weights(s, proj, lm, aux)
        load_heads(s)
        opt.load_state_dict(s["optimizer"])
        st = s["state"]
        set_rng_state(s["rng"])
        print(f"[resume] step {st['step']}, epoch {st['epoch']} pos {st['pos']}, {st['samples']} samples, "
              f"{st['elapsed'] / 60:.1f} min trained, horizon {st['total_steps']} steps")
    elif args.resume:
        print(f"[resume] no {ckpt}: starting fresh")
    elif args.init:
        s = src
        taken = []
        if args.init_aux:
            load_weights(s, proj, lm, aux)
            taken += ["aux"] if aux is not None and s.get("aux") is not None else []
            taken += load_heads(s)
        else:
            load_weights(s, proj, lm)  # the aux heads start fresh
        print(f"[init] weights from {args.init} (step {s['state']['step']}, {s['state']['samples']} samples); "
              f"new optimiser and schedule; training-only heads taken: {', '.join(taken) or 'none'}")
        if narrow is not None:
            check_widened(narrow, proj, lm, vision_pos, processor, prefix_ids, image_mask,
                          data.batch(list(range(min(2, len(data.images)))), pad_id)[0])
    if st["total_steps"] is None:
        cands = []
        if args.max_steps:
            cands.append(args.max_steps)
        if args.max_samples:
            cands.append(math.ceil(args.max_samples / (args.batch_images * data.items_per_image)))
        if cands:
            st["total_steps"] = min(cands)
        elif not args.hours:
            raise SystemExit("give --hours, --max-samples or --max-steps")
    (out / "train_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2) + "\n")

    stop = {"flag": False}

    def on_signal(sig, _frame):
        print(f"[train] signal {sig}: checkpointing after this step", flush=True)
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def checkpoint(reason: str):
        st["elapsed"] = elapsed()
        save(ckpt, {"projector": proj.state_dict(), "aux": aux.state_dict() if aux is not None else None,
                    **{k: h.state_dict() if h is not None else None for k, h in heads_by_key.items()},
                    "vision_pos": vision_pos.detach().clone() if vision_pos is not None else None,
                    "language_model": lm.state_dict(), "optimizer": opt.state_dict(),
                    "state": dict(st), "rng": rng_state(), "args": vars(args), "config": cfg.to_dict()})
        print(f"[ckpt] {reason}: step {st['step']} -> {ckpt}", flush=True)

    t0, el0 = time.perf_counter(), st["elapsed"]

    def elapsed() -> float:
        return el0 + time.perf_counter() - t0

    last_ckpt = time.perf_counter()
    img_keys = torch.nonzero(image_mask).squeeze(1)  # the image tokens' positions in the prefix (attention keys)
    order = data.order(args.seed, st["epoch"])
    log = {"loss": 0.0, "g_loss": 0.0, "g_n": 0, "v_loss": 0.0, "v_n": 0, "g_acc": 0, "v_acc": 0, "items": 0,
           "aux": 0.0, "aux_acc": 0.0, "attn": 0.0, "word": 0.0, "phrase": 0.0, "copy": 0.0, "qual": 0.0,
           "qual_copy": 0.0, "box": 0.0, "ro": 0.0, "ro_acc": 0.0, "ro_n": 0, "hr": 0.0, "hr_acc": 0, "hr_n": 0,
           "ar": 0.0, "ar_acc": 0, "ar_n": 0,
           "pr": 0.0, "pr_col": 0, "pr_cnt": 0, "pr_n": 0,
           "t": time.perf_counter(), "steps": 0}
    calib_t = None
    proj.train()
    lm.train()
    while True:
        if st["total_steps"] is not None and st["step"] >= st["total_steps"]:
            break
        if args.stop_step and st["step"] >= args.stop_step:
            print(f"[train] --stop-step {args.stop_step} reached")
            break
        if args.hours and elapsed() >= args.hours * 3600:
            print(f"[train] time budget of {args.hours} h reached")
            break
        if stop["flag"]:
            break
        if st["pos"] >= len(order):
            st["epoch"] += 1
            st["pos"] = 0
            order = data.order(args.seed, st["epoch"])
        ids = order[st["pos"]:st["pos"] + args.batch_images].tolist()
        b, (patch_labels, target_mask, row_box, words, early, phrases, heads, head_at, head_decides, sets,
            quals) = to_device(data.batch(
                ids, pad_id, vqa_targets=args.attn_sup_vqa, word_targets=args.word_attn > 0,
                phrase_targets=args.phrase_attn > 0 or args.copy_attn > 0, phrase_sink=args.phrase_sink,
                phrase_size=args.phrase_size))
        total_for_lr = st["total_steps"] or 10 ** 9
        lr = lr_at(st["step"], total_for_lr, args)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        use_attn = (args.attn_sup > 0 and target_mask is not None  # some supervised position has a target
                    and bool((target_mask[b[3]].any(1) & (early if args.attn_early else True)).any()))
        use_words = args.word_attn > 0 and words is not None
        use_phrases = args.phrase_attn > 0 and phrases is not None
        copy_sel = None
        if args.copy_attn > 0 and heads is not None:  # early answer positions of items with a head noun
            copy_sel = early & (heads[b[3]] >= 0)
            copy_sel = copy_sel if bool(copy_sel.any()) else None
        use_quals = args.qual_attn > 0 and quals is not None
        qual_copy = None
        if use_quals:  # early answer positions of the items with a qualifier, and the qualifier's position
            q_of = torch.full((len(head_at),), -1, dtype=torch.long)
            q_of[quals[0]] = quals[1]
            qual_copy = early & (q_of[b[3]] >= 0)
        grab = sorted(set(args.attn_layer if use_attn else []) | set(args.word_attn_layer if use_words else [])
                      | ({args.phrase_layer} if use_phrases or use_quals else set())
                      | ({args.copy_layer} if copy_sel is not None or use_quals else set()))
        with attention_outputs(lm, tuple(args.attn_readout_layers) if attn_readout is not None else ()) as a_out:
            logits, labels, lk, n, img, probs, hs, *mid = forward(
                proj, lm, prefix_ids, image_mask, b, attn_layers=tuple(grab),
                vision_pos=vision_pos,
                hidden_layers=tuple(sorted(set(args.readout_layers if readout is not None else [])
                                           | ({args.head_readout_layer} if head_readout is not None else set())
                                           | ({args.phrase_readout_layer} if phrase_readout is not None else set()))))
        tok_loss = F.cross_entropy(logits.float(), labels, reduction="none")
        w_tok = torch.where(lk, 1.0, args.vqa_weight)
        if item_w is not None:
            w_tok = w_tok * on_device(item_w[data.image_items(ids)])[b[3]]
        loss = (tok_loss * w_tok).sum() / w_tok.sum()
        aux_loss, aux_acc = (aux.loss(img, patch_labels, lm) if aux is not None else (torch.zeros(()), 0.0))
        total_loss = loss + args.aux * aux_loss
        attn_loss, attn_mass = torch.zeros(()), 0.0
        if use_attn:
            # mass of the head-mean attention of every answer position of an item with a target (grounding; VQA with
            # --attn-sup-vqa) on the target's patches
            rows_t, cols_t = b[3], b[4]
            sel = target_mask[rows_t].any(1)
            if args.attn_early:
                sel = sel & early
            if args.attn_per_item:  # weight 1 / (answer positions of its item), normalised over the items
                per_row = torch.bincount(rows_t[sel], minlength=target_mask.shape[0]).float()
                w_pos = 1.0 / per_row[rows_t[sel]]
                w_pos = w_pos / w_pos.sum()
            else:
                w_pos = torch.full((int(sel.sum()),), 1.0 / int(sel.sum()))
            for layer_probs in (probs[l] for l in args.attn_layer):
                pm = layer_probs.mean(1)[rows_t[sel], cols_t[sel]][:, img_keys]  # [T', 576]
                mass = (pm * target_mask[rows_t[sel]]).sum(1)
                attn_loss = attn_loss - ((mass + 1e-6).log() * w_pos).sum() / len(args.attn_layer)
                attn_mass += (mass * w_pos).sum().item() / len(args.attn_layer)
            total_loss = total_loss + args.attn_sup * attn_loss
        word_loss, word_mass = torch.zeros(()), 0.0
        if use_words:
            w_rows, w_cols, w_masks, _ = words
            for l in args.word_attn_layer:
                pw = probs[l][w_rows, args.word_attn_head, w_cols][:, img_keys]  # [words, 576]
                mass = (pw * w_masks).sum(1)
                word_loss = word_loss - (mass + 1e-6).log().mean() / len(args.word_attn_layer)
                word_mass += mass.mean().item() / len(args.word_attn_layer)
            total_loss = total_loss + args.word_attn * word_loss
        phrase_mass = copy_mass = 0.0
        if use_phrases:
            p_rows, p_cols, p_masks, p_empty = phrases
            pp = probs[args.phrase_layer][p_rows, args.phrase_head, p_cols]  # [phrases, P + S]
            mass = (pp[:, img_keys] * p_masks).sum(1) + pp[:, 0] * p_empty
            total_loss = total_loss - args.phrase_attn * (mass + 1e-6).log().mean()
            phrase_mass = mass.mean().item()
        if copy_sel is not None:
            r, c = b[3][copy_sel], b[4][copy_sel]
            read = heads[r] if not (args.qual_copy and use_quals) else torch.where(q_of[r] >= 0, q_of[r], heads[r])
            mass = probs[args.copy_layer][r, args.copy_head, c, prefix_ids.shape[0] + read]
            total_loss = total_loss - args.copy_attn * (mass + 1e-6).log().mean()
            copy_mass = mass.mean().item()
        qual_mass = qual_copy_mass = 0.0
        if use_quals:
            q_rows, q_cols, q_masks, _ = quals
            pq = probs[args.phrase_layer][q_rows, args.qual_head, q_cols][:, img_keys]  # [quals, 576]
            mass = (pq * q_masks).sum(1)
            total_loss = total_loss - args.qual_attn * (mass + 1e-6).log().mean()
            qual_mass = mass.mean().item()
            if bool(qual_copy.any()):
                r, c = b[3][qual_copy], b[4][qual_copy]
                mass = probs[args.copy_layer][r, args.qual_head, c, prefix_ids.shape[0] + q_of[r]]
                total_loss = total_loss - args.qual_attn * (mass + 1e-6).log().mean()
                qual_copy_mass = mass.mean().item()
        box_loss = torch.zeros(())
        if box_head is not None and bool(lk.any()):
            box_loss = F.l1_loss(torch.sigmoid(box_head(hs[lk])), row_box[lk])
            total_loss = total_loss + args.box_aux * box_loss
        ro_loss, ro_hit, ro_n = torch.zeros(()), 0, 0
        if readout is not None and bool((~lk).any()):  # the residual stream after the layers
            ro_loss, ro_hit, ro_n = answer_readout(readout, mid[0], b, lk, readout_class[labels[~lk]])
            total_loss = total_loss + args.vqa_readout * ro_loss
        ar_loss, ar_hit, ar_n = torch.zeros(()), 0, 0
        if attn_readout is not None and bool((~lk).any()):  # what the layers' heads add at the answer positions
            ar_loss, ar_hit, ar_n = answer_readout(attn_readout, a_out, b, lk, readout_class[labels[~lk]])
            total_loss = total_loss + args.attn_readout * ar_loss
        hr_loss, hr_hit, hr_n = torch.zeros(()), 0, 0
        if head_readout is not None:
            # the first answer token of every item whose head noun alone decides its VQA answer, read at the noun
            first = torch.searchsorted(b[3], torch.arange(len(head_at)))  # rows are sorted by item
            sel = head_decides & (head_at >= 0) & ~lk[first]
            if bool(sel.any()):
                m_sel = torch.nonzero(sel).squeeze(1)
                h_noun = mid[0][args.head_readout_layer][m_sel, head_at[m_sel]]
                z = head_readout(h_noun * torch.rsqrt(h_noun.pow(2).mean(-1, keepdim=True) + 1e-6))
                cls = readout_class[labels[first[m_sel]]]
                hr_loss = F.cross_entropy(z, cls)
                hr_hit, hr_n = int((z.argmax(-1) == cls).sum()), len(cls)
                total_loss = total_loss + args.head_readout * hr_loss
        pr_loss, pr_col, pr_cnt, pr_n = torch.zeros(()), 0, 0, 0
        if phrase_readout is not None and phrases is not None and sets is not None:
            p_rows, p_cols = phrases[0], phrases[1]
            named_colours, count = sets
            if use_quals and quals[3] is not None:  # the qualifier words too: their referent's colour, count 1
                p_rows, p_cols = torch.cat([p_rows, quals[0]]), torch.cat([p_cols, quals[1]])
                named_colours, count = torch.cat([named_colours, quals[3][0]]), torch.cat([count, quals[3][1]])
            h_word = mid[0][args.phrase_readout_layer][p_rows, p_cols]
            z = phrase_readout(h_word * torch.rsqrt(h_word.pow(2).mean(-1, keepdim=True) + 1e-6))
            nc = len(make_data.COLORS)
            pr_loss = (F.binary_cross_entropy_with_logits(z[:, :nc], named_colours.float())
                       + F.cross_entropy(z[:, nc:], count.clamp(max=z.shape[1] - nc - 1)))
            total_loss = total_loss + args.phrase_readout * pr_loss
            with torch.no_grad():
                pr_col = int(((z[:, :nc] > 0) == named_colours).all(1).sum())
                pr_cnt = int((z[:, nc:].argmax(-1) == count).sum())
                pr_n = len(count)
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], args.clip)
        opt.step()
        st["step"] += 1
        st["pos"] += len(ids)
        st["samples"] += n
        with torch.no_grad():
            hit = logits.argmax(-1) == labels
            log["loss"] += loss.item()
            log["aux"] += aux_loss.item()
            log["attn"] += attn_mass
            log["word"] += word_mass
            log["phrase"] += phrase_mass
            log["copy"] += copy_mass
            log["qual"] += qual_mass
            log["qual_copy"] += qual_copy_mass
            log["box"] += box_loss.item()
            log["ro"] += ro_loss.item()
            log["ro_acc"] += ro_hit
            log["ro_n"] += ro_n
            log["hr"] += hr_loss.item()
            log["ar"] += ar_loss.item()
            log["ar_acc"] += ar_hit
            log["ar_n"] += ar_n
            log["hr_acc"] += hr_hit
            log["hr_n"] += hr_n
            log["pr"] += pr_loss.item()
            log["pr_col"] += pr_col
            log["pr_cnt"] += pr_cnt
            log["pr_n"] += pr_n
            log["aux_acc"] += aux_acc
            log["g_loss"] += tok_loss[lk].sum().item()
            log["g_n"] += int(lk.sum())
            log["v_loss"] += tok_loss[~lk].sum().item()
            log["v_n"] += int((~lk).sum())
            log["g_acc"] += int(hit[lk].sum())
            log["v_acc"] += int(hit[~lk].sum())
            log["items"] += n
            log["steps"] += 1
        if st["total_steps"] is None:  # --hours only: time the first steps, then fix the cosine horizon
            if st["step"] == 2:
                calib_t = (time.perf_counter(), elapsed())
            elif calib_t and st["step"] == 2 + args.calib_steps:
                per_step = (time.perf_counter() - calib_t[0]) / args.calib_steps
                st["total_steps"] = st["step"] + int((args.hours * 3600 - elapsed()) / per_step)
                print(f"[train] {per_step:.2f} s/step measured: cosine horizon {st['total_steps']} steps "
                      f"(~{st['total_steps'] * args.batch_images * data.items_per_image:.0f} samples)", flush=True)
        if st["step"] % args.log_every == 0 or st["step"] == 1:
            dt = time.perf_counter() - log["t"]
            print(f"[train] step {st['step']}/{st['total_steps'] or '?'} ep {st['epoch']} lr {lr:.2e} loss "
                  f"{log['loss'] / log['steps']:.4f} (ground {log['g_loss'] / max(1, log['g_n']):.4f} tok-acc "
                  f"{log['g_acc'] / max(1, log['g_n']):.3f}, vqa {log['v_loss'] / max(1, log['v_n']):.4f} tok-acc "
                  f"{log['v_acc'] / max(1, log['v_n']):.3f}, aux {log['aux'] / log['steps']:.3f} colour-acc "
                  f"{log['aux_acc'] / log['steps']:.2f}, target attn {log['attn'] / log['steps']:.3f}, box L1 "
                  f"{log['box'] / log['steps']:.3f}"
                  + (f", word attn {log['word'] / log['steps']:.3f}" if args.word_attn > 0 else "")
                  + (f", phrase attn {log['phrase'] / log['steps']:.3f}" if args.phrase_attn > 0 else "")
                  + (f", copy attn {log['copy'] / log['steps']:.3f}" if args.copy_attn > 0 else "")
                  + (f", qual attn {log['qual'] / log['steps']:.3f} copy {log['qual_copy'] / log['steps']:.3f}"
                     if args.qual_attn > 0 else "")
                  + (f", readout {log['ro'] / log['steps']:.3f} acc {log['ro_acc'] / max(1, log['ro_n']):.3f}"
                     if readout is not None else "")
                  + (f", attn readout {log['ar'] / log['steps']:.3f} acc {log['ar_acc'] / max(1, log['ar_n']):.3f}"
                     if attn_readout is not None else "")
                  + (f", head readout {log['hr'] / log['steps']:.3f} acc {log['hr_acc'] / max(1, log['hr_n']):.3f}"
                     if head_readout is not None else "")
                  + (f", phrase readout {log['pr'] / log['steps']:.3f} colours {log['pr_col'] / max(1, log['pr_n']):.3f}"
                     f" count {log['pr_cnt'] / max(1, log['pr_n']):.3f}" if phrase_readout is not None else "")
                  + f") | {log['items'] / dt:.2f} samples/s, "
                  f"{dt / log['items']:.3f} s/sample, {dt / log['steps']:.2f} s/step | {st['samples']} samples, "
                  f"{elapsed() / 60:.1f} min", flush=True)
            log = {k: (0 if k != "t" else time.perf_counter()) for k in log}
        if time.perf_counter() - last_ckpt >= args.ckpt_minutes * 60:
            checkpoint("periodic")
            last_ckpt = time.perf_counter()
    checkpoint("signal" if stop["flag"] else "end")
    print(f"[train] done: step {st['step']}, {st['samples']} samples, {st['elapsed'] / 60:.1f} min")


if __name__ == "__main__":
    main()
