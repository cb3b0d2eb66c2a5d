//! The decoding thread of `burnish serve`: continuous batching over a fixed set of sequence
//! slots ([`models::slots::SlotBatch`]). Requests wait in arrival order, join the running
//! batch as soon as their `n` slots are free, get one token per step with everyone else,
//! and leave as they finish, so a short request never waits for a long one to end.

use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use burn::tensor::backend::Backend;
use tokio::sync::mpsc::UnboundedSender;

use models::generate::{sample_token, FinishReason, SamplingParams};
use models::slots::SlotBatch;
use models::{CausalLm, TextTokenizer};

use super::api::ApiError;

/// One request as the engine runs it: `n` samples of one prompt.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Entry of the model's LoRA bank (0 = the base model).
    pub adapter: usize,
    pub n: usize,
    pub params: SamplingParams,
    /// Stop strings: the completion ends before the first one it contains.
    pub stops: Vec<String>,
    /// Send text as it is generated (else only the final text).
    pub stream: bool,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    /// New text of one choice (streaming only).
    Text {
        choice: usize,
        delta: String,
    },
    Done {
        choice: usize,
        text: String,
        finish: FinishReason,
        tokens: usize,
    },
    Failed(ApiError),
}

/// What the HTTP side and the engine share.
#[derive(Default)]
pub struct Shared {
    /// Requests accepted and not yet admitted to the batch (the bounded queue).
    pub waiting: AtomicUsize,
    pub shutdown: AtomicBool,
    /// Requests running in the batch (for `/health`).
    pub running: AtomicUsize,
}

pub struct EngineConfig {
    pub slots: usize,
    pub capacity: usize,
    pub pad_id: u32,
    /// Prompt widths and attention views round up to this (see `SamplingParams`).
    pub shape_multiple: usize,
    /// After a shutdown signal, requests in flight get this long to finish.
    pub grace: Duration,
}

struct Choice {
    slot: usize,
    tokens: Vec<u32>,
    /// Logits for the next token.
    logits: Vec<f32>,
    /// Text already streamed.
    sent: String,
    done: bool,
}

struct Running {
    job: Job,
    rng: StdRng,
    choices: Vec<Choice>,
}

fn shutting_down() -> ApiError {
    ApiError::status(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the server is shutting down",
    )
}

fn timed_out() -> ApiError {
    ApiError::status(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        "the request timed out (see burnish serve --request-timeout)",
    )
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("generation failed: {e:#}"),
    )
}

/// Runs until shutdown with nothing left in flight, or until every sender is gone.
pub fn run<B: Backend>(
    mut model: CausalLm<B>,
    tok: Arc<TextTokenizer>,
    cfg: EngineConfig,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
) {
    let fresh = |model: &CausalLm<B>| {
        SlotBatch::new(
            model,
            cfg.slots,
            cfg.capacity,
            cfg.pad_id,
            cfg.shape_multiple,
        )
    };
    let mut batch = fresh(&model);
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut shutdown_at: Option<Instant> = None;
    let dequeued = |n: usize| shared.waiting.fetch_sub(n, Ordering::SeqCst);
    loop {
        if running.is_empty() && pending.is_empty() {
            if shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            match jobs.recv_timeout(Duration::from_millis(50)) {
                Ok(j) => pending.push_back(j),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(j) = jobs.try_recv() {
            pending.push_back(j);
        }
        let now = Instant::now();
        if shared.shutdown.load(Ordering::SeqCst) {
            let since = *shutdown_at.get_or_insert(now);
            dequeued(pending.len());
            for j in pending.drain(..) {
                let _ = j.events.send(Event::Failed(shutting_down()));
            }
            if now >= since + cfg.grace {
                for r in running.drain(..) {
                    end(&mut batch, r, Some(shutting_down()));
                }
            }
        }
        pending.retain(|j| {
            let keep = !j.events.is_closed() && now < j.deadline;
            if !keep {
                dequeued(1);
                let _ = j.events.send(Event::Failed(timed_out()));
            }
            keep
        });
        // Cancelled (client gone) or out of time: free their slots.
        let (gone, kept): (Vec<_>, Vec<_>) = running
            .drain(..)
            .partition(|r| r.job.events.is_closed() || now >= r.job.deadline);
        running = kept;
        for r in gone {
            end(&mut batch, r, Some(timed_out()));
        }
        // First come, first served: a request needing more slots than are free holds
        // back the ones behind it rather than being starved by them.
        while let Some(n) = pending.front().map(|j| j.n) {
            let free = batch.free_slots();
            if free.len() < n {
                break;
            }
            let job = pending.pop_front().expect("front exists");
            dequeued(1);
            let slots = free[..n].to_vec();
            let admitted = guarded(|| batch.admit(&mut model, &job.prompt, &slots, job.adapter));
            match admitted {
                Ok(logits) => running.push(Running {
                    rng: StdRng::seed_from_u64(job.params.seed),
                    choices: slots
                        .into_iter()
                        .map(|slot| Choice {
                            slot,
                            tokens: vec![],
                            logits: logits.clone(),
                            sent: String::new(),
                            done: false,
                        })
                        .collect(),
                    job,
                }),
                Err(Fault::Refused(e)) => {
                    let _ = job.events.send(Event::Failed(internal(e)));
                }
                Err(Fault::Panicked(e)) => {
                    let _ = job.events.send(Event::Failed(internal(e)));
                    // The cache may be half written: fail what runs in it and start over.
                    for r in running.drain(..) {
                        end(
                            &mut batch,
                            r,
                            Some(internal(anyhow::anyhow!(
                                "the batch was reset after an internal error"
                            ))),
                        );
                    }
                    batch = fresh(&model);
                }
            }
        }
        shared.running.store(running.len(), Ordering::SeqCst);
        let mut feed = Vec::new();
        for r in running.iter_mut() {
            for ci in 0..r.choices.len() {
                if sample_next(r, ci, &tok) {
                    batch.release(r.choices[ci].slot);
                } else {
                    let c = &r.choices[ci];
                    feed.push((c.slot, *c.tokens.last().expect("sampled")));
                }
            }
        }
        running.retain(|r| r.choices.iter().any(|c| !c.done));
        if feed.is_empty() {
            continue;
        }
        match guarded(|| batch.step(&mut model, &feed)) {
            Ok(logits) => {
                // A slot holds one live choice: route each row of logits by its slot.
                for ((slot, _), row) in feed.iter().zip(logits) {
                    if let Some(c) = running
                        .iter_mut()
                        .flat_map(|r| r.choices.iter_mut())
                        .find(|c| !c.done && c.slot == *slot)
                    {
                        c.logits = row;
                    }
                }
            }
            Err(fault) => {
                let e = internal(fault.into_error());
                for r in running.drain(..) {
                    end(&mut batch, r, Some(e.clone()));
                }
                batch = fresh(&model);
            }
        }
    }
}

enum Fault {
    /// The call returned an error; the cache is as it was.
    Refused(anyhow::Error),
    /// The call panicked (a bug): the cache may be half written.
    Panicked(anyhow::Error),
}

impl Fault {
    fn into_error(self) -> anyhow::Error {
        match self {
            Fault::Refused(e) | Fault::Panicked(e) => e,
        }
    }
}

/// Run a model call so that a panic fails the requests involved instead of the server.
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, Fault> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Fault::Refused(e)),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(Fault::Panicked(anyhow::anyhow!("internal error: {msg}")))
        }
    }
}

/// Free a request's slots; tell its client why when it did not finish.
fn end<B: Backend>(batch: &mut SlotBatch<B>, r: Running, why: Option<ApiError>) {
    for c in &r.choices {
        if !c.done {
            batch.release(c.slot);
        }
    }
    if let Some(e) = why {
        let _ = r.job.events.send(Event::Failed(e));
    }
}

/// Sample choice `ci`'s next token, stream its text, and say whether it finished.
fn sample_next(r: &mut Running, ci: usize, tok: &TextTokenizer) -> bool {
    let job = &r.job;
    let c = &mut r.choices[ci];
    if c.done {
        return false;
    }
    let (t, _) = sample_token(&c.logits, &job.params, &mut r.rng);
    c.tokens.push(t);
    let mut finish = None;
    if job.params.stop_ids.contains(&t) {
        finish = Some(FinishReason::Eos);
    } else if c.tokens.len() >= job.params.max_new_tokens {
        finish = Some(FinishReason::Length);
    }
    let needs_text = job.stream || !job.stops.is_empty() || finish.is_some();
    if !needs_text {
        return false;
    }
    let text = tok.decode(&c.tokens, true).unwrap_or_default();
    let cut = job.stops.iter().filter_map(|s| text.find(s.as_str())).min();
    if cut.is_some() {
        finish = Some(FinishReason::StopString);
    }
    let text = match cut {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    let ready = match finish {
        Some(_) => text.as_str(),
        None => streamable(&text, &job.stops),
    };
    if job.stream && ready.len() > c.sent.len() && ready.starts_with(c.sent.as_str()) {
        let delta = ready[c.sent.len()..].to_string();
        c.sent = ready.to_string();
        let _ = job.events.send(Event::Text { choice: ci, delta });
    }
    match finish {
        Some(finish) => {
            c.done = true;
            let _ = job.events.send(Event::Done {
                choice: ci,
                text,
                finish,
                tokens: c.tokens.len(),
            });
            true
        }
        None => false,
    }
}

/// The part of a completion that is safe to stream: not a trailing incomplete character
/// (decoded as U+FFFD) nor a tail that may still grow into a stop string.
fn streamable<'a>(text: &'a str, stops: &[String]) -> &'a str {
    let text = text.trim_end_matches('\u{FFFD}');
    let mut keep = text.len();
    for s in stops {
        for (i, _) in text.char_indices().rev().take(s.chars().count()) {
            if s.starts_with(&text[i..]) {
                keep = keep.min(i);
            }
        }
    }
    &text[..keep]
}

#[cfg(test)]
mod tests {
    use super::streamable;

    #[test]
    fn held_back_text_is_what_may_become_a_stop_string_or_a_character() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(streamable("hello\nUs", &stops), "hello");
        assert_eq!(streamable("hello\nUx", &stops), "hello\nUx");
        assert_eq!(streamable("caf\u{FFFD}", &[]), "caf");
    }
}
