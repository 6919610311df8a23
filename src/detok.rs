//! UTF-8-safe streaming detokenisation.
//!
//! Byte-level BPE tokens can split a multi-byte character; decoding token by token would emit U+FFFD. The
//! [`StreamDecoder`] keeps two offsets into the generated ids (the prefix/read-offset technique of Hugging Face
//! text-generation-inference): it decodes `ids[prefix..]` and `ids[prefix..read]` and emits the difference only
//! once the new text no longer ends in U+FFFD. Decoding a short window that starts a few tokens back keeps
//! context-dependent decoders (leading-space stripping, byte fallback) consistent with a full decode, so the
//! concatenation of every emitted piece plus [`StreamDecoder::finish`] equals `tokenizer.decode(ids, true)`.
//! Special tokens, which that decode skips, never enter the window: a run of them (a model looping on a control
//! token) costs the same per token as any other, instead of re-decoding a window that grows with each. Nor does a
//! run of text that keeps ending in a real U+FFFD hold the window open: after a few ids it is emitted up to a cut
//! that cannot split a character.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

const REPLACEMENT: char = '\u{FFFD}';

/// Ids pushed since the last piece after which text that still ends in U+FFFD is emitted up to a safe cut: a model
/// that keeps producing a real U+FFFD (the character itself, or bytes that are not UTF-8) would otherwise hold
/// every later piece back and re-decode a window that grows with each id.
const MAX_PENDING: usize = 8;

/// Turns generated token ids into text pieces as soon as they are complete UTF-8.
#[derive(Clone)]
pub struct StreamDecoder {
    tokenizer: Arc<Tokenizer>,
    /// Every id pushed.
    ids: Vec<u32>,
    /// The ids that decode to text (all but skipped special tokens); the offsets index into it.
    window: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("ids", &self.ids)
            .field("prefix_offset", &self.prefix_offset)
            .field("read_offset", &self.read_offset)
            .finish_non_exhaustive()
    }
}

impl StreamDecoder {
    /// A decoder that skips special tokens (as the final `decode(ids, true)` does).
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        StreamDecoder { tokenizer, ids: Vec::new(), window: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens: true }
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Forgets all pushed ids, to reuse the decoder for a new generation.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.window.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding ids {ids:?}: {e}")))
    }

    /// Adds one id; returns the text it completes, or `None` while a character is still incomplete or the id
    /// decodes to nothing: a special token, or an id the tokenizer lacks (a model's vocabulary is often padded
    /// past its tokenizer's, and its sampler can pick such a row), which the full decode skips too.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let silent = match self.tokenizer.id_to_token(id) {
            None => true,
            Some(token) => self.skip_special_tokens && self.tokenizer.get_added_vocabulary().is_special_token(&token),
        };
        if silent {
            return Ok(None);
        }
        self.window.push(id);
        let prefix_text = self.decode(&self.window[self.prefix_offset..self.read_offset])?;
        let new_text = self.decode(&self.window[self.prefix_offset..])?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with(REPLACEMENT) {
            if let Some(piece) = new_text.strip_prefix(prefix_text.as_str()) {
                let piece = piece.to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.window.len();
                return Ok(Some(piece));
            }
            // The window's text was rewritten by the decoder (rare); wait for more context or `finish`.
        }
        if self.window.len() - self.read_offset > MAX_PENDING {
            return self.emit_settled(&prefix_text, &new_text);
        }
        Ok(None)
    }

    /// Emits the pending text up to the latest cut that cannot split a character, when the text keeps ending in
    /// U+FFFD. A character has at most 4 bytes and every id in the window decodes to at least one, so a character
    /// still incomplete at the end of the window began in its last 3 ids. A cut before those whose text is a prefix
    /// of the whole window's text therefore ends on a character boundary: a character that straddled it would be
    /// complete in the whole text and a U+FFFD in the cut's. The pieces still concatenate to the full decode.
    /// Of any 4 consecutive cuts at most 3 fall inside one character, so 4 are tried: a constant cost per id even
    /// where none qualifies (a decoder that rewrote the window's text).
    fn emit_settled(&mut self, prefix_text: &str, new_text: &str) -> Result<Option<String>> {
        for cut in (self.read_offset + 1..=self.window.len() - 3).rev().take(4) {
            let text = self.decode(&self.window[self.prefix_offset..cut])?;
            if text.len() > prefix_text.len() && new_text.starts_with(text.as_str()) {
                if let Some(piece) = text.strip_prefix(prefix_text) {
                    let piece = piece.to_owned();
                    self.prefix_offset = self.read_offset;
                    self.read_offset = cut;
                    return Ok(Some(piece));
                }
            }
        }
        Ok(None)
    }

    /// Flushes whatever is pending (an incomplete character comes out as U+FFFD, as in a full decode).
    pub fn finish(&mut self) -> Result<String> {
        let prefix_text = self.decode(&self.window[self.prefix_offset..self.read_offset])?;
        let new_text = self.decode(&self.window[self.prefix_offset..])?;
        self.prefix_offset = self.window.len();
        self.read_offset = self.window.len();
        let piece = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_owned(),
            None => {
                // Emit from the end of the longest common prefix, at a character boundary.
                let common = new_text
                    .char_indices()
                    .zip(prefix_text.chars())
                    .find(|((_, a), b)| a != b)
                    .map(|((i, _), _)| i)
                    .unwrap_or(new_text.len().min(prefix_text.len()));
                new_text.get(common..).unwrap_or_default().to_owned()
            }
        };
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    /// GPT-2's byte -> printable char map used by ByteLevel BPE.
    fn byte_chars() -> Vec<char> {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut n = 0;
        (0u32..256)
            .map(|b| {
                if printable.contains(&b) {
                    char::from_u32(b).unwrap()
                } else {
                    n += 1;
                    char::from_u32(255 + n).unwrap()
                }
            })
            .collect()
    }

    /// A ByteLevel BPE with the 256 byte tokens, a few merges that split characters across tokens, and `</s>`.
    fn tokenizer() -> Arc<Tokenizer> {
        let chars = byte_chars();
        let mut vocab = Map::new();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let tok = |bytes: &[u8]| bytes.iter().map(|&b| chars[b as usize]).collect::<String>();
        // 世 = E4 B8 96, 界 = E7 95 8C, 🙂 = F0 9F 99 82, é = C3 A9.
        let pairs: [(&[u8], &[u8]); 4] =
            [(&[0xE4], &[0xB8]), (&[0x96], &[0xE7]), (&[0x9F], &[0x99]), (b"h", &[0xC3])];
        let mut merges = Vec::new();
        for (a, b) in pairs {
            let (a, b) = (tok(a), tok(b));
            vocab.insert(format!("{a}{b}"), json!(vocab.len()));
            merges.push(Value::String(format!("{a} {b}")));
        }
        let eos = vocab.len();
        let j = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": eos, "content": "</s>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        Arc::new(Tokenizer::from_bytes(j.to_string()).unwrap())
    }

    fn encode(t: &Tokenizer, text: &str) -> Vec<u32> {
        t.encode(text, false).unwrap().get_ids().to_vec()
    }

    fn stream(t: &Arc<Tokenizer>, ids: &[u32]) -> (Vec<String>, String) {
        let mut d = StreamDecoder::new(t.clone());
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(p) = d.push(id).unwrap() {
                pieces.push(p);
            }
        }
        let rest = d.finish().unwrap();
        (pieces, rest)
    }

    #[test]
    fn streams_multibyte_text_without_replacement_chars() {
        let t = tokenizer();
        let text = "héllo 世界 🙂 done";
        let ids = encode(&t, text);
        // Byte tokens plus merges that straddle characters: more ids than chars.
        assert!(ids.len() > text.chars().count());
        assert!(ids.contains(&259)); // "h" + first byte of é
        let (pieces, rest) = stream(&t, &ids);
        for p in &pieces {
            assert!(!p.contains(REPLACEMENT), "{p:?}");
            assert!(!p.is_empty());
        }
        assert_eq!(rest, "");
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces.concat(), t.decode(&ids, true).unwrap());
        // Pieces come out as soon as characters complete: "世" is held back until its last byte arrives.
        assert!(pieces.iter().any(|p| p.contains('🙂')));
    }

    #[test]
    fn special_tokens_are_skipped() {
        let t = tokenizer();
        let mut ids = encode(&t, "a世");
        ids.push(260); // </s>
        ids.extend(encode(&t, " b"));
        let (pieces, rest) = stream(&t, &ids);
        assert_eq!(pieces.concat() + &rest, "a世 b");
        assert_eq!(pieces.concat() + &rest, t.decode(&ids, true).unwrap());
    }

    #[test]
    fn finish_flushes_an_incomplete_character() {
        let t = tokenizer();
        let ids = [u32::from(b'x'), 0xF0, 0x9F];
        let mut d = StreamDecoder::new(t.clone());
        assert_eq!(d.push(ids[0]).unwrap().as_deref(), Some("x"));
        assert_eq!(d.push(ids[1]).unwrap(), None);
        assert_eq!(d.push(ids[2]).unwrap(), None);
        let rest = d.finish().unwrap();
        assert_eq!(format!("x{rest}"), t.decode(&ids, true).unwrap());
        assert!(rest.contains(REPLACEMENT));
        d.reset();
        assert!(d.ids().is_empty());
        assert_eq!(d.push(u32::from(b'y')).unwrap().as_deref(), Some("y"));
    }

    #[test]
    fn special_and_unknown_ids_stay_out_of_the_window() {
        let t = tokenizer();
        let eos = 260;
        let mut d = StreamDecoder::new(t.clone());
        assert_eq!(d.push(u32::from(b'a')).unwrap().as_deref(), Some("a"));
        // Before, each of these re-decoded a window that grew by one: quadratic in the run's length.
        for _ in 0..1000 {
            assert_eq!(d.push(eos).unwrap(), None);
        }
        assert_eq!(d.window.len(), 1, "only the text id");
        assert_eq!(d.ids().len(), 1001);
        assert_eq!(d.push(u32::from(b'b')).unwrap().as_deref(), Some("b"));
        assert_eq!(d.finish().unwrap(), "");
        // An id the tokenizer lacks (a padded vocabulary row, or any u32 from a C caller) decodes to nothing, as in
        // the full decode, and does not grow the window either.
        for unknown in [261, u32::MAX] {
            assert_eq!(d.push(unknown).unwrap(), None);
        }
        assert_eq!(d.window.len(), 2);
        assert_eq!(d.push(u32::from(b'c')).unwrap().as_deref(), Some("c"));
        assert_eq!(d.ids().len(), 1005);
        assert_eq!(t.decode(d.ids(), true).unwrap(), "abc");
    }

    #[test]
    fn a_run_of_real_replacement_characters_streams_in_bounded_windows() {
        let t = tokenizer();
        let fffd = [0xEFu32, 0xBF, 0xBD];
        let mut ids = encode(&t, "a");
        let mut d = StreamDecoder::new(t.clone());
        let mut pieces: Vec<String> = d.push(ids[0]).unwrap().into_iter().collect();
        // Before, nothing came out after "a" and each id re-decoded the whole run: quadratic in its length.
        for _ in 0..1000 {
            for id in fffd {
                ids.push(id);
                pieces.extend(d.push(id).unwrap());
                assert!(d.window.len() - d.prefix_offset <= 2 * MAX_PENDING + 4, "window {}", d.window.len() - d.prefix_offset);
            }
        }
        assert!(pieces.len() > 300, "{} pieces", pieces.len());
        // Bytes that are not UTF-8 (a lone continuation byte, a lead byte cut off by ASCII) are real U+FFFDs too.
        for id in [0x80, 0x80, 0xE2, u32::from(b'b'), 0xF0, 0x9F, 0x99, 0x82] {
            ids.push(id);
            pieces.extend(d.push(id).unwrap());
        }
        let rest = d.finish().unwrap();
        let full = t.decode(&ids, true).unwrap();
        assert_eq!(pieces.concat() + &rest, full);
        assert!(full.starts_with('a') && full.ends_with("b🙂") && full.chars().filter(|&c| c == REPLACEMENT).count() == 1003);
    }

    proptest! {
        /// Any byte sequence, valid UTF-8 or not (the model picks tokens, not characters).
        #[test]
        fn arbitrary_bytes_stream_as_the_full_decode(bytes in proptest::collection::vec(
            prop_oneof![any::<u8>(), Just(0xEFu8), Just(0xBF), Just(0xBD), 0x80u8..0xC0, 0xC2u8..0xF5], 0..48)) {
            let t = tokenizer();
            let ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
            let (pieces, rest) = stream(&t, &ids);
            prop_assert_eq!(pieces.concat() + &rest, t.decode(&ids, true).unwrap());
        }

        #[test]
        fn special_ids_anywhere_stream_as_the_full_decode(text in "[a-z世界🙂 ]{0,12}", at in proptest::collection::vec(0usize..16, 0..4)) {
            let t = tokenizer();
            let mut ids = encode(&t, &text);
            for &i in &at {
                ids.insert(i.min(ids.len()), 260);
            }
            let (pieces, rest) = stream(&t, &ids);
            prop_assert_eq!(pieces.concat() + &rest, t.decode(&ids, true).unwrap());
        }

        #[test]
        fn concatenation_equals_full_decode(chars in proptest::collection::vec(any::<char>(), 0..24)) {
            let t = tokenizer();
            let text: String = chars.into_iter().collect();
            let ids = encode(&t, &text);
            let (pieces, rest) = stream(&t, &ids);
            for p in &pieces {
                prop_assert!(!p.ends_with(REPLACEMENT) || text.contains(REPLACEMENT));
            }
            let full = t.decode(&ids, true).unwrap();
            prop_assert_eq!(pieces.concat() + &rest, full.clone());
            prop_assert_eq!(full, text);
        }
    }
}
