//! Ask several questions about one image with the library's pull-style API: the image is encoded once
//! ([`Model::prepare`]) and each question is a [`Generation`] pulled token by token.
//!
//! `cargo run --release --example ask -- models/tiny-llava-clip examples/coco-000000000139.jpg "Describe the image."`

use std::io::Write;

use anyhow::Context;
use nuwa::image::ImageLimits;
use nuwa::pipeline::{GenerationParams, ImageInput, LoadOptions, Model, Step};
use nuwa::prune::{Amount, Method, PruneConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model_dir), Some(image)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: ask MODEL_DIR IMAGE [PROMPT ...]");
    };
    let mut prompts: Vec<String> = args.collect();
    if prompts.is_empty() {
        prompts = vec!["Describe the image.".into(), "Is there a person in the image?".into()];
    }
    let model = Model::load(&model_dir, &LoadOptions::default()).context("loading the model")?;
    let prepared = model.prepare(&ImageInput::Path(image.into()), &ImageLimits::default())?;
    let params = GenerationParams {
        max_new_tokens: 24,
        prune: PruneConfig { method: Method::Nuwa, amount: Amount::Budget(64), ..PruneConfig::default() },
        ..GenerationParams::default()
    };
    let stdout = std::io::stdout();
    for prompt in &prompts {
        let mut generation = model.generate_prepared(&prepared, prompt, &params)?;
        let mut out = stdout.lock();
        write!(out, "Q: {prompt}\nA: ")?;
        loop {
            match generation.step()? {
                Step::Token { text, .. } => write!(out, "{text}")?,
                Step::Finished { text, reason } => {
                    writeln!(out, "{text}  [{reason:?}]")?;
                    break;
                }
            }
            out.flush()?;
        }
        let o = generation.output();
        writeln!(
            out,
            "   visual tokens {} -> {} -> {}, ttft {:.1} ms, boxes {:?}",
            o.stats.visual_tokens_in, o.stats.visual_tokens_after_stage1, o.stats.visual_tokens_after_stage2, o.stats.ttft_ms, o.boxes
        )?;
    }
    Ok(())
}
