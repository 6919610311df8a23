//! Vision tower and projector sessions.

use std::sync::Mutex;

use ndarray::{Array2, ArrayView2, Axis};
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef};

use crate::error::{Error, Result};
use crate::image::PixelBatch;
use crate::manifest::Manifest;
use crate::runtime::{Expect, OpenedSession, Provider, Runtime, SessionOptions};

/// What the vision tower gives one image: pre-projector features and the Stage-1 signals, in raster order.
#[derive(Debug, Clone)]
pub struct VisionTokens {
    /// Pre-projector features `[N, D]` (the configured feature layer, CLS dropped).
    pub features: Array2<f32>,
    /// CLS attention over the patches, summed over heads `[N]`, when the tower has a CLS token.
    pub cls_attention: Option<Vec<f32>>,
    /// Mean of the trailing hidden states `[N, D]`, not normalised.
    pub similarity: Array2<f32>,
    /// Patch rows.
    pub grid_h: usize,
    /// Patch columns.
    pub grid_w: usize,
}

pub(crate) fn ort_err(stage: &'static str) -> impl Fn(ort::Error) -> Error {
    move |e| Error::Session { stage, message: e.to_string() }
}

pub(crate) fn take_f32(outputs: &mut ort::session::SessionOutputs<'_>, stage: &'static str, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let value = outputs
        .remove(name)
        .ok_or_else(|| Error::Session { stage, message: format!("graph returned no output {name:?}") })?;
    let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err(stage))?;
    let dims = shape.iter().map(|&d| d.max(0) as usize).collect();
    Ok((dims, data.to_vec()))
}

pub(crate) fn lock<'a>(session: &'a Mutex<Session>, stage: &'static str) -> Result<std::sync::MutexGuard<'a, Session>> {
    session.lock().map_err(|_| Error::Session { stage, message: "session lock poisoned by an earlier panic".into() })
}

fn to_2d(what: &str, dims: &[usize], data: Vec<f32>, rows: usize, cols: usize) -> Result<Array2<f32>> {
    if dims != [1, rows, cols] {
        return Err(Error::Shape { what: what.into(), message: format!("expected [1, {rows}, {cols}], got {dims:?}") });
    }
    Array2::from_shape_vec((rows, cols), data).map_err(|e| Error::Shape { what: what.into(), message: e.to_string() })
}

/// The vision tower session.
pub struct VisionEncoder {
    session: Mutex<Session>,
    input: String,
    features: String,
    cls_attention: Option<String>,
    similarity: String,
    grid: (usize, usize),
    hidden: usize,
    height: usize,
    width: usize,
    /// Provider running the session.
    pub provider: Provider,
}

impl VisionEncoder {
    const STAGE: &'static str = "vision";

    /// Opens and validates the vision graph named by the manifest.
    pub fn load(rt: &Runtime, m: &Manifest, opts: &SessionOptions, notes: &mut Vec<String>) -> Result<Self> {
        let v = &m.vision;
        let opened: OpenedSession = rt.open(Self::STAGE, &m.file(&v.file), "vision.file", opts)?;
        let n = v.num_tokens() as i64;
        let d = v.hidden_size as i64;
        let mut outputs = vec![
            Expect { name: &v.features_output, field: "vision.hidden_size", ty: TensorElementType::Float32, dims: vec![Some(1), Some(n), Some(d)] },
            Expect { name: &v.similarity_output, field: "vision.hidden_size", ty: TensorElementType::Float32, dims: vec![Some(1), Some(n), Some(d)] },
        ];
        if let Some(cls) = &v.cls_attention_output {
            outputs.push(Expect { name: cls, field: "vision.grid_h/grid_w", ty: TensorElementType::Float32, dims: vec![Some(1), Some(n)] });
        }
        let inputs = [Expect {
            name: &v.input,
            field: "image.height/width",
            ty: TensorElementType::Float32,
            dims: vec![Some(1), Some(3), Some(m.image.height as i64), Some(m.image.width as i64)],
        }];
        opened.validate(&inputs, &outputs)?;
        notes.extend(opened.note);
        Ok(VisionEncoder {
            session: Mutex::new(opened.session),
            input: v.input.clone(),
            features: v.features_output.clone(),
            cls_attention: v.cls_attention_output.clone(),
            similarity: v.similarity_output.clone(),
            grid: (v.grid_h, v.grid_w),
            hidden: v.hidden_size,
            height: m.image.height as usize,
            width: m.image.width as usize,
            provider: opened.provider,
        })
    }

    /// Runs the tower on one preprocessed image.
    pub fn encode(&self, pixels: &PixelBatch) -> Result<VisionTokens> {
        let shape = pixels.pixels.shape();
        if shape != [1, 3, self.height, self.width] {
            return Err(Error::Shape {
                what: "pixel_values".into(),
                message: format!("expected [1, 3, {}, {}], got {shape:?}", self.height, self.width),
            });
        }
        let tensor = TensorRef::from_array_view(pixels.pixels.view()).map_err(ort_err(Self::STAGE))?;
        let mut session = lock(&self.session, Self::STAGE)?;
        let mut out = session
            .run(vec![(self.input.as_str(), SessionInputValue::from(tensor))])
            .map_err(ort_err(Self::STAGE))?;
        let n = self.grid.0 * self.grid.1;
        let (dims, data) = take_f32(&mut out, Self::STAGE, &self.features)?;
        let features = to_2d("vision features", &dims, data, n, self.hidden)?;
        let (dims, data) = take_f32(&mut out, Self::STAGE, &self.similarity)?;
        let similarity = to_2d("vision similarity", &dims, data, n, self.hidden)?;
        let cls_attention = match &self.cls_attention {
            Some(name) => {
                let (dims, data) = take_f32(&mut out, Self::STAGE, name)?;
                if dims != [1, n] {
                    return Err(Error::Shape { what: "cls_attention".into(), message: format!("expected [1, {n}], got {dims:?}") });
                }
                Some(data)
            }
            None => None,
        };
        Ok(VisionTokens { features, cls_attention, similarity, grid_h: self.grid.0, grid_w: self.grid.1 })
    }
}

/// The projector session (vision features -> decoder embeddings).
pub struct Projector {
    session: Mutex<Session>,
    input: String,
    output: String,
    in_dim: usize,
    out_dim: usize,
    /// Provider running the session.
    pub provider: Provider,
}

impl Projector {
    const STAGE: &'static str = "projector";

    /// Opens and validates the projector graph.
    pub fn load(rt: &Runtime, m: &Manifest, opts: &SessionOptions, notes: &mut Vec<String>) -> Result<Self> {
        let p = &m.projector;
        let opened = rt.open(Self::STAGE, &m.file(&p.file), "projector.file", opts)?;
        let din = m.vision.hidden_size as i64;
        let dout = m.decoder.hidden_size as i64;
        opened.validate(
            &[Expect { name: &p.input, field: "vision.hidden_size", ty: TensorElementType::Float32, dims: vec![Some(1), None, Some(din)] }],
            &[Expect { name: &p.output, field: "decoder.hidden_size", ty: TensorElementType::Float32, dims: vec![Some(1), None, Some(dout)] }],
        )?;
        notes.extend(opened.note);
        Ok(Projector {
            session: Mutex::new(opened.session),
            input: p.input.clone(),
            output: p.output.clone(),
            in_dim: m.vision.hidden_size,
            out_dim: m.decoder.hidden_size,
            provider: opened.provider,
        })
    }

    /// Projects `[M, vision hidden]` tokens to `[M, decoder hidden]` embeddings.
    pub fn project(&self, tokens: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        if tokens.ncols() != self.in_dim {
            return Err(Error::Shape { what: "projector input".into(), message: format!("{} columns, expected {}", tokens.ncols(), self.in_dim) });
        }
        let m = tokens.nrows();
        let batch = tokens.insert_axis(Axis(0));
        let batch = batch.as_standard_layout();
        let tensor = TensorRef::from_array_view(batch.view()).map_err(ort_err(Self::STAGE))?;
        let mut session = lock(&self.session, Self::STAGE)?;
        let mut out = session
            .run(vec![(self.input.as_str(), SessionInputValue::from(tensor))])
            .map_err(ort_err(Self::STAGE))?;
        let (dims, data) = take_f32(&mut out, Self::STAGE, &self.output)?;
        to_2d("projector output", &dims, data, m, self.out_dim)
    }
}
