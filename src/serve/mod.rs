//! `burnish serve`: an OpenAI-compatible HTTP server for the models burnish trains, with
//! continuous batching over a fixed set of sequence slots and several LoRA adapters served
//! over one base (chosen by the request's `model`).

mod api;
mod engine;
mod http;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkpoints::export::resolve_model_and_adapters;
use checkpoints::peft::{load_adapter, read_adapter_config};
use models::checkpoint::{load_model, load_tokenizer};
use models::CausalLm;

use crate::device::{dispatch, OnDevice};
use engine::{EngineConfig, Shared};
use http::App;

#[derive(Parser, Clone)]
pub struct Args {
    /// Model folder, run folder (its final/ export or newest checkpoint) or adapter folder
    /// (served over the base its adapter_config.json names).
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter (folder or run) to serve beside the base, as `NAME=PATH` or `PATH`
    /// (named after the folder); repeatable. Requests pick one with `"model": NAME`.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Name of the base model in requests and /v1/models (default: the --model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on the `listening on` line).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Sequences decoded together (sequence slots of the KV cache).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Tokens per sequence, prompt and completion (default: the model's
    /// max_position_embeddings, at most 2048).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Requests waiting for a slot before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Seconds a request may wait and run before it fails with 408.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// After Ctrl-C/SIGTERM, seconds requests in flight get to finish.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Environment variable holding the API key clients must send (unset: no key needed).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Chat template: `auto` (the model's own) or a built-in name.
    #[arg(long, default_value = "auto")]
    pub template: String,
}

pub fn run(a: Args) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    for (name, v) in [
        ("--request-timeout", a.request_timeout),
        ("--shutdown-grace", a.shutdown_grace),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be a non-negative number of seconds, got {v}");
        }
    }
    let device = a.device.clone();
    dispatch(&device, a)
}

/// The folder's own name, for a served model's id.
fn folder_name(p: &Path) -> String {
    let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// An `--adapter` value: `NAME=PATH` or `PATH`.
fn named_adapter(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            (name.to_string(), PathBuf::from(path))
        }
        _ => (folder_name(Path::new(spec)), PathBuf::from(spec)),
    }
}

struct Loaded<B: Backend> {
    base_dir: PathBuf,
    model: CausalLm<B>,
    names: Vec<String>,
}

/// The base model with every adapter in a LoRA bank, and the served names.
fn load_served<B: Backend>(a: &Args, device: &B::Device) -> Result<Loaded<B>> {
    let specs: Vec<(String, PathBuf)> = a.adapter.iter().map(|s| named_adapter(s)).collect();
    let paths: Vec<&Path> = specs.iter().map(|(_, p)| p.as_path()).collect();
    let (base_dir, dirs) = resolve_model_and_adapters(&a.model, &paths)?;
    // `--model` an adapter: it is served under its own name, the base under the base's.
    let model_is_adapter = dirs.len() > specs.len();
    let mut adapter_names: Vec<String> = specs.into_iter().map(|(n, _)| n).collect();
    if model_is_adapter {
        adapter_names.insert(0, folder_name(&a.model));
    }
    let adapters: Vec<(String, PathBuf)> = adapter_names.into_iter().zip(dirs).collect();
    let (_, base) = load_model::<B>(&base_dir, device)?;
    let base_name = a.served_model_name.clone().unwrap_or_else(|| {
        folder_name(if model_is_adapter {
            &base_dir
        } else {
            &a.model
        })
    });
    let mut names = vec![base_name];
    let mut loaded = Vec::new();
    for (name, dir) in &adapters {
        if names.contains(name) {
            bail!("two served models are named `{name}`; name adapters with --adapter NAME=PATH");
        }
        let cfg = read_adapter_config(dir)?;
        if cfg.reward_model {
            bail!(
                "{} is a reward model's adapter; serve causal LM adapters only",
                dir.display()
            );
        }
        let (m, _) = load_adapter(base.clone(), dir)
            .with_context(|| format!("loading adapter `{name}` from {}", dir.display()))?;
        loaded.push(m);
        names.push(name.clone());
    }
    let model = match loaded.is_empty() {
        true => base,
        false => base.with_lora_bank(&loaded)?,
    };
    Ok(Loaded {
        base_dir,
        model,
        names,
    })
}

impl OnDevice for Args {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let Loaded {
            base_dir,
            model,
            names,
        } = load_served::<B>(&self, &device)?;
        let cfg = models::checkpoint::load_config(&base_dir)?;
        let tok = load_tokenizer(&base_dir, &cfg)?;
        let template = tok.template(Some(&self.template))?;
        let capacity = self
            .max_model_len
            .unwrap_or(cfg.max_position_embeddings.min(2048));
        let shape_multiple = models::backend::default_pad_multiple::<B>(&device);
        if capacity < models::generate::bucket(1, shape_multiple) + 1 {
            bail!("--max-model-len {capacity} leaves no room for a prompt and an answer");
        }
        if capacity > cfg.max_position_embeddings {
            eprintln!(
                "warning: --max-model-len {capacity} is beyond the model's max_position_embeddings ({})",
                cfg.max_position_embeddings
            );
        }
        let api_key = match &self.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                _ => bail!("--api-key-env {var}: the variable is unset or empty"),
            },
        };
        let mut stop_ids = tok.stop_ids.clone();
        stop_ids.extend(cfg.eos_token_ids.iter().copied());
        let pad_id = tok.pad_id.or(cfg.pad_token_id).unwrap_or(0);
        let kv_bytes = 2
            * cfg.num_hidden_layers
            * self.max_batch
            * cfg.num_key_value_heads
            * cfg.head_dim
            * capacity
            * 4;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let tok = Arc::new(tok);
        let app = Arc::new(App {
            tok: tok.clone(),
            template,
            names: names.clone(),
            vocab: cfg.vocab_size,
            capacity,
            max_batch: self.max_batch,
            queue_limit: self.queue,
            max_body: self.max_body_bytes,
            timeout: Duration::from_secs_f64(self.request_timeout),
            api_key,
            stop_ids,
            pad_id,
            shape_multiple,
            jobs: Mutex::new(tx),
            shared: shared.clone(),
            created: http::now_secs(),
            ids: AtomicU64::new(0),
        });
        let engine_cfg = EngineConfig {
            slots: self.max_batch,
            capacity,
            pad_id,
            shape_multiple,
            grace: Duration::from_secs_f64(self.shutdown_grace),
        };
        let engine_shared = shared.clone();
        let engine = std::thread::Builder::new()
            .name("burnish-engine".into())
            .spawn(move || engine::run(model, tok, engine_cfg, rx, engine_shared))
            .context("cannot start the generation thread")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let addr = format!("{}:{}", self.host, self.port);
        let signalled = shared.clone();
        let served = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            eprintln!(
                "serving {} on {}: {} slots x {capacity} tokens (KV cache {:.0} MB), queue {}",
                names.join(", "),
                base_dir.display(),
                self.max_batch,
                kv_bytes as f64 / 1e6,
                self.queue
            );
            println!("listening on http://{local}/v1");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            axum::serve(listener, http::router(app))
                .with_graceful_shutdown(shutdown_signal(signalled))
                .await
                .context("the HTTP server failed")
        });
        shared.shutdown.store(true, Ordering::SeqCst);
        let _ = engine.join();
        served?;
        eprintln!("burnish serve: stopped");
        Ok(())
    }
}

/// Resolves on the first Ctrl-C or SIGTERM: new requests get 503, the ones in flight
/// finish (up to --shutdown-grace). A second signal exits at once.
async fn shutdown_signal(shared: Arc<Shared>) {
    wait_for_signal().await;
    eprintln!(
        "burnish serve: shutting down (finishing requests in flight; Ctrl-C again to quit now)"
    );
    shared.shutdown.store(true, Ordering::SeqCst);
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("burnish serve: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
