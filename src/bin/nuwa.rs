//! `nuwa`: run, inspect and benchmark exported VLMs from the command line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nuwa::pipeline::{GenerationParams, ImageInput, LoadOptions, Model, Request};
use nuwa::prune::{Amount, Method, PositionPolicy, PruneConfig, Stage2Select};
use nuwa::runtime::{Provider, Runtime};
use nuwa::sampler::SamplerConfig;

/// `eprintln!` that never panics: a closed or full stderr (`nuwa ... 2>&1 | head`) loses the message, not the run,
/// whose result goes to stdout and the exit status.
macro_rules! errln {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(name = "nuwa", version, about = "On-device VLM inference with Nüwa visual token pruning", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about an image, streaming text to stdout.
    Run(RunArgs),
    /// Print the model's manifest summary and the available execution providers.
    Info(InfoArgs),
    /// Measure per-token decode time at several context lengths.
    Bench(BenchArgs),
    /// Grounding and VQA accuracy on a JSONL data set, for one pruning setting or a sweep of methods and budgets.
    Eval(EvalArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (holds manifest.json).
    #[arg(long)]
    model: PathBuf,
    /// Execution provider: cpu, cuda or coreml (falls back to CPU, saying so).
    #[arg(long, default_value = "cpu")]
    provider: Provider,
    /// Intra-op threads per session (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// ONNX Runtime library to load (default: ORT_DYLIB_PATH, then beside the binary, then third_party/onnxruntime).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Use the unquantised vision graph.
    #[arg(long)]
    vision_fp32: bool,
}

impl ModelArgs {
    fn load(&self) -> Result<std::sync::Arc<Model>> {
        let opts = LoadOptions {
            provider: self.provider,
            intra_threads: self.threads,
            ort_library: self.ort_lib.clone(),
            vision_fp32: self.vision_fp32,
        };
        let model = Model::load(&self.model, &opts).with_context(|| format!("loading model {}", self.model.display()))?;
        for note in model.provider_notes() {
            errln!("nuwa: {note}");
        }
        Ok(model)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// The question or instruction.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Print one JSON object (text, boxes, tokens, stats) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Sampling temperature (default: greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens when sampling (needs --temperature; greedy decoding has no sampling).
    #[arg(long, requires = "temperature")]
    top_k: Option<u32>,
    /// Nucleus sampling threshold (needs --temperature).
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    top_p: f32,
    /// Sampling seed (also seeds `--prune random`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    prune: PruneArgs,
    /// Write every intermediate tensor of the request as .npy files with an index.json into this directory.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Write the image with the kept tokens (yellow: pillars, cyan: aggregated, green: kept by a plain selection,
    /// white frame: kept by Stage 2) and predicted boxes (red) drawn on it.
    #[arg(long)]
    viz: Option<PathBuf>,
}

#[derive(Args)]
struct PruneArgs {
    /// Pruning method: none, nuwa, fastv, visionzip, divprune, dart, pool, random.
    #[arg(long, default_value = "none")]
    prune: Method,
    /// Budget in average visual tokens per layer: 64, 128 or 192 (LLaVA-1.5 presets, scaled to the model's grid), or
    /// the full token count for no pruning.
    #[arg(long, conflicts_with_all = ["keep1", "keep2"])]
    budget: Option<usize>,
    /// Visual tokens kept by Stage 1 (or by a Stage-1-only method).
    #[arg(long, requires = "keep2")]
    keep1: Option<usize>,
    /// Visual tokens kept by Stage 2 (or by FastV).
    #[arg(long, requires = "keep1")]
    keep2: Option<usize>,
    /// Position ids of kept tokens: original (default) or contiguous (VisionZip's default).
    #[arg(long)]
    positions: Option<PositionPolicy>,
    /// Ablation of Nüwa's Stage 1: the pillar quantile (published 0.55; 0: every anchor a pillar, no aggregation).
    #[arg(long)]
    pillar_quantile: Option<f64>,
    /// Ablation of VisionZip: contextual tokens within the budget (published: 10 per 64; 0: dominant tokens only).
    #[arg(long)]
    visionzip_contextual: Option<usize>,
    /// Ablation of Nüwa's Stage 1: no region separation (the anchors are the global top-K by CLS attention).
    #[arg(long)]
    no_region_separation: bool,
    /// Ablation of Nüwa's Stage 2: attention (published) or random (a draw seeded by --seed).
    #[arg(long)]
    stage2_select: Option<Stage2Select>,
}

impl PruneArgs {
    fn config(&self, seed: u64) -> PruneConfig {
        let amount = match (self.budget, self.keep1, self.keep2) {
            (Some(b), _, _) => Amount::Budget(b),
            (None, Some(keep1), Some(keep2)) => Amount::Keep { keep1, keep2 },
            _ => Amount::All,
        };
        PruneConfig {
            method: self.prune,
            amount,
            positions: self.positions,
            seed,
            pillar_quantile: self.pillar_quantile,
            contextual: self.visionzip_contextual,
            regions: self.no_region_separation.then_some(false),
            // The published ranking is the default, stored as such (one setting, one label).
            stage2_select: self.stage2_select.filter(|s| *s == Stage2Select::Random),
        }
    }
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context lengths to measure at (default: 64 and 1024, or the longest the model allows with --steps).
    #[arg(long, value_delimiter = ',')]
    contexts: Option<Vec<usize>>,
    /// Timed decode steps per context.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSON Lines data: {"image", "kind": "grounding", "prompt", "bbox": [x1, y1, x2, y2]} or {"image", "kind": "vqa",
    /// "prompt", "answer"}; image paths relative to the file.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    prune: PruneArgs,
    /// Run several settings in one process: "METHOD:B1,B2;METHOD:B;none;..." (a method without budgets gets
    /// 64,128,192). Without a value: every method at 64,128,192 plus none. The none run is always included.
    #[arg(long, num_args = 0..=1, default_missing_value = "default", conflicts_with_all = ["prune", "budget", "keep1", "keep2", "pillar_quantile", "visionzip_contextual", "no_region_separation", "stage2_select"])]
    sweep: Option<String>,
    /// Write the table to OUT.md and OUT.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the first N non-blank lines of the data.
    #[arg(long)]
    limit: Option<usize>,
    /// Most tokens generated per item (greedy decoding).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Seed of `random` pruning.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON (one run: its summary; a sweep: the table).
    #[arg(long)]
    json: bool,
    /// Write every item's answer and verdict to this JSON Lines file, one line per item and setting (with its `run`
    /// label) as it is scored, so a stopped sweep keeps what it did.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Continue a stopped run of the same command: the items already in the --predictions file are kept and not
    /// run again, and new ones are appended (without the file, it starts from the beginning).
    #[arg(long, requires = "predictions")]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `println!` that never panics: a closed stdout (`nuwa ... | head`) ends the process quietly, as for other Unix
/// tools; any other write error is reported and exits 1.
macro_rules! outln {
    ($($t:tt)*) => {
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    };
}

/// `print!` counterpart of `outln!`.
macro_rules! out {
    ($($t:tt)*) => {
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    };
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    errln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench(a),
        Command::Eval(a) => eval(a),
    };
    if let Err(e) = result {
        errln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> Result<()> {
    let sampler = match a.temperature {
        None => SamplerConfig::Greedy,
        Some(temperature) => SamplerConfig::Temperature { temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
    };
    if !a.image.is_file() {
        anyhow::bail!("image {} does not exist or is not a file", a.image.display());
    }
    // An output the run could not write should fail now, not after the generation.
    if let Some(v) = &a.viz {
        let ext = v.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            anyhow::bail!("--viz {}: the file name must end in .png, .jpg or .jpeg", v.display());
        }
        check_output_file(v, "--viz")?;
    }
    if let Some(dir) = &a.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("creating --dump {}", dir.display()))?;
        check_writable_dir(dir, "--dump", dir)?;
        if dir.join("index.json").is_dir() {
            anyhow::bail!("--dump {}: its index.json is a directory", dir.display());
        }
    }
    let prune = a.prune.config(a.seed);
    let model = a.model.load()?;
    let m = model.manifest();
    // Fail on a bad method/budget before any model work.
    prune.resolve(m.vision.grid_h, m.vision.grid_w)?;
    let request = Request {
        image: ImageInput::Path(a.image.clone()),
        prompt: a.prompt.clone(),
        params: GenerationParams {
            max_new_tokens: a.max_tokens,
            sampler,
            prune: prune.clone(),
            record: a.dump.is_some() || a.viz.is_some(),
            ..GenerationParams::default()
        },
    };
    let mut generation = model.generate(&request).with_context(|| format!("processing {}", a.image.display()))?;
    if a.json {
        generation.run_to_end(|_| true)?;
        let out = generation.output();
        let json = serde_json::json!({
            "model": model.manifest().id,
            "text": out.text,
            "boxes": out.boxes,
            "tokens": out.tokens,
            "finish_reason": out.finish_reason,
            "image": { "width": out.resize.original_width, "height": out.resize.original_height },
            "stats": out.stats,
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        let mut io_error = None;
        generation.run_to_end(|text| match lock.write_all(text.as_bytes()).and_then(|_| lock.flush()) {
            Ok(()) => true,
            Err(e) => {
                io_error = Some(e);
                false
            }
        })?;
        if let Some(e) = io_error {
            stdout_failed(e);
        }
        if let Err(e) = writeln!(lock) {
            stdout_failed(e);
        }
        let out = generation.output();
        for b in &out.boxes {
            errln!("box (original pixels): [{:.1}, {:.1}, {:.1}, {:.1}]", b[0], b[1], b[2], b[3]);
        }
        let s = &out.stats;
        errln!(
            "nuwa: {} tokens | vision {:.1} ms | prefill {:.1} ms | ttft {:.1} ms | decode {:.2} ms/token | visual tokens {} -> {} | {}",
            s.generated_tokens,
            s.vision_ms,
            s.prefill_ms,
            s.ttft_ms,
            s.decode_ms_per_token,
            s.visual_tokens_in,
            s.visual_tokens_kept,
            s.provider
        );
    }
    write_artifacts(&a, &model, &generation, &prune)
}

fn write_artifacts(a: &RunArgs, model: &Model, generation: &nuwa::pipeline::Generation, prune: &PruneConfig) -> Result<()> {
    let Some(trace) = generation.trace() else { return Ok(()) };
    let out = generation.output();
    if let Some(dir) = &a.dump {
        let request = serde_json::json!({
            "model": model.manifest().id,
            "image": a.image.to_string_lossy(),
            "prompt": a.prompt,
            "prune": prune,
            "text": out.text,
            "boxes": out.boxes,
        });
        nuwa::dump::write_trace(dir, trace, request).with_context(|| format!("writing --dump {}", dir.display()))?;
        errln!("nuwa: wrote the request's tensors to {}", dir.display());
    }
    if let Some(path) = &a.viz {
        create_parent_dir(path, "--viz")?;
        let bytes = std::fs::read(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
        let original = nuwa::image::decode_image(&bytes, &nuwa::image::ImageLimits::default())?;
        nuwa::viz::render(&original, &out.resize, trace, model.manifest().vision.patch_size, &out.boxes, path)?;
        errln!("nuwa: wrote {}", path.display());
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let model = a.model.load()?;
    let m = model.manifest();
    let rt: &Runtime = model.runtime();
    let providers: Vec<String> = rt.available_providers().iter().map(|p| format!("{p:?}").to_lowercase()).collect();
    if a.json {
        let json = serde_json::json!({
            "manifest": m,
            "dir": m.dir,
            "onnxruntime": { "library": rt.library(), "build": rt.build_info(), "providers": providers },
            "provider": format!("{:?}", model.provider()).to_lowercase(),
        });
        outln!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let v = &m.vision;
    let d = &m.decoder;
    outln!("model        {} ({}) at {}", m.id, m.architecture, m.dir.display());
    outln!(
        "image        {}x{} {:?} {:?}, mean {:?} std {:?}",
        m.image.width, m.image.height, m.image.resize, m.image.interpolation, m.image.mean, m.image.std
    );
    outln!(
        "vision       {} ({} layers, width {}, patch {}, grid {}x{} = {} tokens, CLS {}, features layer {}, metric layer {}, similarity over last {})",
        v.file, v.num_layers, v.hidden_size, v.patch_size, v.grid_h, v.grid_w, v.num_tokens(), v.has_cls, v.feature_layer, v.metric_layer, v.similarity_layers
    );
    outln!("projector    {}", m.projector.file);
    outln!(
        "decoder      {} layers split at {} (head {}, tail {}), hidden {}, heads {}/{} kv, head dim {}, vocab {}, context {}",
        d.num_layers, d.split_layer, d.head.file, d.tail.file, d.hidden_size, d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.vocab_size, d.max_position_embeddings
    );
    outln!(
        "embeddings   {} [{} x {}] {:?} at offset {}{}",
        m.embeddings.file,
        m.embeddings.rows,
        m.embeddings.cols,
        m.embeddings.dtype,
        m.embeddings.offset,
        if d.tail.final_hidden.is_some() { ", also the tied lm_head (the tail outputs its final hidden state)" } else { "" }
    );
    outln!(
        "tokenizer    {} (bos {:?}, eos {:?}, image token {:?} = {})",
        m.tokenizer.file, m.tokenizer.bos_token_id, m.tokenizer.eos_token_ids, m.tokenizer.image_token, m.tokenizer.image_token_id
    );
    outln!("template     {:?} (add_bos {})", m.prompt.template, m.prompt.add_bos);
    let presets: Vec<String> = [64usize, 128, 192]
        .iter()
        .filter_map(|&b| {
            let cfg = PruneConfig { method: Method::Nuwa, amount: Amount::Budget(b), ..PruneConfig::default() };
            let r = cfg.resolve(v.grid_h, v.grid_w).ok()?;
            Some(format!("{b}: {} -> {}", r.stage1.unwrap_or(v.num_tokens()), r.stage2.or(r.stage1).unwrap_or(v.num_tokens())))
        })
        .collect();
    outln!("nuwa budgets {} (visual tokens after stage 1 -> after stage 2, of {})", presets.join(" | "), v.num_tokens());
    outln!("onnxruntime  {} ({})", rt.library().display(), rt.build_info());
    outln!("providers    available: {} | running: {:?}", providers.join(", "), model.provider());
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let model = a.model.load()?;
    let max = model.manifest().decoder.max_position_embeddings;
    let contexts = match a.contexts {
        Some(c) => c,
        None => {
            let mut c = vec![64.min(max.saturating_sub(a.steps)), 1024.min(max.saturating_sub(a.steps))];
            c.dedup();
            c
        }
    };
    // Every context is checked before any runs, so a bad one costs no measurement already made.
    for &context in &contexts {
        nuwa::bench::check_decode_bench(context, a.steps, max)?;
    }
    let mut rows = Vec::new();
    for &context in &contexts {
        // One untimed warm-up pass per context so allocation and kernel selection do not count.
        model.bench_decode(context, a.steps.min(2))?;
        let r = model.bench_decode(context, a.steps)?;
        if !a.json {
            outln!(
                "context {:>6}: decode median {:>8.3} ms/token (mean {:.3}, min {:.3}) over {} steps; prefill {:.1} ms; KV {:.1} KiB",
                r.context,
                r.median_ms_per_token,
                r.mean_ms_per_token,
                r.min_ms_per_token,
                r.steps,
                r.prefill_ms,
                r.kv_bytes as f64 / 1024.0
            );
        }
        rows.push(r);
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "model": model.manifest().id, "decode": rows }))?);
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    use nuwa::eval::{self, progress::Progress, ItemEvent, Table};
    // Recorded in the table; an argument that is not UTF-8 (a file name) is recorded lossily.
    let command = std::iter::once("nuwa".to_string())
        .chain(std::env::args_os().skip(1).map(|a| shell_quote(a.to_string_lossy().into_owned())))
        .collect::<Vec<_>>()
        .join(" ");
    let data = eval::Dataset::load(&a.data, a.limit).with_context(|| format!("reading --data {}", a.data.display()))?;
    // Outputs are checked before any model work: a sweep takes minutes to hours, and its table must not be lost
    // at the end to a path that could never be written, nor overwrite the data or each other.
    let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(out) = &a.out {
        let (md, json) = Table::paths(out)?;
        outputs.push(("--out", md));
        outputs.push(("--out", json));
    }
    if let Some(p) = &a.predictions {
        outputs.push(("--predictions", p.clone()));
    }
    for (i, (option, path)) in outputs.iter().enumerate() {
        if same_file(path, &a.data) {
            anyhow::bail!("{option} {} is the --data file: it would be overwritten", path.display());
        }
        if let Some((other, _)) = outputs[..i].iter().find(|(_, p)| same_file(p, path)) {
            anyhow::bail!("{option} {} is also written by {other}", path.display());
        }
        check_output_file(path, option)?;
    }
    let template = a.prune.config(a.seed);
    let settings = match &a.sweep {
        Some(spec) => eval::parse_sweep(spec, &template)?,
        None => vec![template],
    };
    let labels: Vec<String> = settings.iter().map(eval::label).collect();
    // The manifest alone names the model, so a predictions file of another model is refused before loading it.
    let manifest = nuwa::manifest::Manifest::load(&a.model.model)?;
    // Before --predictions is created (which empties it): a typo must not cost an earlier run's results.
    eval::check_settings(&manifest, &settings)?;
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let made = eval::predictions::Made {
        model: manifest.id.clone(),
        max_new_tokens: a.max_tokens,
        seed: settings.iter().any(PruneConfig::uses_seed).then_some(a.seed),
        vision_fp32: a.model.vision_fp32,
    };
    let mut resumed = eval::predictions::Resumed { items: vec![Vec::new(); settings.len()], complete_len: 0 };
    let mut predictions = match &a.predictions {
        Some(p) => {
            let file = if a.resume && p.is_file() {
                resumed = eval::predictions::read(p, &data, &labels, &made).context("--resume")?;
                let file = std::fs::OpenOptions::new().append(true).open(p).with_context(|| format!("opening --predictions {}", p.display()))?;
                // A line cut short when the earlier run was stopped goes; the rest is kept.
                file.set_len(resumed.complete_len).with_context(|| format!("truncating --predictions {}", p.display()))?;
                errln!("nuwa eval: resuming: {} of {} item runs already in {}", resumed.len(), data.items.len() * settings.len(), p.display());
                file
            } else {
                std::fs::File::create(p).with_context(|| format!("creating --predictions {}", p.display()))?
            };
            Some(std::io::BufWriter::new(file))
        }
        None => None,
    };
    let model = a.model.load()?;
    let mut progress = Progress::new(data.items.len() * settings.len() - resumed.len(), !a.quiet);
    progress.set_label(&if settings.len() > 1 { format!("{} settings", settings.len()) } else { labels[0].clone() });
    // Predictions are written as items are scored, so a sweep that is stopped keeps what it has done.
    let mut write_error = None;
    let sources: std::collections::HashMap<usize, &eval::EvalItem> = data.items.iter().map(|it| (it.line, it)).collect();
    let runs = eval::evaluate_sweep_from(&model, &data, &settings, a.max_tokens, resumed.items, |i, e| {
        progress.tick(matches!(e, ItemEvent::Failed(_)));
        if let (Some(w), ItemEvent::Scored(item), None) = (predictions.as_mut(), &e, &write_error) {
            let written = match sources.get(&item.line) {
                Some(source) => write_prediction(w, item, source, &labels[i], &made),
                None => Err(anyhow::anyhow!("a result for line {}, which the data does not hold", item.line)),
            };
            if let Err(err) = written {
                write_error = Some(err);
            }
        }
    })?;
    for (run, label) in runs.iter().zip(&labels) {
        if settings.len() > 1 {
            let s = eval::Summary::of(run);
            let acc = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.3}"));
            progress.println(&format!(
                "nuwa eval: {label}: grounding {} vqa {} ttft {}",
                acc(s.grounding_acc),
                acc(s.vqa_acc),
                s.mean_ttft_ms.map_or("n/a".to_string(), |t| format!("{t:.1} ms"))
            ));
        }
    }
    progress.finish();
    let table = Table::new(&model.manifest().id, &a.data, Some(command), a.max_tokens, data.items.len(), &runs);
    report_unreadable(&table);
    // Printed first: a failure to write --out (a full disk) does not cost the results.
    match (&a.sweep, table.rows.first()) {
        (None, Some(row)) if a.json => outln!("{}", serde_json::to_string_pretty(row)?),
        (None, Some(r)) => {
            let acc = |v: Option<f64>, c: usize, n: usize| v.map_or("n/a".to_string(), |x| format!("{x:.3} ({c}/{n})"));
            outln!(
                "{} on {}: {} | grounding Acc@0.5 {} | VQA {} | mean TTFT {} | visual tokens {} -> {} | unreadable {}",
                table.model,
                a.data.display(),
                r.label,
                acc(r.grounding_acc, r.grounding_correct, r.n_grounding),
                acc(r.vqa_acc, r.vqa_correct, r.n_vqa),
                r.mean_ttft_ms.map_or("n/a".to_string(), |t| format!("{t:.1} ms")),
                r.mean_visual_tokens_after_stage1.map_or("n/a".to_string(), |t| format!("{t:.1}")),
                r.mean_visual_tokens_kept.map_or("n/a".to_string(), |t| format!("{t:.1}")),
                r.unreadable
            );
        }
        _ if a.json => outln!("{}", serde_json::to_string_pretty(&table)?),
        _ => out!("{}", table.markdown()),
    }
    if let Some(out) = &a.out {
        let (md, json) = table.write(out)?;
        errln!("nuwa eval: wrote {} and {}", md.display(), json.display());
    }
    // The table is printed and written first: a failed predictions file (a full disk) does not cost the results.
    if let (Some(e), Some(p)) = (write_error, &a.predictions) {
        return Err(e.context(format!("writing --predictions {} (the table above is complete; the file is not)", p.display())));
    }
    // A run that scored nothing is a failure, not a table of n/a: say so in the exit status.
    if table.rows.iter().all(|r| r.n_grounding + r.n_vqa == 0) {
        anyhow::bail!("no item of {} could be scored (the unreadable lines and why are listed above)", a.data.display());
    }
    Ok(())
}

/// Fails now, before any model work, when `option`'s output file `path` could not be written at the end: its
/// directory is created if missing and must take a new file, `path` must not be a directory, and an existing file
/// must be writable.
fn check_output_file(path: &std::path::Path, option: &str) -> Result<()> {
    create_parent_dir(path, option)?;
    if path.is_dir() {
        anyhow::bail!("{option} {} is a directory", path.display());
    }
    if path.exists() {
        // An existing file is written in place (a pre-created results file, /dev/null): its directory need not
        // take new files.
        std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("{option} {} cannot be written", path.display()))?;
        return Ok(());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    check_writable_dir(dir, option, path)
}

/// Fails when no new file can be created in `dir` (for `option`'s output `path`).
fn check_writable_dir(dir: &std::path::Path, option: &str, path: &std::path::Path) -> Result<()> {
    let probe = dir.join(format!(".nuwa-write-check-{}", std::process::id()));
    std::fs::File::create(&probe).with_context(|| format!("{option} {}: cannot create files in {}", path.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether two paths name the same file: by canonical path where both exist, else by absolute path.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => matches!((std::path::absolute(a), std::path::absolute(b)), (Ok(x), Ok(y)) if x == y),
    }
}

/// Creates the directory an output file named by `option` goes into, if it is missing.
fn create_parent_dir(path: &std::path::Path, option: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the directory {} of {option} {}", dir.display(), path.display()))?;
    }
    Ok(())
}

/// Appends one scored item, with the label of its run, to the predictions file and flushes it.
fn write_prediction(
    w: &mut impl Write,
    item: &nuwa::eval::ItemResult,
    source: &nuwa::eval::EvalItem,
    run: &str,
    made: &nuwa::eval::predictions::Made,
) -> Result<()> {
    writeln!(w, "{}", nuwa::eval::predictions::line(item, source, run, made)?)?;
    w.flush()?;
    Ok(())
}

/// Quotes a command-line argument for a POSIX shell when it needs it (for the command recorded in a table).
fn shell_quote(arg: String) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Lists the lines that were not scored on stderr (dataset problems once; request failures per run).
fn report_unreadable(table: &nuwa::eval::Table) {
    const SHOWN: usize = 20;
    let mut seen = std::collections::BTreeMap::new();
    for row in &table.rows {
        for u in &row.unreadable_items {
            seen.entry((u.line, u.reason.clone())).or_insert_with(Vec::new).push(row.label.clone());
        }
    }
    if seen.is_empty() {
        return;
    }
    let lines: std::collections::BTreeSet<usize> = seen.keys().map(|(l, _)| *l).collect();
    errln!("nuwa eval: {} unreadable line(s) in {}, not scored:", lines.len(), table.data.display());
    let all = table.rows.len();
    for ((line, reason), runs) in seen.iter().take(SHOWN) {
        let which = if runs.len() == all { String::new() } else { format!(" (in {})", runs.join(", ")) };
        errln!("  line {line}: {reason}{which}");
    }
    if seen.len() > SHOWN {
        errln!("  ... and {} more (see unreadable_items in the JSON)", seen.len() - SHOWN);
    }
}
