//! Prompt layout: the chat template rendered with one placeholder per kept visual token, tokenised whole, and the
//! position id of every token under the "nothing was pruned" convention.

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

    let encode = |t: &Tokenizer, text: &str| -> Result<Vec<u32>> {
        Ok(t.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
    };
    let mut ids: Vec<u32> = Vec::with_capacity(rendered.len() / 2 + prompt.len());
    if m.prompt.add_bos {
        ids.extend(m.tokenizer.bos_token_id);
    }
    if holds_special_text(tokenizer, prompt) {
        // User text must not produce control tokens ("<|im_end|>" typed into a prompt would end the turn): the
        // template's pieces are tokenised as usual and the prompt as plain text between them.
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let prompt_ids = encode(&plain, prompt)?;
        for (i, piece) in rendered.split("{prompt}").enumerate() {
            if i > 0 {
                ids.extend_from_slice(&prompt_ids);
            }
            ids.extend(encode(tokenizer, piece)?);
        }
    } else {
        // The common case, tokenised whole exactly as the reference processor does.
        ids.extend(encode(tokenizer, &rendered.replace("{prompt}", prompt))?);
    }

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
