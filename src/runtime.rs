//! ONNX Runtime bring-up: finding and loading the shared library once per process, choosing an execution provider
//! (CUDA / CoreML requested, CPU as the fallback that always works), and opening sessions whose declared inputs and
//! outputs are checked against the manifest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::environment::{Environment, GlobalThreadPoolOptions};
#[cfg(any(feature = "cuda", feature = "coreml"))]
use ort::ep::ExecutionProvider;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{Outlet, TensorElementType};

use crate::error::{Error, Result};

/// An execution provider a caller can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The CPU provider; always available.
    #[default]
    Cpu,
    /// NVIDIA CUDA (needs an ONNX Runtime build with CUDA and a GPU).
    Cuda,
    /// Apple CoreML (macOS / iOS builds of ONNX Runtime).
    CoreMl,
}

impl Provider {
    /// ONNX Runtime's name of the provider.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::CoreMl => "CoreMLExecutionProvider",
        }
    }
}

impl std::str::FromStr for Provider {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "coreml" => Ok(Provider::CoreMl),
            other => Err(Error::InvalidRequest(format!("unknown execution provider {other:?} (expected cpu, cuda or coreml)"))),
        }
    }
}

/// How sessions are created.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// The provider asked for; CPU is used when it cannot be had.
    pub provider: Provider,
    /// Intra-op threads (None: ONNX Runtime's default, one per core).
    pub intra_threads: Option<usize>,
}

/// The loaded ONNX Runtime library and its environment (one per process).
///
/// All sessions share one intra-op thread pool whose idle threads sleep instead of spinning: the four sessions of a
/// request run one after another, and on a device with few cores per-session pools that spin starve each other
/// (measured on 2 cores: int8 SmolLM2 decode 37 -> 22 ms/token without spinning, onnx/bench/README.md).
pub struct Runtime {
    env: Environment,
    library: PathBuf,
    threads: usize,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("library", &self.library).field("threads", &self.threads).finish()
    }
}

static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

const LIB_NAME: &str = if cfg!(target_os = "windows") {
    "onnxruntime.dll"
} else if cfg!(target_os = "macos") {
    "libonnxruntime.dylib"
} else {
    "libonnxruntime.so"
};

/// Where the library is looked for when no path is given: `ORT_DYLIB_PATH`, then beside the executable, then
/// `third_party/onnxruntime/` in the executable's ancestors (what `scripts/setup-ort.sh` installs).
pub fn find_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent();
    if let Some(d) = dir {
        let beside = d.join(LIB_NAME);
        if beside.is_file() {
            return Some(beside);
        }
    }
    while let Some(d) = dir {
        let candidate = d.join("third_party").join("onnxruntime").join(LIB_NAME);
        if candidate.is_file() {
            return Some(candidate);
        }
        dir = d.parent();
    }
    None
}

/// A load error with the dynamic loader's own reason (ort prints only "dlopen failed" and keeps `dlerror`'s text,
/// such as a missing dependency or a wrong ELF class, in the error's source).
fn load_error_text(e: &ort::LoadDynamicError) -> String {
    let mut text = e.to_string();
    if let ort::LoadDynamicError::Dlopen { error, .. } = e {
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
    }
    text
}

/// The most intra-op threads a pool may have. ONNX Runtime starts every thread of a pool up front; far above the
/// core count (100,000, a typo's worth) that takes minutes and gigabytes before anything runs.
pub const MAX_INTRA_THREADS: usize = 1024;

fn check_threads(threads: Option<usize>) -> Result<()> {
    match threads {
        Some(n) if n > MAX_INTRA_THREADS => Err(Error::InvalidRequest(format!(
            "{n} intra-op threads asked for: at most {MAX_INTRA_THREADS} (this machine has {} cores)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ))),
        _ => Ok(()),
    }
}

impl Runtime {
    /// Loads ONNX Runtime (once per process) from `library`, or from [`find_library`] when `None`, with a shared
    /// thread pool of `threads` intra-op threads (None: one per core). Later calls return the same runtime; one
    /// that names another library is refused (a process has one ONNX Runtime), not silently given the first.
    pub fn get(library: Option<&Path>, threads: Option<usize>) -> Result<Arc<Runtime>> {
        check_threads(threads)?;
        let loaded = |rt: &Arc<Runtime>| -> Result<Arc<Runtime>> {
            let same = |p: &Path| p.canonicalize().ok().zip(rt.library.canonicalize().ok()).is_some_and(|(a, b)| a == b);
            match library {
                Some(p) if !same(p) => Err(Error::Runtime(format!(
                    "ONNX Runtime is already loaded in this process from {}; {} cannot be loaded beside it",
                    rt.library.display(),
                    p.display()
                ))),
                _ => Ok(rt.clone()),
            }
        };
        if let Some(rt) = RUNTIME.get() {
            return loaded(rt);
        }
        let _guard = INIT_LOCK.lock().map_err(|_| Error::Runtime("initialisation lock poisoned".into()))?;
        if let Some(rt) = RUNTIME.get() {
            return loaded(rt);
        }
        let path = match library {
            Some(p) => p.to_path_buf(),
            None => find_library().ok_or_else(|| {
                Error::Runtime(format!(
                    "{LIB_NAME} not found: run scripts/setup-ort.sh (installs ONNX Runtime 1.31.1 from PyPI) or set ORT_DYLIB_PATH"
                ))
            })?,
        };
        if !path.is_file() {
            let what = if path.exists() { "is not a file" } else { "does not exist" };
            return Err(Error::Runtime(format!(
                "library {} {what}: run scripts/setup-ort.sh or point ORT_DYLIB_PATH at libonnxruntime",
                path.display()
            )));
        }
        let builder = ort::init_from(&path).map_err(|e| Error::Runtime(format!("cannot load {}: {}", path.display(), load_error_text(&e))))?;
        let threads = threads.filter(|&n| n > 0).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let rt_err = |e: ort::Error| Error::Runtime(format!("cannot create the environment: {e}"));
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(threads)
            .and_then(|p| p.with_spin_control(false))
            .map_err(rt_err)?;
        let env = builder.with_name("nuwa").with_global_thread_pool(pool).build().map_err(rt_err)?;
        let rt = Arc::new(Runtime { env, library: path, threads });
        let _ = RUNTIME.set(rt.clone());
        Ok(rt)
    }

    /// Intra-op threads of the shared pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The library file in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// ONNX Runtime's build description (version, commit).
    pub fn build_info(&self) -> String {
        ort::info().to_string()
    }

    /// Execution providers this ONNX Runtime build was compiled with.
    pub fn available_providers(&self) -> Vec<Provider> {
        #[cfg_attr(not(any(feature = "cuda", feature = "coreml")), allow(unused_mut))]
        let mut out = vec![Provider::Cpu];
        #[cfg(feature = "cuda")]
        if ort::ep::CUDA::is_available().unwrap_or(false) {
            out.push(Provider::Cuda);
        }
        #[cfg(feature = "coreml")]
        if ort::ep::CoreML::is_available().unwrap_or(false) {
            out.push(Provider::CoreMl);
        }
        out
    }

    // ort's builder error carries the builder back (144 bytes); it is turned into ours at once.
    #[allow(clippy::result_large_err)]
    fn builder(&self, options: &SessionOptions) -> Result<SessionBuilder> {
        check_threads(options.intra_threads)?;
        let b = Session::builder(&self.env).map_err(|e| Error::Runtime(e.to_string()))?;
        let b = b.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| Error::Runtime(e.to_string()))?;
        match options.intra_threads {
            // A thread count other than the shared pool's gets a pool of its own (also without spinning).
            Some(n) if n > 0 && n != self.threads => b
                .with_independent_thread_pool()
                .and_then(|b| b.with_intra_threads(n))
                .and_then(|b| b.with_intra_op_spinning(false))
                .map_err(|e| Error::Runtime(e.to_string())),
            _ => Ok(b),
        }
    }

    /// Opens the graph at `path` for `stage`, trying the requested provider and falling back to CPU.
    ///
    /// Returns the session and the provider that actually runs it, with a note when it is not the one asked for.
    pub fn open(&self, stage: &'static str, path: &Path, field: &str, options: &SessionOptions) -> Result<OpenedSession> {
        if !path.is_file() {
            return Err(Error::ModelFile {
                path: path.to_path_buf(),
                message: format!("not found (named by manifest field {field})"),
            });
        }
        let mut note = None;
        if options.provider != Provider::Cpu {
            match self.try_provider(options, path) {
                Ok(session) => return Ok(OpenedSession { session, stage, path: path.to_path_buf(), provider: options.provider, note }),
                Err(why) => {
                    note = Some(format!("{} requested but {why}; running on CPU", options.provider.ort_name()));
                }
            }
        }
        let session = self
            .builder(options)?
            .commit_from_file(path)
            .map_err(|e| Error::ModelFile { path: path.to_path_buf(), message: format!("ONNX Runtime cannot load it: {e}") })?;
        Ok(OpenedSession { session, stage, path: path.to_path_buf(), provider: Provider::Cpu, note })
    }

    /// A build with neither provider feature (a CPU-only binary) has nothing to try.
    #[cfg(not(any(feature = "cuda", feature = "coreml")))]
    fn try_provider(&self, options: &SessionOptions, _path: &Path) -> std::result::Result<Session, String> {
        Err(match options.provider {
            Provider::Cpu => "CPU needs no provider".into(),
            _ => "nuwa was built without that provider's feature".into(),
        })
    }

    #[cfg(any(feature = "cuda", feature = "coreml"))]
    fn try_provider(&self, options: &SessionOptions, path: &Path) -> std::result::Result<Session, String> {
        let dispatch = match options.provider {
            Provider::Cpu => return Err("CPU needs no provider".into()),
            #[cfg(feature = "cuda")]
            Provider::Cuda => {
                if !ort::ep::CUDA::is_available().unwrap_or(false) {
                    return Err("this ONNX Runtime build has no CUDA provider".into());
                }
                ort::ep::CUDA::default().build().error_on_failure()
            }
            #[cfg(feature = "coreml")]
            Provider::CoreMl => {
                if !ort::ep::CoreML::is_available().unwrap_or(false) {
                    return Err("this ONNX Runtime build has no CoreML provider".into());
                }
                ort::ep::CoreML::default().build().error_on_failure()
            }
            #[allow(unreachable_patterns)]
            _ => return Err("nuwa was built without that provider's feature".into()),
        };
        let b = self.builder(options).map_err(|e| e.to_string())?;
        let mut b = b.with_execution_providers([dispatch]).map_err(|e| format!("it failed to register: {e}"))?;
        b.commit_from_file(path).map_err(|e| format!("it failed to load the graph: {e}"))
    }
}

/// A session just opened, with what is needed to validate it.
pub struct OpenedSession {
    /// The session.
    pub session: Session,
    /// The pipeline stage it serves.
    pub stage: &'static str,
    /// The graph file.
    pub path: PathBuf,
    /// The provider that runs it.
    pub provider: Provider,
    /// Why the requested provider is not the one running, if so.
    pub note: Option<String>,
}

/// An expected tensor: its name, element type and dimensions (None = any; -1 in the graph = dynamic).
pub struct Expect<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Manifest field the name or dimension came from.
    pub field: &'a str,
    /// Element type.
    pub ty: TensorElementType,
    /// Dimensions.
    pub dims: Vec<Option<i64>>,
}

impl OpenedSession {
    fn err(&self, message: String) -> Error {
        Error::Manifest { path: self.path.clone(), message }
    }

    fn check(&self, outlets: &[Outlet], kind: &str, e: &Expect<'_>) -> Result<()> {
        let outlet = outlets.iter().find(|o| o.name() == e.name).ok_or_else(|| {
            let names: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
            self.err(format!("{} graph has no {kind} {:?} (manifest field {}); it has {names:?}", self.stage, e.name, e.field))
        })?;
        let ty = outlet.dtype().tensor_type();
        if ty != Some(e.ty) {
            return Err(self.err(format!("{} {kind} {:?} has type {ty:?}, expected {:?}", self.stage, e.name, e.ty)));
        }
        let shape: Vec<i64> = outlet.dtype().tensor_shape().map(|s| s.iter().copied().collect()).unwrap_or_default();
        if shape.len() != e.dims.len() {
            return Err(self.err(format!(
                "{} {kind} {:?} has rank {} (shape {shape:?}), expected rank {}",
                self.stage,
                e.name,
                shape.len(),
                e.dims.len()
            )));
        }
        for (axis, (&got, want)) in shape.iter().zip(&e.dims).enumerate() {
            if let Some(want) = want {
                if got >= 0 && got != *want {
                    return Err(self.err(format!(
                        "{} {kind} {:?} axis {axis} is {got} in the graph but the manifest ({}) says {want}",
                        self.stage, e.name, e.field
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that the graph declares these inputs and outputs with compatible types and dimensions.
    /// A graph input outside `inputs` is refused too: the runtime feeds exactly these, so every request would fail
    /// inside ONNX Runtime on the missing one.
    pub fn validate(&self, inputs: &[Expect<'_>], outputs: &[Expect<'_>]) -> Result<()> {
        for e in inputs {
            self.check(self.session.inputs(), "input", e)?;
        }
        if let Some(extra) = self.session.inputs().iter().find(|o| !inputs.iter().any(|e| e.name == o.name())) {
            let fed: Vec<&str> = inputs.iter().map(|e| e.name).collect();
            return Err(self.err(format!(
                "{} graph has an input {:?} that the runtime does not feed (it feeds {fed:?}): not an export of this manifest?",
                self.stage,
                extra.name()
            )));
        }
        for e in outputs {
            self.check(self.session.outputs(), "output", e)?;
        }
        Ok(())
    }
}
