//! The Evol-Instruct loop: per seed row, `rounds` evolutions in sequence, each picked at
//! random (seeded, per row and round) among the configured operations. Output is
//! append-only JSONL, one line per finished (row, round), so a restarted run skips what is
//! done and an interrupted one loses nothing but the requests in flight.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::backend::{BackendError, ChatBackend, ChatRequest};
use super::eliminate::{parse_judgement, EliminationConfig, InfoGain, Reason};
use super::openai::OpenAiConfig;
use super::prompts::{Operation, Templates};
use crate::dedup::minhash::{fmix64, SplitMix};
use crate::records::{Record, Reject, Row, USER};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// An OpenAI-compatible HTTP server.
    #[default]
    Openai,
    /// The in-process burnish generator.
    Local,
}

fn default_max_new_tokens() -> usize {
    256
}
fn default_local_temperature() -> f32 {
    0.7
}
fn default_top_p() -> f32 {
    0.95
}
fn default_device() -> String {
    "cpu".into()
}

/// The local backend: a model folder run by burnish's own generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub model: Option<PathBuf>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_local_temperature")]
    pub temperature: f32,
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    #[serde(default = "default_device")]
    pub device: String,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            model: None,
            max_new_tokens: default_max_new_tokens(),
            temperature: default_local_temperature(),
            top_p: default_top_p(),
            device: default_device(),
        }
    }
}

fn default_rounds() -> usize {
    1
}
fn default_operations() -> Vec<Operation> {
    Operation::ALL.to_vec()
}
fn yes() -> bool {
    true
}

/// `[data.evolve]` of a recipe, and the options of `burnish data evolve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvolveConfig {
    #[serde(default = "default_rounds")]
    pub rounds: usize,
    /// Seed of the per-row, per-round choice of operation.
    #[serde(default)]
    pub seed: u64,
    /// Operations to pick from (uniformly): in-depth ones and `breadth`.
    #[serde(default = "default_operations")]
    pub operations: Vec<Operation>,
    /// A folder whose template files override the bundled ones.
    #[serde(default)]
    pub templates_dir: Option<PathBuf>,
    #[serde(default)]
    pub eliminate: EliminationConfig,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub openai: OpenAiConfig,
    #[serde(default)]
    pub local: LocalConfig,
    /// Append-only output (in `data prepare`: default under the cache dir).
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// In `data prepare`: train on the original rows too (as WizardLM does).
    #[serde(default = "yes")]
    pub keep_original: bool,
}

impl Default for EvolveConfig {
    fn default() -> Self {
        Self {
            rounds: default_rounds(),
            seed: 0,
            operations: default_operations(),
            templates_dir: None,
            eliminate: EliminationConfig::default(),
            backend: BackendKind::Openai,
            openai: OpenAiConfig::default(),
            local: LocalConfig::default(),
            out: None,
            keep_original: true,
        }
    }
}

impl EvolveConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rounds == 0 {
            bail!("evolve rounds must be at least 1");
        }
        if self.operations.is_empty() {
            bail!("evolve operations is empty: name at least one");
        }
        if self.backend == BackendKind::Local && self.local.model.is_none() {
            bail!("the local evolve backend needs local.model (a model folder)");
        }
        Ok(())
    }
}

/// An instruction to evolve, with the id its lineage starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub id: String,
    pub instruction: String,
}

/// Instructions from canonical rows: the first user message of a conversation or a prompt
/// task (preference pairs are not evolved). Returns the seeds and how many rows had none.
pub fn seeds_from_rows(rows: &[Row]) -> (Vec<Seed>, Vec<Reject>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for r in rows {
        let conv = match &r.record {
            Record::Conversation(c) => Some(c),
            Record::PromptTask(p) => Some(&p.prompt),
            Record::Preference(_) | Record::Unpaired(_) => None,
        };
        match conv.and_then(|c| c.messages.iter().find(|m| m.role == USER)) {
            Some(m) if !m.content.trim().is_empty() => out.push(Seed {
                id: r.origin.to_string(),
                instruction: m.content.clone(),
            }),
            _ => skipped.push(Reject {
                origin: r.origin.clone(),
                field: None,
                reason: "no user instruction to evolve".into(),
                raw: None,
            }),
        }
    }
    (out, skipped)
}

/// One line of the output: an evolved instruction with its answer, or an eliminated try.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    id: String,
    root_id: String,
    parent_id: String,
    round: usize,
    operation: Operation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instruction: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    messages: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvolveReport {
    pub seeds: usize,
    pub rounds: usize,
    pub backend: String,
    /// (row, round) steps already in the output from an earlier run, skipped.
    pub resumed_steps: usize,
    /// New evolved, answered rows written by this run.
    pub evolved: usize,
    pub by_operation: BTreeMap<String, usize>,
    /// Eliminated evolutions by reason (this run).
    pub eliminated: BTreeMap<String, usize>,
    /// Steps not finished because the backend failed (retried on the next run), by kind.
    pub failed: BTreeMap<String, usize>,
    pub judge_unclear: usize,
    pub requests: usize,
    pub interrupted: bool,
    pub out: PathBuf,
    pub eliminated_file: PathBuf,
    pub seconds: f64,
}

impl EvolveReport {
    pub fn summary(&self) -> String {
        let fmt = |m: &BTreeMap<String, usize>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        format!(
            "evolve   {} seeds x {} rounds via {}: {} evolved ({}), {} resumed\n\
             evolve   eliminated: {}\n\
             evolve   failed (retried next run): {}{}\n\
             evolve   {} requests in {:.1}s -> {}\n",
            self.seeds,
            self.rounds,
            self.backend,
            self.evolved,
            fmt(&self.by_operation),
            self.resumed_steps,
            fmt(&self.eliminated),
            fmt(&self.failed),
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            self.requests,
            self.seconds,
            self.out.display()
        )
    }
}

/// `evolved.jsonl` -> `evolved.eliminated.jsonl`.
pub fn eliminated_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "evolve".into());
    out.with_file_name(format!("{stem}.eliminated.jsonl"))
}

/// Per root id: (steps done, current instruction, id of the current instruction).
type Progress = HashMap<String, (usize, Option<(String, String)>)>;

fn load_progress(path: &Path, progress: &mut Progress) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(f)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let n = lines.len();
    for (i, text) in lines.iter().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let line: Line = match serde_json::from_str(text) {
            Ok(l) => l,
            // A line cut short by a kill at the very end is redone.
            Err(_) if i + 1 == n => continue,
            Err(e) => bail!(
                "{}:{}: not an evolve output line ({e}); resume needs the file this command wrote",
                path.display(),
                i + 1
            ),
        };
        let entry = progress.entry(line.root_id.clone()).or_insert((0, None));
        entry.0 = entry.0.max(line.round);
        if line.reason.is_none() {
            if let Some(instr) = line
                .messages
                .first()
                .and_then(|m| m.get("content"))
                .and_then(|c| c.as_str())
            {
                // Rounds of one row are written in order: the last success is the newest.
                entry.1 = Some((instr.to_string(), line.id.clone()));
            }
        }
    }
    Ok(())
}

/// Opens for appending, first ending a line cut short by an earlier kill.
fn open_append(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for appending", path.display()))?;
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
        }
    }
    Ok(f)
}

fn pick(cfg: &EvolveConfig, root: &str, round: usize) -> Operation {
    let h = fmix64(blake3_u64(root) ^ cfg.seed.wrapping_mul(0x9e3779b97f4a7c15) ^ round as u64);
    let mut rng = SplitMix(h);
    cfg.operations[(rng.next() % cfg.operations.len() as u64) as usize]
}

fn blake3_u64(s: &str) -> u64 {
    u64::from_le_bytes(
        blake3::hash(s.as_bytes()).as_bytes()[..8]
            .try_into()
            .expect("8"),
    )
}

struct Shared<'a> {
    cfg: &'a EvolveConfig,
    templates: Templates,
    backend: &'a dyn ChatBackend,
    stop: &'a AtomicBool,
    files: Mutex<(File, File)>,
    report: Mutex<EvolveReport>,
    requests: AtomicUsize,
    pb: ProgressBar,
}

impl Shared<'_> {
    fn call(&self, prompt: String) -> Result<String, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.backend.complete(&ChatRequest::user(prompt))
    }

    /// The Equal / Not Equal judgement: greedy and short.
    fn judge(&self, prompt: String) -> Result<String, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = ChatRequest::user(prompt);
        req.temperature = Some(0.0);
        req.max_tokens = Some(16);
        self.backend.complete(&req)
    }

    fn write(&self, line: &Line) -> Result<()> {
        let text = serde_json::to_string(line)? + "\n";
        let mut files = self.files.lock().expect("writer lock");
        let f = if line.reason.is_some() {
            &mut files.1
        } else {
            &mut files.0
        };
        // One write per line, flushed: a kill between lines loses nothing.
        f.write_all(text.as_bytes())?;
        f.flush()?;
        Ok(())
    }

    fn count(&self, f: impl FnOnce(&mut EvolveReport)) {
        f(&mut self.report.lock().expect("report lock"));
    }

    /// Runs the remaining rounds of one seed; returns early on a backend failure or stop.
    fn run_seed(&self, seed: &Seed, done: usize, current: Option<(String, String)>) -> Result<()> {
        let (mut instruction, mut parent) =
            current.unwrap_or_else(|| (seed.instruction.clone(), seed.id.clone()));
        for round in (done + 1)..=self.cfg.rounds {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let op = pick(self.cfg, &seed.id, round);
            // A backend failure ends this row for now; the next run retries the step.
            let fail = |e: BackendError| {
                self.count(|r| *r.failed.entry(e.kind()).or_default() += 1);
                Ok(())
            };
            let evolved = match self.call(self.templates.evolve_prompt(op, &instruction)) {
                Ok(t) => t.trim().to_string(),
                Err(e) => return fail(e),
            };
            let mut reason = self.cfg.eliminate.check_instruction(&instruction, &evolved);
            if reason.is_none() && self.cfg.eliminate.info_gain == InfoGain::Judge {
                if self.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                match self.judge(self.templates.judge_prompt(&instruction, &evolved)) {
                    Ok(reply) => match parse_judgement(&reply) {
                        Some(true) => reason = Some(Reason::NoInformationGain),
                        Some(false) => {}
                        None => self.count(|r| r.judge_unclear += 1),
                    },
                    Err(e) => return fail(e),
                }
            }
            let mut answer = None;
            if reason.is_none() {
                if self.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                match self.call(evolved.clone()) {
                    Ok(a) => {
                        let a = a.trim().to_string();
                        reason = self.cfg.eliminate.check_answer(&a);
                        answer = Some(a);
                    }
                    Err(e) => return fail(e),
                }
            }
            let id = format!("{}#r{round}", seed.id);
            match reason {
                Some(reason) => {
                    self.write(&Line {
                        id,
                        root_id: seed.id.clone(),
                        parent_id: parent.clone(),
                        round,
                        operation: op,
                        reason: Some(reason),
                        instruction: Some(evolved),
                        messages: vec![],
                    })?;
                    self.count(|r| *r.eliminated.entry(reason.name().into()).or_default() += 1);
                    // As in the paper, the previous instruction goes back into the pool.
                }
                None => {
                    let answer = answer.expect("answered");
                    self.write(&Line {
                        id: id.clone(),
                        root_id: seed.id.clone(),
                        parent_id: parent.clone(),
                        round,
                        operation: op,
                        reason: None,
                        instruction: None,
                        messages: vec![
                            serde_json::json!({"role": "user", "content": evolved}),
                            serde_json::json!({"role": "assistant", "content": answer}),
                        ],
                    })?;
                    self.count(|r| {
                        r.evolved += 1;
                        *r.by_operation.entry(op.name().into()).or_default() += 1;
                    });
                    instruction = evolved;
                    parent = id;
                }
            }
            self.pb.inc(1);
        }
        Ok(())
    }
}

/// Evolves `seeds`, appending to `out` (rows) and its `.eliminated.jsonl` sibling. Rows and
/// rounds already in those files are skipped. Setting `stop` (Ctrl-C) ends the run after the
/// requests in flight; everything finished is already on disk.
pub fn evolve(
    seeds: &[Seed],
    cfg: &EvolveConfig,
    backend: &dyn ChatBackend,
    out: &Path,
    stop: &AtomicBool,
) -> Result<EvolveReport> {
    cfg.validate()?;
    let start = Instant::now();
    let templates = Templates::load(cfg.templates_dir.as_deref())?;
    let elim_path = eliminated_path(out);
    let mut progress = Progress::new();
    load_progress(out, &mut progress)?;
    load_progress(&elim_path, &mut progress)?;
    let mut ids = std::collections::HashSet::new();
    for s in seeds {
        if !ids.insert(&s.id) {
            bail!(
                "two input rows share the id `{}`; ids must be unique to resume",
                s.id
            );
        }
    }
    let files = (open_append(out)?, open_append(&elim_path)?);
    let resumed: usize = seeds
        .iter()
        .map(|s| progress.get(&s.id).map_or(0, |p| p.0.min(cfg.rounds)))
        .sum();
    let total = seeds.len() * cfg.rounds;
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("evolve");
    pb.set_position(resumed as u64);
    let shared = Shared {
        cfg,
        templates,
        backend,
        stop,
        files: Mutex::new(files),
        report: Mutex::new(EvolveReport {
            seeds: seeds.len(),
            rounds: cfg.rounds,
            backend: backend.describe(),
            resumed_steps: resumed,
            out: out.to_path_buf(),
            eliminated_file: elim_path.clone(),
            ..Default::default()
        }),
        requests: AtomicUsize::new(0),
        pb,
    };
    let next = AtomicUsize::new(0);
    let workers = backend.concurrency().clamp(1, seeds.len().max(1));
    let errors: Mutex<Vec<anyhow::Error>> = Mutex::new(vec![]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(seed) = seeds.get(i) else { return };
                let (done, current) = progress.get(&seed.id).cloned().unwrap_or((0, None));
                if done >= cfg.rounds {
                    continue;
                }
                if let Err(e) = shared.run_seed(seed, done, current) {
                    errors.lock().expect("errors lock").push(e);
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
            });
        }
    });
    shared.pb.finish_and_clear();
    if let Some(e) = errors.into_inner().expect("errors").into_iter().next() {
        return Err(e.context(format!("writing {}", out.display())));
    }
    let mut report = shared.report.into_inner().expect("report");
    report.requests = shared.requests.load(Ordering::Relaxed);
    report.interrupted = stop.load(Ordering::SeqCst);
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes a deterministic evolution, judges "Not Equal", answers at length.
    struct Fake {
        calls: AtomicUsize,
        fail_every: usize,
    }

    impl ChatBackend for Fake {
        fn describe(&self) -> String {
            "fake".into()
        }
        fn concurrency(&self) -> usize {
            3
        }
        fn complete(&self, req: &ChatRequest) -> Result<String, BackendError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail_every > 0 && n.is_multiple_of(self.fail_every) {
                return Err(BackendError::Http {
                    status: 503,
                    body: "busy".into(),
                });
            }
            let p = &req.messages[0].content;
            if p.contains("#Evolved Instruction#") {
                let orig = p
                    .split("#Original Instruction#")
                    .nth(1)
                    .and_then(|s| s.split("#Evolved Instruction#").next())
                    .unwrap()
                    .trim();
                Ok(format!("{orig} Explain each step in detail."))
            } else if p.contains("Not Equal") {
                Ok("Not Equal".into())
            } else {
                Ok(format!("Here is a careful answer to: {p}"))
            }
        }
    }

    fn seeds() -> Vec<Seed> {
        (0..5)
            .map(|i| Seed {
                id: format!("s{i}"),
                instruction: format!("Compute {i} plus {i}."),
            })
            .collect()
    }

    #[test]
    fn runs_rounds_with_lineage_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("evolved.jsonl");
        let cfg = EvolveConfig {
            rounds: 2,
            ..Default::default()
        };
        let stop = AtomicBool::new(false);
        // Every 4th call fails: some steps are left for the next run.
        let flaky = Fake {
            calls: AtomicUsize::new(0),
            fail_every: 4,
        };
        let r1 = evolve(&seeds(), &cfg, &flaky, &out, &stop).unwrap();
        assert!(
            r1.failed.get("http_503").copied().unwrap_or(0) > 0,
            "{r1:?}"
        );
        let good = Fake {
            calls: AtomicUsize::new(0),
            fail_every: 0,
        };
        let r2 = evolve(&seeds(), &cfg, &good, &out, &stop).unwrap();
        assert_eq!(r2.resumed_steps, r1.evolved);
        assert_eq!(r1.evolved + r2.evolved, 10);
        let r3 = evolve(&seeds(), &cfg, &good, &out, &stop).unwrap();
        assert_eq!((r3.evolved, r3.requests, r3.resumed_steps), (0, 0, 10));

        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 10);
        for l in &lines {
            let round = l["round"].as_u64().unwrap();
            let root = l["root_id"].as_str().unwrap();
            let parent = l["parent_id"].as_str().unwrap();
            if round == 1 {
                assert_eq!(parent, root);
            } else {
                assert_eq!(parent, format!("{root}#r1"));
                // Round 2 evolves round 1's instruction.
                let c = l["messages"][0]["content"].as_str().unwrap();
                assert_eq!(c.matches("Explain each step").count(), 2, "{c}");
            }
            assert!(Operation::parse(l["operation"].as_str().unwrap()).is_ok());
        }
    }

    #[test]
    fn a_stop_flag_ends_the_run_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("e.jsonl");
        let stop = AtomicBool::new(true);
        let good = Fake {
            calls: AtomicUsize::new(0),
            fail_every: 0,
        };
        let r = evolve(&seeds(), &EvolveConfig::default(), &good, &out, &stop).unwrap();
        assert!(r.interrupted);
        assert_eq!(r.requests, 0);
    }

    #[test]
    fn operations_are_picked_per_row_and_round_deterministically() {
        let cfg = EvolveConfig::default();
        let a: Vec<Operation> = (1..=20).map(|r| pick(&cfg, "x", r)).collect();
        let b: Vec<Operation> = (1..=20).map(|r| pick(&cfg, "x", r)).collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() >= 4, "{a:?}");
    }
}
