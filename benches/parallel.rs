//! Data-parallel scaling on CPU, full SFT of the `small` preset through the shared loop,
//! one global batch of 2 micro-batches of 4 x 256 tokens per step:
//! - `one`: one device accumulating both micro-batches;
//! - `threads`: two replicas in one process (burn-collective's local level), one each;
//! - `processes`: two processes on loopback (its global level: orchestrator, websockets),
//!   one replica each, as `burnish launch --nproc-per-node 2` runs them.
//!
//! Prints tokens/s of the global batch and the gradient all-reduce time per step (flatten,
//! all-reduce of all 56M gradients, waiting for the other replica included). On a 2-core
//! machine the replicas share the cores, so this measures the overhead of data
//! parallelism, not a speed-up. Each mode runs in its own process(es).
//! Run: `cargo bench --bench parallel` (BURNISH_BENCH_STEPS=N measured steps, default 2;
//! BURNISH_BENCH_PRESET=tiny for a quick run).

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use burn::tensor::backend::AutodiffBackend;
use models::backend::CpuTrain;
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::CausalLm;
use trainers::method::BatchShape;
use trainers::parallel::{run_replicas, ParallelOptions, Topology};
use trainers::sft::Sft;
use trainers::train_loop::{run_loop_on, LoopConfig};
use trainers::weights::WeightsFormat;

use support::{loop_config, mean_tokens_per_s, peak_rss_mb, rows, run_child};

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

const MICRO: usize = 4;
const SEQ: usize = 256;
const GLOBAL_MICRO_BATCHES: usize = 2;

static NO_STOP: AtomicBool = AtomicBool::new(false);

fn preset() -> String {
    std::env::var("BURNISH_BENCH_PRESET").unwrap_or_else(|_| "small".into())
}

fn model_and_weights<B: AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
) -> (CausalLm<B>, WeightsFormat) {
    let tokens = PresetTokens {
        bos: Some(1),
        eos: vec![2],
        pad: Some(0),
    };
    let cfg = preset_config(&preset(), "llama", 32064, &tokens).unwrap();
    let model = CausalLm::<B>::from_source(&cfg, &mut RandomInit::new(0, 0.02), device).unwrap();
    let weights = WeightsFormat::Full {
        cfg: Box::new(cfg),
        tokenizer_dir: dir.to_path_buf(),
    };
    (model, weights)
}

fn config(dir: &Path, steps: usize) -> LoopConfig {
    let mut cfg = loop_config(dir, steps + 1);
    cfg.micro_batches = GLOBAL_MICRO_BATCHES;
    std::fs::create_dir_all(&cfg.run_dir).unwrap();
    cfg
}

fn method(cfg: &LoopConfig) -> Sft {
    let n = MICRO * GLOBAL_MICRO_BATCHES * cfg.total_steps;
    Sft::new(
        rows(n, SEQ, 32064),
        vec![],
        BatchShape::exact(MICRO, MICRO, 0, 0),
    )
    .unwrap()
}

/// Train as this process's replicas (`devices` of them) of a job (`topology`), print rank
/// 0's figures.
fn replicas(steps: usize, dir: &Path, devices: usize, topology: Option<Topology>) {
    let cfg = config(dir, steps);
    let run_dir = cfg.run_dir.clone();
    let syncs = run_replicas::<CpuTrain, _, _>(
        vec![Default::default(); devices],
        topology,
        &ParallelOptions::default(),
        move |replica, device| {
            let (model, weights) = model_and_weights::<CpuTrain>(&cfg.run_dir, device);
            let mut m = method(&cfg);
            run_loop_on(
                model,
                &mut m,
                &cfg,
                &weights,
                None,
                &NO_STOP,
                Some(replica),
                None,
            )?;
            Ok((
                replica.rank,
                replica.gradient_sync_time.as_secs_f64() / replica.gradient_syncs.max(1) as f64,
            ))
        },
    )
    .unwrap();
    if let Some((0, sync_s)) = syncs.first().copied() {
        let (tps, measured) = mean_tokens_per_s(&run_dir);
        println!(
            "{{\"tokens_per_s\":{tps:.1},\"all_reduce_s\":{sync_s:.3},\"peak_rss_mb\":{:.0},\"steps\":{measured}}}",
            peak_rss_mb()
        );
    }
}

fn run_mode(mode: &str, steps: usize, dir: &Path) {
    match mode {
        "one" => {
            let cfg = config(dir, steps);
            let (model, weights) = model_and_weights::<CpuTrain>(dir, &Default::default());
            let mut m = method(&cfg);
            run_loop_on(model, &mut m, &cfg, &weights, None, &NO_STOP, None, None).unwrap();
            let (tps, measured) = mean_tokens_per_s(&cfg.run_dir);
            println!(
                "{{\"tokens_per_s\":{tps:.1},\"all_reduce_s\":0,\"peak_rss_mb\":{:.0},\"steps\":{measured}}}",
                peak_rss_mb()
            );
        }
        "threads" => replicas(steps, dir, 2, None),
        // One of the two processes (the environment says which).
        "process" => replicas(steps, dir, 1, Topology::from_env().unwrap()),
        // Start both processes; rank 0 prints.
        "processes" => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
                .min(60000);
            let exe = std::env::current_exe().unwrap();
            let children: Vec<_> = (0..2)
                .map(|rank| {
                    Command::new(&exe)
                        .env("BURNISH_BENCH_MODE", "process")
                        .env("RAYON_NUM_THREADS", "1")
                        .env("WORLD_SIZE", "2")
                        .env("RANK", rank.to_string())
                        .env("LOCAL_RANK", rank.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|c| c.wait_with_output().unwrap())
                .collect();
            for c in &children {
                print!("{}", String::from_utf8_lossy(&c.stdout));
                if !c.status.success() {
                    panic!("{}", String::from_utf8_lossy(&c.stderr));
                }
            }
        }
        other => panic!("unknown mode {other}"),
    }
}

fn main() {
    trainers::allocator::tune_for_training();
    let steps: usize = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    if let Ok(mode) = std::env::var("BURNISH_BENCH_MODE") {
        let dir = tempfile::tempdir().unwrap();
        run_mode(&mode, steps, dir.path());
        return;
    }
    println!(
        "{} preset, full SFT, global batch {GLOBAL_MICRO_BATCHES} x {MICRO} x {SEQ} tokens, 2 CPU threads in all, {steps} measured steps (+1 warm-up)",
        preset()
    );
    let mut base = None;
    for (mode, label) in [
        ("one", "1 device, 2 micro-batches accumulated"),
        ("threads", "2 replicas, threads of one process"),
        ("processes", "2 processes on loopback (1 thread each)"),
    ] {
        let v = run_child(mode, &[]);
        let tps = v["tokens_per_s"].as_f64().unwrap();
        let base = *base.get_or_insert(tps);
        println!(
            "{label:<42} {tps:>8.1} tokens/s (x{:.2})  all-reduce {:>6.3} s/step  peak RSS {} MB per process",
            tps / base,
            v["all_reduce_s"].as_f64().unwrap(),
            v["peak_rss_mb"]
        );
    }
}
