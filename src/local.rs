//! Backends that run a burnish model in process: the local chat backend of Evol-Instruct
//! (burnish's own sampler, `models::generate`) and the mean-pooled hidden-state embedder of
//! semantic dedup.

use anyhow::Result;
use burn::prelude::*;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use datasets::dedup::embed::normalize;
use datasets::dedup::Embedder;
use datasets::evolve::{BackendError, ChatBackend, ChatRequest};
use models::checkpoint::{load_model, load_tokenizer};
use models::generate::{generate, SamplingParams};
use models::{CausalLm, ChatTemplate, ForwardInput, TextTokenizer};

/// A model and its tokenizer, loaded once.
pub struct Loaded<B: Backend> {
    pub model: CausalLm<B>,
    pub tok: TextTokenizer,
    pub eos: Vec<u32>,
    pub pad: u32,
    pub name: String,
}

pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Loaded<B>> {
    let (cfg, model) = load_model::<B>(dir, device)?;
    let tok = load_tokenizer(dir, &cfg)?;
    let mut eos = tok.stop_ids.clone();
    eos.extend(cfg.eos_token_ids.iter().copied());
    let pad = tok.pad_id.or(cfg.pad_token_id).unwrap_or(0);
    Ok(Loaded {
        model,
        tok,
        eos,
        pad,
        name: dir.display().to_string(),
    })
}

/// Evol-Instruct's local backend: renders the chat template and samples with burnish's
/// generator. One request at a time (the model is behind a lock).
pub struct LocalChat<B: Backend> {
    inner: Mutex<CausalLm<B>>,
    tok: TextTokenizer,
    template: ChatTemplate,
    params: SamplingParams,
    calls: AtomicU64,
    name: String,
}

impl<B: Backend> LocalChat<B> {
    pub fn new(
        l: Loaded<B>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: f32,
        seed: u64,
    ) -> Result<Self> {
        let template = l.tok.template(None)?;
        let shape_multiple = models::backend::default_pad_multiple::<B>(&l.model.device());
        Ok(Self {
            inner: Mutex::new(l.model),
            tok: l.tok,
            template,
            params: SamplingParams {
                max_new_tokens,
                temperature,
                top_k: 0,
                top_p,
                seed,
                stop_ids: l.eos,
                pad_id: l.pad,
                shape_multiple,
            },
            calls: AtomicU64::new(0),
            name: l.name,
        })
    }
}

impl<B: Backend> ChatBackend for LocalChat<B> {
    fn describe(&self) -> String {
        format!("local:{}", self.name)
    }

    fn complete(&self, req: &ChatRequest) -> Result<String, BackendError> {
        let other = |e: anyhow::Error| BackendError::Other(format!("{e:#}"));
        let text = self
            .template
            .render(&req.messages, true, &self.tok.template_tokens())
            .map_err(other)?;
        let prompt = self.tok.encode(&text, false).map_err(other)?;
        let mut params = self.params.clone();
        if let Some(t) = req.temperature {
            params.temperature = t;
        }
        if let Some(m) = req.max_tokens {
            params.max_new_tokens = m;
        }
        // A different stream per call, reproducible for a given order of calls.
        params.seed = params
            .seed
            .wrapping_add(self.calls.fetch_add(1, Ordering::SeqCst));
        let model = self.inner.lock().expect("model lock");
        let out = generate(&*model, std::slice::from_ref(&prompt), &params, None).map_err(other)?;
        self.tok.decode(&out[0].tokens, true).map_err(other)
    }
}

/// Semantic dedup's model embedder: the mean of the final hidden states over a text's
/// tokens (after the last norm), L2-normalised. Texts are cut to `max_tokens`.
pub struct ModelEmbedder<B: Backend> {
    inner: Mutex<CausalLm<B>>,
    tok: TextTokenizer,
    max_tokens: usize,
    name: String,
}

impl<B: Backend> ModelEmbedder<B> {
    pub fn new(l: Loaded<B>, max_tokens: usize) -> Self {
        Self {
            inner: Mutex::new(l.model),
            tok: l.tok,
            max_tokens,
            name: l.name,
        }
    }
}

impl<B: Backend> Embedder for ModelEmbedder<B> {
    fn describe(&self) -> String {
        format!("model:{} (mean-pooled hidden states)", self.name)
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let model = self.inner.lock().expect("model lock");
        let device = model.device();
        let d = model.hidden_size();
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            let mut ids = self.tok.encode(t, true)?;
            ids.truncate(self.max_tokens);
            if ids.is_empty() {
                out.push(vec![0.0; d]);
                continue;
            }
            let h = model.hidden_states(ForwardInput::<B>::causal(&[ids], &device), None);
            let mean: Vec<f32> = h
                .mean_dim(1)
                .reshape([d])
                .into_data()
                .iter::<f32>()
                .collect();
            let mut v = mean;
            normalize(&mut v);
            out.push(v);
        }
        Ok(out)
    }
}
