//! The decoder split at layer K: a head graph (layers [0, K) plus the Stage-2 signal) and a tail graph
//! (layers [K, N), final norm, last-position logits), each with its own in-place KV cache. A tail may instead end at
//! the final norm (manifest `decoder.tail.final_hidden`): then the tied lm_head is the embedding table, applied here.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayView2, Axis};
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef};

use crate::embeddings::Embeddings;
use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::manifest::{layer_name, Manifest};
use crate::runtime::{Expect, Provider, Runtime, SessionOptions};
use crate::vision::{lock, ort_err, take_f32};

/// Which segment of the decoder a graph is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Layers from 0; outputs hidden states and the attention row of its last layer.
    Head,
    /// Middle segment `i` (manifest `decoder.middle[i]`); like the head, from a later layer.
    Middle(usize),
    /// Layers [K, N) with the final norm and lm_head (in the graph or the embedding table); last-position logits.
    Tail,
}

/// What one run of a decoder half produced (its new keys and values are already in the cache).
#[derive(Debug, Clone)]
pub enum HalfOutput {
    /// Head: hidden states `[S, hidden]` and the head-mean attention row of the last query over all `P + S` positions.
    Head {
        /// Hidden states after layer K-1.
        hidden: Array2<f32>,
        /// Stage-2 signal.
        attention_row: Vec<f32>,
    },
    /// Tail: logits of the last position.
    Tail {
        /// `[vocab]` logits.
        logits: Vec<f32>,
    },
}

/// One half of the split decoder.
pub struct DecoderHalf {
    half: Half,
    session: Mutex<Session>,
    input: String,
    positions: String,
    past_keys: Vec<String>,
    past_values: Vec<String>,
    new_keys: Vec<String>,
    new_values: Vec<String>,
    output: String,
    attention_row: Option<String>,
    layers: std::ops::Range<usize>,
    hidden: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    /// The tied lm_head when the tail graph outputs its final hidden state (`decoder.tail.final_hidden`).
    lm_head: Option<Arc<Embeddings>>,
    /// Threads sharing the table lm_head with the caller (the session's intra-op thread count in all).
    lm_head_workers: Option<rayon::ThreadPool>,
    /// Provider running the session.
    pub provider: Provider,
}

impl DecoderHalf {
    fn stage(half: Half) -> &'static str {
        match half {
            Half::Head => "decoder head",
            Half::Middle(_) => "decoder middle",
            Half::Tail => "decoder tail",
        }
    }

    /// Opens and validates one half of the decoder named by the manifest. `table` is the model's embedding table:
    /// the tail applies it as lm_head when its graph outputs `final_hidden` instead of `logits`.
    pub fn load(rt: &Runtime, m: &Manifest, half: Half, table: &Arc<Embeddings>, opts: &SessionOptions, notes: &mut Vec<String>) -> Result<Self> {
        let d = &m.decoder;
        let stage = Self::stage(half);
        let (file, field, input, positions, pk, pv, nk, nv, output, row, layers) = match half {
            Half::Head => {
                let h = &d.head;
                (&h.file, "decoder.head.file", &h.inputs_embeds, &h.position_ids, &h.past_key, &h.past_value, &h.new_key, &h.new_value, &h.hidden_states, Some(&h.attention_row), 0..d.head_end())
            }
            Half::Middle(i) => {
                let s = d.middle.get(i).ok_or_else(|| Error::Manifest { path: m.path(), message: format!("decoder.middle[{i}] does not exist") })?;
                (&s.file, "decoder.middle[].file", &s.hidden_states, &s.position_ids, &s.past_key, &s.past_value, &s.new_key, &s.new_value, &s.output, Some(&s.attention_row), s.first_layer..s.last_layer)
            }
            Half::Tail => {
                let t = &d.tail;
                let output = t.logits.as_ref().or(t.final_hidden.as_ref()).ok_or_else(|| Error::Manifest {
                    path: m.path(),
                    message: "decoder.tail names neither `logits` nor `final_hidden`".into(),
                })?;
                (&t.file, "decoder.tail.file", &t.hidden_states, &t.position_ids, &t.past_key, &t.past_value, &t.new_key, &t.new_value, output, None, d.split_layer..d.num_layers)
            }
        };
        let opened = rt.open(stage, &m.file(file), field, opts)?;
        // Before any per-layer name is built: the graph's input count bounds the layers the manifest may claim.
        let expected_inputs = 2 + 2 * layers.len();
        if opened.session.inputs().len() != expected_inputs {
            return Err(Error::Manifest {
                path: opened.path.clone(),
                message: format!(
                    "{stage} graph has {} inputs but layers {:?} of the manifest account for {expected_inputs}: wrong decoder.split_layer or num_layers?",
                    opened.session.inputs().len(),
                    layers
                ),
            });
        }
        let names = |t: &str| layers.clone().map(|l| layer_name(t, l)).collect::<Vec<_>>();
        let (past_keys, past_values, new_keys, new_values) = (names(pk), names(pv), names(nk), names(nv));
        let h = Some(d.hidden_size as i64);
        let kvh = Some(d.num_key_value_heads as i64);
        let hd = Some(d.head_dim as i64);
        let f32t = TensorElementType::Float32;
        let mut inputs = vec![
            Expect { name: input, field: "decoder.hidden_size", ty: f32t, dims: vec![Some(1), None, h] },
            Expect { name: positions, field: "decoder position_ids", ty: TensorElementType::Int64, dims: vec![Some(1), None] },
        ];
        let mut outputs = vec![match half {
            Half::Head | Half::Middle(_) => Expect { name: output, field: "decoder.hidden_size", ty: f32t, dims: vec![Some(1), None, h] },
            Half::Tail if d.tail.final_hidden.is_some() => {
                Expect { name: output, field: "decoder.tail.final_hidden (decoder.hidden_size)", ty: f32t, dims: vec![Some(1), h] }
            }
            Half::Tail => Expect { name: output, field: "decoder.vocab_size", ty: f32t, dims: vec![Some(1), Some(d.vocab_size as i64)] },
        }];
        for names in [&past_keys, &past_values] {
            for n in names {
                inputs.push(Expect { name: n, field: "decoder.num_key_value_heads/head_dim", ty: f32t, dims: vec![Some(1), None, kvh, hd] });
            }
        }
        for names in [&new_keys, &new_values] {
            for n in names {
                outputs.push(Expect { name: n, field: "decoder.num_key_value_heads/head_dim", ty: f32t, dims: vec![Some(1), None, kvh, hd] });
            }
        }
        if let Some(r) = row {
            outputs.push(Expect { name: r, field: "decoder.head.attention_row", ty: f32t, dims: vec![Some(1), None] });
        }
        opened.validate(&inputs, &outputs)?;
        // The table's shape matches the vocabulary and width: Manifest::validate checks embeddings.rows/cols against
        // decoder.vocab_size/hidden_size, and Embeddings::open maps exactly that shape.
        let lm_head = match half {
            Half::Tail if d.tail.final_hidden.is_some() => Some(Arc::clone(table)),
            _ => None,
        };
        let lm_head_workers = match &lm_head {
            Some(_) => crate::embeddings::lm_head_workers(opts.intra_threads.filter(|&n| n > 0).unwrap_or_else(|| rt.threads()), d.vocab_size)?,
            None => None,
        };
        notes.extend(opened.note);
        Ok(DecoderHalf {
            half,
            session: Mutex::new(opened.session),
            input: input.clone(),
            positions: positions.clone(),
            past_keys,
            past_values,
            new_keys,
            new_values,
            output: output.clone(),
            attention_row: row.cloned(),
            layers,
            hidden: d.hidden_size,
            kv_heads: d.num_key_value_heads,
            head_dim: d.head_dim,
            vocab: d.vocab_size,
            lm_head,
            lm_head_workers,
            provider: opened.provider,
        })
    }

    /// The global layer range this half runs.
    pub fn layers(&self) -> std::ops::Range<usize> {
        self.layers.clone()
    }

    /// An empty cache for this half's layers with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(self.layers.start, self.layers.len(), self.kv_heads, self.head_dim, capacity)
    }

    /// Runs `input` (`[S, hidden]`: embeddings for the head, hidden states for the tail) at `positions`,
    /// attending to everything in `cache`, and appends the new keys and values to `cache`.
    pub fn run(&self, input: ArrayView2<'_, f32>, positions: &[i64], cache: &mut KvCache) -> Result<HalfOutput> {
        let stage = Self::stage(self.half);
        let s = input.nrows();
        if s == 0 || input.ncols() != self.hidden || positions.len() != s {
            return Err(Error::Shape {
                what: format!("{stage} input"),
                message: format!("[{s}, {}] with {} positions; hidden size is {}", input.ncols(), positions.len(), self.hidden),
            });
        }
        if cache.first_layer() != self.layers.start || cache.num_layers() != self.layers.len() {
            return Err(Error::Shape { what: format!("{stage} cache"), message: "cache belongs to other layers".into() });
        }
        let batch = input.insert_axis(Axis(0));
        let batch = batch.as_standard_layout();
        let err = ort_err(stage);
        let mut feeds: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(2 + 2 * self.layers.len());
        feeds.push((Cow::Borrowed(self.input.as_str()), TensorRef::from_array_view(batch.view()).map_err(&err)?.into()));
        feeds.push((Cow::Borrowed(self.positions.as_str()), TensorRef::from_array_view(([1usize, s], positions)).map_err(&err)?.into()));
        let shape = cache.past_shape();
        for i in 0..self.layers.len() {
            let (k, v) = cache.past(i);
            feeds.push((Cow::Borrowed(self.past_keys[i].as_str()), TensorRef::from_array_view((shape, k)).map_err(&err)?.into()));
            feeds.push((Cow::Borrowed(self.past_values[i].as_str()), TensorRef::from_array_view((shape, v)).map_err(&err)?.into()));
        }
        let mut session = lock(&self.session, stage)?;
        let mut out = session.run(feeds).map_err(&err)?;

        let expect_kv = [1, s, self.kv_heads, self.head_dim];
        let mut new_k = Vec::with_capacity(self.layers.len());
        let mut new_v = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            for (names, dst) in [(&self.new_keys, &mut new_k), (&self.new_values, &mut new_v)] {
                let value = out.get(&names[i]).ok_or_else(|| Error::Session { stage, message: format!("graph returned no output {:?}", names[i]) })?;
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(&err)?;
                let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
                if dims != expect_kv {
                    return Err(Error::Shape { what: names[i].clone(), message: format!("expected {expect_kv:?}, got {dims:?}") });
                }
                dst.push(data);
            }
        }
        let past_len = cache.len();
        cache.append(s, &new_k, &new_v)?;
        drop(new_k);
        drop(new_v);

        let (dims, data) = take_f32(&mut out, stage, &self.output)?;
        match self.half {
            Half::Head | Half::Middle(_) => {
                if dims != [1, s, self.hidden] {
                    return Err(Error::Shape { what: self.output.clone(), message: format!("expected [1, {s}, {}], got {dims:?}", self.hidden) });
                }
                let hidden = Array2::from_shape_vec((s, self.hidden), data).map_err(|e| Error::Shape { what: self.output.clone(), message: e.to_string() })?;
                let row_name = self.attention_row.as_deref().unwrap_or_default();
                let (rdims, attention_row) = take_f32(&mut out, stage, row_name)?;
                if rdims != [1, past_len + s] {
                    return Err(Error::Shape { what: row_name.into(), message: format!("expected [1, {}], got {rdims:?}", past_len + s) });
                }
                Ok(HalfOutput::Head { hidden, attention_row })
            }
            Half::Tail => match &self.lm_head {
                Some(table) => {
                    if dims != [1, self.hidden] {
                        return Err(Error::Shape { what: self.output.clone(), message: format!("expected [1, {}], got {dims:?}", self.hidden) });
                    }
                    let mut logits = vec![0.0f32; self.vocab];
                    table.logits_into(&data, &mut logits, self.lm_head_workers.as_ref())?;
                    Ok(HalfOutput::Tail { logits })
                }
                None => {
                    if dims != [1, self.vocab] {
                        return Err(Error::Shape { what: self.output.clone(), message: format!("expected [1, {}], got {dims:?}", self.vocab) });
                    }
                    Ok(HalfOutput::Tail { logits: data })
                }
            },
        }
    }
}
