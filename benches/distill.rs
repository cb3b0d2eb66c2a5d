//! Distillation benchmark: a `tiny` student (2.1M) learning from a `small` teacher (56M),
//! micro-batch 4 x 256 tokens, 2 threads, through the shared loop. Student training
//! tokens/s with the teacher run every step (full-vocabulary log-probs) versus its top-20
//! log-probs computed once and cached, plus what the cache costs and saves.
//!
//! Each mode runs in its own process so its peak RSS is its own.
//! Run: `cargo bench --bench distill` (BURNISH_BENCH_STEPS=N measured steps, default 3).

mod support;

use std::sync::atomic::AtomicBool;

use datasets::batch::Padding;
use models::backend::{Cpu, CpuTrain};
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::CausalLm;
use trainers::distill::{teacher_top_k, Distill, DistillSettings, TeacherSource};
use trainers::method::BatchShape;
use trainers::train_loop::run_loop;
use trainers::weights::WeightsFormat;

use support::{loop_config, mean_tokens_per_s, peak_rss_mb, rows, run_child};

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

const BATCH: usize = 4;
const SEQ: usize = 256;
const TOP_K: usize = 20;

fn run_mode(mode: &str, steps: usize) {
    let tokens = PresetTokens {
        bos: Some(1),
        eos: vec![2],
        pad: Some(0),
    };
    let vocab = 32064;
    let device = Default::default();
    let teacher_cfg = preset_config("small", "llama", vocab, &tokens).unwrap();
    let student_cfg = preset_config("tiny", "llama", vocab, &tokens).unwrap();
    let teacher =
        CausalLm::<Cpu>::from_source(&teacher_cfg, &mut RandomInit::new(1, 0.02), &device).unwrap();
    let student =
        CausalLm::<CpuTrain>::from_source(&student_cfg, &mut RandomInit::new(0, 0.02), &device)
            .unwrap();
    let total = steps + 1;
    let data = rows(BATCH * total, SEQ, vocab);
    let mut settings: DistillSettings = toml::from_str("teacher = \"unused\"").unwrap();
    let mut precompute_s = 0.0;
    let source = if mode == "cached" {
        settings.top_k = Some(TOP_K);
        let t0 = std::time::Instant::now();
        let train = teacher_top_k(&teacher, &data, BATCH, TOP_K, Padding::exact(0));
        precompute_s = t0.elapsed().as_secs_f64();
        TeacherSource::Cached {
            train,
            eval: vec![],
            k: TOP_K,
            model: None,
        }
    } else {
        TeacherSource::Online(Box::new(teacher))
    };
    let shape = BatchShape::exact(BATCH, BATCH, 0, 0);
    let mut method =
        Distill::<CpuTrain>::new(data, vec![], shape, vec![2], source, settings).unwrap();
    let work = tempfile::tempdir().unwrap();
    let cfg = loop_config(work.path(), total);
    std::fs::create_dir_all(&cfg.run_dir).unwrap();
    let weights = WeightsFormat::Full {
        cfg: Box::new(student_cfg),
        tokenizer_dir: work.path().to_path_buf(),
    };
    run_loop(
        student,
        &mut method,
        &cfg,
        &weights,
        None,
        &AtomicBool::new(false),
    )
    .unwrap();
    let (tps, measured) = mean_tokens_per_s(&cfg.run_dir);
    println!(
        "{{\"tokens_per_s\":{tps:.1},\"steps\":{measured},\"peak_rss_mb\":{:.1},\"precompute_s\":{precompute_s:.2}}}",
        peak_rss_mb()
    );
}

fn main() {
    trainers::allocator::tune_for_training();
    let steps: usize = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if let Ok(mode) = std::env::var("BURNISH_BENCH_MODE") {
        run_mode(&mode, steps);
        return;
    }
    println!(
        "teacher small (56M) -> student tiny (2.1M), micro-batch {BATCH} x {SEQ} tokens, 2 threads, \
         {steps} measured steps (+1 warm-up)"
    );
    let online = run_child("online", &[]);
    let cached = run_child("cached", &[]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    println!(
        "  online teacher (full vocabulary)  {:>7.1} tokens/s   peak RSS {:>6.0} MB",
        f(&online, "tokens_per_s"),
        f(&online, "peak_rss_mb")
    );
    println!(
        "  cached top-{TOP_K} teacher log-probs  {:>7.1} tokens/s   peak RSS {:>6.0} MB   (x{:.2} speed; one-off teacher pass {:.1} s for {} rows)",
        f(&cached, "tokens_per_s"),
        f(&cached, "peak_rss_mb"),
        f(&cached, "tokens_per_s") / f(&online, "tokens_per_s"),
        f(&cached, "precompute_s"),
        BATCH * (steps + 1)
    );
    let per_token_full = 32064.0 * 4.0;
    let per_token_topk = TOP_K as f64 * 8.0;
    println!(
        "  teacher targets per trained token: {:.0} KB full log-probs vs {:.0} B cached (ids + log-probs), x{:.0} smaller",
        per_token_full / 1024.0,
        per_token_topk,
        per_token_full / per_token_topk
    );
}
