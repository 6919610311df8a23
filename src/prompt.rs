//! Prompt layout: the chat template rendered with one placeholder per kept visual token, tokenised whole (special-
//! token text in the user's prompt kept as text), and the position id of every token under the "nothing was
//! pruned" convention.

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// A tokenised prompt with its image span and positions.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLayout {
    /// Token ids (image placeholders included).
    pub ids: Vec<u32>,
    /// Position id of every token.
    pub positions: Vec<i64>,
    /// Where the visual tokens sit in `ids`.
    pub image_span: Range<usize>,
    /// Position of the first generated token: the unpruned prompt length.
    pub next_position: i64,
}

impl PromptLayout {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the layout has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Whether `text` contains the text of one of the tokenizer's special tokens (which a whole-text encode would turn
/// into that control token).
fn holds_special_text(tokenizer: &Tokenizer, text: &str) -> bool {
    // The added vocabulary by reference: `Tokenizer::get_added_tokens_decoder` would clone it on every request.
    let added = tokenizer.get_added_vocabulary().get_added_tokens_decoder();
    added.values().any(|t| t.special && !t.content.is_empty() && text.contains(t.content.as_str()))
}

fn encode(t: &Tokenizer, text: &str) -> Result<tokenizers::Encoding> {
    t.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// The ids of the template `pieces` joined by `prompt`. Without `prompt_as_text` this is the whole-text encode the
/// reference processor does. With it, special-token text inside the prompt stays text and everything else is
/// tokenised as in the whole-text encode: the tokenizer splits its input at added tokens and encodes each stretch
/// between them on its own, so the added tokens are looked for in the template's pieces only and each stretch
/// (which may run from template text through the prompt into template text) is encoded as one, with special
/// tokens read as text. A stretch that does not start the text gets no Metaspace prefix where the tokenizer
/// prepends one to the first stretch only, as in the whole-text encode.
fn encode_rendered(tokenizer: &Tokenizer, pieces: &[&str], prompt: &str, prompt_as_text: bool) -> Result<Vec<u32>> {
    if !prompt_as_text {
        return Ok(encode(tokenizer, &pieces.join(prompt))?.get_ids().to_vec());
    }
    enum Part {
        Added(u32),
        Text(Range<usize>),
    }
    let added = tokenizer.get_added_vocabulary().get_added_tokens_decoder();
    let mut text = String::with_capacity(pieces.iter().map(|p| p.len()).sum::<usize>() + prompt.len() * pieces.len());
    let mut parts = Vec::new();
    let mut stretch_start = 0;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            text.push_str(prompt);
        }
        let base = text.len();
        text.push_str(piece);
        let encoding = encode(tokenizer, piece)?;
        for (&id, &(start, end)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
            let Some(token) = added.get(&id) else { continue };
            if token.normalized || token.lstrip || token.rstrip || token.single_word {
                // Matched on normalised text or with the whitespace around it: the stretches are not plain byte
                // ranges of the template. Tokenise the pieces and the prompt separately instead.
                return encode_separately(tokenizer, pieces, prompt);
            }
            parts.push(Part::Text(stretch_start..base + start));
            parts.push(Part::Added(id));
            stretch_start = base + end;
        }
    }
    parts.push(Part::Text(stretch_start..text.len()));

    let mut plain = tokenizer.clone();
    plain.set_encode_special_tokens(true);
    let inner = without_first_prefix(&plain)?;
    let mut ids = Vec::with_capacity(text.len() / 2);
    for part in parts {
        match part {
            Part::Added(id) => ids.push(id),
            Part::Text(range) if range.is_empty() => {}
            Part::Text(range) => {
                let t = if range.start > 0 { inner.as_ref().unwrap_or(&plain) } else { &plain };
                ids.extend_from_slice(encode(t, &text[range])?.get_ids());
            }
        }
    }
    Ok(ids)
}

/// The template's pieces tokenised as usual and the prompt as plain text between them (for templates whose added
/// tokens are matched on normalised text or strip whitespace).
fn encode_separately(tokenizer: &Tokenizer, pieces: &[&str], prompt: &str) -> Result<Vec<u32>> {
    let mut plain = tokenizer.clone();
    plain.set_encode_special_tokens(true);
    let prompt_ids = encode(&plain, prompt)?.get_ids().to_vec();
    let mut ids = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            ids.extend_from_slice(&prompt_ids);
        }
        ids.extend_from_slice(encode(tokenizer, piece)?.get_ids());
    }
    Ok(ids)
}

/// `t` with every Metaspace pre-tokenizer that prepends its replacement to the first stretch only set to never
/// prepend (for stretches that do not start the text), or None when it has none.
fn without_first_prefix(t: &Tokenizer) -> Result<Option<Tokenizer>> {
    fn never(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(o) => {
                let mut changed = false;
                if o.get("type").and_then(|t| t.as_str()) == Some("Metaspace") && o.get("prepend_scheme").and_then(|p| p.as_str()) == Some("first") {
                    o.insert("prepend_scheme".into(), "never".into());
                    changed = true;
                }
                // Every nested value is visited (no short-circuit): a Sequence may hold more than one.
                for v in o.values_mut() {
                    changed |= never(v);
                }
                changed
            }
            serde_json::Value::Array(a) => {
                let mut changed = false;
                for v in a {
                    changed |= never(v);
                }
                changed
            }
            _ => false,
        }
    }
    let Some(pre) = t.get_pre_tokenizer() else { return Ok(None) };
    let bad = |e: serde_json::Error| Error::Tokenizer(format!("re-reading the pre-tokenizer: {e}"));
    let mut v = serde_json::to_value(pre).map_err(bad)?;
    if !never(&mut v) {
        return Ok(None);
    }
    let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(v).map_err(bad)?;
    let mut out = t.clone();
    out.with_pre_tokenizer(Some(pre));
    Ok(Some(out))
}

/// Lays out `prompt` around the visual tokens at raster indices `visual` (sorted) of an image of `total_visual` tokens.
///
/// Visual token k gets position `image_start + visual[k]`; text after the image continues at
/// `image_start + total_visual`, as if no visual token had been pruned. The prompt is user text: the text of a
/// special token in it (`<|im_end|>`, `</s>`) is tokenised as ordinary characters, never as the control token; the
/// image placeholder is refused.
pub fn layout(tokenizer: &Tokenizer, m: &Manifest, prompt: &str, visual: &[usize], total_visual: usize) -> Result<PromptLayout> {
    if prompt.trim().is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    let image_token = &m.tokenizer.image_token;
    if prompt.contains(image_token.as_str()) {
        return Err(Error::InvalidRequest(format!(
            "the prompt contains the image placeholder {image_token:?}; the runtime inserts it itself"
        )));
    }
    if visual.is_empty() || visual.windows(2).any(|w| w[0] >= w[1]) || visual.last().is_some_and(|&l| l >= total_visual) {
        return Err(Error::InvalidRequest(format!(
            "visual token indices must be non-empty, strictly increasing and below {total_visual}"
        )));
    }
    let template = &m.prompt.template;
    let (before_image, rest) = template.split_once("{image}").ok_or_else(|| Error::Manifest {
        path: m.path(),
        message: "prompt.template has no {image}".into(),
    })?;
    let mut rendered = String::with_capacity(template.len() + image_token.len() * visual.len());
    rendered.push_str(before_image);
    for _ in 0..visual.len() {
        rendered.push_str(image_token);
    }
    rendered.push_str(rest);

    let mut ids: Vec<u32> = Vec::with_capacity(rendered.len() / 2 + prompt.len());
    if m.prompt.add_bos {
        ids.extend(m.tokenizer.bos_token_id);
    }
    let pieces: Vec<&str> = rendered.split("{prompt}").collect();
    ids.extend(encode_rendered(tokenizer, &pieces, prompt, holds_special_text(tokenizer, prompt))?);

    let image_id = m.tokenizer.image_token_id;
    let start = ids.iter().position(|&t| t == image_id).ok_or_else(|| {
        Error::Tokenizer(format!("the tokenizer did not produce the image token id {image_id} for {image_token:?}"))
    })?;
    let span = start..start + visual.len();
    let count = ids.iter().filter(|&&t| t == image_id).count();
    if count != visual.len() || ids.get(span.clone()).is_none_or(|s| s.iter().any(|&t| t != image_id)) {
        return Err(Error::Tokenizer(format!(
            "expected {} contiguous image tokens, the tokenizer produced {count}",
            visual.len()
        )));
    }
    let vocab = m.decoder.vocab_size as u32;
    if let Some(&bad) = ids.iter().find(|&&t| t >= vocab) {
        return Err(Error::Tokenizer(format!("token id {bad} is outside the model vocabulary ({vocab})")));
    }

    let mut positions = Vec::with_capacity(ids.len());
    positions.extend((0..start).map(|i| i as i64));
    positions.extend(visual.iter().map(|&r| (start + r) as i64));
    let n_after = ids.len() - span.end;
    // total_visual comes from the caller: a value near usize::MAX must not wrap into negative position ids.
    let next_position = start
        .checked_add(total_visual)
        .and_then(|a| a.checked_add(n_after))
        .and_then(|n| i64::try_from(n).ok())
        .ok_or_else(|| Error::InvalidRequest(format!("{total_visual} visual positions do not fit in position ids")))?;
    let after = next_position - n_after as i64;
    positions.extend((0..n_after).map(|j| after + j as i64));
    Ok(PromptLayout { ids, positions, image_span: span, next_position })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    /// A SentencePiece-style BPE (byte fallback, `▁` for spaces) with `<unk>`, `<s>`, `</s>`, `<image>`,
    /// `<|im_start|>`, `<|im_end|>` as special added tokens. `legacy`: Llama-2's tokenizer.json (a Prepend("▁") +
    /// Replace normalizer, applied to every stretch, LLaVA-1.5's); otherwise a Metaspace pre-tokenizer that
    /// prepends to the first stretch only (`prepend_scheme: first`, newer Llama / Mistral exports), alone or
    /// (`in_sequence`) inside a Sequence pre-tokenizer.
    fn sentencepiece(legacy: bool, in_sequence: bool) -> Tokenizer {
        let mut vocab = Map::new();
        for t in ["<unk>", "<s>", "</s>"] {
            vocab.insert(t.into(), json!(vocab.len()));
        }
        for b in 0..=255u8 {
            vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
        }
        let mut merges = Vec::new();
        vocab.insert("▁".into(), json!(vocab.len()));
        for c in (b'!'..=b'~').map(char::from) {
            vocab.insert(c.to_string(), json!(vocab.len()));
        }
        for c in ('a'..='z').chain('A'..='Z') {
            vocab.insert(format!("▁{c}"), json!(vocab.len()));
            merges.push(json!(format!("▁ {c}")));
        }
        vocab.insert("▁▁".into(), json!(vocab.len()));
        merges.push(json!("▁ ▁"));
        let added: Vec<_> = ["<unk>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let id = if i < 3 { i } else { vocab.len() + i - 3 };
                json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let (normalizer, pre_tokenizer) = if legacy {
            (
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
                serde_json::Value::Null,
            )
        } else {
            let metaspace = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false});
            let pre = if in_sequence { json!({"type": "Sequence", "pretokenizers": [metaspace]}) } else { metaspace };
            (serde_json::Value::Null, pre)
        };
        let j = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        Tokenizer::from_bytes(j.to_string()).expect("tokenizer")
    }

    fn shipped(name: &str) -> Tokenizer {
        Tokenizer::from_file(format!("{}/models/{name}/tokenizer.json", env!("CARGO_MANIFEST_DIR"))).expect("tokenizer")
    }

    const TEMPLATES: [&str; 4] = [
        "USER: <image><image><image>\n{prompt} ASSISTANT:",
        "<|im_start|>user\n<image><image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        "{prompt}\n<image><image> Ünïcode <image>: {prompt} done",
        "<image>{prompt}<image>",
    ];

    #[test]
    fn user_text_path_equals_the_whole_text_encode_when_there_is_nothing_to_escape() {
        let tokenizers = [
            ("llama-legacy", sentencepiece(true, false)),
            ("metaspace-first", sentencepiece(false, false)),
            ("metaspace-first in a sequence", sentencepiece(false, true)),
            ("demo", shipped("nuwa-demo")),
            ("fixture", shipped("tiny-llava-clip")),
        ];
        let prompts = ["What is this?", " leading space", "trailing space ", "Two  spaces\nand a line", "é世🙂 x", "a"];
        let mut separate_differs = 0;
        for (name, t) in &tokenizers {
            for template in TEMPLATES {
                let pieces: Vec<&str> = template.split("{prompt}").collect();
                for prompt in prompts {
                    let whole = encode_rendered(t, &pieces, prompt, false).expect("whole");
                    let as_text = encode_rendered(t, &pieces, prompt, true).expect("as text");
                    assert_eq!(as_text, whole, "{name}: {template:?} with {prompt:?}");
                    separate_differs += usize::from(encode_separately(t, &pieces, prompt).expect("separately") != whole);
                }
            }
        }
        // What the prompt path did before: the template's pieces and the prompt tokenised apart, which a
        // SentencePiece tokenizer gives each its own "▁" prefix ("▁What" for "What" after "\n").
        assert!(separate_differs > 10, "{separate_differs}");
    }

    #[test]
    fn special_token_text_in_user_text_stays_text_with_every_tokenizer() {
        for (name, t) in [("llama-legacy", sentencepiece(true, false)), ("metaspace-first", sentencepiece(false, true)), ("fixture", shipped("tiny-llava-clip"))] {
            let special: Vec<u32> = t.get_added_tokens_decoder().iter().filter(|(_, a)| a.special).map(|(&id, _)| id).collect();
            let image = t.token_to_id("<image>").expect("image token");
            for template in TEMPLATES {
                let pieces: Vec<&str> = template.split("{prompt}").collect();
                let prompt = "What is </s> this <s>?";
                let ids = encode_rendered(&t, &pieces, prompt, true).expect("as text");
                let whole = encode_rendered(&t, &pieces, prompt, false).expect("whole");
                // The control tokens are the template's own: its image tokens (and chat markers), none from the prompt.
                let controls = |ids: &[u32]| ids.iter().filter(|id| special.contains(id)).count();
                let template_controls = encode_rendered(&t, &pieces, "x", false).map(|ids| controls(&ids)).expect("x");
                assert_eq!(controls(&ids), template_controls, "{name}: {template:?}");
                assert!(controls(&whole) > template_controls, "{name}: the whole-text encode reads </s> as a control token");
                assert_eq!(ids.iter().filter(|&&id| id == image).count(), template.matches("<image>").count());
                let decoded = t.decode(&ids, false).expect("decode");
                assert_eq!(decoded.matches(prompt).count(), pieces.len() - 1, "{name}: {decoded:?}");
            }
        }
    }
}
