//! `burnish generate`: sample a completion from a model for a prompt or a chat message.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

use models::checkpoint::{load_model, load_tokenizer};
use models::generate::{generate, SamplingParams};
use models::Message;

use crate::device::{dispatch, OnDevice};

#[derive(Parser, Clone)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// Raw text prompt (no chat template).
    #[arg(long, conflicts_with = "chat")]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Chat template: `auto` (the model's own) or a built-in name.
    #[arg(long, default_value = "auto")]
    pub template: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the completion contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt.is_none() && a.chat.is_none() {
        bail!("give either --prompt TEXT or --chat MESSAGE");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    let device = a.device.clone();
    dispatch(&device, a)
}

impl OnDevice for Args {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let (cfg, model) = load_model::<B>(&self.model, &device)?;
        let tok = load_tokenizer(&self.model, &cfg)?;
        let (text, add_special) = match (&self.prompt, &self.chat) {
            (Some(p), _) => (p.clone(), true),
            (None, Some(c)) => {
                let mut messages = vec![];
                if let Some(s) = &self.system {
                    messages.push(Message::new("system", s));
                }
                messages.push(Message::new("user", c));
                let t = tok.template(Some(&self.template))?;
                // The template writes BOS itself when the model expects it.
                (t.render(&messages, true, &tok.template_tokens())?, false)
            }
            (None, None) => unreachable!(),
        };
        let prompt = tok.encode(&text, add_special)?;
        let mut stop_ids = tok.stop_ids.clone();
        stop_ids.extend(cfg.eos_token_ids.iter().copied());
        let params = SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop_ids,
            pad_id: tok.pad_id.or(cfg.pad_token_id).unwrap_or(0),
            shape_multiple: models::backend::default_pad_multiple::<B>(&device),
        };
        let stops = self.stop.clone();
        let stop_fn = |_row: usize, ids: &[u32]| -> bool {
            !stops.is_empty()
                && tok
                    .decode(ids, true)
                    .map(|s| stops.iter().any(|x| s.contains(x.as_str())))
                    .unwrap_or(false)
        };
        let start = Instant::now();
        let out = generate(
            &model,
            std::slice::from_ref(&prompt),
            &params,
            Some(&stop_fn),
        )?;
        let secs = start.elapsed().as_secs_f64();
        let g = &out[0];
        let mut completion = tok.decode(&g.tokens, true)?;
        if let Some(cut) = stops
            .iter()
            .filter_map(|s| completion.find(s.as_str()))
            .min()
        {
            completion.truncate(cut);
        }
        println!("{completion}");
        eprintln!(
            "[{} prompt tokens, {} new tokens, finish: {:?}, {:.1} tokens/s]",
            prompt.len(),
            g.tokens.len(),
            g.finish,
            g.tokens.len() as f64 / secs.max(1e-9)
        );
        Ok(())
    }
}
